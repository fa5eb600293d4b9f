"""Block-sparse Triton prefill kernel for per-head sink + window rules (forward only).

Contract: kernels/__init__.py (q [B,Hq,Nq,D], k/v [B,Hkv,Nk,D], queries = the last Nq of Nk
keys, per-sequence real keys start <= j < end, per-(sequence, head) span). The oracle is
kernels/reference.py:sparse_attention_reference; the kept set is moa_search.rules.kept.

One program per (batch, query head, query block of BLOCK_M rows). It visits only the key
blocks its head keeps:

    sink blocks      hold sink tokens and lie left of the window's first block
    window blocks    from the block holding (first row - span + 1) to the diagonal:
                     leading edge (masked) | interior (no mask at all) | diagonal/padding (masked)

A key block is "interior" when every (row, key) pair in it is kept for every real row of the
query block: the block is inside [start, end), left of the first row's diagonal and right of
the last row's window edge. Only edge blocks pay for the token mask, so a plan means exactly
the token-level set of `rules.kept` on this backend too. The masked blocks (sink, leading
edge, diagonal) run in one loop and the interior in a second: each loop is software-pipelined
on its own, so fewer loops means fewer pipeline fills per program.

Softmax is online (FlashAttention-2 style) in base 2, with fp32 accumulators. Inputs bf16,
fp16 (fp32 works, through tf32 dots on the GPU); head_dim a power of 2 >= 16 runs directly,
any other is zero-padded to one (a copy of q, k, v). On Hopper and newer, K/V blocks are
loaded through tensor descriptors (TMA bulk copies), elsewhere through pointers. Programs are
launched longest work first (last query blocks first, and inside a query block the heads with
the widest spans first) so that the heterogeneous spans of a plan do not leave a long tail.

A layer whose every head is dense does not come here: moa_search.attention sends it to SDPA.

On Hopper (sm_90), bf16/fp16 prefill runs kernels/prefill_hopper.py instead: the same visited
blocks and token masks, written in Gluon with a TMA producer warp and two consumer warpgroups
whose softmax overlaps their P V products. This file's kernel serves everything else (the CPU
interpreter, other GPUs, decode-shaped calls, fp32, pinned block shapes).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import prefill_hopper
# the visited blocks and token masks, shared with the Gluon kernel (re-exported for tests)
from .blocks import LOG2E, _block_start, _item_blocks, _key_blocks, _mask_kind, _sink_fits, _token_mask  # noqa: F401


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ----------------------------------------------------------------------------- kernel


@triton.jit
def _load_kv(k_base, v_base, skn, svn, n, Nk, KD, VD, b, kvh,
             D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, USE_TMA: tl.constexpr):
    """K and V of key block [n, n+BLOCK_N): [BLOCK_N, D] each; rows past Nk read as zeros."""
    cols = n + tl.arange(0, BLOCK_N)
    d = tl.arange(0, D)
    if USE_TMA:  # bulk tensor copies; rows past Nk come back as zeros
        k = KD.load([b, kvh, tl.cast(n, tl.int32), 0]).reshape(BLOCK_N, D)
        v = VD.load([b, kvh, tl.cast(n, tl.int32), 0]).reshape(BLOCK_N, D)
    elif MASKED:
        inb = cols < Nk
        k = tl.load(k_base + cols[:, None] * skn + d[None, :], mask=inb[:, None], other=0.0)
        v = tl.load(v_base + cols[:, None] * svn + d[None, :], mask=inb[:, None], other=0.0)
    else:
        k = tl.load(k_base + cols[:, None] * skn + d[None, :])
        v = tl.load(v_base + cols[:, None] * svn + d[None, :])
    return k, v


@triton.jit
def _scores(q, k, n, kind, st, en, s, sink, q_pos, BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    """Raw scores q k^T [ROWS, BLOCK_N]; on edge blocks (MASKED) dropped pairs are -inf
    (_token_mask of this `kind`).

    The scale is applied later, inside the exp2's FMA. q_pos: [ROWS] query positions counted
    from the sequence start (int32).
    """
    qk = tl.dot(q, tl.trans(k))
    if MASKED:
        qk = _token_mask(qk, kind, n + tl.arange(0, BLOCK_N) - st, q_pos, en - st, s, sink)
    return qk


@triton.jit
def _fold(acc, l_i, m_i, qk, v, qk_scale, MASKED: tl.constexpr):
    """Online-softmax step: fold scores qk [ROWS, BLOCK_N] and values v into (acc, l_i, m_i)."""
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    if MASKED:
        # a row with nothing kept so far keeps m = -inf; shift by 0 then so exp2 gives 0, not NaN
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new
    p = tl.exp2(qk * qk_scale - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, l_i, m_new


@triton.jit
def _visit(acc, l_i, m_i, q, q_pos, k_base, v_base, skn, svn, n, kind, st, en, s, sink, Nk, qk_scale, KD, VD, b, kvh,
           D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, USE_TMA: tl.constexpr):
    """Fold key block [n, n+BLOCK_N) into the running (acc, l_i, m_i) of one query block."""
    k, v = _load_kv(k_base, v_base, skn, svn, n, Nk, KD, VD, b, kvh, D, BLOCK_N, MASKED, USE_TMA)
    qk = _scores(q, k, n, kind, st, en, s, sink, q_pos, BLOCK_N, MASKED)
    return _fold(acc, l_i, m_i, qk, v, qk_scale, MASKED)


@triton.jit
def _prefill_fwd(Q, K, V, O, LSE, SPAN, START, END, ORDER, KD, VD,
                 qk_scale, sink, Nq, Nk, Hq, G, BH,
                 sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
                 N_BUCKET, M_BUCKET, W_BUCKET,
                 D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 WRITE_LSE: tl.constexpr, USE_TMA: tl.constexpr):
    # --- which work item: last query blocks first, widest heads first inside a block
    pid = tl.program_id(0)
    num_m = tl.cdiv(Nq, BLOCK_M)
    mb = num_m - 1 - pid // BH
    bh = tl.load(ORDER + pid % BH)
    b = bh // Hq
    h = bh % Hq
    kvh = h // G
    # positions fit in int32; 32-bit index math is cheaper in the masked blocks
    st = tl.load(START + b).to(tl.int32)
    en = tl.load(END + b).to(tl.int32)
    s = tl.load(SPAN + bh).to(tl.int32)  # the caller computed it once (rules.span: <= the length)

    off = Nk - Nq  # absolute index of query row 0
    rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    q_pos = off + rows - st
    d = tl.arange(0, D)
    q_base = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
    k_base = K + b.to(tl.int64) * skb + kvh.to(tl.int64) * skh
    v_base = V + b.to(tl.int64) * svb + kvh.to(tl.int64) * svh
    q = tl.load(q_base + rows[:, None] * sqn + d[None, :], mask=(rows < Nq)[:, None], other=0.0)

    # --- the key blocks this query block visits (absolute key indices)
    sink_lo, a, i_lo, i_hi, c_sink, c_edge, c_diag = _key_blocks(
        off + mb * BLOCK_M, off + mb * BLOCK_M + BLOCK_M - 1, st, en, s, sink, Nk, BLOCK_N)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    # Two software-pipelined loops: every masked block (sink | window edge | diagonal, in that
    # order of t), then the interior. Online softmax does not care about the visiting order,
    # and each extra loop would cost a pipeline fill and drain per program.
    c_all = c_edge + c_diag
    for t in range(0, c_all):
        n = tl.where(t < c_sink, sink_lo + t * BLOCK_N,
                     tl.where(t < c_edge, a + (t - c_sink) * BLOCK_N, i_hi + (t - c_edge) * BLOCK_N))
        kind = _mask_kind(t, n, c_sink, c_edge, 0, st, sink)  # no interior between: every block here is an edge
        acc, l_i, m_i = _visit(acc, l_i, m_i, q, q_pos, k_base, v_base, skn, svn, n, kind, st, en, s, sink, Nk,
                               qk_scale, KD, VD, b, kvh, D, BLOCK_N, True, USE_TMA)
    for n in range(i_lo, i_hi, BLOCK_N):
        acc, l_i, m_i = _visit(acc, l_i, m_i, q, q_pos, k_base, v_base, skn, svn, n, 0, st, en, s, sink, Nk, qk_scale,
                               KD, VD, b, kvh, D, BLOCK_N, False, USE_TMA)

    # --- padding rows and rows with nothing kept: zeros and lse -inf
    ok = (rows < Nq) & (q_pos >= 0) & (off + rows < en) & (l_i > 0)
    l_safe = tl.where(ok, l_i, 1.0)
    out = tl.where(ok[:, None], acc / l_safe[:, None], 0.0)
    o_base = O + b.to(tl.int64) * sob + h.to(tl.int64) * soh
    tl.store(o_base + rows[:, None] * son + d[None, :], out.to(O.dtype.element_ty), mask=(rows < Nq)[:, None])
    if WRITE_LSE:
        lse = tl.where(ok, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        tl.store(LSE + bh.to(tl.int64) * Nq + rows, lse, mask=rows < Nq)


# ----------------------------------------------------------------------------- tuning

def _smem_bytes(bm: int, bn: int, d: int, stages: int, elem: int = 2) -> int:
    """Q tile + `stages` buffers each of K and V (matches the compiled kernels' shared memory)."""
    return elem * d * (bm + 2 * bn * stages)


def _prune(configs, named_args, **kwargs):
    """Drop configs whose tiles cannot fit the shared memory of a Hopper SM (227 KB) at this D."""
    d = named_args["D"] if "D" in named_args else kwargs["D"]
    elem = named_args["Q"].element_size()
    kept = [c for c in configs
            if _smem_bytes(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], d, c.num_stages, elem) <= 200 * 1024]
    return kept or configs[-1:]


