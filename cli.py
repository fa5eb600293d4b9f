"""`moa`: per-head elastic sparse attention (MoA) for a Hugging Face model.

The pipeline on your checkpoint M (a local folder), one command a step:

  1. the model answers long-context prompts (its answers calibrate it)
       moa calibrate --model M -o calib
  2. measure how far back each head needs to look, at several lengths
       moa profile --model M --data calib --lengths 2048,4096,8192 -o prof
  3. choose a rule per head under a density budget: search/plan.json
       moa search --profiles prof --budget 0.5 --extend-lengths 16k -o search
  4. compare dense, the plan and the uniform baseline; use the plan
       moa eval --model M --dense --plan search/plan.json \\
                --uniform-density 0.5 -o eval
       moa generate --model M --plan search/plan.json --prompt "..."

M may also be a GGUF file (llama.cpp's format; pip install "moa-search[gguf]");
`moa convert-gguf M.gguf -o DIR` writes it once as a safetensors folder.

Plans and speed:
  moa plan inspect search/plan.json          densities per length and per layer
  moa plan uniform --model M --span-fraction 0.5 -o uniform.json
  moa bench decode --model-shape llama-7b --density 0.5      (GPU)

Try it all on the small model that ships with moa-search: `moa demo --quick`
(a smoke run, under a minute on a CPU), then `moa demo`. `moa COMMAND --help`
explains each step. An interrupted calibrate, profile or search resumes when
the same command runs again.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

from moa_search.errors import check
from moa_search.models import add_device_map_argument, load_model, parse_device_map
from moa_search.rules import lengths_arg

COMMANDS = {
    # name: (module, one-line help, issue that builds it)
    "calibrate": ("moa_search.calibrate", "build a calibration set answered by the model itself", 3),
    "profile": ("moa_search.profiler.run", "measure per-head attention influence at several lengths", 3),
    "search": ("moa_search.search", "search per-head elastic rules under a density budget, export a plan", 4),
    "plan": ("moa_search.cli", "inspect, convert or build plan files", 2),
    "generate": ("moa_search.cli", "generate text with a plan applied", 2),
    "eval": ("moa_search.eval", "retrieval accuracy and perplexity: dense vs plans", 7),
    "bench": ("moa_search.bench", "time kernels and decode against dense SDPA and FlexAttention", 5),
    "demo": ("moa_search.demo", "run the whole pipeline on the embedded model", 7),
    "convert-gguf": ("moa_search.models", "write a GGUF model once as a safetensors checkpoint folder", 19),
}


# ----------------------------------------------------------------------------- moa plan


def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="plan_command", metavar="ACTION", required=True)
    q = sub.add_parser("inspect", help="densities per length, per-layer summary, distinct rules",
                       description="Print a plan's average KV and compute density at each length, a per-layer "
                                   "summary and the number of distinct rules.")
    q.add_argument("plan", help="plan JSON file")
    q.add_argument("--lengths", default=None,
                   help="comma-separated lengths (default: the plan's profiled lengths, else 4096,8192,16384)")
    q.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    q.set_defaults(run=run_plan_inspect)

    c = sub.add_parser("convert", help="import an official MoA plan ({alphas, betas})",
                       description="Import a plan written by the official MoA tool. Its 64-token sink lies inside "
                                   "its span; the imported plan keeps sink=64 and a span 64 tokens shorter.")
    c.add_argument("--from-moa", required=True, metavar="FILE", help="official MoA JSON with 'alphas' and 'betas'")
    c.add_argument("--model", required=True, metavar="MODEL_DIR", help="model directory (only config.json is read)")
    c.add_argument("-o", "--output", required=True, help="output plan JSON")
    c.set_defaults(run=run_plan_convert)

    u = sub.add_parser("uniform", help="the StreamingLLM baseline: every head the same rule",
                       description="Build a uniform plan: every head keeps SINK first tokens and the same window, "
                                   "either a fraction of the input length or a fixed number of tokens.")
    u.add_argument("--model", required=True, metavar="MODEL_DIR", help="model directory (only config.json is read)")
    u.add_argument("--sink", type=int, default=64, help="sink tokens (default 64)")
    g = u.add_mutually_exclusive_group(required=True)
    g.add_argument("--span-fraction", type=float, help="window = fraction * N (elastic)")
    g.add_argument("--span-tokens", type=int, help="window = fixed number of tokens")
    u.add_argument("-o", "--output", required=True, help="output plan JSON")
    u.set_defaults(run=run_plan_uniform)

    s = sub.add_parser("schema", help="print the plan file's JSON Schema")
    s.set_defaults(run=lambda args: print(json.dumps(_schema(), indent=1)) or 0)


def _schema():
    from moa_search.schema import PLAN_SCHEMA

    return PLAN_SCHEMA


def plan_summary(plan, lengths: list[int]) -> dict:
    """Everything `moa plan inspect` shows, as plain data."""
    import numpy as np

    alpha, beta = plan.query_rules()
    longest = max(lengths)
    spans = plan.spans(longest)
    layers = []
    for layer in range(plan.model.num_layers):
        layers.append({
            "layer": layer,
            "mean_span_fraction": float(spans[layer].mean() / longest),
            "local_heads": int((beta[layer] == 0).sum()),
            "distinct_rules": len(set(zip(alpha[layer].tolist(), beta[layer].tolist()))),
            **{k: v for k, v in _layer_dens(plan, layer, longest).items()},
        })
    return {
        "model": plan.model.architecture,
        "granularity": plan.granularity,
        "sink": plan.sink,
        "distinct_rules": plan.distinct_rules(),
        "local_heads": int((beta == 0).sum()),
        "query_heads": int(beta.size),
        "lengths": {str(n): plan.densities(n) for n in lengths},
        "layers_at": longest,
        "layers": layers,
        "budget": plan.budget,
        "mean_beta": float(np.mean(beta)),
    }


def _layer_dens(plan, layer, n):
    from moa_search import rules as R

    s = plan.spans(n)[layer]
    return {"kv_density": float(R.kv_density(plan.sink, s, n).mean()),
            "compute_density": float(R.compute_density(plan.sink, s, n).mean())}


def model_shape(model_dir: str):
    """The attention shape of a checkpoint folder, its config.json or a GGUF file (config or metadata only)."""
    from moa_search import models
    from moa_search.plan import ModelShape

    if Path(model_dir).suffix == ".json" and Path(model_dir).is_file():
        return ModelShape.from_pretrained(model_dir)
    models.check_model(model_dir)
    return models.model_shape(model_dir)


def run_plan_inspect(args) -> int:
    from moa_search.plan import load_plan

    lengths = lengths_arg("--lengths", args.lengths) if args.lengths else None
    plan = load_plan(args.plan)
    lengths = lengths or plan.profiled_lengths or [4096, 8192, 16384]
    info = plan_summary(plan, lengths)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    from rich.console import Console
    from rich.table import Table

    con = Console()
    con.print(f"[bold]{args.plan}[/]: {info['model']}, {plan.model.num_layers} layers x {plan.model.num_query_heads} "
              f"query heads ({plan.model.num_kv_heads} KV), granularity {plan.granularity}, sink {plan.sink}, "
              f"{info['distinct_rules']} distinct rules, {info['local_heads']}/{info['query_heads']} local heads (beta=0)")
    t = Table(title="average density over query heads")
    for col in ("length", "KV density", "compute density", "KV cache (group max)"):
        t.add_column(col, justify="right")
    for n, d in info["lengths"].items():
        t.add_row(n, f"{d['kv_density']:.3f}", f"{d['compute_density']:.3f}", f"{d['kv_cache_density']:.3f}")
    con.print(t)
    t = Table(title=f"per layer at N={info['layers_at']}")
    for col in ("layer", "mean span / N", "KV density", "compute density", "local heads", "distinct rules"):
        t.add_column(col, justify="right")
    for row in info["layers"]:
        t.add_row(str(row["layer"]), f"{row['mean_span_fraction']:.3f}", f"{row['kv_density']:.3f}",
                  f"{row['compute_density']:.3f}", str(row["local_heads"]), str(row["distinct_rules"]))
    con.print(t)
    return 0


def run_plan_convert(args) -> int:
    from moa_search.plan import PlanError, plan_from_moa, save_plan

    try:
        obj = json.loads(open(args.from_moa).read())
    except FileNotFoundError:
        raise PlanError(f"{args.from_moa}: no such file") from None
    except IsADirectoryError:
        raise PlanError(f"{args.from_moa}: is a folder, expected the official MoA JSON file") from None
    except UnicodeDecodeError:
        raise PlanError(f"{args.from_moa}: not a JSON file (binary content)") from None
    except json.JSONDecodeError as e:
        raise PlanError(f"{args.from_moa}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    shape = model_shape(args.model)
    plan = plan_from_moa(obj, shape, source=args.from_moa)
    save_plan(plan, args.output)
    print(f"wrote {args.output}: {plan.model.num_layers} layers x {plan.model.num_query_heads} query heads, sink {plan.sink}")
    return 0


def run_plan_uniform(args) -> int:
    from moa_search.plan import save_plan, uniform_plan

    check(args.sink >= 0, f"--sink must be >= 0, got {args.sink}")
    check(args.span_fraction is None or 0 < args.span_fraction <= 1,
          f"--span-fraction must be in (0, 1], got {args.span_fraction}")
    check(args.span_tokens is None or args.span_tokens >= 1, f"--span-tokens must be >= 1, got {args.span_tokens}")
    shape = model_shape(args.model)
    plan = uniform_plan(shape, sink=args.sink, span_fraction=args.span_fraction, span_tokens=args.span_tokens)
    save_plan(plan, args.output)
    print(f"wrote {args.output}: uniform sink {args.sink} + "
          + (f"{args.span_fraction:g} N" if args.span_fraction is not None else f"{args.span_tokens} tokens"))
    return 0


# ----------------------------------------------------------------------------- moa generate


GENERATE_HELP = """\
Generate text from a prompt with a plan applied (or dense, to compare).

