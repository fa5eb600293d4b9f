"""What a search writes and prints: the plans, summary.csv, the Pareto front and span PNGs, the table."""
from __future__ import annotations

import csv
import io
from pathlib import Path

from .files import atomic_write_text
from .milp import Problem
from .plan import Plan, save_plan


def write_outputs(res, problem: Problem, heatmap_length: int | None, console=None) -> None:
    """OUTDIR/plan.json, pareto/plan_XX.json, summary.csv, the PNGs, and the table on the console.
    res: a search.SearchResult."""
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


def plot_front(res, problem: Problem, path: Path) -> Path:
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


def print_summary(res, problem: Problem, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    con = console or Console()
    # narrow enough for 80 columns: per-length densities and solver details are in summary.csv
    samples, items = res.plan.provenance.get("calibration_samples"), res.plan.validation.get("items")
    caption = [f"predicted loss from {samples} profiled sample(s) per length"] if samples else []
    caption += [f"score: held-out loss on {items} item(s)"] if items else []
    t = Table(title=f"Pareto plans: {problem.kind} density <= {problem.budget:g} at every N in "
                    f"{', '.join(map(_short, problem.budget_lengths))}", caption="; ".join(caption) or None)
    for col in ["plan"] + [f"loss@{_short(n)}" for n in problem.loss_lengths] + ["max dens", "score"]:
        t.add_column(col, justify="right", no_wrap=True)
    for i, (plan, p, s) in enumerate(res.pareto):
        name = f"plan_{i:02d}" + (" [bold red]*[/]" if i == res.chosen else "")
        t.add_row(name, *[f"{v:.3g}" for v in p.losses], f"{max(p.densities):.3f}", "-" if s is None else f"{s:.4g}")
    con.print(t)
    con.print(f"[bold red]*[/] chosen; each plan's solve status and densities per length: {res.out_dir / 'summary.csv'}")
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


__all__ = ["write_outputs", "plot_front", "plot_spans", "print_summary"]
