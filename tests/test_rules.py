"""Rules and densities against brute-force token masks."""
import itertools

import numpy as np
import pytest
import torch

from moa_search import rules as R


def brute_kept(n, sink, span):
    """Direct transcription of the definition, one (i, j) at a time."""
    m = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(i + 1):
            m[i, j] = bool(j < sink or i - j < span)
    return m


CASES = [(n, sink, span) for n, sink, span in itertools.product([1, 2, 7, 33, 64, 65, 130], [0, 1, 4, 64, 200], [1, 3, 16, 64, 129, 500])]


@pytest.mark.parametrize("n,sink,span", CASES)
def test_kept_matrix_and_densities_match_brute_force(n, sink, span):
    s = min(span, n)  # spans are clamped to n by span(); densities accept any span
    ref = brute_kept(n, sink, s)
    assert torch.equal(R.kept_matrix(n, sink, s), ref)
    assert R.kept_pairs(sink, s, n) == int(ref.sum())
    assert R.compute_density(sink, s, n) == pytest.approx(ref.sum().item() / (n * (n + 1) / 2))
    # the last row holds exactly what a decode cache must hold
    assert R.kv_density(sink, s, n) == pytest.approx(ref[-1].sum().item() / n)


def test_kept_pairs_unclamped_span_equals_clamped():
    # span > n behaves as span = n (the rule keeps all causal pairs)
    for n in (5, 17):
        assert R.kept_pairs(3, 10 * n, n) == n * (n + 1) // 2


def test_densities_broadcast_over_heads_and_lengths():
    sink = 4
    spans = np.array([[1, 8, 33], [2, 50, 100]])
    ns = np.array([[40], [100]])
    got = R.compute_density(sink, np.minimum(spans, ns), ns)
    for (a, b), sp in np.ndenumerate(spans):
        n = int(ns[a, 0])
        ref = brute_kept(n, sink, min(sp, n))
        assert got[a, b] == pytest.approx(ref.sum().item() / (n * (n + 1) / 2))


def test_span_clamps_and_floors():
    assert R.span(0, 0.5, 101) == 50
    assert R.span(-500, 0.0, 100) == 1            # below min_span -> min_span
    assert R.span(-500, 0.0, 100, min_span=8) == 8
    assert R.span(10, 1.0, 100) == 100            # above n -> n
    t = R.span(torch.tensor([0.0, 64.0]), torch.tensor([0.25, 0.0]), torch.tensor([[1000], [10]]))
    assert t.tolist() == [[250, 64], [2, 10]]
    assert R.Rule(16, 0.125).span(1024) == 144


def test_candidate_grid_valid_at_every_length():
    lengths = [2048, 4096, 8192]
    grid = R.candidate_grid(lengths)
    assert len(grid) == len(set(grid)) >= 15
    for r in grid:
        for n in lengths:
            raw = np.floor(r.alpha + r.beta * n)
            assert 0 < raw <= n
    # MoA's grid for 2k/4k/8k: alpha -2048..8192 step 1024, betas k/8
    alphas = {r.alpha for r in grid}
    assert min(alphas) >= -2048 and max(alphas) <= 8192 and all(a % 1024 == 0 for a in alphas)
    assert {0.0, 1024.0, 2048.0, -1024.0} <= alphas
    assert {r.beta for r in grid} <= {k / 8 for k in range(9)}
    # a rule that is invalid at the short length is excluded
    assert R.Rule(4096.0, 0.0) not in grid


def test_candidate_grid_custom_and_empty():
    grid = R.candidate_grid([100], alphas=[10, 200], betas=[0.0])
    assert grid == [R.Rule(10.0, 0.0)]
    with pytest.raises(ValueError, match="no candidate rule"):
        R.candidate_grid([100], alphas=[200], betas=[0.0])


def test_parse_lengths():
    assert R.parse_lengths("4096, 8k,16K") == [4096, 8192, 16384]
    for bad in ("", "abc", "-5", "4096,,x"):
        with pytest.raises(ValueError):
            R.parse_lengths(bad)


def test_group_max():
    v = np.array([[1, 5, 3, 2], [7, 0, 0, 9]])
    assert R.group_max(v, 2).tolist() == [[5, 3], [7, 9]]


def test_block_count_is_the_ceiling():
    assert [R.block_count(n, 64) for n in (1, 63, 64, 65, 128, 129)] == [1, 1, 1, 2, 2, 3]
    np.testing.assert_array_equal(R.block_count(np.array([0, 7, 8, 9]), 8), [0, 1, 1, 2])


@pytest.mark.parametrize("sink,span,bs", [(0, 1, 4), (3, 5, 4), (8, 2, 4), (5, 40, 8), (16, 7, 8), (2, 100, 16)])
def test_visited_key_blocks_are_the_blocks_of_kept_keys(sink, span, bs):
    """Brute force: a block is needed iff a row of the query block keeps one of its keys."""
    n = 61
    keep = R.kept_matrix(n, sink, span).numpy()
    for q_first in range(0, n, 5):
        for q_last in (q_first, min(n - 1, q_first + bs - 1), min(n - 1, q_first + 3 * bs)):
            needed = {j // bs for j in np.flatnonzero(keep[q_first:q_last + 1].any(0))}
            sink_blocks, window_blocks = R.visited_key_blocks(q_first, q_last, sink, span, bs)
            assert not set(sink_blocks) & set(window_blocks)
            assert set(sink_blocks) | set(window_blocks) == needed, (q_first, q_last)
            assert list(sink_blocks) == sorted(sink_blocks) and list(window_blocks) == sorted(window_blocks)


def test_check_density_is_the_one_range_check():
    assert R.check_density(0.5) == 0.5 and R.check_density(1) == 1.0
    for bad in (0, -0.1, 1.5, "x", None, float("nan")):
        with pytest.raises(ValueError, match=r"budget must be a density in \(0, 1\]"):
            R.check_density(bad)
    with pytest.raises(ValueError, match="--uniform-density"):
        R.check_density(2, "--uniform-density")
