"""Choosing among the Pareto plans: each scored on held-out data (MoA's selection) or, without
it, by the predicted loss at the longest profiled length.
"""
from __future__ import annotations

import hashlib
import json
import math
from typing import Callable, Sequence

from .milp import SearchError
from .pareto import Point
from .plan import Plan

SCORE_ATTR = "score:"  # study user-attr prefix caching validation scores per plan


def score_plans(plans: Sequence[Plan], front: Sequence[Point], study, score_fn: Callable[[Plan], float],
                score_name: str = "validation loss", score_info: dict | None = None,
                progress: bool = True) -> list[float]:
    """score_fn(plan) of every plan (lower is better), cached in the study by the plan's choice
    and the scorer's description, so a resumed search does not score a plan twice. Each plan's
    `validation` field records its score."""
    from tqdm.auto import tqdm

    tag = json.dumps(score_info or {}, sort_keys=True, default=str)
    cached = study.user_attrs
    scores = []
    for plan, p in tqdm(list(zip(plans, front)), desc="scoring plans", disable=not progress):
        key = SCORE_ATTR + hashlib.sha256((tag + p.choice.tobytes().hex()).encode()).hexdigest()[:16]
        if key in cached:
            score = float(cached[key])
        else:
            score = float(score_fn(plan))
            study.set_user_attr(key, score)
        scores.append(score)
        plan.validation = {"metric": score_name, "score": score, **(score_info or {})}
    return scores


def choose_plan(plans: Sequence[Plan], front: Sequence[Point], scores: Sequence[float | None],
                longest: int, score_name: str = "validation loss") -> tuple[int, str]:
    """(index of the chosen plan, how it was chosen in words): the lowest finite score, or
    without scores the lowest predicted loss at the longest profiled length."""
    if any(s is not None for s in scores):
        finite = [i for i, s in enumerate(scores) if s is not None and math.isfinite(s)]
        if not finite:
            raise SearchError("every Pareto plan scored NaN/inf on the validation data")
        chosen = min(finite, key=lambda i: scores[i])
        return chosen, f"lowest {score_name} on the validation data among {len(plans)} Pareto plans"
    chosen = min(range(len(plans)), key=lambda i: front[i].losses[-1])
    selection = (f"no validation set given: chose the lowest predicted loss at the longest profiled length "
                 f"N={longest} among {len(plans)} Pareto plans (give --model and --validation to choose by "
                 f"held-out loss at a longer length, as MoA does)")
    for plan in plans:
        plan.validation = {"selected_by": f"predicted loss at N={longest}", "score": None}
    return chosen, selection


def validation_scorer(model, dataset, backend: str = "auto", progress: bool = False) -> Callable[[Plan], float]:
    """score_fn(plan): response-masked mean next-token loss of `dataset` with `plan` applied.

    dataset: rows with input_ids (list[int]), response_start, response_end (half-open token span
    of the response; response_start >= 1). Token-weighted mean over all items. The model is
    left without a plan afterwards.
    """
    import torch

    from .apply import apply_plan, input_device, remove_plan
    from .losses import response_loss

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


__all__ = ["SCORE_ATTR", "score_plans", "choose_plan", "validation_scorer"]
