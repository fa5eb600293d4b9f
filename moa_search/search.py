"""`moa search`: from influence profiles to a Pareto set of per-head rules and one plan.

    profiles (influence_N.safetensors per length N)
      -> loss[l, h, r]    influence the rule r drops for head h at profiled length l
         density[n, r]    the rule's KV or compute density at every budget length n
      -> 0/1 programs (moa_search.milp), one per epsilon-constraint point, run by an optuna
         study stored in OUTDIR/search.db (a stopped search resumes where it stopped)
      -> the non-dominated plans, scored on held-out data when a scorer is given
      -> OUTDIR/plan.json (chosen), OUTDIR/pareto/plan_XX.json, summary.csv, PNGs

The loss of a rule is the sum over blocks of the block's influence times the fraction of
that block's causal entries the rule drops, computed exactly at token level (DESIGN.md 3-5).
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import itertools
import json
import math
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from . import milp
from .apply import input_device
from . import rules as R
from .milp import Problem, SearchError
from .plan import ModelShape, Plan, atomic_write_text, provenance, save_plan

DELTA = 1e-4          # weight of the non-primary losses in each objective: picks non-dominated plans among ties
SCORE_ATTR = "score:"  # study user-attr prefix caching validation scores per plan


# ----------------------------------------------------------------------------- loss and density tables


def _prefix_clip(m: np.ndarray, w: np.ndarray) -> np.ndarray:
    """sum over integers k < m of clip(k, 0, w) (w >= 0), elementwise, closed form."""
    mm = np.clip(m - 1, 0, w)
    return mm * (mm + 1) // 2 + np.maximum(m - 1 - w, 0) * w


def _rows_sum(r0, r1, t, w):
    """sum over rows i in [r0, r1) of clip(i + t, 0, w): how many entries of a block the rows hold."""
    return _prefix_clip(r1 + t, w) - _prefix_clip(r0 + t, w)


def block_drop_fraction(n: int, block_size: int, sink: int, spans: Sequence[int]) -> np.ndarray:
    """Fraction of each block's causal entries that a rule drops: float64 [R, nb, nb].

    n: sequence length; nb = ceil(n / block_size) (the last block may be short); spans: [R]
    windows span(n) of the rules (>= 1). Token level, exactly moa_search.rules.kept: row i
    drops j iff sink <= j <= i - span. Blocks with no causal entry get 0.

    Interval arithmetic: in block (bq, bk) with rows [r0, r1) and columns [c0, c1), row i
    holds clip(i - c0 + 1, 0, c1 - c0) causal entries and drops
    clip(i - span - a + 1, 0, c1 - a) of them, a = max(c0, sink); both sum over rows in
    closed form.
    """
    nb = -(-n // block_size)
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


def loss_table(influence, n: int, block_size: int, sink: int, rules: Sequence[R.Rule], min_span: int = 1) -> np.ndarray:
    """Loss of every rule for every head at length n: float64 [L, H, R].

    influence: [L, H, nb, nb] block sums (torch or numpy; float64). One matrix product over
    the flattened blocks: loss[h, r] = sum_b influence[h, b] * dropped_fraction[r, b].
    """
    infl = influence.detach().cpu().numpy() if hasattr(influence, "detach") else np.asarray(influence)
    infl = np.ascontiguousarray(infl, dtype=np.float64)
    L, H, nb, nb2 = infl.shape
    if nb != nb2 or nb != -(-n // block_size):
        raise SearchError(f"influence at length {n} has {nb}x{nb2} blocks, expected {-(-n // block_size)} "
                          f"(block size {block_size})")
    spans = [r.span(n, min_span) for r in rules]
    frac = block_drop_fraction(n, block_size, sink, spans).reshape(len(rules), nb * nb)
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


# ----------------------------------------------------------------------------- the problem


def make_problem(tables: Tables, budget: float, kind: str = "kv", granularity: str = "kv_head",
                 extend_lengths: Sequence[int] = (), lower: float | None = None,
                 max_rules_per_layer: int | None = None) -> Problem:
    """The 0/1 program for one budget. kv_head: one rule per KV head, influence summed over its
    query heads. query_head: one rule per query head; with KV density a group costs its max span."""
    if granularity not in ("kv_head", "query_head"):
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


# ----------------------------------------------------------------------------- the Pareto front


@dataclass
class Point:
    """One epsilon-constraint point: what was asked and what the solver said."""

    point: int
    role: str                      # "anchor:N" (min loss at N alone) or "eps"
    eps: list                      # per profiled length, None = unbounded
    status: str
    solver: str
    seconds: float
    gap: float | None = None
    message: str = ""
    choice: np.ndarray | None = None
    losses: list | None = None     # per profiled length
    densities: list | None = None  # per budget length
    resumed: bool = False

    @property
    def feasible(self) -> bool:
        return self.choice is not None


def _weights(m: int, primary: int, scale: np.ndarray) -> np.ndarray:
    w = np.full(m, DELTA) / scale
    w[primary] = 1.0 / scale[primary]
    return w


def _grid(m: int, points: int) -> list[tuple[float, ...]]:
    """Levels t in (0, 1) for the m-1 non-primary losses: eps = ideal + t (nadir - ideal).

    The ends are left to the anchors: t = 1 is the primary's own anchor, and t = 0 (another
    loss held at its very best) is that loss's anchor or infeasible, and the hardest to solve."""
    if m < 2 or points <= m:
        return []
    k = max(1, int(math.floor((points - m) ** (1.0 / (m - 1)) + 1e-9)))
    return list(itertools.product(*[[(i + 1) / (k + 1) for i in range(k)]] * (m - 1)))


