"""`moa bench`: speed and memory against the baselines, measured side by side in one run.

    moa bench prefill ...   block-sparse prefill kernel vs dense SDPA and FlexAttention
    moa bench decode ...    compressed-cache decode vs transformers' dense SDPA path

Each mode lives in its own module (bench_prefill, bench_decode) with add_arguments/run.
"""
from __future__ import annotations

import importlib
import sys

MODES = {"prefill": ("moa_search.bench_prefill", 5), "decode": ("moa_search.bench_decode", 6)}


def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="bench_mode", metavar="MODE", required=True)
    chosen = next((a for a in sys.argv[2:] if a in MODES), None)
    for name, (modname, issue) in MODES.items():
        q = sub.add_parser(name, help=f"bench {name}")
        if name != chosen:
            continue
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as e:
            if e.name != modname:
                raise
            q.set_defaults(bench_run=lambda args, n=name, i=issue: _missing(n, i))
            continue
        q.description = mod.__doc__
        mod.add_arguments(q)
        q.set_defaults(bench_run=mod.run)


def _missing(name, issue) -> int:
    print(f"moa bench {name}: not built yet (issue #{issue}).", file=sys.stderr)
    return 2


def run(args) -> int:
    return args.bench_run(args)
