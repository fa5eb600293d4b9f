"""Fused influence-profile kernel: the block sums of |dS| / (1 - A), shaped like a FlashAttention backward.

Reference (the oracle, same math, same shapes): moa_search.profiler.reference.influence_reference.
The math is in DESIGN.md section 4 and that module's docstring.

    q, do:    [B, Hq, N, D]    k, v: [B, Hkv, N, D]  (GQA: K/V are read, never repeated)
    lse:      [B, Hq, N] float32, natural log-sum-exp of each row's scaled causal scores
    -> I:     [B, Hq, nb, nb] float32, nb = ceil(N / block_size); blocks above the diagonal are 0

One program per (query block, query head, batch) loops twice over the key blocks 0..bq,
recomputing X = exp(scale q k^T - lse) and dP = dO V^T one BLOCK x BLOCK tile at a time
in registers: pass 1 accumulates the row mass l_i = sum_j X_ij and sum_j X_ij dP_ij, so
A = X / l and D_i = sum_j A_ij dP_ij (float32; the reference says why rows are renormalised
and why D is not dO . O), pass 2 reduces |A (dP - D)| / max(1 - A, EPS) over each tile to one
number and stores it. Each program owns its row of I, so no atomics, and nothing of size
N x N ever exists. Cost: 4 tile matmuls per causal tile (a FlashAttention backward does 5).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from moa_search.profiler.reference import EPS  # same guard as the reference


@triton.jit
def _tile(q, do, k_base, v_base, s_kn, s_vn, bk, offs_m, m_ok, offs_d, d_ok, lse2, qk_scale, N,
          BLOCK: tl.constexpr, IEEE: tl.constexpr):
    """One BLOCK x BLOCK tile of key block bk: (X = exp(s - lse), dP = dO V^T, causal-and-in-range mask)."""
    offs_n = bk * BLOCK + tl.arange(0, BLOCK)
    n_ok = offs_n < N
    nd = n_ok[:, None] & d_ok[None, :]
    k = tl.load(k_base + offs_n[:, None] * s_kn + offs_d[None, :], mask=nd, other=0.0)
    v = tl.load(v_base + offs_n[:, None] * s_vn + offs_d[None, :], mask=nd, other=0.0)
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
        dp = tl.dot(do, tl.trans(v), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
        dp = tl.dot(do, tl.trans(v))
    valid = (offs_m[:, None] >= offs_n[None, :]) & m_ok[:, None] & n_ok[None, :]
    p = tl.where(valid, tl.exp2(s * qk_scale - lse2[:, None]), 0.0)
    return p, dp, valid


@triton.jit
def _influence_kernel(
    Q, K, V, DO, LSE, OUT,
    s_qb, s_qh, s_qn,
    s_kb, s_kh, s_kn,
    s_vb, s_vh, s_vn,
    s_db, s_dh, s_dn,
    s_lb, s_lh,
    s_ib, s_ih, s_iq,
    N, D, scale, eps,
    G: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
):
    bq = tl.num_programs(0) - 1 - tl.program_id(0)   # longest rows (most key blocks) start first
    h = tl.program_id(1)
    b = tl.program_id(2)
    kvh = h // G
    offs_m = bq * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < N
    d_ok = offs_d < D
    md = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qn + offs_d[None, :], mask=md, other=0.0)
    do = tl.load(DO + b * s_db + h * s_dh + offs_m[:, None] * s_dn + offs_d[None, :], mask=md, other=0.0)
    lse = tl.load(LSE + b * s_lb + h * s_lh + offs_m, mask=m_ok, other=0.0)
    log2e: tl.constexpr = 1.4426950408889634
    qk_scale = scale * log2e
    lse2 = lse * log2e
    k_base = K + b * s_kb + kvh * s_kh
    v_base = V + b * s_vb + kvh * s_vh
    out_row = OUT + b * s_ib + h * s_ih + bq * s_iq
    mass = tl.zeros([BLOCK], dtype=tl.float32)
    xdp = tl.zeros([BLOCK], dtype=tl.float32)
    for bk in range(0, bq + 1):                                                       # pass 1: l_i, D_i
        x, dp, valid = _tile(q, do, k_base, v_base, s_kn, s_vn, bk, offs_m, m_ok, offs_d, d_ok, lse2, qk_scale, N,
                             BLOCK, IEEE)
        mass += tl.sum(x, axis=1)
        xdp += tl.sum(x * dp, axis=1)
    inv_mass = 1.0 / tl.where(m_ok, mass, 1.0)
    delta = xdp * inv_mass
    for bk in range(0, bq + 1):                                                       # pass 2: tile sums
        x, dp, valid = _tile(q, do, k_base, v_base, s_kn, s_vn, bk, offs_m, m_ok, offs_d, d_ok, lse2, qk_scale, N,
                             BLOCK, IEEE)
        p = x * inv_mass[:, None]
        ds = p * (dp - delta[:, None])
        e = tl.where(valid, tl.abs(ds) / tl.maximum(1.0 - p, eps), 0.0)
        tl.store(out_row + bk, tl.sum(tl.sum(e, axis=1), axis=0))


def influence_triton(q, k, v, do, lse, scale: float, block_size: int = 64) -> torch.Tensor:
    """Launcher (see the module docstring for shapes). Returns float32 [B, Hq, nb, nb].

    block_size is the profile's block and the kernel's tile: a power of two in [16, 128].
    The last dimension of every input must be contiguous (as attention layouts are).
    """
    B, Hq, N, D = q.shape
    Hkv = k.shape[1]
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of KV heads ({Hkv})")
    bs = int(block_size)
    if bs < 16 or bs > 128 or bs & (bs - 1):
        raise ValueError(f"the fused influence kernel needs block_size a power of two in [16, 128], got {bs}; "
                         "use --backend reference for other block sizes")
    if D > 256:
        raise ValueError(f"head_dim {D} > 256 is not supported by the fused influence kernel")
    for name, t in (("q", q), ("k", k), ("v", v), ("do", do)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dimension")
    lse = lse.float()
    nb = -(-N // bs)
    out = torch.zeros(B, Hq, nb, nb, dtype=torch.float32, device=q.device)
    if N == 0:
        return out
    block_d = max(16, triton.next_power_of_2(D))
    _influence_kernel[(nb, Hq, B)](
        q, k, v, do, lse, out,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        lse.stride(0), lse.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        N, D, float(scale), EPS,
        G=Hq // Hkv, BLOCK=bs, BLOCK_D=block_d, IEEE=q.dtype == torch.float32,
        num_warps=4 if bs <= 64 else 8, num_stages=2,
    )
    return out