def study_name(problem: Problem, settings: dict) -> str:
    """Same problem and settings -> same study (resume); anything else -> a fresh one."""
    h = hashlib.sha256()
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    h.update(np.ascontiguousarray(problem.loss).tobytes())
    h.update(np.ascontiguousarray(problem.density).tobytes())
    return "moa-search-" + h.hexdigest()[:16]


def run_pareto(problem: Problem, out_dir: str | os.PathLike, points: int = 20, solver: str = "highs",
                  time_limit: float | None = None, mip_gap: float = 1e-3, settings: dict | None = None,
                  progress: bool = True, jobs: int = 1) -> tuple[list[Point], "object"]:
    """Run (or resume) the epsilon-constraint sweep in an optuna study at OUTDIR/search.db.

    Points 0..m-1 minimise each profiled length's loss alone (anchors: they give each loss's
    best value and its worst among the anchors); the rest minimise the loss at the longest
    profiled length with the others bounded at levels between those. Each point is one trial
    with param "point"; finished points (optimal, time-limited, infeasible or failed) are read
    back, never solved again; trials left RUNNING by an interrupted run are failed and redone.
    jobs > 1 solves independent points in that many worker processes. Returns (points, study).
    """
    import optuna
    from optuna.trial import TrialState
    from tqdm.auto import tqdm

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    m = problem.loss.shape[0]
    primary = m - 1                                   # longest profiled length
    name = study_name(problem, settings or {})
    study = optuna.create_study(study_name=name, storage=f"sqlite:///{out / 'search.db'}",
                                directions=["minimize"] * m, load_if_exists=True,
                                sampler=optuna.samplers.RandomSampler(seed=0))
    study.set_user_attr("settings", json.dumps(settings or {}, default=str))
    with warnings.catch_warnings():  # experimental in optuna, harmless: names the objectives in the storage
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([f"loss@{n}" for n in problem.loss_lengths])
    done: dict[int, Point] = {}
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.RUNNING:               # left behind by an interrupted run
            study.tell(t.number, state=TrialState.FAIL)
        elif "status" in t.user_attrs and "point" in t.params:
            done[int(t.params["point"])] = _point_from_trial(t)
    scale = milp.loss_scale(problem)
    grid = _grid(m, points)
    total = m + len(grid)
    bar = tqdm(total=total, desc="pareto points", disable=not progress, initial=len([p for p in done if p < total]))

    def finish(spec, trial, sol: milp.Solution) -> Point:
        idx, role, weights, eps = spec
        pt = Point(idx, role, [None if e is None or not np.isfinite(e) else float(e) for e in eps],
                   sol.status, sol.solver, sol.seconds, sol.gap, sol.message, sol.choice,
                   None if sol.losses is None else sol.losses.tolist(),
                   None if sol.densities is None else sol.densities.tolist())
        for key, value in (("role", pt.role), ("eps", pt.eps), ("solver", pt.solver), ("seconds", pt.seconds),
                           ("gap", pt.gap), ("message", str(pt.message)[:500]), ("densities", pt.densities),
                           ("choice", None if pt.choice is None else pt.choice.tolist()), ("status", pt.status)):
            trial.set_user_attr(key, value)
        if pt.feasible:
            study.tell(trial, pt.losses)
        else:
            study.tell(trial, state=TrialState.FAIL)
        bar.update(1)
        return pt

    def ask(idx):
        trial = study.ask()
        trial.suggest_int("point", idx, idx)       # fixed: the point id names the trial
        return trial

    def solve_all(specs) -> list[Point]:
        """Solve the points not finished before; with jobs > 1 in worker processes."""
        out = {}
        for spec in specs:
            if spec[0] in done:
                done[spec[0]].resumed = True
                out[spec[0]] = done[spec[0]]
        todo = [spec for spec in specs if spec[0] not in out]
        kw = dict(solver=solver, time_limit=time_limit, mip_gap=mip_gap)
        open_trials = {}
        try:
            if jobs <= 1 or len(todo) <= 1:
                for spec in todo:
                    open_trials[spec[0]] = trial = ask(spec[0])
                    out[spec[0]] = finish(spec, trial, milp.solve(problem, spec[2], spec[3], **kw))
                    del open_trials[spec[0]]
            else:
                from concurrent.futures import ProcessPoolExecutor, as_completed

                with ProcessPoolExecutor(min(jobs, len(todo))) as ex:
                    futures = {}
                    for spec in todo:
                        open_trials[spec[0]] = ask(spec[0])
                        futures[ex.submit(milp.solve, problem, spec[2], spec[3], **kw)] = spec
                    try:
                        for f in as_completed(futures):
                            spec = futures[f]
                            try:
                                sol = f.result()
                            except Exception as e:   # a worker died: report the point as failed
                                sol = milp.Solution("failed", solver, 0.0, message=f"worker error: {e!r}")
                            out[spec[0]] = finish(spec, open_trials.pop(spec[0]), sol)
                    except BaseException:
                        ex.shutdown(wait=False, cancel_futures=True)
                        raise
        except BaseException:
            for trial in open_trials.values():      # no "status": a resumed run redoes them
                study.tell(trial, state=TrialState.FAIL)
            raise
        return [out[spec[0]] for spec in specs]

    results = solve_all([(i, f"anchor:{problem.loss_lengths[i]}", _weights(m, i, scale), [None] * m)
                         for i in range(m)])
    anchors = [p for p in results if p.feasible]
    if grid and anchors:
        vals = np.array([p.losses for p in anchors])
        ideal, nadir = vals.min(0), vals.max(0)
        others = [j for j in range(m) if j != primary]
        specs = []
        for k, levels in enumerate(grid):
            eps = [None] * m
            for j, t in zip(others, levels):
                eps[j] = ideal[j] + t * (nadir[j] - ideal[j])
            specs.append((m + k, "eps", _weights(m, primary, scale), eps))
        results += solve_all(specs)
    bar.close()
    return results, study


