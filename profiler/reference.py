"""PyTorch reference of the influence profile and of dense causal attention (forward + backward).

Runs anywhere (CPU included); it is the oracle the fused Triton kernel
(moa_search.kernels.influence) is tested against, and the CPU path of `moa profile`.

Math (DESIGN.md section 4), per head, S = scale * Q K^T + causal mask, A = softmax(S),
O = A V, dO = dL/dO, dP = dO V^T:

    D_i   = sum_j A_ij dP_ij                       (= dO_i . O_i in exact arithmetic)
    dS_ij = A_ij (dP_ij - D_i)                     (the gradient of L w.r.t. the score S_ij)
    E_ij  = |dS_ij| / max(1 - A_ij, EPS)           (first-order loss change of dropping (i, j))
    I[bq, bk] = sum of E_ij over the causal (i, j) with i // block = bq, j // block = bk

Three numerical choices, all shared with the fused kernel:
- A is renormalised from the scores it is recomputed from (A = X / sum_j X_ij with
  X = exp(S - lse)), so the given lse only stabilises the exponent. An lse that another
  kernel computed (the flash forward) carries other rounding than these scores; left as is,
  a row's mass would be off 1 by ~1e-6 and the 1 / max(1 - A, EPS) factor would amplify that
  10^4 times (a single-key row would get E = |dP| * 1e-2 instead of 0).
- D_i is recomputed from A and dP in the accumulation dtype rather than taken from the
  stored O: in bf16, O's rounding error (~4e-3 relative) would otherwise enter dS and be
  divided by a small 1 - A in peaked rows.
- EPS = 1e-4. 1 - A_ij is known only to ~1e-6 in float32 (A = exp(s - lse) inherits the
  rounding of s and lse), so entries with 1 - A below ~1e-5 are ill-conditioned; the clamp
  makes E ramp smoothly to 0 as A_ij -> 1 (exactly 0 when a row has a single key, which no
  rule can drop anyway). It underestimates only entries holding more than 99.99% of a
  row's mass; sink tokens, the usual case, are kept by every rule.

Shapes: q, o, do [B, Hq, N, D]; k, v [B, Hkv, N, D] (GQA: query head h reads KV head
h // (Hq / Hkv); K and V are never repeated); lse [B, Hq, N] natural-log log-sum-exp of
the scaled scores of each row. Accumulation is float32 (float64 when the inputs are).
"""
from __future__ import annotations

import torch

from moa_search.rules import block_count

EPS = 1e-4


def acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _rows(n: int, per_row: int, chunk_elems: int, multiple: int = 1) -> int:
    """Rows per chunk so that a chunk holds at most ~chunk_elems elements (a multiple of `multiple`)."""
    rows = max(1, chunk_elems // max(1, per_row))
    rows = max(multiple, rows // multiple * multiple)
    return min(rows, block_count(n, multiple) * multiple)


def dense_forward(q, k, v, scale: float, chunk_elems: int = 1 << 24):
    """Causal attention, chunked over query rows. -> (o [B,Hq,N,D] in q's dtype, lse [B,Hq,N] acc dtype)."""
    B, Hq, N, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    acc = acc_dtype(q)
    kf, vf = k.to(acc).unsqueeze(2), v.to(acc).unsqueeze(2)        # [B, Hkv, 1, N, D]
    o = torch.empty_like(q)
    lse = torch.empty(B, Hq, N, dtype=acc, device=q.device)
    rows = _rows(N, B * Hq * N, chunk_elems)
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        n = r1 - r0
        qc = q[:, :, r0:r1].to(acc).reshape(B, Hkv, G, n, D)
        s = (qc @ kf[..., :r1, :].transpose(-1, -2)) * scale          # [B, Hkv, G, n, r1]
        causal = torch.arange(r0, r1, device=q.device)[:, None] >= torch.arange(r1, device=q.device)[None, :]
        s = s.masked_fill(~causal, float("-inf"))
        row_lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - row_lse.unsqueeze(-1))
        o[:, :, r0:r1] = (p @ vf[..., :r1, :]).reshape(B, Hq, n, D).to(q.dtype)
        lse[:, :, r0:r1] = row_lse.reshape(B, Hq, n)
    return o, lse


def dense_backward(do, q, k, v, o, lse, scale: float, chunk_elems: int = 1 << 24):
    """Gradients of dense causal attention from the saved (q, k, v, o, lse). -> (dq, dk, dv) in input dtypes."""
    B, Hq, N, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    acc = acc_dtype(q)
    kf, vf = k.to(acc).unsqueeze(2), v.to(acc).unsqueeze(2)
    delta = (do.to(acc) * o.to(acc)).sum(-1)                          # [B, Hq, N]
    dq = torch.empty(B, Hq, N, D, dtype=acc, device=q.device)
    dk = torch.zeros(B, Hkv, N, D, dtype=acc, device=q.device)
    dv = torch.zeros(B, Hkv, N, D, dtype=acc, device=q.device)
    rows = _rows(N, B * Hq * N, chunk_elems)
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        n = r1 - r0
        qc = q[:, :, r0:r1].to(acc).reshape(B, Hkv, G, n, D)
        doc = do[:, :, r0:r1].to(acc).reshape(B, Hkv, G, n, D)
        s = (qc @ kf[..., :r1, :].transpose(-1, -2)) * scale
        causal = torch.arange(r0, r1, device=q.device)[:, None] >= torch.arange(r1, device=q.device)[None, :]
        p = torch.exp(s - lse[:, :, r0:r1].reshape(B, Hkv, G, n, 1)).masked_fill(~causal, 0.0)
        dp = doc @ vf[..., :r1, :].transpose(-1, -2)
        ds = p * (dp - delta[:, :, r0:r1].reshape(B, Hkv, G, n, 1))
        dq[:, :, r0:r1] = (ds @ kf[..., :r1, :]).reshape(B, Hq, n, D) * scale
        dk[:, :, :r1] += (ds.transpose(-1, -2) @ qc).sum(2) * scale
        dv[:, :, :r1] += (p.transpose(-1, -2) @ doc).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def influence_reference(q, k, v, do, lse, scale: float, block_size: int = 64,
                        chunk_elems: int = 1 << 24) -> torch.Tensor:
    """Block-summed influence I [B, Hq, nb, nb] (acc dtype), nb = ceil(N / block_size).

    One query head at a time, chunked over query blocks: never more than one
    [chunk, N] score matrix of one head in memory. Blocks above the diagonal are 0.
    """
    B, Hq, N, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    bs = int(block_size)
    nb = block_count(N, bs)
    acc = acc_dtype(q)
    out = torch.zeros(B, Hq, nb, nb, dtype=acc, device=q.device)
    rows = _rows(N, N, chunk_elems, multiple=bs)                       # whole query blocks per chunk
    for b in range(B):
        for h in range(Hq):
            kv = h // G
            kh, vh = k[b, kv].to(acc), v[b, kv].to(acc)
            for r0 in range(0, N, rows):
                r1 = min(N, r0 + rows)
                s = (q[b, h, r0:r1].to(acc) @ kh[:r1].T) * scale        # [n, r1]
                causal = torch.arange(r0, r1, device=q.device)[:, None] >= torch.arange(r1, device=q.device)[None, :]
                p = torch.exp(s - lse[b, h, r0:r1, None].to(acc)).masked_fill(~causal, 0.0)
                p = p / p.sum(-1, keepdim=True)                            # see the module docstring
                dp = do[b, h, r0:r1].to(acc) @ vh[:r1].T
                ds = p * (dp - (p * dp).sum(-1, keepdim=True))            # the chunk holds whole causal rows
                e = (ds.abs() / (1.0 - p).clamp_min(EPS)).masked_fill(~causal, 0.0)
                tile = block_sum(e, bs, nb)                                # [ceil(n/bs), nb]
                out[b, h, r0 // bs: r0 // bs + tile.shape[0]] = tile
    return out


def block_sum(e: torch.Tensor, bs: int, nb_cols: int) -> torch.Tensor:
    """[n, m] -> [ceil(n/bs), nb_cols]: sums over bs x bs tiles (zero-padded at the tails)."""
    n, m = e.shape
    nbr = block_count(n, bs)
    padded = torch.nn.functional.pad(e, (0, nb_cols * bs - m, 0, nbr * bs - n))
    return padded.view(nbr, bs, nb_cols, bs).sum(dim=(1, 3))
