"""CPU path for sink + window attention that only touches the keys a head keeps.

The reference (kernels/reference.py) scores every query against every key and masks:
exact, but O(N^2) per head whatever the plan's density, so a 4k-token evaluation of a
plan on a CPU costs ~20x a dense SDPA forward. Here each head and each chunk of query
rows gathers only its sink keys and the keys its window can reach, then scores that slice
with the exact token mask: the same kept set as moa_search.rules.kept, work proportional
to the plan's density. Same contract as every kernel (kernels/__init__.py).
The attention backend on the CPU (moa_search.attention, "cpu_window"); tested against the reference.
"""
from __future__ import annotations

import torch

from moa_search.rules import kept


def window_attention_cpu(q, k, v, sink: int, span, start=None, end=None, scale=None, chunk: int = 256):
    """q [B, Hq, Nq, D], k/v [B, Hkv, Nk, D], span int64 [B, Hq] -> out [B, Hq, Nq, D] (q's dtype).

    Queries are the last Nq of the Nk positions; keys outside [start, end) are padding and
    query rows outside it output zeros.
    """
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = D ** -0.5 if scale is None else scale
    start = [0] * B if start is None else [int(x) for x in start]
    end = [Nk] * B if end is None else [int(x) for x in end]
    span = span.to("cpu", torch.long)
    out = torch.zeros_like(q)
    first_row = Nk - Nq
    for b in range(B):
        s0, e0 = start[b], end[b]
        # query rows of this sequence that are real tokens, as positions from s0
        lo_row, hi_row = max(first_row, s0), e0            # absolute rows [lo_row, hi_row)
        if hi_row <= lo_row:
            continue
        for h in range(Hq):
            w = int(span[b, h])
            kb, vb = k[b, h // G, s0:e0].float(), v[b, h // G, s0:e0].float()
            for c0 in range(lo_row, hi_row, chunk):
                c1 = min(hi_row, c0 + chunk)
                r = torch.arange(c0 - s0, c1 - s0)            # relative positions of the rows
                lo = max(0, int(r[0]) - w + 1)                 # first key any row's window reaches
                ns = min(sink, lo)                             # sink keys left of that
                hi = int(r[-1]) + 1
                # sink keys [0, ns) lie left of every row's window and are kept by all rows;
                # keys [lo, hi) are kept where 0 <= row - key < w or key < sink (rules.kept)
                keys = torch.arange(lo, hi, dtype=torch.long)
                band = kept(r[:, None], keys[None, :], sink, w)
                qc = q[b, h, c0 - first_row:c1 - first_row].float()
                kk = torch.cat([kb[:ns], kb[lo:hi]])
                vv = torch.cat([vb[:ns], vb[lo:hi]])
                s = (qc @ kk.T) * scale
                s[:, ns:].masked_fill_(~band, float("-inf"))
                o = torch.softmax(s, dim=-1) @ vv
                out[b, h, c0 - first_row:c1 - first_row] = o.to(q.dtype)
    return out


__all__ = ["window_attention_cpu"]
