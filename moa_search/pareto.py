"""The Pareto sweep of the search: epsilon-constraint points solved and stored in an optuna study.

m profiled lengths give m losses to minimise at once. Points 0..m-1 (the anchors) minimise
each length's loss alone: they give each loss's best value and its worst among the anchors.
The other points minimise the loss at the longest profiled length with the others bounded
at levels between those (`epsilon_levels`). Each point is one trial of a study stored in
OUTDIR/search.db with the fixed param "point"; a finished point (optimal, time-limited,
infeasible or failed) is read back, never solved again, so a stopped sweep resumes.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from . import milp
from .milp import Problem

DELTA = 1e-4          # weight of the non-primary losses in each objective: picks non-dominated plans among ties


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


@dataclass
class PointSpec:
    """What one point asks the solver: objective weights [m] and loss bounds [m] (None = none)."""

    point: int
    role: str
    weights: np.ndarray
    eps: list


@dataclass
class Sweep:
    """One sweep's study, the points it already holds, and how to solve the rest."""

    problem: Problem
    study: object                                  # optuna.Study
    done: dict[int, Point]                         # point id -> finished point read back from the study
    solver: str = "highs"
    time_limit: float | None = None
    mip_gap: float = 1e-3
    jobs: int = 1
    bar: object = None                             # tqdm progress bar
    open_trials: dict = field(default_factory=dict)


def objective_weights(m: int, primary: int, scale: np.ndarray) -> np.ndarray:
    """[m]: the primary length's loss, plus DELTA times the others' (each over its scale)."""
    w = np.full(m, DELTA) / scale
    w[primary] = 1.0 / scale[primary]
    return w


def epsilon_levels(m: int, points: int) -> list[tuple[float, ...]]:
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


def open_study(problem: Problem, out_dir: str | os.PathLike, settings: dict):
    """(study, finished points): the study of this problem and settings at OUTDIR/search.db,
    created or reopened. Trials left RUNNING by an interrupted run are failed (then redone)."""
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    m = problem.loss.shape[0]
    study = optuna.create_study(study_name=study_name(problem, settings), storage=f"sqlite:///{out / 'search.db'}",
                                directions=["minimize"] * m, load_if_exists=True,
                                sampler=optuna.samplers.RandomSampler(seed=0))
    study.set_user_attr("settings", json.dumps(settings, default=str))
    with warnings.catch_warnings():  # experimental in optuna, harmless: names the objectives in the storage
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([f"loss@{n}" for n in problem.loss_lengths])
    done: dict[int, Point] = {}
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.RUNNING:
            study.tell(t.number, state=TrialState.FAIL)
        elif "status" in t.user_attrs and "point" in t.params:
            done[int(t.params["point"])] = _point_from_trial(t)
    return study, done


def _point_from_trial(t) -> Point:
    ua = t.user_attrs
    choice = ua.get("choice")
    return Point(int(t.params["point"]), ua.get("role", "?"), ua.get("eps"), ua["status"], ua.get("solver", "?"),
                 float(ua.get("seconds") or 0.0), ua.get("gap"), ua.get("message", ""),
                 None if choice is None else np.asarray(choice, dtype=np.int64),
                 list(t.values) if t.values is not None else None, ua.get("densities"))


def _ask(sweep: Sweep, spec: PointSpec):
    trial = sweep.study.ask()
    trial.suggest_int("point", spec.point, spec.point)       # fixed: the point id names the trial
    sweep.open_trials[spec.point] = trial
    return trial


def _record(sweep: Sweep, spec: PointSpec, sol: milp.Solution) -> Point:
    """Store a solve in its trial (user attrs; the losses as the trial's values) and close it."""
    from optuna.trial import TrialState

    trial = sweep.open_trials.pop(spec.point)
    pt = Point(spec.point, spec.role, [None if e is None or not np.isfinite(e) else float(e) for e in spec.eps],
               sol.status, sol.solver, sol.seconds, sol.gap, sol.message, sol.choice,
               None if sol.losses is None else sol.losses.tolist(),
               None if sol.densities is None else sol.densities.tolist())
    for key, value in (("role", pt.role), ("eps", pt.eps), ("solver", pt.solver), ("seconds", pt.seconds),
                       ("gap", pt.gap), ("message", str(pt.message)[:500]), ("densities", pt.densities),
                       ("choice", None if pt.choice is None else pt.choice.tolist()), ("status", pt.status)):
        trial.set_user_attr(key, value)
    if pt.feasible:
        sweep.study.tell(trial, pt.losses)
    else:
        sweep.study.tell(trial, state=TrialState.FAIL)
    if sweep.bar is not None:
        sweep.bar.update(1)
    return pt


