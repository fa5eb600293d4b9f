"""Elastic sink + window rules: every formula of the rule family, in one place.

A head's rule at input length N keeps, for query row i (0-based, causal),

    kept(i) = { j <= i : j < sink  or  i - j < span(N) }
    span(N) = clamp(floor(alpha + beta * N), min_span, N)

Here: the span at N, the kept set, both densities (KV and compute), the number of blocks
of a length, the key blocks a block of query rows visits, and the fraction of each block's
causal entries a rule drops (what the search's loss tables weigh the profile with). The
kernels' references, the profiler, the plan, the search and the CLI compute these through
the functions here, so a plan means the same thing everywhere.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .errors import MoaError


@dataclass(frozen=True)
class Rule:
    """One elastic rule: span(N) = clamp(floor(alpha + beta * N), min_span, N)."""

    alpha: float
    beta: float

    def span(self, n: int, min_span: int = 1) -> int:
        return int(span(self.alpha, self.beta, n, min_span))

    def __str__(self) -> str:
        return f"{self.alpha:g}+{self.beta:g}N"


def span(alpha, beta, n, min_span: int = 1):
    """Window length at input length n (tokens, excluding the sink).

    alpha, beta, n: scalars, numpy arrays or tensors (broadcast). Returns integers of
    the same kind. The raw value floor(alpha + beta*n) is clamped to [min_span, n].
    """
    torch = sys.modules.get("torch")  # a tensor argument means torch is loaded; plans alone never need it
    if torch is not None and any(isinstance(x, torch.Tensor) for x in (alpha, beta, n)):
        alpha, beta, n = (torch.as_tensor(x, dtype=torch.float64) for x in (alpha, beta, n))
        raw = torch.floor(alpha + beta * n)
        return torch.minimum(torch.clamp(raw, min=min_span), n).to(torch.int64)
    raw = np.floor(np.asarray(alpha, dtype=np.float64) + np.asarray(beta, dtype=np.float64) * np.asarray(n, dtype=np.float64))
    out = np.minimum(np.maximum(raw, min_span), n).astype(np.int64)
    return out if out.ndim else int(out)


def raw_span(alpha, beta, n):
    """floor(alpha + beta*n) before clamping: a candidate rule is valid at n iff 0 < raw <= n."""
    return np.floor(np.asarray(alpha, dtype=np.float64) + np.asarray(beta, dtype=np.float64) * np.asarray(n, dtype=np.float64))


def kept(q_pos, k_pos, sink, span):
    """The kept set as a boolean mask (attention-gym style: broadcast over any shape).

    q_pos, k_pos: integer positions counted from the first real token of the sequence
    (e.g. q_pos[..., :, None] and k_pos[..., None, :]). sink, span: ints or tensors that
    broadcast against them (e.g. [H, 1, 1] for per-head rules). True = attend.
    """
    return (k_pos <= q_pos) & ((k_pos < sink) | (q_pos - k_pos < span))


def kept_matrix(n: int, sink: int, span: int, device=None):
    """[n, n] bool mask of one head's rule at length n (prefill: every row uses span(n))."""
    import torch

    pos = torch.arange(n, device=device)
    return kept(pos[:, None], pos[None, :], sink, span)


def kv_density(sink, span, n):
    """Cached tokens / n = min(sink + span, n) / n (decode memory). Broadcasts."""
    sink, span, n = (np.asarray(x, dtype=np.float64) for x in (sink, span, n))
    return np.minimum(sink + span, n) / n


def kept_pairs(sink, span, n):
    """Number of kept (i, j) pairs of the causal n x n matrix, closed form. Broadcasts.

    Row i keeps min(span, i+1) window entries plus the sink entries left of the window,
    max(0, min(sink, i - span + 1)). Summed over rows:
      window: s(s+1)/2 + (n - s) s            with s = min(span, n)
      sink:   k(k+1)/2 + (m - k) sink         with m = max(0, n - span), k = min(sink, m)
    """
    sink, span, n = (np.asarray(x, dtype=np.int64) for x in (sink, span, n))
    s = np.minimum(span, n)
    window = s * (s + 1) // 2 + (n - s) * s
    m = np.maximum(0, n - span)
    k = np.minimum(sink, m)
    sink_part = k * (k + 1) // 2 + (m - k) * sink
    return window + sink_part


