"""Which key blocks a query block of the sparse prefill visits, and the token mask of each:
one definition, compiled into the Triton kernel (kernels/prefill.py) and, as Gluon, into the
Hopper kernel (kernels/prefill_hopper.py); checked on the CPU by tests/test_prefill_visit.py.
Block ranges follow moa_search.rules.kept exactly (see kernels/prefill.py's module doc).
"""
from __future__ import annotations

import triton
import triton.language as tl

# exp(x) = exp2(x * LOG2E): both kernels fold the softmax scale into this factor
LOG2E = 1.4426950408889634

@triton.jit
def _item_blocks(q_first, q_last, st, en, s, sink, Nk, BLOCK_N: tl.constexpr):
    """_key_blocks counted in the Gluon kernel's visit order (_block_start): (sink_lo, a, i_lo,
    i_hi, c_sink, c_edge, c_int, T), with c_int interior blocks and T blocks in all."""
    sink_lo, a, i_lo, i_hi, c_sink, c_edge, c_diag = _key_blocks(q_first, q_last, st, en, s, sink, Nk, BLOCK_N)
    c_int = (i_hi - i_lo) // BLOCK_N
    return sink_lo, a, i_lo, i_hi, c_sink, c_edge, c_int, c_edge + c_int + c_diag


@triton.jit
def _block_start(t, c_sink, c_edge, c_int, sink_lo, a, i_lo, i_hi, BLOCK_N: tl.constexpr):
    """First key of the t-th block in the Gluon kernel's visit order (_key_blocks' counts):
    sink | leading edge | interior | diagonal."""
    return tl.where(t < c_sink, sink_lo + t * BLOCK_N,
                    tl.where(t < c_edge, a + (t - c_sink) * BLOCK_N,
                             tl.where(t < c_edge + c_int, i_lo + (t - c_edge) * BLOCK_N,
                                      i_hi + (t - c_edge - c_int) * BLOCK_N)))


@triton.jit
def _sink_fits(c_sink, st, sink, a, sink_lo, HALF: tl.constexpr):
    """Whether the kept keys of the only sink block all lie in its first HALF keys (the Gluon
    kernel then multiplies that block at half width): they end at min(st + sink, a)."""
    return (c_sink == 1) & (tl.minimum(st + sink, a) <= sink_lo + HALF)


@triton.jit
def _mask_kind(t, n, c_sink, c_edge, c_int, st, sink):
    """Which token mask the t-th visited block (first key n; counts of _key_blocks) needs:
    0 none (interior), 1 a sink block, 2 a window block past the sink keys, 3 any other."""
    edge = (t < c_edge) | (t >= c_edge + c_int)
    return tl.where(t < c_sink, 1, tl.where(edge, tl.where(n - st >= sink, 2, 3), 0))


@triton.jit
def _token_mask(qk, kind, k_pos, q_pos, en_rel, s, sink):
    """qk [ROWS, BLOCK_N] with the pairs outside the kept set at -inf: rules.kept's
    k <= q and (k < sink or k > q - s), for keys 0 <= k < en_rel. k_pos [BLOCK_N] and q_pos
    [ROWS] count from the sequence start.

    The mask is the costliest part of an edge block's softmax, so each kind of block (_mask_kind)
    applies only the terms that can drop a pair of a real row there; padding rows are zeroed
    at the store whatever they hold.
      1: a sink block lies left of every row's window and before every real row: k < sink;
      2: a window block holds no sink key, and a real row's k <= q < en_rel: 0 <= q - k < s,
         one unsigned compare;
      3: the full test.
    """
    if kind == 1:  # (k < en_rel holds there for real rows already: a guard, one op per column)
        col = (k_pos >= 0) & (k_pos < sink) & (k_pos < en_rel)
        qk = tl.where(tl.expand_dims(col, 0), qk, float("-inf"))
    elif kind == 2:
        d = tl.expand_dims(q_pos, 1) - tl.expand_dims(k_pos, 0)
        qk = tl.where(d.to(tl.uint32) < s.to(tl.uint32), qk, float("-inf"))
    elif kind == 3:
        kp = tl.expand_dims(k_pos, 0)
        qp = tl.expand_dims(q_pos, 1)
        keep = (kp >= 0) & (kp < en_rel) & (kp <= qp) & ((kp < sink) | (kp > qp - s))
        qk = tl.where(keep, qk, float("-inf"))
    return qk


@triton.jit
def _key_blocks(q_first, q_last, st, en, s, sink, Nk, BLOCK_N: tl.constexpr):
    """The key blocks that query rows [q_first, q_last] (absolute) visit, for one (sequence, head).

    Returns (sink_lo, a, i_lo, i_hi, c_sink, c_edge, c_diag): c_sink sink blocks from sink_lo,
    leading-edge blocks from a up to i_lo (c_edge counts sink + edge), interior blocks
    [i_lo, i_hi), then c_diag diagonal/padding blocks from i_hi. Only the interior needs no
    token mask. Also the Gluon kernel's (kernels/prefill_hopper.py): one definition of the set.
    """
    # the real rows of this block and the key ranges they keep
    row_lo = tl.maximum(q_first, st)
    row_hi = tl.minimum(tl.minimum(q_last, Nk - 1), en - 1)
    has_rows = row_lo <= row_hi
    win_lo = tl.maximum(st, row_lo - s + 1)              # first key of the first row's window
    a = (win_lo // BLOCK_N) * BLOCK_N                    # first window block
    win_hi = tl.where(has_rows, tl.minimum(row_hi + 1, en), a)  # one past the last kept key
    # interior: every real row keeps every key of the block
    i_lo = tl.cdiv(tl.maximum(st, row_hi - s + 1), BLOCK_N) * BLOCK_N
    i_hi = (tl.minimum(en, row_lo + 1) // BLOCK_N) * BLOCK_N
    no_interior = i_lo >= i_hi
    i_lo = tl.where(no_interior, a, i_lo)
    i_hi = tl.where(no_interior, a, i_hi)
    # sink blocks strictly left of the window's first block (the rest is masked in the window)
    sink_lo = (st // BLOCK_N) * BLOCK_N
    sink_hi = tl.where(has_rows & (sink > 0), tl.minimum(tl.minimum(st + sink, win_hi), a), sink_lo)
    c_sink = tl.cdiv(sink_hi - sink_lo, BLOCK_N)
    c_edge = c_sink + tl.cdiv(i_lo - a, BLOCK_N)
    c_diag = tl.maximum(tl.cdiv(win_hi - i_hi, BLOCK_N), 0)
    return sink_lo, a, i_lo, i_hi, c_sink, c_edge, c_diag


__all__ = ["LOG2E", "_key_blocks", "_item_blocks", "_block_start", "_sink_fits", "_mask_kind", "_token_mask"]
