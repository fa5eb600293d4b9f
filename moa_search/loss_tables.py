"""What the search optimises: loss and density tables from the influence profiles, the 0/1
program of one budget, and the plan of a solution.

    loss[l, h, r]    the profiled influence that rule r drops for query head h at length l:
                     sum over blocks of the block's influence times the fraction of its causal
                     entries the rule drops (rules.block_drop_fraction, exact at token level)
    density[n, r]    the rule's KV or compute density at every budget length n
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from . import rules as R
from .milp import Problem, SearchError
from .plan import GRANULARITIES, ModelShape, Plan


def loss_table(influence, n: int, block_size: int, sink: int, rules: Sequence[R.Rule], min_span: int = 1) -> np.ndarray:
    """Loss of every rule for every head at length n: float64 [L, H, R].

    influence: [L, H, nb, nb] block sums (torch or numpy; float64). One matrix product over
    the flattened blocks: loss[h, r] = sum_b influence[h, b] * dropped_fraction[r, b].
    """
    infl = influence.detach().cpu().numpy() if hasattr(influence, "detach") else np.asarray(influence)
    infl = np.ascontiguousarray(infl, dtype=np.float64)
    L, H, nb, nb2 = infl.shape
    if nb != nb2 or nb != R.block_count(n, block_size):
        raise SearchError(f"influence at length {n} has {nb}x{nb2} blocks, expected {R.block_count(n, block_size)} "
                          f"(block size {block_size})")
    spans = [r.span(n, min_span) for r in rules]
    frac = R.block_drop_fraction(n, block_size, sink, spans).reshape(len(rules), nb * nb)
    return (infl.reshape(L * H, nb * nb) @ frac.T).reshape(L, H, len(rules))


def density_table(rules: Sequence[R.Rule], lengths: Sequence[int], sink: int, kind: str = "kv",
                  min_span: int = 1) -> np.ndarray:
    """Density of every rule at every length: float64 [n, R] (it does not depend on the head)."""
    a = np.array([r.alpha for r in rules])
    b = np.array([r.beta for r in rules])
    n = np.asarray(lengths, dtype=np.int64)[:, None]
    return np.asarray(R.density(kind, sink, R.span(a[None], b[None], n, min_span), n), dtype=np.float64)


@dataclass
class Tables:
    """What the search needs from the profiles. loss: float64 [m, L, Hq, R] per query head."""

    lengths: list[int]
    loss: np.ndarray
    rules: list[R.Rule]
    model: ModelShape
    block_size: int
    sink: int
    min_span: int = 1
    calibration: str = ""
    samples: int = 0


def load_tables(profiles: str | os.PathLike, sink: int = 64, rules: Sequence[R.Rule] | None = None,
                min_span: int = 1, alpha_steps: int = 8, betas: Sequence[float] | None = None,
                progress: bool = True) -> Tables:
    """Loss tables from a folder of profiles, one file at a time (a 32k profile of a 7B model is GBs)."""
    from tqdm.auto import tqdm

    from .profiler.io import ProfileError, load_profile

    folder = Path(profiles)
    files = sorted(folder.glob("influence_*.safetensors"))
    if not files:
        raise ProfileError(f"{folder}: no influence_*.safetensors files (run `moa profile` first)")
    lengths = sorted(int(p.stem.split("_")[-1]) for p in files)
    if rules is None:
        rules = R.candidate_grid(lengths, betas=betas, alpha_steps=alpha_steps)
    model, tables, blocks, calib, samples = None, {}, set(), set(), 0
    for p in tqdm(files, desc="loss tables", disable=not progress):
        prof = load_profile(p, model)
        model = model or prof.model
        tables[prof.length] = loss_table(prof.influence, prof.length, prof.block_size, sink, rules, min_span)
        blocks.add(prof.block_size), calib.add(prof.calibration_hash)
        samples = prof.samples
        del prof
    return Tables(lengths=sorted(tables), loss=np.stack([tables[n] for n in sorted(tables)]), rules=list(rules),
                  model=model, block_size=min(blocks), sink=sink, min_span=min_span,
                  calibration=",".join(sorted(c for c in calib if c)), samples=samples)


def make_problem(tables: Tables, budget: float, kind: str = "kv", granularity: str = "kv_head",
                 extend_lengths: Sequence[int] = (), lower: float | None = None,
                 max_rules_per_layer: int | None = None) -> Problem:
    """The 0/1 program for one budget. kv_head: one rule per KV head, influence summed over its
    query heads. query_head: one rule per query head; with KV density a group costs its max span."""
    if granularity not in GRANULARITIES:
        raise SearchError(f"granularity must be 'kv_head' or 'query_head', got {granularity!r}")
    if kind not in ("kv", "compute"):
        raise SearchError(f"density kind must be 'kv' or 'compute', got {kind!r}")
    m, L, Hq, Rn = tables.loss.shape
    g = tables.model.group
    if granularity == "kv_head":
        loss = tables.loss.reshape(m, L, Hq // g, g, Rn).sum(3)
        group = 1
    else:
        loss = tables.loss
        group = g if kind == "kv" else 1  # compute cost is per query head; the cache is per group
    budget_lengths = sorted(set(tables.lengths) | {int(n) for n in extend_lengths})
    dens = density_table(tables.rules, budget_lengths, tables.sink, kind, tables.min_span)
    return Problem(loss=loss.reshape(m, -1, Rn), density=dens, budget=float(budget), budget_lengths=budget_lengths,
                   loss_lengths=list(tables.lengths), layers=L, group=group, lower=lower,
                   max_rules_per_layer=max_rules_per_layer, kind=kind)


def plan_from_choice(tables: Tables, choice: np.ndarray, granularity: str, **fields) -> Plan:
    """Plan whose unit u (layer-major) follows rule choice[u]."""
    L = tables.model.num_layers
    a = np.array([tables.rules[r].alpha for r in choice]).reshape(L, -1)
    b = np.array([tables.rules[r].beta for r in choice]).reshape(L, -1)
    return Plan(model=tables.model, alpha=a.tolist(), beta=b.tolist(), sink=tables.sink, block_size=tables.block_size,
                min_span=tables.min_span, granularity=granularity, **fields)


__all__ = ["loss_table", "density_table", "Tables", "load_tables", "make_problem", "plan_from_choice"]