def _point_from_trial(t) -> Point:
    ua = t.user_attrs
    choice = ua.get("choice")
    return Point(int(t.params["point"]), ua.get("role", "?"), ua.get("eps"), ua["status"], ua.get("solver", "?"),
                 float(ua.get("seconds") or 0.0), ua.get("gap"), ua.get("message", ""),
                 None if choice is None else np.asarray(choice, dtype=np.int64),
                 list(t.values) if t.values is not None else None, ua.get("densities"))


def non_dominated(points: Sequence[Point]) -> list[Point]:
    """Feasible points no other feasible point beats at every length; one per distinct plan,
    ordered by loss at the longest profiled length."""
    feas = [p for p in points if p.feasible]
    seen, unique = set(), []
    for p in sorted(feas, key=lambda p: (p.losses[-1], p.point)):
        key = p.choice.tobytes()
        if key not in seen:
            seen.add(key)
            unique.append(p)
    vals = np.array([p.losses for p in unique]) if unique else np.zeros((0, 0))
    keep = []
    for i, p in enumerate(unique):
        v = vals[i]
        dominated = np.any(np.all(vals <= v, axis=1) & np.any(vals < v - 1e-12 * np.abs(v), axis=1))
        if not dominated:
            keep.append(p)
    return keep


# ----------------------------------------------------------------------------- search


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
    budget_info = {"kind": kind, "density": float(budget), "lengths": problem.budget_lengths,
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
                                  study=study.study_name, epsilon=p.eps)))
    scores: list[float | None] = [None] * len(plans)
    longest = tables.lengths[-1]
    if score_fn is not None:
        from tqdm.auto import tqdm

        tag = json.dumps(score_info or {}, sort_keys=True, default=str)
        cached = study.user_attrs
        for i, (plan, p) in enumerate(tqdm(list(zip(plans, front)), desc="scoring plans", disable=not progress)):
            key = SCORE_ATTR + hashlib.sha256((tag + p.choice.tobytes().hex()).encode()).hexdigest()[:16]
            if key in cached:
                scores[i] = float(cached[key])
            else:
                scores[i] = float(score_fn(plan))
                study.set_user_attr(key, scores[i])
            plan.validation = {"metric": score_name, "score": scores[i], **(score_info or {})}
        finite = [i for i, s in enumerate(scores) if s is not None and math.isfinite(s)]
        if not finite:
            raise SearchError("every Pareto plan scored NaN/inf on the validation data")
        chosen = min(finite, key=lambda i: scores[i])
        selection = f"lowest {score_name} on the validation data among {len(plans)} Pareto plans"
    else:
        chosen = min(range(len(plans)), key=lambda i: front[i].losses[-1])
        selection = (f"no validation set given: chose the lowest predicted loss at the longest profiled length "
                     f"N={longest} among {len(plans)} Pareto plans (give --model and --validation to choose by "
                     f"held-out loss at a longer length, as MoA does)")
        for plan in plans:
            plan.validation = {"selected_by": f"predicted loss at N={longest}", "score": None}
    plans[chosen].validation["chosen"] = True
    plans[chosen].provenance["selection"] = selection
    result = SearchResult(plans[chosen], chosen, list(zip(plans, front, scores)), points, selection, out)
    _export(result, tables, problem, heatmap_length, console)
    return result