def compute_density(sink, span, n):
    """Kept pairs / causal pairs n(n+1)/2 (prefill FLOPs). Broadcasts."""
    n64 = np.asarray(n, dtype=np.int64)
    return kept_pairs(sink, span, n) / (n64 * (n64 + 1) / 2)


def density(kind: str, sink, span, n):
    """kind 'kv' or 'compute'."""
    if kind == "kv":
        return kv_density(sink, span, n)
    if kind == "compute":
        return compute_density(sink, span, n)
    raise ValueError(f"density kind must be 'kv' or 'compute', got {kind!r}")


def check_density(value, name: str = "budget") -> float:
    """A density budget or target (either kind): a number in (0, 1]. Returns it as a float;
    raises MoaError (a ValueError) naming `name` otherwise. The one check of a budget's range: the search,
    eval's uniform baselines and the benchmarks call it (plan files: schema.py)."""
    try:
        d = float(value)
    except (TypeError, ValueError):
        raise MoaError(f"{name} must be a density in (0, 1], got {value!r}") from None
    if not 0 < d <= 1:
        raise MoaError(f"{name} must be a density in (0, 1], got {value!r}")
    return d


def candidate_grid(
    lengths: Sequence[int],
    alphas: Sequence[float] | None = None,
    betas: Sequence[float] | None = None,
    alpha_steps: int = 8,
) -> list[Rule]:
    """Candidate rules valid at every length (0 < floor(alpha + beta*N) <= N).

    Default grid scales MoA's (alpha in -2048..8192 step 1024, beta in {0, 1/8, ..., 1}
    for 2k/4k/8k profiles) to the longest length L: alpha = k L / alpha_steps for k from
    floor(-alpha_steps / 4) to alpha_steps (-L/4..L for the default 8; -L/3..L for 6).
    """
    lengths = sorted(int(n) for n in lengths)
    if not lengths or lengths[0] <= 0:
        raise ValueError(f"lengths must be positive, got {lengths}")
    longest = lengths[-1]
    if alphas is None:
        step = longest / alpha_steps
        alphas = [step * k for k in range(-alpha_steps // 4, alpha_steps + 1)]
    if betas is None:
        betas = [k / 8 for k in range(9)]
    rules = []
    for a in alphas:
        for b in betas:
            raw = raw_span(a, b, np.asarray(lengths))
            if np.all(raw > 0) and np.all(raw <= np.asarray(lengths)):
                rules.append(Rule(float(a), float(b)))
    if not rules:
        raise ValueError(f"no candidate rule is valid at every length {lengths}")
    return rules


def parse_lengths(text: str) -> list[int]:
    """'4096,8192,16k' -> [4096, 8192, 16384] (k = 1024)."""
    out = []
    for part in str(text).split(","):
        part = part.strip().lower()
        if not part:
            continue
        mult = 1024 if part.endswith("k") else 1
        try:
            value = int(float(part.rstrip("k")) * mult)
        except ValueError:
            raise ValueError(f"cannot read length {part!r} in {text!r}; expected integers like 4096,8192 or 8k") from None
        if value <= 0:
            raise ValueError(f"lengths must be positive, got {value} in {text!r}")
        out.append(value)
    if not out:
        raise ValueError(f"no lengths in {text!r}")
    return out


def lengths_arg(flag: str, text: str) -> list[int]:
    """--lengths style value -> [int], or a MoaError naming the flag."""
    try:
        return parse_lengths(text)
    except ValueError as e:
        raise MoaError(f"{flag}: {e}") from None


def block_count(n, block_size: int):
    """Blocks of `block_size` tokens covering n tokens: ceil(n / block_size) (the last may be short).
    n: an int or an integer array."""
    return -(-n // block_size)


def visited_key_blocks(q_first: int, q_last: int, sink: int, span: int, block_size: int) -> tuple[range, range]:
    """The key blocks that query rows [q_first, q_last] (0-based, causal) need under one rule:
    (sink blocks, window blocks), as ranges of block indices, disjoint, in ascending order.

    A block is needed iff some row of the range keeps one of its keys (rules.kept); the
    kernels' visit plan (kernels/prefill.py `_key_blocks`) is the same set, plus the
    bookkeeping of sequence starts and ends.
    """
    if q_first > q_last or span < 1:
        return range(0), range(0)
    win_lo = max(0, q_first - span + 1)                   # first key of the first row's window
    first_window = win_lo // block_size
    window = range(first_window, q_last // block_size + 1)
    sink_end = min(block_count(min(sink, win_lo), block_size), first_window)
    return range(0, sink_end), window


def _prefix_clip(m: np.ndarray, w: np.ndarray) -> np.ndarray:
    """sum over integers k < m of clip(k, 0, w) (w >= 0), elementwise, closed form."""
    mm = np.clip(m - 1, 0, w)
    return mm * (mm + 1) // 2 + np.maximum(m - 1 - w, 0) * w


def _rows_sum(r0, r1, t, w):
    """sum over rows i in [r0, r1) of clip(i + t, 0, w): how many entries of a block the rows hold."""
    return _prefix_clip(r1 + t, w) - _prefix_clip(r0 + t, w)


def block_drop_fraction(n: int, block_size: int, sink: int, spans: Sequence[int]) -> np.ndarray:
    """Fraction of each block's causal entries that a rule drops: float64 [R, nb, nb].

    n: sequence length; nb = block_count(n, block_size) (the last block may be short);
    spans: [R] windows span(n) of the rules (>= 1). Token level, exactly `kept`: row i
    drops j iff sink <= j <= i - span. Blocks with no causal entry get 0.

    Interval arithmetic: in block (bq, bk) with rows [r0, r1) and columns [c0, c1), row i
    holds clip(i - c0 + 1, 0, c1 - c0) causal entries and drops
    clip(i - span - a + 1, 0, c1 - a) of them, a = max(c0, sink); both sum over rows in
    closed form.
    """
    nb = block_count(n, block_size)
    edges = np.minimum(np.arange(nb + 1, dtype=np.int64) * block_size, n)
    r0, r1 = edges[:-1, None], edges[1:, None]          # rows of block bq   [nb, 1]
    c0, c1 = edges[None, :-1], edges[None, 1:]          # columns of block bk [1, nb]
    causal = _rows_sum(r0, r1, 1 - c0, c1 - c0)         # [nb, nb]
    a = np.maximum(c0, sink)
    w = np.maximum(c1 - a, 0)
    s = np.asarray(spans, dtype=np.int64).reshape(-1, 1, 1)
    if np.any(s < 1):
        raise ValueError(f"spans must be >= 1, got {np.asarray(spans).min()}")
    dropped = _rows_sum(r0[None], r1[None], 1 - s - a[None], w[None])  # [R, nb, nb]
    return np.divide(dropped, causal, out=np.zeros(dropped.shape), where=causal > 0)


def group_max(values: np.ndarray, group: int) -> np.ndarray:
    """[..., Hq] -> [..., Hkv]: the max over each GQA group of `group` consecutive query heads."""
    shape = values.shape[:-1] + (values.shape[-1] // group, group)
    return values.reshape(shape).max(-1)


__all__ = [
    "Rule", "span", "raw_span", "kept", "kept_matrix", "kv_density", "kept_pairs", "compute_density",
    "density", "check_density", "candidate_grid", "parse_lengths", "group_max", "block_count", "visited_key_blocks",
    "block_drop_fraction",
]
