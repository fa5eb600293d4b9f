"""Time launch configs of the prefill kernel side by side (GPU machine), to choose its autotune set.

Each variant pins (BLOCK_M, BLOCK_N, warps, stages) and the K/V load path (tensor
descriptors / pointers). Every variant is first checked in bf16 against the reference on a
small padded batch; then all are timed on the same inputs as `moa bench prefill` (llama3-8b
attention shape, hetero / uniform / dense spans), with dense SDPA and FlexAttention in the
same process. Rows are appended to $OUT/sweep.jsonl as they come, so a run cut short keeps
what it measured. The winners go into kernels/prefill.py:_PREFILL_SHAPES.

    python scripts/prefill_sweep.py --lengths 16384 --top 4 --top-lengths 32768
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

from moa_search import rules as R
from moa_search.bench_prefill import _FlexCase, hetero_spans, resolve_shape, uniform_spans
from moa_search.kernels import prefill
from moa_search.kernels.reference import sparse_attention_reference

# name -> launcher kwargs
# name -> launcher kwargs: (BLOCK_M, BLOCK_N, warps, stages, max registers per thread, TMA).
# The register caps let two programs share an SM, so one's softmax can overlap the other's GEMMs.
VARIANTS = {
    f"{'tma' if tma else 'ptr'}-{bm}x{bn}w{w}s{st}" + (f"r{r}" if r else ""):
        dict(block_m=bm, block_n=bn, num_warps=w, num_stages=st, use_tma=tma, maxnreg=r)
    for tma in (True, False)
    for bm, bn, w, st, r in [(128, 64, 8, 3, None), (128, 64, 8, 4, None), (128, 128, 8, 2, None), (64, 64, 4, 3, None),
                             (64, 64, 4, 2, None), (128, 32, 8, 3, 128), (128, 32, 8, 4, 128), (64, 32, 4, 3, 168)]
}


def check_case(D=128, dtype=torch.bfloat16, Nq=None):
    """A small padded GQA batch and its float32 reference: 2 sequences of 1500 keys (right
    padding in one, left in the other), 8 query / 2 KV heads, spans from 1 to past N, sink 64;
    Nq < 1500 queries are the last of the keys. -> ((q, k, v, span, start, end), (out, lse))."""
    g = torch.Generator(device="cuda").manual_seed(1)
    B, Hq, Hkv, N = 2, 8, 2, 1500
    q = torch.randn(B, Hq, Nq or N, D, device="cuda", dtype=dtype, generator=g)
    k, v = (torch.randn(B, Hkv, N, D, device="cuda", dtype=dtype, generator=g) for _ in range(2))
    span = torch.tensor([[5, 40, 1500, 170, 700, 64, 1000, 333], [3, 900, 9, 2000, 128, 129, 1, 1499]], device="cuda")
    st, en = torch.tensor([0, 113], device="cuda"), torch.tensor([1400, 1500], device="cuda")
    ref = sparse_attention_reference(q.float(), k.float(), v.float(), 64, span, st, en, return_lse=True)
    return (q, k, v, span, st, en), ref


def check(kw) -> float:
    """bf16 relative error vs the fp32 reference on check_case's batch."""
    (q, k, v, span, st, en), (ref, _) = check_case()
    out = torch.full_like(q, float("nan"))
    o = prefill.sparse_attention_prefill(q, k, v, 64, span, st, en, out=out, **kw)
    return float((o.float() - ref).norm() / ref.norm())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="16384")
    ap.add_argument("--top", type=int, default=4, help="re-time the best N variants at --top-lengths")
    ap.add_argument("--top-lengths", default="32768")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--rep", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its first compile takes minutes)")
    args = ap.parse_args()
    import triton

    out_dir = os.environ.get("OUT", "gpu_out")
    os.makedirs(out_dir, exist_ok=True)
    log = open(os.path.join(out_dir, "sweep.jsonl"), "a")
    shape = resolve_shape("llama3-8b")
    Hq, Hkv, D, sink = shape.num_query_heads, shape.num_kv_heads, shape.head_dim, 64
    bench = lambda fn: float(triton.testing.do_bench(fn, warmup=25, rep=args.rep, return_mode="median"))  # noqa: E731
    flex = None if args.no_flex else _FlexCase(sink, 1, Hq, torch.device("cuda"))
    names = [n for n in args.variants.split(",") if n]
    t0 = time.time()

    ok = []
    for name in names:
        try:
            err = check(VARIANTS[name])
        except Exception as e:  # noqa: BLE001 - a variant that does not compile is reported, not fatal
            print(f"{name}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        print(f"[{time.time() - t0:4.0f}s] {name}: bf16 rel err {err:.2e}", flush=True)
        if err < 2e-2:
            ok.append(name)

    def sweep(n, variants):
        g = torch.Generator(device="cuda").manual_seed(n)
        q = torch.randn(1, Hq, n, D, device="cuda", dtype=torch.bfloat16, generator=g)
        k, v = (torch.randn(1, Hkv, n, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
        causal = 4 * D * Hq * n * (n + 1) / 2
        sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # noqa: E731
        t_def = bench(sdpa)
        print(f"N={n} sdpa-default {t_def:.3f} ms {causal / t_def / 1e9:.0f} TFLOP/s", flush=True)
        cases = [("hetero 0.5", hetero_spans(shape, sink, n, 0.5)), ("hetero 0.25", hetero_spans(shape, sink, n, 0.25)),
                 ("uniform 0.25", uniform_spans(shape, sink, n, 0.25)), ("dense", np.full(Hq, n))]
        res = {}
        for case, sp in cases:
            span = torch.as_tensor(sp[None].copy(), dtype=torch.long, device="cuda")
            dens = float(np.mean(R.compute_density(sink, sp, n)))
            flops = 4 * D * float(np.sum(R.kept_pairs(sink, sp, n)))
            ideal = dens * t_def
            runs = {"flex": flex.runner(q, k, v, span, D ** -0.5)} if flex else {}
            for name in variants:
                runs[name] = (lambda kw=VARIANTS[name]: prefill.sparse_attention_prefill(q, k, v, sink, span, **kw))
            # every method once per round, rotated, median over rounds (clocks drift during a run)
            times = {name: [] for name in runs}
            names = list(runs)
            for r in range(args.rounds):
                for name in names[r % len(names):] + names[: r % len(names)]:
                    times[name].append(bench(runs[name]))
            rows = [(name, float(np.median(ts))) for name, ts in times.items()]
            t_flex = dict(rows).get("flex", float("nan"))
            for name, t in rows:
                rec = dict(n=n, case=case, density=dens, method=name, ms=t, tflops=flops / t / 1e9,
                           x_ideal_default=t / ideal, flex_over=t_flex / t)
                log.write(json.dumps(rec) + "\n")
                log.flush()
                res[(case, name)] = t
                print(f"[{time.time() - t0:4.0f}s] N={n} {case:<13} {name:<24} {t:7.3f} ms {flops / t / 1e9:6.1f} TFLOP/s "
                      f"x{t / ideal:.2f} ideal(default)  flex/this {t_flex / t:.2f}", flush=True)
        return res

    res = {}
    for n in R.parse_lengths(args.lengths):
        res.update(sweep(n, ok))
        torch.cuda.empty_cache()
    # rank by the geometric mean time over the sparse cases
    sparse = ["hetero 0.5", "hetero 0.25", "uniform 0.25"]
    score = {v: float(np.exp(np.mean([np.log(res[(c, v)]) for c in sparse]))) for v in ok}
    best = sorted(score, key=score.get)[: args.top]
    print("ranking:", ", ".join(f"{v} {score[v]:.3f}" for v in sorted(score, key=score.get)), flush=True)
    for n in R.parse_lengths(args.top_lengths) if best else []:
        sweep(n, best)
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
