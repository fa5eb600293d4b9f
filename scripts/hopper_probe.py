"""Check and time kernels/prefill_hopper.py on the GPU machine (sm_90): its launch configs, or
the current kernel against an earlier version of it (--baseline).

Every variant is first checked in bf16 (D 128 and 64, Nq = Nk and Nq < Nk, with LSE; fp16
once) against the float32 reference on prefill_sweep.check_case's padded GQA batch, then timed
on the llama3-8b attention shape (`moa bench prefill`'s synthetic spans), beside SDPA (the
ideal's yardstick). Timing is paired: every variant once per round, the order reversed every
other round, `--rounds` rounds; it reports each variant's median x ideal and its median ratio
to the first variant, round by round. GPU clocks drift by 5-10% in a run, so only the
paired ratios of one process compare variants. Rows go to stdout and $OUT/hopper_probe.jsonl.

    python scripts/hopper_probe.py "128,3,1;64,4,2" 16384,32768        # (BLOCK_N, STAGES, Q_BUFS);...
    git show HEAD~1:kernels/prefill_hopper.py > /tmp/before.py
    python scripts/hopper_probe.py --baseline /tmp/before.py --rounds 14  # paired A/B of two versions
    python scripts/hopper_probe.py --baseline /tmp/before.py --baseline /tmp/other.py "" 16384  # copies only
"""
import argparse
import importlib.util
import json
import os

import numpy as np
import torch
import triton
from prefill_sweep import check_case

from moa_search import rules as R
from moa_search.bench_prefill import hetero_spans, resolve_shape, uniform_spans
from moa_search.kernels import prefill_hopper as PH


def load_version(path):
    """An earlier copy of prefill_hopper.py, imported inside moa_search.kernels (its relative imports)."""
    name = "moa_search.kernels._hopper_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def check(launch, D=128, dtype=torch.bfloat16, Nq=None):
    """(relative error of O, max |LSE error|, any NaN left, LSE infinite where it should not be)."""
    (q, k, v, span, st, en), (ref, rl) = check_case(D, dtype, Nq)
    out = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:3], float("nan"), device=q.device)
    res = launch(q, k, v, span, st, en, 64, D ** -0.5, out, lse, True)
    if isinstance(res, tuple):  # --wrapper: its own outputs
        out, lse = res
    fin = torch.isfinite(rl)
    lerr = float((lse[fin] - rl[fin]).abs().max()) if fin.any() else 0.0
    return (float((out.float() - ref).norm() / ref.norm()), lerr, bool(torch.isnan(out).any()),
            bool((torch.isfinite(lse) != fin).any()))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("configs", nargs="?", default="128,3,1", help="BLOCK_N,STAGES,Q_BUFS;... (default 128,3,1)")
    ap.add_argument("lengths", nargs="?", default="16384,32768")
    ap.add_argument("--baseline", metavar="FILE", action="append", default=[],
                    help="an earlier prefill_hopper.py, default config (repeatable: each is named by its file "
                         "name; the first is timed first, and the paired ratios are against it)")
    ap.add_argument("--cases", default="dense,hetero0.5,uniform0.5,hetero0.25,uniform0.25")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--wrapper", action="store_true",
                    help="also time kernels/prefill.py:sparse_attention_prefill, the launcher a model's layer "
                         "and `moa bench prefill` call (its checks and allocations included)")
    args = ap.parse_args()
    out_dir = os.environ.get("OUT", "gpu_out")
    os.makedirs(out_dir, exist_ok=True)
    log = open(os.path.join(out_dir, "hopper_probe.jsonl"), "a")

    def emit(**r):
        print(json.dumps(r), flush=True)
        log.write(json.dumps(r) + "\n")
        log.flush()

    variants = {}
    for i, path in enumerate(args.baseline):
        variants["baseline" if i == 0 else os.path.basename(path)] = load_version(path).hopper_prefill
    for c in filter(None, args.configs.split(";")):
        cfg = tuple(map(int, c.split(",")))
        if len(cfg) != 3:
            ap.error(f"config {c!r}: expected BLOCK_N,STAGES,Q_BUFS (give the configs before the lengths)")
        variants[f"gluon{cfg}"] = lambda *a, cfg=cfg: PH.hopper_prefill(*a, config=cfg)
    if args.wrapper:
        from moa_search.kernels.prefill import sparse_attention_prefill
        variants["wrapper"] = lambda q, k, v, span, st, en, sink, scale, out, lse, wl: sparse_attention_prefill(
            q, k, v, sink, span, st, en, scale=scale, return_lse=wl)
    for name, launch in variants.items():
        for D in (128, 64):
            for Nq in (None, 700):
                try:
                    err, lerr, nan, lmis = check(launch, D, Nq=Nq)
                    emit(kind="check", variant=name, D=D, Nq=Nq, rel_err=err, lse_err=lerr, nan=nan, lse_mismatch=lmis)
                except Exception as e:  # noqa: BLE001 - a config that cannot run is reported, not fatal
                    emit(kind="check", variant=name, D=D, Nq=Nq, error=f"{type(e).__name__}: {str(e)[:500]}")
        emit(kind="check", variant=name, dtype="fp16", rel_err=check(launch, 128, torch.float16)[0])

    shape = resolve_shape("llama3-8b")
    Hq, Hkv, D, sink = shape.num_query_heads, shape.num_kv_heads, shape.head_dim, 64
    bench = lambda fn: float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))  # noqa: E731
    for N in (int(x) for x in args.lengths.split(",")):
        g = torch.Generator(device="cuda").manual_seed(N)
        q = torch.randn(1, Hq, N, D, device="cuda", dtype=torch.bfloat16, generator=g)
        k, v = (torch.randn(1, Hkv, N, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
        t_sdpa = bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                                 enable_gqa=True))
        emit(kind="time", N=N, method="sdpa", ms=t_sdpa, tflops=4 * Hq * D * N * (N + 1) / 2 / t_sdpa / 1e9)
        st = torch.zeros(1, dtype=torch.long, device="cuda")
        en = torch.full((1,), N, dtype=torch.long, device="cuda")
        spans = {"dense": lambda: np.full(Hq, N), "hetero0.5": lambda: hetero_spans(shape, sink, N, 0.5),
                 "uniform0.5": lambda: uniform_spans(shape, sink, N, 0.5),
                 "hetero0.25": lambda: hetero_spans(shape, sink, N, 0.25),
                 "uniform0.25": lambda: uniform_spans(shape, sink, N, 0.25)}
        for case in args.cases.split(","):
            sp = np.asarray(spans[case]())
            ideal = float(np.mean(R.compute_density(sink, sp, N))) * t_sdpa
            span = torch.tensor(sp, device="cuda").view(1, Hq)
            out = torch.empty_like(q)
            times, names = {n: [] for n in variants}, list(variants)
            for r in range(args.rounds):
                for name in (names if r % 2 == 0 else names[::-1]):
                    launch = variants[name]
                    times[name].append(bench(lambda: launch(q, k, v, span, st, en, sink, D ** -0.5, out, out, False)))
            first = np.array(times[names[0]])
            for name, ts in times.items():
                emit(kind="time", N=N, case=case, method=name, ms=float(np.median(ts)),
                     x_ideal=float(np.median(ts)) / ideal, paired_vs_first=float(np.median(np.array(ts) / first)),
                     rounds=[round(t, 4) for t in ts])


if __name__ == "__main__":
    main()