# ----------------------------------------------------------------------------- export


def _export(res: SearchResult, tables: Tables, problem: Problem, heatmap_length: int | None, console) -> None:
    out = res.out_dir
    pdir = out / "pareto"
    pdir.mkdir(parents=True, exist_ok=True)
    for old in pdir.glob("plan_*.json"):      # a previous search's plans must not linger beside these
        old.unlink()
    names = {}
    for i, (plan, p, score) in enumerate(res.pareto):
        names[p.point] = f"pareto/plan_{i:02d}.json"
        save_plan(plan, out / names[p.point])
    save_plan(res.plan, out / "plan.json")
    pareto_ids = {p.point for _, p, _ in res.pareto}
    scores = {p.point: s for _, p, s in res.pareto}
    chosen_point = res.pareto[res.chosen][1].point
    header = (["point", "role", "status", "solver", "seconds", "gap"]
              + [f"loss@{n}" for n in problem.loss_lengths] + [f"eps@{n}" for n in problem.loss_lengths]
              + [f"{problem.kind}_density@{n}" for n in problem.budget_lengths]
              + ["max_distinct_rules_per_layer", "pareto", "plan_file", "score", "chosen", "resumed", "message"])
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    for p in sorted(res.points, key=lambda p: p.point):
        distinct = int(problem.distinct_per_layer(p.choice).max()) if p.feasible else ""
        w.writerow([p.point, p.role, p.status, p.solver, f"{p.seconds:.3f}", "" if p.gap is None else f"{p.gap:.2e}"]
                   + ([f"{v:.6g}" for v in p.losses] if p.losses else [""] * len(problem.loss_lengths))
                   + ["" if e is None else f"{e:.6g}" for e in (p.eps or [None] * len(problem.loss_lengths))]
                   + ([f"{v:.6f}" for v in p.densities] if p.densities else [""] * len(problem.budget_lengths))
                   + [distinct, p.point in pareto_ids, names.get(p.point, ""),
                      "" if scores.get(p.point) is None else f"{scores[p.point]:.6g}",
                      p.point == chosen_point, p.resumed, p.message if p.status != "optimal" else ""])
    atomic_write_text(out / "summary.csv", buf.getvalue())
    res.files.update(plan=out / "plan.json", summary=out / "summary.csv", pareto=pdir, study=out / "search.db")
    res.files["front_png"] = plot_front(res, problem, out / "pareto_front.png")
    n_heat = heatmap_length or problem.budget_lengths[-1]
    res.files["heatmap_png"] = plot_spans(res.plan, n_heat, out / "chosen_spans.png")
    print_summary(res, problem, console)