def _set_block_shapes(nargs):
    """Autotune pre-hook of the TMA variant: the descriptors' box follows the config's BLOCK_N."""
    for name in ("KD", "VD"):
        desc = nargs[name]
        if hasattr(desc, "block_shape"):
            desc.block_shape = [1, 1, nargs["BLOCK_N"], desc.block_shape[-1]]


def _configs(shapes, hook=None):
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st, pre_hook=hook)
            for bm, bn, w, st in shapes]


# (BLOCK_M, BLOCK_N, num_warps, num_stages). Kept small: every config costs a compile at first
# use. From a sweep on the H100 (BENCHMARKS.md, scripts/prefill_sweep.py): 128x64 with 8 warps
# and 3 stages wins on nearly every case; 4 warps per 128 rows or 1 CTA of 4 warps per SM lose.
_PREFILL_SHAPES = [(128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2), (64, 64, 4, 3)]
# decode-like calls (a handful of query rows): small query blocks, wide key blocks
_DECODE_SHAPES = [(16, 64, 4, 3), (16, 128, 4, 3), (16, 128, 8, 3)]
_KEY = ["D", "N_BUCKET", "M_BUCKET", "W_BUCKET"]  # the buckets: autotune keys only, unused in the kernel
# A layer whose mean window is under this fraction of N is tuned apart from wide ones.
NARROW = 0.2
_PRUNE = {"early_config_prune": _prune}
_TUNED = {
    (decode, tma): triton.autotune(_configs(_DECODE_SHAPES if decode else _PREFILL_SHAPES,
                                            _set_block_shapes if tma else None),
                                   key=_KEY, prune_configs_by=_PRUNE)(_prefill_fwd)
    for decode in (False, True) for tma in (False, True)
}


