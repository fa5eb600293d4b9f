"""`moa`: the command-line front of moa-search.

The pipeline, one subcommand a step:

    moa calibrate   a calibration set whose answers the model itself wrote
    moa profile     per-head, per-block attention influence at several lengths
    moa search      per-head elastic rules under a density budget -> plan.json
    moa plan        inspect, convert (official MoA format) or build (uniform) plans
    moa generate    run a model with a plan
    moa eval        retrieval accuracy and perplexity: dense vs plans
    moa bench       kernel and decode speed against dense SDPA and FlexAttention
    moa demo        all of the above on the embedded model
    moa convert-gguf  a GGUF model (llama.cpp's file) as a safetensors folder

Each step's options live beside its code: the module named in COMMANDS provides
`add_arguments(parser)` and `run(args) -> int`.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys

from moa_search.models import add_device_map_argument, load_model, parse_device_map

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


def run_plan_inspect(args) -> int:
    from moa_search.plan import load_plan
    from moa_search.rules import parse_lengths

    plan = load_plan(args.plan)
    lengths = parse_lengths(args.lengths) if args.lengths else (plan.profiled_lengths or [4096, 8192, 16384])
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
    from moa_search.plan import ModelShape, PlanError, plan_from_moa, save_plan

    shape = ModelShape.from_pretrained(args.model)
    try:
        obj = json.loads(open(args.from_moa).read())
    except FileNotFoundError:
        raise PlanError(f"{args.from_moa}: no such file") from None
    except json.JSONDecodeError as e:
        raise PlanError(f"{args.from_moa}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    plan = plan_from_moa(obj, shape, source=args.from_moa)
    save_plan(plan, args.output)
    print(f"wrote {args.output}: {plan.model.num_layers} layers x {plan.model.num_query_heads} query heads, sink {plan.sink}")
    return 0


def run_plan_uniform(args) -> int:
    from moa_search.plan import ModelShape, save_plan, uniform_plan

    shape = ModelShape.from_pretrained(args.model)
    plan = uniform_plan(shape, sink=args.sink, span_fraction=args.span_fraction, span_tokens=args.span_tokens)
    save_plan(plan, args.output)
    print(f"wrote {args.output}: uniform sink {args.sink} + "
          + (f"{args.span_fraction:g} N" if args.span_fraction is not None else f"{args.span_tokens} tokens"))
    return 0


# ----------------------------------------------------------------------------- moa generate


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="MODEL_DIR", help="Hugging Face checkpoint directory")
    p.add_argument("--plan", help="plan JSON (omit with --dense)")
    p.add_argument("--dense", action="store_true", help="run the dense model (no plan)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt", help="prompt text")
    g.add_argument("--prompt-file", help="file holding the prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--device", default=None, help="cuda, cpu... (default: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    add_device_map_argument(p)
    from moa_search.models import add_gguf_argument

    add_gguf_argument(p)
    p.set_defaults(run=run_generate)





def run_generate(args) -> int:
    import torch

    from moa_search import apply_plan
    from moa_search.apply import input_device

    if not args.dense and not args.plan:
        print("moa generate: give --plan PLAN, or --dense for the dense model", file=sys.stderr)
        return 2
    prompt = args.prompt if args.prompt is not None else open(args.prompt_file).read()
    model, tok = load_model(args.model, args.device, args.dtype, parse_device_map(args.device_map),
                            gguf_file=args.gguf_file)
    if not args.dense:
        apply_plan(model, args.plan)
    enc = tok(prompt, return_tensors="pt").to(input_device(model))
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                             temperature=args.temperature if args.sample else None,
                             pad_token_id=tok.pad_token_id)
    print(tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    return 0


# ----------------------------------------------------------------------------- front


def _missing(name: str, issue: int):
    def run(args) -> int:
        print(f"moa {name}: this step is not built yet (issue #{issue}).", file=sys.stderr)
        return 2
    return run


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
            try:
                mod = importlib.import_module(modname)
            except ModuleNotFoundError as e:
                if e.name != modname:
                    raise
                p.set_defaults(run=_missing(name, issue))
                continue
            mod.add_arguments(p)
            p.set_defaults(run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
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
        print(f"\nmoa {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