def plot_front(res: SearchResult, problem: Problem, path: Path) -> Path:
    """Loss at the longest profiled length against each other length's loss; all points,
    the non-dominated ones, and the chosen plan."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lens = problem.loss_lengths
    m = len(lens)
    feas = [p for p in res.points if p.feasible]
    front = [p for _, p, _ in res.pareto]
    chosen = res.pareto[res.chosen][1]
    others = list(range(m - 1)) or [None]
    fig, axes = plt.subplots(1, len(others), figsize=(5 * len(others), 4.2), squeeze=False)
    for ax, j in zip(axes[0], others):
        def xy(ps):
            return ([p.losses[j] if j is not None else p.densities[-1] for p in ps], [p.losses[-1] for p in ps])
        ax.scatter(*xy(feas), c="lightgray", label="solved points")
        ax.scatter(*xy(front), c="tab:blue", label="Pareto plans")
        ax.scatter(*xy([chosen]), c="tab:red", marker="*", s=200, label="chosen")
        ax.set_xlabel(f"predicted loss at N={lens[j]}" if j is not None else f"{problem.kind} density")
        ax.set_ylabel(f"predicted loss at N={lens[-1]}")
        for axis, values in (("x", xy(feas)[0]), ("y", xy(feas)[1])):
            lo_v, hi_v = min(values), max(values)
            if lo_v > 0 and hi_v / lo_v > 20:     # the anchors of other lengths can be far off: log scale
                getattr(ax, f"set_{axis}scale")("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Pareto front, {problem.kind} density budget {problem.budget:g} at N={problem.budget_lengths}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_spans(plan: Plan, n: int, path: Path) -> Path:
    """Layer x query head heatmap of span(N)/N of the plan."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frac = plan.spans(n) / n
    L, H = frac.shape
    fig, ax = plt.subplots(figsize=(max(4, 0.25 * H + 2), max(3, 0.2 * L + 1.5)))
    im = ax.imshow(frac, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xlabel("query head")
    ax.set_ylabel("layer")
    ax.set_title(f"span / N at N={n} (sink {plan.sink}, {plan.granularity})")
    fig.colorbar(im, ax=ax, label="span / N")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _short(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def print_summary(res: SearchResult, problem: Problem, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    # piped output (a log, a CI job) would otherwise get rich's 80 columns and truncated numbers
    con = console or (Console() if sys.stdout.isatty() else Console(width=160))
    t = Table(title=f"Pareto plans ({problem.kind} density <= {problem.budget:g} at N={problem.budget_lengths})")
    for col in (["plan", "point", "status"] + [f"loss@{_short(n)}" for n in problem.loss_lengths]
                + [f"dens@{_short(n)}" for n in problem.budget_lengths] + ["score", ""]):
        t.add_column(col, justify="right")
    for i, (plan, p, s) in enumerate(res.pareto):
        t.add_row(f"plan_{i:02d}", str(p.point), p.status, *[f"{v:.4g}" for v in p.losses],
                  *[f"{v:.4f}" for v in p.densities], "-" if s is None else f"{s:.4f}",
                  "[bold red]chosen[/]" if i == res.chosen else "")
    con.print(t)
    bad = [p for p in res.points if p.status != "optimal"]
    for p in sorted(bad, key=lambda p: p.point):
        what = {"time_limit": "stopped at the time limit (feasible, not proven optimal",
                "infeasible": "infeasible (its loss bounds cannot all hold", "failed": "failed ("}[p.status]
        gap = f", gap {p.gap:.2e}" if p.gap is not None else ""
        con.print(f"[yellow]point {p.point} ({p.role}): {what}{gap}) {p.message}[/]")
    resumed = sum(p.resumed for p in res.points)
    if resumed:
        con.print(f"resumed: {resumed} of {len(res.points)} points read back from {res.out_dir / 'search.db'}")
    con.print(f"selection: {res.selection}")
    con.print(f"wrote {res.files['plan']}, {len(res.pareto)} plans in {res.files['pareto']}, {res.files['summary']}, "
              f"{res.files['front_png'].name}, {res.files['heatmap_png'].name}")


# ----------------------------------------------------------------------------- validation scorer


def validation_scorer(model, dataset, backend: str = "auto", progress: bool = False) -> Callable[[Plan], float]:
    """score_fn(plan): response-masked mean next-token loss of `dataset` with `plan` applied.

    dataset: rows with input_ids (list[int]), response_start, response_end (half-open token span
    of the response; response_start >= 1). Token-weighted mean over all items. The model is
    left without a plan afterwards.
    """
    import torch

    from .apply import apply_plan, remove_plan
    from .eval import response_loss

    for col in ("input_ids", "response_start", "response_end"):
        if col not in dataset.column_names:
            raise SearchError(f"validation data lacks column {col!r} (has {dataset.column_names})")
    items = []
    for k, row in enumerate(dataset):
        ids, rs, re = list(row["input_ids"]), int(row["response_start"]), int(row["response_end"])
        if not 1 <= rs < re <= len(ids):
            raise SearchError(f"validation item {k}: response span [{rs}, {re}) must satisfy 1 <= start < end <= "
                              f"{len(ids)} (the number of input_ids)")
        items.append((ids, rs, re))
    device = input_device(model)

    def score(plan: Plan) -> float:
        from tqdm.auto import tqdm

        apply_plan(model, plan, backend=backend)
        total, count = 0.0, 0
        try:
            with torch.no_grad():
                for ids, rs, re in tqdm(items, desc="validation", disable=not progress, leave=False):
                    x = torch.tensor([ids], device=device)
                    total += float(response_loss(model, x[0, rs:re], rs, reduction="sum", input_ids=x))
                    count += re - rs
        finally:
            remove_plan(model)
        return total / count

    score.lengths = [len(i[0]) for i in items]
    return score


# ----------------------------------------------------------------------------- CLI


EPILOG = """\
how it works:
  For every profiled length N, head h and candidate rule r (span = clamp(alpha + beta N)),
  the predicted loss is the profiled influence the rule drops. One rule per head is chosen
  by a 0/1 program so the average density stays within --budget at every profiled and
  --extend-lengths length. The Pareto front over the per-length losses is swept by the
  epsilon-constraint method (--pareto-points solves), stored in OUTDIR/search.db: run the
  same command again to resume a stopped search.

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
                   help="candidate alphas: -L/4 .. L in steps of L/STEPS, L the longest profiled length (default 8)")
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


def run(args) -> int:
    if (args.model is None) != (args.validation is None):
        raise SearchError("give --model and --validation together (or neither: then the plan is chosen by "
                          "predicted loss)")
    betas = None
    if args.betas:
        try:
            betas = [float(b) for b in args.betas.split(",") if b.strip()]
        except ValueError:
            raise SearchError(f"--betas: expected numbers like 0,0.25,0.5, got {args.betas!r}") from None
    extend = R.parse_lengths(args.extend_lengths) if args.extend_lengths else []
    tables = load_tables(args.profiles, sink=args.sink, min_span=args.min_span, alpha_steps=args.alpha_steps,
                         betas=betas, progress=not args.quiet)
    score_fn, info = None, None
    if args.validation:
        import datasets

        from moa_search.models import load_model, parse_device_map

        data = datasets.load_from_disk(args.validation)
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
    return 0 if res.plan is not None else 1


__all__ = ["block_drop_fraction", "loss_table", "density_table", "Tables", "load_tables", "make_problem",
           "plan_from_choice", "run_pareto", "non_dominated", "search", "SearchResult", "validation_scorer",
           "add_arguments", "run"]
