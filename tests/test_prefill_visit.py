"""The prefill kernels' visit plan against brute force (CPU, Triton interpreter).

The Gluon kernel (kernels/prefill_hopper.py) has no interpreter, but the pieces that decide
what it computes are plain Triton functions of kernels/prefill.py, compiled into it:
_item_blocks (which blocks: _key_blocks, counted), _block_start (in which order), _mask_kind
and _token_mask (which pairs of a block count), _sink_fits (when the sink block is multiplied
at half width). Here they run in the Gluon kernel's loop, and for every real query row the
pairs they keep must be the kept set of moa_search.rules, each pair exactly once.
"""
from __future__ import annotations

import random

import pytest
import torch
import triton
import triton.language as tl

from moa_search import rules as R
from moa_search.kernels.prefill import _block_start, _item_blocks, _mask_kind, _sink_fits, _token_mask


@triton.jit
def _probe(KEEP, NS, KIND, META, Nq, Nk, st, en, s, sink,
           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, T_MAX: tl.constexpr):
    """One work item (query block mb) as the Gluon kernel walks it: each visited block's first
    key NS, mask kind KIND and kept pairs KEEP [T_MAX, BLOCK_M, BLOCK_N]; META = (T, whether
    the sink block runs at half width)."""
    mb = tl.program_id(0)
    off = Nk - Nq
    q_row = mb * BLOCK_M
    sink_lo, a, i_lo, i_hi, c_sink, c_edge, c_int, T = _item_blocks(
        off + q_row, off + q_row + BLOCK_M - 1, st, en, s, sink, Nk, BLOCK_N)
    q_pos = off + q_row + tl.arange(0, BLOCK_M) - st
    tl.store(META + mb * 2, T)
    tl.store(META + mb * 2 + 1, _sink_fits(c_sink, st, sink, a, sink_lo, BLOCK_N // 2).to(tl.int32))
    i = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    for t in range(T):
        n = _block_start(t, c_sink, c_edge, c_int, sink_lo, a, i_lo, i_hi, BLOCK_N)
        kind = _mask_kind(t, n, c_sink, c_edge, c_int, st, sink)
        k_pos = n + tl.arange(0, BLOCK_N) - st
        s_masked = _token_mask(tl.zeros([BLOCK_M, BLOCK_N], tl.float32), kind, k_pos, q_pos, en - st, s, sink)
        base = mb * T_MAX + t
        tl.store(KEEP + base * BLOCK_M * BLOCK_N + i, (s_masked == 0).to(tl.int8))
        tl.store(NS + base, n)
        tl.store(KIND + base, kind)


def _check_visit(Nq, Nk, st, en, span, sink, block_m, block_n):
    """Run _probe on every work item and compare the pairs kept by real rows with rules.kept."""
    num_m = triton.cdiv(Nq, block_m)
    t_max = triton.cdiv(Nk, block_n) + 1
    keep = torch.zeros(num_m, t_max, block_m, block_n, dtype=torch.int8)
    ns = torch.full((num_m, t_max), -1, dtype=torch.int32)
    kind = torch.full((num_m, t_max), -1, dtype=torch.int32)
    meta = torch.zeros(num_m, 2, dtype=torch.int32)
    s = min(span, Nk)
    _probe[(num_m,)](keep, ns, kind, meta, Nq, Nk, st, en, s, sink, BLOCK_M=block_m, BLOCK_N=block_n, T_MAX=t_max)

    off = Nk - Nq
    count = torch.zeros(Nq, Nk, dtype=torch.int32)   # times each (row, key) pair is kept
    for mb in range(num_m):
        T, fits = int(meta[mb, 0]), bool(meta[mb, 1])
        assert T <= t_max
        starts = ns[mb, :T].tolist()
        assert len(set(starts)) == T, f"item {mb} visits a block twice: {starts}"
        assert all(n % block_n == 0 and 0 <= n < Nk for n in starts), starts
        rows = torch.arange(mb * block_m, min((mb + 1) * block_m, Nq))
        real = (off + rows >= st) & (off + rows < en)
        for t, n in enumerate(starts):
            cols = torch.arange(n, min(n + block_n, Nk))
            k_t = keep[mb, t, : len(rows), : len(cols)].to(torch.int32) * real[:, None]
            count[rows[:, None], cols[None, :]] += k_t
            # kinds 1 and 2 drop terms; only where no real row could need them
            if kind[mb, t] == 0:
                assert keep[mb, t, : len(rows), : len(cols)][real].all(), "interior block with a dropped pair"
        if fits:  # the Gluon kernel multiplies block 0 at half width and runs block 1 with it
            assert T >= 2 and int(kind[mb, 0]) == 1
            assert not keep[mb, 0, : len(rows), block_n // 2:][real].any(), "a kept pair past the half sink block"

    q_pos = torch.arange(Nq)[:, None] + off - st
    k_pos = torch.arange(Nk)[None, :] - st
    want = R.kept(q_pos, k_pos, sink, s) & (k_pos >= 0) & (k_pos < en - st) & (q_pos >= 0) & (q_pos < en - st)
    assert torch.equal(count, want.to(torch.int32)), (
        f"{int((count != want.to(torch.int32)).sum())} pairs differ; max count {int(count.max())}")
    return meta


@pytest.mark.parametrize("Nq,Nk,st,en,span,sink,blocks", [
    (300, 300, 0, 300, 40, 8, (32, 16)),      # narrow window, sink blocks, tails
    (300, 300, 0, 300, 40, 64, (128, 128)),   # the Gluon kernel's blocks: sink fits in 64 keys
    (700, 700, 0, 700, 200, 64, (128, 128)),
    (700, 700, 0, 700, 200, 200, (128, 128)),  # sink over two blocks: no half block
    (700, 700, 113, 700, 150, 64, (128, 128)),  # left padding: the sink straddles a block edge
    (700, 700, 0, 650, 1, 64, (128, 128)),    # right padding, one-token window
    (257, 700, 40, 690, 333, 8, (16, 32)),    # queries are the last keys, both paddings
    (500, 500, 0, 500, 500, 64, (64, 64)),    # dense span: interior blocks only
    (200, 200, 0, 200, 5, 0, (32, 32)),       # no sink
])
def test_visit_keeps_each_kept_pair_once(Nq, Nk, st, en, span, sink, blocks):
    _check_visit(Nq, Nk, st, en, span, sink, *blocks)


def test_visit_random_cases_and_half_sink_taken():
    rng = random.Random(5)
    fits_seen = 0
    for _ in range(25):
        Nk = rng.randint(40, 600)
        Nq = rng.choice([Nk, rng.randint(1, Nk)])
        st = rng.choice([0, 0, rng.randint(0, Nk // 2)])
        en = rng.choice([Nk, rng.randint(st + 1, Nk)])
        block_m, block_n = rng.choice([(16, 16), (32, 16), (16, 32), (64, 64), (128, 128)])
        meta = _check_visit(Nq, Nk, st, en, rng.choice([1, 7, 64, 129, rng.randint(1, 2 * Nk)]),
                            rng.choice([0, 4, 64, 100]), block_m, block_n)
        fits_seen += int(meta[:, 1].sum())
    assert fits_seen > 0, "no case took the half-width sink block"
