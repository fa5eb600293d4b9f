"""`moa bench`: speed and memory against the baselines, measured side by side in one run.

    moa bench prefill ...   block-sparse prefill kernel vs dense SDPA and FlexAttention
    moa bench decode ...    compressed-cache decode vs transformers' dense SDPA path

Each mode lives in its own module (bench_prefill, bench_decode) with add_arguments/run;
`moa bench MODE --help` shows its options.
"""
from __future__ import annotations

import argparse
import importlib
import sys

MODES = {"prefill": ("moa_search.bench_prefill", 5), "decode": ("moa_search.bench_decode", 6)}


def add_arguments(p) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.description = __doc__
    p.add_argument("mode", choices=list(MODES), help="what to time")
    p.add_argument("options", nargs=argparse.REMAINDER, help="options of the mode (see moa bench MODE --help)")


def run(args) -> int:
    modname, issue = MODES[args.mode]
    try:
        mod = importlib.import_module(modname)
    except ModuleNotFoundError as e:
        if e.name != modname:
            raise
        print(f"moa bench {args.mode}: not built yet (issue #{issue}).", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog=f"moa bench {args.mode}", description=mod.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    mod.add_arguments(parser)
    return int(mod.run(parser.parse_args(args.options)) or 0)
