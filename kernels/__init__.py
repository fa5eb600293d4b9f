"""Attention kernels for per-head sink + window rules, each beside its PyTorch reference.

Shared contract (prefill and decode alike): queries are the last Nq positions of Nk keys.

    q: [B, Hq, Nq, D]   k, v: [B, Hkv, Nk, D]   (GQA: Hq = G * Hkv, K/V never repeated)
    sink:  int                  first `sink` real tokens are always kept
    span:  int64 [B, Hq]        window length of each head for each sequence
    start: int64 [B]            index of the first real (non-pad) key; left padding
    end:   int64 [B]            one past the last real key (Nk unless right-padded)
    scale: float

Key j of sequence b is real iff start[b] <= j < end[b]; positions are counted from
start[b], and the kept set is `moa_search.rules.kept`. Query rows with no kept key
(padding) output zeros, with log-sum-exp -inf.
"""
from .reference import sparse_attention_reference

__all__ = ["sparse_attention_reference"]