def _bucket(n: int) -> int:
    """Autotune key: the best block shape moves with the length (on the H100, narrow layers
    picked 64x64 at 16k and 128x64 at 32k)."""
    return 0 if n <= 1024 else 1 if n <= 4096 else 2 if n <= 16384 else 3


# ----------------------------------------------------------------------------- launcher


def _check(q, k, v, span, start, end):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"expected q [B,Hq,Nq,D], k/v [B,Hkv,Nk,D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, Hq, Nq, D = q.shape
    Bk, Hkv, Nk, Dk = k.shape
    if k.shape != v.shape or Bk != B or Dk != D:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must be [B={B}, Hkv, Nk, D={D}]")
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of KV heads ({Hkv})")
    if Nq > Nk:
        raise ValueError(f"queries ({Nq}) must be the last Nq of the Nk={Nk} keys")
    if tuple(span.shape) != (B, Hq):
        raise ValueError(f"span must be int64 [B={B}, Hq={Hq}], got {tuple(span.shape)}")
    for name, t in (("start", start), ("end", end)):
        if t is not None and tuple(t.shape) != (B,):
            raise ValueError(f"{name} must be int64 [B={B}], got {tuple(t.shape)}")


def _tma_ok(*tensors) -> bool:
    """Tensor descriptors need Hopper or newer, 16-byte aligned bases and strides."""
    t0 = tensors[0]
    if not t0.is_cuda or torch.cuda.get_device_capability(t0.device)[0] < 9:
        return False
    return all(t.data_ptr() % 16 == 0 and all(st * t.element_size() % 16 == 0 for st in t.stride()[:-1])
               for t in tensors)


