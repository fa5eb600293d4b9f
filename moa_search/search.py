"""`moa search`: from influence profiles to a Pareto set of per-head rules and one plan.

    profiles (influence_N.safetensors per length N)
      -> loss[l, h, r], density[n, r]         loss_tables.py (rules.block_drop_fraction)
      -> 0/1 programs, one per epsilon-constraint point (milp.py), run by an optuna study
         stored in OUTDIR/search.db: a stopped search resumes where it stopped   (pareto.py)
      -> the non-dominated plans, scored on held-out data when a scorer is given   (scoring.py)
      -> OUTDIR/plan.json (chosen), OUTDIR/pareto/plan_XX.json, summary.csv, PNGs  (search_report.py)

From Python: `search_plans(profiles_dir, budget, out_dir, ...)`, or `search(tables, ...)` on
loss tables already loaded.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from . import milp
from . import rules as R
from .errors import check_counts
from .loss_tables import Tables, density_table, load_tables, loss_table, make_problem, plan_from_choice  # noqa: F401
from .milp import Problem, SearchError
from .pareto import Point, non_dominated, run_pareto
from .plan import Plan, provenance, sink_share_warnings
from .scoring import choose_plan, score_plans, validation_scorer
from .search_report import write_outputs


@dataclass
class SearchResult:
    plan: Plan
    chosen: int                               # index into pareto
    pareto: list[tuple[Plan, Point, float | None]]   # (plan, point, validation score)
    points: list[Point]
    selection: str                            # how the plan was chosen, in words
    out_dir: Path
    files: dict = field(default_factory=dict)


def search(tables: Tables, budget: float, out_dir: str | os.PathLike, *, kind: str = "kv",
           granularity: str = "kv_head", solver: str = "highs", extend_lengths: Sequence[int] = (),
           pareto_points: int = 20, time_limit: float | None = None, mip_gap: float = 1e-3,
           max_rules_per_layer: int | None = None, lower: float | None = None,
           score_fn: Callable[[Plan], float] | None = None, score_name: str = "validation loss",
           score_info: dict | None = None, heatmap_length: int | None = None, source: str = "",
           progress: bool = True, console=None, jobs: int = 1) -> SearchResult:
    """Search per-head rules under `budget` and write everything to `out_dir`.

    score_fn(plan) -> float (lower is better), e.g. the response-masked loss of held-out data at
    a length beyond the profiled ones; each Pareto plan is scored and the best exported. Without
    it the plan with the lowest predicted loss at the longest profiled length is chosen.
    Raises SearchError if no plan meets the budget (naming the length and the least feasible budget).
    """
    out = Path(out_dir)
    problem = make_problem(tables, budget, kind, granularity, extend_lengths, lower, max_rules_per_layer)
    milp.check_budget(problem)
    settings = {"budget": budget, "kind": kind, "granularity": granularity, "solver": solver,
                "budget_lengths": problem.budget_lengths, "points": pareto_points, "lower": lower,
                "max_rules_per_layer": max_rules_per_layer, "sink": tables.sink, "min_span": tables.min_span,
                "rules": [(r.alpha, r.beta) for r in tables.rules], "mip_gap": mip_gap, "time_limit": time_limit}
    points, study = run_pareto(problem, out, pareto_points, solver, time_limit, mip_gap, settings, progress, jobs)
    front = non_dominated(points)
    if not front:
        bad = "; ".join(f"point {p.point} ({p.role}): {p.status} {p.message}" for p in points)
        raise SearchError(f"no solve produced a plan: {bad}. Raise --time-limit or try --solver "
                          f"{'cbc' if solver == 'highs' else 'highs'}.")
    plans = front_plans(tables, problem, front, granularity, lower, source, study.study_name)
    scores: list[float | None] = [None] * len(plans)
    if score_fn is not None:
        scores = score_plans(plans, front, study, score_fn, score_name, score_info, progress)
    chosen, selection = choose_plan(plans, front, scores, tables.lengths[-1], score_name)
    plans[chosen].validation["chosen"] = True
    plans[chosen].provenance["selection"] = selection
    result = SearchResult(plans[chosen], chosen, list(zip(plans, front, scores)), points, selection, out)
    write_outputs(result, problem, heatmap_length, console)
    return result


def front_plans(tables: Tables, problem: Problem, front: Sequence[Point], granularity: str, lower: float | None,
                source: str, study_name: str) -> list[Plan]:
    """The plan of every Pareto point, with its budget, predicted losses and provenance."""
    budget_info = {"kind": problem.kind, "density": float(problem.budget), "lengths": problem.budget_lengths,
                   "lower": lower, "granularity_cost": "group max span" if problem.group > 1 else "per head"}
    plans = []
    for p in front:
        achieved = dict(zip(map(str, problem.budget_lengths), p.densities))
        plans.append(plan_from_choice(
            tables, p.choice, granularity, budget={**budget_info, "achieved": achieved},
            profiled_lengths=list(tables.lengths),
            predicted_loss={str(n): float(v) for n, v in zip(tables.lengths, p.losses)},
            provenance=provenance(source=source or "moa search", calibration=tables.calibration,
                                  calibration_samples=tables.samples, solver=p.solver, solve_status=p.status,
                                  solve_seconds=round(p.seconds, 3), mip_gap=p.gap, pareto_point=p.point,
                                  study=study_name, epsilon=p.eps)))
    return plans


def search_plans(profiles: str | os.PathLike, budget: float, out_dir: str | os.PathLike, *, sink: int = 64,
                 min_span: int = 1, alpha_steps: int = 8, betas: Sequence[float] | None = None,
                 progress: bool = True, **options) -> SearchResult:
    """The `moa search` step from Python: loss tables from the profiles folder (`moa profile`'s
    output), then `search` with `options` (kind, granularity, solver, extend_lengths,
    pareto_points, time_limit, mip_gap, max_rules_per_layer, lower, score_fn, score_info,
    heatmap_length, source, console, jobs). Returns the SearchResult; result.plan is the chosen plan."""
    tables = load_tables(profiles, sink=sink, min_span=min_span, alpha_steps=alpha_steps, betas=betas,
                         progress=progress)
    return search(tables, budget, out_dir, progress=progress, **options)


# ----------------------------------------------------------------------------- CLI


EPILOG = """\
how it works:
  Candidates: every (alpha, beta) of the grid (--alpha-steps, --betas) whose span
  floor(alpha + beta N) satisfies 0 < span <= N at every profiled length N; the others
  are dropped. For every profiled length N, head h and candidate r, the predicted loss is
  the profiled influence the rule drops. One rule per head is chosen by a 0/1 program so
  the average density stays within --budget at every profiled and --extend-lengths length.
  The Pareto front over the per-length losses is swept by the epsilon-constraint method
  (--pareto-points solves): each solve minimises the loss at the longest profiled length
  plus 1e-4 x the losses at the other lengths (each loss divided by its worst possible
  value), some with the other lengths' losses bounded. Without --validation the chosen
  plan is the Pareto plan of lowest predicted loss at the longest profiled length; with
  --model and --validation, the one of lowest held-out loss. The solves are stored in
  OUTDIR/search.db: run the same command again to resume a stopped search.

