"""PyTorch reference of sparse sink + window attention (runs anywhere; the oracle for tests).

Chunked over query rows so that it never holds more than one [B, Hq, chunk, Nk] score
block: usable on the CPU at 16k+ tokens for small models.
"""
from __future__ import annotations

import torch

from moa_search.rules import kept


def kept_mask(sink: int, span: torch.Tensor, start: torch.Tensor, end: torch.Tensor,
              q_abs: torch.Tensor, nk: int) -> torch.Tensor:
    """Boolean [B, Hq, nq, nk] mask of the kept set for absolute query rows q_abs [nq]."""
    j = torch.arange(nk, device=span.device)
    st = start.view(-1, 1, 1, 1)
    k_pos = j.view(1, 1, 1, -1) - st                      # [B, 1, 1, Nk]
    q_pos = q_abs.view(1, 1, -1, 1) - st                  # [B, 1, nq, 1]
    real_k = (j.view(1, 1, 1, -1) >= st) & (j.view(1, 1, 1, -1) < end.view(-1, 1, 1, 1))
    real_q = (q_pos >= 0) & (q_abs.view(1, 1, -1, 1) < end.view(-1, 1, 1, 1))
    return kept(q_pos, k_pos, sink, span[:, :, None, None]) & real_k & real_q


def sparse_attention_reference(q, k, v, sink: int, span, start=None, end=None, scale=None,
                               chunk_elems: int = 1 << 26, return_lse: bool = False):
    """Exact masked softmax attention in float32 (see kernels/__init__ for the contract).

    Returns out [B, Hq, Nq, D] in q's dtype (and lse [B, Hq, Nq] float32 if return_lse).
    """
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    dev = q.device
    scale = D ** -0.5 if scale is None else scale
    start = torch.zeros(B, dtype=torch.long, device=dev) if start is None else start.to(dev, torch.long)
    end = torch.full((B,), Nk, dtype=torch.long, device=dev) if end is None else end.to(dev, torch.long)
    span = span.to(dev, torch.long)
    kf = k.float().unsqueeze(2)                            # [B, Hkv, 1, Nk, D]
    vf = v.float().unsqueeze(2)
    out = torch.empty(B, Hq, Nq, D, dtype=q.dtype, device=dev)
    lse = torch.empty(B, Hq, Nq, dtype=torch.float32, device=dev)
    rows = max(1, chunk_elems // max(1, B * Hq * Nk))
    for r0 in range(0, Nq, rows):
        r1 = min(Nq, r0 + rows)
        qc = q[:, :, r0:r1].float().view(B, Hkv, G, r1 - r0, D)
        s = (qc @ kf.transpose(-1, -2)) * scale               # [B, Hkv, G, n, Nk]
        q_abs = torch.arange(Nk - Nq + r0, Nk - Nq + r1, device=dev)
        m = kept_mask(sink, span, start, end, q_abs, Nk).view(B, Hkv, G, r1 - r0, Nk)
        s = s.masked_fill(~m, float("-inf"))
        row_lse = torch.logsumexp(s, dim=-1)                  # -inf where nothing is kept
        p = torch.exp(s - row_lse.unsqueeze(-1).clamp_min(-1e30))
        p = torch.where(m, p, torch.zeros((), device=dev))
        out[:, :, r0:r1] = (p @ vf).view(B, Hq, r1 - r0, D).to(q.dtype)
        lse[:, :, r0:r1] = row_lse.view(B, Hq, r1 - r0)
    return (out, lse) if return_lse else out