def sparse_attention_prefill(q, k, v, sink: int, span, start=None, end=None, scale=None,
                             return_lse: bool = False, block_m: int | None = None, block_n: int | None = None,
                             num_warps: int = 4, num_stages: int = 2, out=None, lse_out=None,
                             sort_heads: bool = True, use_tma: bool | None = None, maxnreg: int | None = None,
                             width: float | None = None, use_gluon: bool | None = None, persistent: bool = True):
    """Sink + window attention with the Triton kernel, or on sm_90 the Gluon one (contract:
    kernels/__init__.py).

    q [B,Hq,Nq,D] (bf16/fp16/fp32), k/v [B,Hkv,Nk,D], span int64 [B,Hq], start/end int64 [B].
    Returns out [B,Hq,Nq,D] in q's dtype, and lse [B,Hq,Nq] float32 (natural log) if
    return_lse. block_m/block_n (with num_warps/num_stages/maxnreg) pin the block shape instead
    of autotuning (tests, interpreter, sweeps); maxnreg caps registers per thread, e.g. so that
    two programs share an SM.
    out / lse_out: optional preallocated results (contiguous [B,Hq,Nq,D] / fp32 [B,Hq,Nq]).
    sort_heads: launch the widest heads first (False: natural head order; for benchmarks). The
    Gluon kernel always runs heads in natural order (GQA groups side by side share K/V in L2).
    use_tma: load K/V blocks with tensor descriptors. None: wherever the GPU and the
    tensors' alignment allow it (Hopper+); False: pointers.
    width: the mean window / Nk, if the caller knows it on the host; for the Triton kernel,
    layers of narrow windows get their own autotuned block shape (64-row blocks waste less at
    the window edges). The Gluon kernel has one shape (narrower ones measured slower).
    use_gluon: run the warp-specialized Hopper kernel (kernels/prefill_hopper.py). None: on
    sm_90 for bf16/fp16 prefill (more than 16 query rows) with aligned q/k/v and no pinned block
    shape; False: always this file's Triton kernel. persistent: the Gluon kernel's schedule
    (one program per SM looping over work items, or one program per item).
    """
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    dev = q.device
    scale = D ** -0.5 if scale is None else float(scale)
    start = torch.zeros(B, dtype=torch.long, device=dev) if start is None else start.to(dev, torch.long)
    end = torch.full((B,), Nk, dtype=torch.long, device=dev) if end is None else end.to(dev, torch.long)
    span = span.to(dev, torch.long).contiguous()
    _check(q, k, v, span, start, end)

    d_pad = max(16, triton.next_power_of_2(D))
    if d_pad != D:
        # tl.arange needs a power of 2: zero columns change no score and give zero output columns
        pad = lambda t: torch.nn.functional.pad(t, (0, d_pad - D))  # noqa: E731
        res = sparse_attention_prefill(pad(q), pad(k), pad(v), sink, span, start, end, scale, return_lse=return_lse,
                                       block_m=block_m, block_n=block_n, num_warps=num_warps,
                                       num_stages=num_stages, lse_out=lse_out, sort_heads=sort_heads, use_tma=use_tma,
                                       maxnreg=maxnreg, width=width, use_gluon=use_gluon, persistent=persistent)
        o = (res[0] if return_lse else res)[..., :D]
        o = out.copy_(o) if out is not None else o.contiguous()
        return (o, res[1]) if return_lse else o

    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if out is None:
        out = torch.empty(B, Hq, Nq, D, dtype=q.dtype, device=dev)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} with unit last stride, got {tuple(out.shape)} {out.dtype}")
    if not return_lse:
        lse = out  # never written (WRITE_LSE=False); any pointer will do
    elif lse_out is None:
        lse = torch.empty(B, Hq, Nq, dtype=torch.float32, device=dev)
    elif tuple(lse_out.shape) != (B, Hq, Nq) or lse_out.dtype != torch.float32 or not lse_out.is_contiguous():
        raise ValueError(f"lse_out must be contiguous float32 {(B, Hq, Nq)}, got {tuple(lse_out.shape)} {lse_out.dtype}")
    else:
        lse = lse_out
    BH = B * Hq
    if use_gluon is None:
        use_gluon = block_m is None and Nq > 16 and not _interpreted() and prefill_hopper.supported(q, k, v)
    elif use_gluon and not prefill_hopper.supported(q, k, v):
        raise ValueError("use_gluon=True needs an sm_90 GPU, Triton's Gluon, bf16/fp16 q/k/v with head_dim "
                         f"in {sorted(prefill_hopper.CONFIG)} and 16-byte aligned bases and strides")
    if use_gluon:
        prefill_hopper.hopper_prefill(q, k, v, span, start, end, sink, scale, out, lse, return_lse,
                                      persistent=persistent)
        return (out, lse) if return_lse else out
    # widest heads first: their programs are the long ones (stable: GQA groups stay together)
    if sort_heads:
        order = torch.argsort(span.flatten(), descending=True, stable=True).to(torch.int32)
    else:
        order = torch.arange(BH, dtype=torch.int32, device=dev)
    if use_tma is None:
        use_tma = not _interpreted() and _tma_ok(k, v)
    elif use_tma and not _interpreted() and not _tma_ok(k, v):  # the interpreter emulates descriptors anywhere
        raise ValueError("use_tma=True needs a Hopper+ GPU and 16-byte aligned K/V (bases and strides)")
    if use_tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        bn0 = block_n or block_m or 64
        kd, vd = (TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, bn0, D]) for t in (k, v))
    else:
        kd, vd = k, v  # unused placeholders
    args = (q, k, v, out, lse, span, start, end, order, kd, vd,
            scale * LOG2E, int(sink), Nq, Nk, Hq, Hq // Hkv, BH,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
            _bucket(Nk), int(Nq <= 16), int(width is not None and width < NARROW))
    grid = lambda meta: (triton.cdiv(Nq, meta["BLOCK_M"]) * BH,)  # noqa: E731
    if block_m is None and _interpreted():
        block_m, block_n = 32, 32
    if block_m is not None:
        _launch(_prefill_fwd, grid, args, dict(D=D, BLOCK_M=block_m, BLOCK_N=block_n or block_m, WRITE_LSE=return_lse,
                                               USE_TMA=use_tma, num_warps=num_warps, num_stages=num_stages,
                                               **({} if maxnreg is None else {"maxnreg": maxnreg})))
    else:
        _launch(_TUNED[(Nq <= 16, bool(use_tma))], grid, args, dict(D=D, WRITE_LSE=return_lse, USE_TMA=use_tma))
    return (out, lse) if return_lse else out


def _launch(kernel, grid, args, meta) -> None:
    """The one launch of this file's kernel (a seam: tests wrap it to count launches)."""
    kernel[grid](*args, **meta)


def prefill_backend(q, k, v, sink, span, start, end, scale, width=None):
    """The "triton" backend of moa_search.attention (the reference's signature + the width hint)."""
    return sparse_attention_prefill(q, k, v, sink, span, start, end, scale, width=width)


__all__ = ["sparse_attention_prefill", "prefill_backend"]