def _solve_in_workers(sweep: Sweep, todo: list[PointSpec], solved: dict[int, Point], kw: dict) -> None:
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with ProcessPoolExecutor(min(sweep.jobs, len(todo))) as ex:
        futures = {}
        for spec in todo:
            _ask(sweep, spec)
            futures[ex.submit(milp.solve, sweep.problem, spec.weights, spec.eps, **kw)] = spec
        try:
            for f in as_completed(futures):
                spec = futures[f]
                try:
                    sol = f.result()
                except Exception as e:   # a worker died: report the point as failed
                    sol = milp.Solution("failed", sweep.solver, 0.0, message=f"worker error: {e!r}")
                solved[spec.point] = _record(sweep, spec, sol)
        except BaseException:
            ex.shutdown(wait=False, cancel_futures=True)
            raise


def solve_points(sweep: Sweep, specs: Sequence[PointSpec]) -> list[Point]:
    """The points of `specs`, in order: read back when the study holds them, else solved (with
    jobs > 1 in worker processes). On an interruption the open trials are failed, so a
    resumed run redoes them."""
    from optuna.trial import TrialState

    solved: dict[int, Point] = {}
    for spec in specs:
        if spec.point in sweep.done:
            sweep.done[spec.point].resumed = True
            solved[spec.point] = sweep.done[spec.point]
    todo = [spec for spec in specs if spec.point not in solved]
    kw = dict(solver=sweep.solver, time_limit=sweep.time_limit, mip_gap=sweep.mip_gap)
    try:
        if sweep.jobs <= 1 or len(todo) <= 1:
            for spec in todo:
                _ask(sweep, spec)
                solved[spec.point] = _record(sweep, spec, milp.solve(sweep.problem, spec.weights, spec.eps, **kw))
        else:
            _solve_in_workers(sweep, todo, solved, kw)
    except BaseException:
        for trial in sweep.open_trials.values():      # no "status": a resumed run redoes them
            sweep.study.tell(trial, state=TrialState.FAIL)
        sweep.open_trials.clear()
        raise
    return [solved[spec.point] for spec in specs]


def anchor_specs(problem: Problem, scale: np.ndarray) -> list[PointSpec]:
    """Points 0..m-1: each profiled length's loss minimised alone."""
    m = problem.loss.shape[0]
    return [PointSpec(i, f"anchor:{problem.loss_lengths[i]}", objective_weights(m, i, scale), [None] * m)
            for i in range(m)]


def epsilon_specs(problem: Problem, anchors: Sequence[Point], levels, scale: np.ndarray) -> list[PointSpec]:
    """Points m..: the longest length's loss, the others bounded between their best and worst
    values among the feasible anchors."""
    m = problem.loss.shape[0]
    primary = m - 1                                   # longest profiled length
    vals = np.array([p.losses for p in anchors])
    ideal, nadir = vals.min(0), vals.max(0)
    others = [j for j in range(m) if j != primary]
    specs = []
    for k, level in enumerate(levels):
        eps = [None] * m
        for j, t in zip(others, level):
            eps[j] = ideal[j] + t * (nadir[j] - ideal[j])
        specs.append(PointSpec(m + k, "eps", objective_weights(m, primary, scale), eps))
    return specs


def run_pareto(problem: Problem, out_dir: str | os.PathLike, points: int = 20, solver: str = "highs",
               time_limit: float | None = None, mip_gap: float = 1e-3, settings: dict | None = None,
               progress: bool = True, jobs: int = 1) -> tuple[list[Point], "object"]:
    """Run (or resume) the epsilon-constraint sweep in an optuna study at OUTDIR/search.db
    (module docstring). jobs > 1 solves independent points in that many worker processes.
    Returns (points, study)."""
    from tqdm.auto import tqdm

    study, done = open_study(problem, out_dir, settings or {})
    m = problem.loss.shape[0]
    scale = milp.loss_scale(problem)
    levels = epsilon_levels(m, points)
    total = m + len(levels)
    bar = tqdm(total=total, desc="pareto points", disable=not progress, initial=len([p for p in done if p < total]))
    sweep = Sweep(problem, study, done, solver, time_limit, mip_gap, jobs, bar)
    results = solve_points(sweep, anchor_specs(problem, scale))
    anchors = [p for p in results if p.feasible]
    if levels and anchors:
        results += solve_points(sweep, epsilon_specs(problem, anchors, levels, scale))
    bar.close()
    return results, study


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


__all__ = ["DELTA", "Point", "PointSpec", "Sweep", "objective_weights", "epsilon_levels", "study_name", "open_study",
           "solve_points", "anchor_specs", "epsilon_specs", "run_pareto", "non_dominated"]