outputs (in OUTDIR):
  plan.json            the chosen plan (load it with `moa generate --plan` or apply_plan)
  pareto/plan_XX.json  every Pareto plan with its predicted losses and score
  summary.csv          every solve: status, losses, densities, Pareto membership
  pareto_front.png     the front; chosen_spans.png: span/N of the chosen plan per layer x head

examples:
  moa search --profiles prof/ --budget 0.5 -o search/
  moa search --profiles prof/ --budget 0.25 --extend-lengths 32k --granularity query_head \\
             --model ckpt/ --validation val/ -o search/
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from moa_search.models import add_device_map_argument

    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = EPILOG
    p.add_argument("--profiles", required=True, metavar="DIR", help="folder of influence_N.safetensors (moa profile)")
    p.add_argument("--budget", required=True, type=float,
                   help="largest average density allowed at every length, in (0, 1] (e.g. 0.5 = half the KV cache)")
    p.add_argument("--lower", type=float, default=None,
                   help="smallest average density (MoA's optional lower bound; default none)")
    p.add_argument("--density", choices=["kv", "compute"], default="kv",
                   help="kv: cached tokens / N, decode memory (default); compute: kept pairs / causal pairs, prefill FLOPs")
    p.add_argument("--granularity", choices=["kv_head", "query_head"], default="kv_head",
                   help="kv_head: one rule per KV head, no wasted cache (default); query_head: one rule per query "
                        "head, a GQA group's cache costs its largest span")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output folder (also holds search.db)")
    p.add_argument("--solver", choices=list(milp.SOLVERS), default="highs",
                   help="highs (scipy.optimize.milp, default) or cbc (pulp); same model, same optimum")
    p.add_argument("--extend-lengths", default=None, metavar="LIST",
                   help="extra lengths (not profiled) where the budget must hold too, e.g. 32k,64k")
    p.add_argument("--pareto-points", type=int, default=20,
                   help="epsilon-constraint solves: one per profiled length plus a grid (default 20)")
    p.add_argument("--time-limit", type=float, default=None, metavar="S",
                   help="seconds per solve; a solve stopped early is kept and reported with its gap")
    p.add_argument("--mip-gap", type=float, default=1e-3,
                   help="relative optimality gap at which a solve counts as optimal (default 1e-3; 0 = prove exact "
                        "optimality, which can take minutes on 7B-sized problems)")
    p.add_argument("--max-rules-per-layer", type=int, default=None, metavar="K",
                   help="at most K distinct rules in each layer (default: no limit)")
    p.add_argument("--sink", type=int, default=64, help="sink tokens every head keeps (default 64)")
    p.add_argument("--min-span", type=int, default=1, help="smallest window (default 1)")
    p.add_argument("--alpha-steps", type=int, default=8,
                   help="candidate alphas k * L / STEPS for k = floor(-STEPS/4) .. STEPS, L the longest profiled "
                        "length (default 8: -L/4 .. L in steps of L/8; e.g. 6 gives -L/3 .. L)")
    p.add_argument("--betas", default=None, metavar="LIST", help="candidate betas (default 0,1/8,...,1)")
    p.add_argument("--model", default=None, metavar="MODEL_DIR",
                   help="score each Pareto plan with this model on --validation (choose by held-out loss)")
    p.add_argument("--validation", default=None, metavar="DIR",
                   help="datasets folder (save_to_disk) with input_ids, response_start, response_end; its items "
                        "should be longer than any profiled length")
    p.add_argument("--device", default=None, help="device for validation (default: cuda if available)")
    add_device_map_argument(p)
    from moa_search.models import add_gguf_argument

    add_gguf_argument(p)
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    p.add_argument("--heatmap-length", type=int, default=None,
                   help="length N of the span/N heatmap (default: the longest budget length)")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="solve this many Pareto points at once, one process each (default: 2, or 1 on one core)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def check_arguments(args) -> None:
    """Out-of-range flags fail here, before any profile or model loads."""
    def need(ok, message):
        if not ok:
            raise SearchError(message)

    need(0 < args.budget <= 1, f"--budget must be in (0, 1], got {args.budget:g}")
    need(args.lower is None or 0 <= args.lower < args.budget,
         f"--lower must be in [0, --budget), got {args.lower} with --budget {args.budget:g}")
    need(args.sink >= 0, f"--sink must be >= 0, got {args.sink}")
    check_counts(("--min-span", args.min_span), ("--alpha-steps", args.alpha_steps),
                 ("--pareto-points", args.pareto_points), ("--jobs", args.jobs),
                 ("--max-rules-per-layer", args.max_rules_per_layer), ("--heatmap-length", args.heatmap_length))
    need(args.time_limit is None or args.time_limit > 0, f"--time-limit must be > 0 seconds, got {args.time_limit}")
    need(args.mip_gap >= 0, f"--mip-gap must be >= 0, got {args.mip_gap}")
    need(Path(args.profiles).exists(), f"{args.profiles}: no such profile folder (make one with `moa profile`)")
    need(Path(args.profiles).is_dir(), f"{args.profiles}: a file; --profiles takes the folder `moa profile -o` wrote")