examples:
  moa generate --model M --plan search/plan.json --prompt "The pass key is 71432. ..."
  moa generate --model M --dense --prompt-file long_prompt.txt --max-new-tokens 32
"""


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.description = GENERATE_HELP
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--model", required=True, metavar="MODEL_DIR", help="Hugging Face checkpoint directory")
    p.add_argument("--plan", help="plan JSON (omit with --dense)")
    p.add_argument("--dense", action="store_true", help="run the dense model (no plan)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt", help="prompt text")
    g.add_argument("--prompt-file", help="file holding the prompt")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0, help="with --sample (default 1.0)")
    p.add_argument("--device", default=None, help="cuda, cpu... (default: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    add_device_map_argument(p)
    from moa_search.models import add_gguf_argument

    add_gguf_argument(p)
    p.set_defaults(run=run_generate)


def run_generate(args) -> int:
    from moa_search.models import check_model, model_shape
    from moa_search.plan import check_plan_fits, load_plan

    check(args.dense or args.plan, "give --plan PLAN, or --dense for the dense model")
    check(not (args.dense and args.plan), "give --plan PLAN or --dense, not both")
    check(args.max_new_tokens >= 1, f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    check(not args.sample or args.temperature > 0, f"--temperature must be > 0, got {args.temperature:g}")
    if args.prompt_file is not None:
        check(Path(args.prompt_file).is_file(), f"{args.prompt_file}: no such prompt file")
    plan = load_plan(args.plan) if args.plan else None   # a broken plan fails before the model loads
    check_model(args.model, args.gguf_file)
    if plan is not None:
        check_plan_fits(plan, model_shape(args.model, args.gguf_file))
    device_map = parse_device_map(args.device_map)
    prompt = args.prompt if args.prompt is not None else Path(args.prompt_file).read_text()

    import torch

    from moa_search import apply_plan
    from moa_search.apply import input_device

    model, tok = load_model(args.model, args.device, args.dtype, device_map, gguf_file=args.gguf_file)
    if plan is not None:
        apply_plan(model, plan)
    enc = tok(prompt, return_tensors="pt").to(input_device(model))
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                             temperature=args.temperature if args.sample else None,
                             pad_token_id=tok.pad_token_id)
    print(tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    return 0


# ----------------------------------------------------------------------------- front


def build_parser(chosen: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moa", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from moa_search import __version__

    parser.add_argument("--version", action="version", version=f"moa-search {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (modname, helptext, issue) in COMMANDS.items():
        p = sub.add_parser(name, help=helptext, description=helptext)
        if name != chosen:
            continue  # only the chosen step's module is imported
        if name == "plan":
            add_plan_arguments(p)
        elif name == "generate":
            add_generate_arguments(p)
        else:
            mod = importlib.import_module(modname)
            mod.add_arguments(p)
            p.set_defaults(run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    # OpenMP threads that spin while waiting for each other burn the cores of a shared CPU machine
    # (`moa demo --quick` on 2 cores at load 5: 133 s spinning, 34 s passive); on an idle machine
    # passive waiting costs little. Only effective before torch loads; the user's own setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    argv = sys.argv[1:] if argv is None else list(argv)
    chosen = argv[0] if argv and argv[0] in COMMANDS else None
    parser = build_parser(chosen)
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 0 if not argv else 2
    from moa_search.errors import MoaError

    try:
        return int(args.run(args) or 0)
    except MoaError as e:
        print(f"moa {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nmoa {args.command}: interrupted; {interrupted(args)}", file=sys.stderr)
        return 130


def interrupted(args) -> str:
    """What an interrupted step kept on disk, and how to go on."""
    out = Path(getattr(args, "output", None) or ".")
    again = "the same command without --restart" if getattr(args, "restart", False) else "the same command"
    if args.command == "calibrate":
        from moa_search.calibrate import answers_checkpoint

        ckpt = answers_checkpoint(out)
        if ckpt.exists():
            return f"the answers so far are kept in {ckpt}; {again} answers only the rest"
        return (f"no answers were kept yet (they are kept every --checkpoint-every {args.checkpoint_every} "
                "batches); the same command starts again")
    if args.command == "profile":
        kept = sorted(p.name for p in out.glob("checkpoints/*")) + sorted(p.name for p in out.glob("influence_*.safetensors"))
        if kept:
            return f"kept in {out}: {', '.join(kept)}; {again} resumes from them (--restart discards them)"
        return (f"nothing was kept yet (sums are kept every --checkpoint-every {args.checkpoint_every} samples); "
                "the same command starts again")
    if args.command == "search":
        if (out / "search.db").exists():
            return (f"the finished Pareto points are kept in {out / 'search.db'}; the same command resumes "
                    "and solves only the rest")
        return "nothing was kept; the same command starts again"
    if args.command == "demo":
        return (f"{out}/ keeps the outputs of the finished steps; `moa demo` again runs every step again "
                "(a calibration stopped midway resumes from its kept answers)")
    return "nothing was written (this step keeps no partial results); run it again"


if __name__ == "__main__":
    sys.exit(main())
