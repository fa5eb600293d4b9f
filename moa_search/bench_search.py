"""Time `moa search` on a Llama-7B-sized synthetic problem (CPU only).

    python -m moa_search.bench_search [--layers 32 --heads 32 --kv-heads 32 --rules 48]
        [--lengths 8k,16k,32k --extend 64k --block-size 64 --budget 0.5 --points 20]

Synthetic random profiles with some structure (each head has its own reach: local heads
put their influence near the diagonal, wide heads far from it; plus noise and a sink
column), built one length at a time. Times: loss tables, one solve of the primary objective
at the budget (HiGHS, and optionally CBC), and a full Pareto sweep through `search()`.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from . import milp
from . import rules as R
from .plan import ModelShape
from .loss_tables import Tables, loss_table, make_problem
from .search import search


def synthetic_influence(rng, layers, heads, n, block_size, reach, wide):
    """float64 [layers, heads, nb, nb]: exp(-distance / reach) near the diagonal plus a flat
    part of weight `wide` (retrieval-like heads), times noise, on causal blocks only."""
    nb = R.block_count(n, block_size)
    q = np.arange(nb)[:, None]
    k = np.arange(nb)[None, :]
    dist = ((q - k) / nb).astype(np.float64)
    causal = (k <= q).astype(np.float64)
    out = np.empty((layers, heads, nb, nb))
    for li in range(layers):   # one layer at a time keeps the temporaries small
        r = reach[li][:, None, None]
        w = wide[li][:, None, None]
        out[li] = (np.exp(-dist[None] / r) + w) * causal[None]
        out[li] *= rng.lognormal(0, 0.5, out[li].shape)
        out[li, :, :, 0] *= 4.0                       # the sink column
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=32)
    p.add_argument("--rules", type=int, default=48)
    p.add_argument("--lengths", default="8k,16k,32k")
    p.add_argument("--extend", default="64k")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--granularity", default="kv_head", choices=["kv_head", "query_head"])
    p.add_argument("--points", type=int, default=20)
    p.add_argument("--mip-gap", type=float, default=1e-3)
    p.add_argument("--time-limit", type=float, default=None, help="seconds per solve")
    p.add_argument("--cbc", action="store_true", help="also time one CBC solve")
    p.add_argument("--no-front", action="store_true", help="skip the Pareto sweep")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=2, help="worker processes for the Pareto sweep")
    p.add_argument("--out", default=None, help="keep the sweep's output folder here (default: a temporary one)")
    args = p.parse_args(argv)

    lengths = R.parse_lengths(args.lengths)
    extend = R.parse_lengths(args.extend) if args.extend else []
    steps = 8   # the default grid, refined until it has enough valid rules, then cut to --rules
    while len(R.candidate_grid(lengths, alpha_steps=steps)) < args.rules:
        steps += 2
    rules = R.candidate_grid(lengths, alpha_steps=steps)[: args.rules]
    shape = ModelShape("LlamaForCausalLM", "llama", args.layers, args.heads, args.kv_heads, 128, "synthetic")
    rng = np.random.default_rng(args.seed)
    reach0 = np.exp(rng.uniform(np.log(0.005), np.log(1.0), (args.layers, args.heads)))
    wide = rng.uniform(0, 0.05, (args.layers, args.heads)) * (rng.random((args.layers, args.heads)) < 0.2)
    t_gen = t_loss = 0.0
    losses = []
    for n in lengths:
        t0 = time.perf_counter()
        infl = synthetic_influence(rng, args.layers, args.heads, n, args.block_size,
                                   reach0 * np.exp(rng.normal(0, 0.3, reach0.shape)), wide)
        t1 = time.perf_counter()
        losses.append(loss_table(infl, n, args.block_size, 64, rules))
        t2 = time.perf_counter()
        t_gen += t1 - t0
        t_loss += t2 - t1
        print(f"N={n}: influence {infl.shape} generated in {t1 - t0:.1f} s, loss table in {t2 - t1:.2f} s", flush=True)
        del infl
    tables = Tables(lengths, np.stack(losses), list(rules), shape, args.block_size, sink=64)
    problem = make_problem(tables, args.budget, "kv", args.granularity, extend)
    print(f"problem: {problem.units} units x {problem.rules} rules, budget {args.budget} at {problem.budget_lengths}, "
          f"granularity {args.granularity}")
    t0 = time.perf_counter()
    milp.check_budget(problem)
    print(f"feasibility check: {time.perf_counter() - t0:.2f} s")
    w = np.zeros(len(lengths))
    w[-1] = 1.0
    solvers = ["highs"] + (["cbc"] if args.cbc else [])
    for s in solvers:
        t0 = time.perf_counter()
        sol = milp.solve(problem, w, solver=s, mip_gap=args.mip_gap, time_limit=args.time_limit)
        wall = time.perf_counter() - t0
        print(f"one solve ({s}, mip_gap {args.mip_gap:g}): {sol.status}, {wall:.2f} s wall "
              f"(solver {sol.seconds:.2f} s), gap {sol.gap}, loss {sol.losses.round(4).tolist()}, "
              f"density {sol.densities.round(4).tolist()}", flush=True)
    if not args.no_front:
        with tempfile.TemporaryDirectory() as tmp:
            out = args.out or tmp
            t0 = time.perf_counter()
            res = search(tables, args.budget, out, granularity=args.granularity, extend_lengths=extend,
                         pareto_points=args.points, mip_gap=args.mip_gap,
                         time_limit=args.time_limit, progress=False, jobs=args.jobs)
            wall = time.perf_counter() - t0
        st = [p.status for p in res.points]
        print(f"pareto sweep: {len(res.points)} points in {wall:.1f} s (solves {sum(p.seconds for p in res.points):.1f} s), "
              f"statuses {dict((s, st.count(s)) for s in set(st))}, {len(res.pareto)} Pareto plans")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