def run(args) -> int:
    check_arguments(args)
    if (args.model is None) != (args.validation is None):
        raise SearchError("give --model and --validation together (or neither: then the plan is chosen by "
                          "predicted loss)")
    betas = None
    if args.betas:
        try:
            betas = [float(b) for b in args.betas.split(",") if b.strip()]
        except ValueError:
            raise SearchError(f"--betas: expected numbers like 0,0.25,0.5, got {args.betas!r}") from None
    extend = R.lengths_arg("--extend-lengths", args.extend_lengths) if args.extend_lengths else []
    if args.model is not None:
        from moa_search.models import check_model

        check_model(args.model, getattr(args, "gguf_file", None))
    tables = load_tables(args.profiles, sink=args.sink, min_span=args.min_span, alpha_steps=args.alpha_steps,
                         betas=betas, progress=not args.quiet)
    score_fn, info = None, None
    if args.validation:
        import datasets

        from moa_search.models import load_model, parse_device_map

        try:
            data = datasets.load_from_disk(args.validation)
        except Exception as e:   # a missing or foreign folder: name it, not datasets' internals
            raise SearchError(f"--validation {args.validation}: not a saved dataset (make one with "
                              f"`moa calibrate`): {type(e).__name__}") from None
        # only the weights are needed (the data is already tokenized): no tokenizer required
        model, _ = load_model(args.model, args.device, args.dtype, parse_device_map(args.device_map), tokenizer=False,
                              gguf_file=args.gguf_file)
        score_fn = validation_scorer(model, data, progress=not args.quiet)
        longest = max(tables.lengths)
        if min(score_fn.lengths) <= longest:
            warnings.warn(f"validation items are {min(score_fn.lengths)}..{max(score_fn.lengths)} tokens; MoA "
                          f"selects at a length longer than any profiled one ({longest})", stacklevel=1)
        info = {"data": str(args.validation), "model": str(args.model), "items": len(score_fn.lengths),
                "max_length": max(score_fn.lengths), "metric_detail": "response-masked mean next-token loss"}
    res = search(tables, args.budget, args.output, kind=args.density, granularity=args.granularity,
                 solver=args.solver, extend_lengths=extend, pareto_points=args.pareto_points,
                 time_limit=args.time_limit, mip_gap=args.mip_gap, max_rules_per_layer=args.max_rules_per_layer,
                 lower=args.lower, score_fn=score_fn, score_info=info, heatmap_length=args.heatmap_length,
                 source=f"moa search --profiles {args.profiles}", progress=not args.quiet, jobs=args.jobs)
    if res.plan is None:
        return 1
    for w in sink_share_warnings(res.plan, str(res.files.get("plan", "plan.json"))):
        print(f"moa search: warning: {w}", file=sys.stderr)
    return 0


__all__ = ["search_plans", "search", "SearchResult", "add_arguments", "run",
           # built from (their homes: loss_tables, pareto, scoring)
           "loss_table", "density_table", "Tables", "load_tables", "make_problem", "plan_from_choice", "run_pareto",
           "non_dominated", "validation_scorer"]
