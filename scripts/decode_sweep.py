"""The split-K decode kernel alone over its launch settings (GPU): tile (BLOCK_N), warps, pipeline
stages and the number of splits, on the packed cache of a uniform plan, one call per layer with
distinct buffers per layer (so a batch-1 layer does not sit in L2), captured in a CUDA graph.
Prints ms per step (all layers) and x the bound (the cache bytes / HBM copy bandwidth).

    python3 scripts/decode_sweep.py --batches 1,32 --json $OUT/decode_sweep.json

Explains the decode kernel's share of a BENCHMARKS.md number (issue 18).
"""
from __future__ import annotations

import argparse
import itertools
import json

import torch

from moa_search.bench import graph_ms
from moa_search.kernels.decode import packed_decode_attention, sm_count, split_count, work_items


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batches", default="1,32")
    p.add_argument("--hkv", type=int, default=8)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--slots", type=int, default=8216, help="slots per KV head (sink + ring)")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--configs", default="64:4:2,64:4:3,64:8:2,64:8:3,64:8:4,128:4:2,128:8:3",
                   help="BLOCK_N:warps:stages, comma-separated")
    p.add_argument("--splits", default="0.5x,1x,2x,4x",
                   help="numbers of splits: an integer, or Mx = M times the launcher's default")
    p.add_argument("--json")
    args = p.parse_args()
    dev, dt, D = "cuda", torch.bfloat16, 128
    Hkv, G, S = args.hkv, args.group, args.slots
    Hq = Hkv * G
    bw = 4.24e12
    out = []
    for B in [int(b) for b in args.batches.split(",")]:
        per_layer = B * Hkv * S * D * 2 * 2
        L = max(2, min(args.layers, int(24e9 // per_layer)))
        keys = [torch.randn(B, Hkv * S, D, dtype=dt, device=dev) for _ in range(L)]
        values = [torch.randn_like(k) for k in keys]
        q = torch.randn(B, Hq, D, dtype=dt, device=dev)
        off = (torch.arange(Hkv, device=dev) * S).to(torch.int32)
        cap = torch.full((Hkv,), S - 64, dtype=torch.int32, device=dev)
        n = torch.full((B,), 16400, dtype=torch.int64, device=dev)
        span = torch.full((B, Hq), S - 64, dtype=torch.int64, device=dev)
        auto = split_count(B * Hkv, S, 64, sm_count("cuda"))
        bound_ms = 1e3 * per_layer * L / bw
        configs = [tuple(int(x) for x in c.split(":")) for c in args.configs.split(",")]
        for (bn, warps, stages), sp in itertools.product(configs, args.splits.split(",")):
            splits = max(1, int(round(auto * float(sp[:-1])))) if sp.endswith("x") else int(sp)
            work = [torch.as_tensor(x, device=dev) for x in work_items([S] * Hkv, bn, splits=splits)]
            try:
                ms = graph_ms(lambda: [packed_decode_attention(q, keys[i], values[i], off, cap, 64, 64, span, n, None,
                                                               work=work, block_n=bn,
                                                               num_warps=warps, num_stages=stages) for i in range(L)])
            except Exception as e:   # out of shared memory for this tile and stage count
                print(f"B={B} bn={bn} w={warps} st={stages} splits={splits}: {type(e).__name__}", flush=True)
                continue
            ms *= args.layers / L
            r = {"batch": B, "block_n": bn, "warps": warps, "stages": stages, "splits": splits, "auto_splits": auto,
                 "ms_per_step": ms, "x_bound": ms / (bound_ms * args.layers / L)}
            out.append(r)
            print(f"B={B} bn={bn} w={warps} st={stages} splits={splits}: {ms:.3f} ms/step, {r['x_bound']:.2f}x bound",
                  flush=True)
        best = min((r for r in out if r["batch"] == B), key=lambda r: r["ms_per_step"])
        print("BEST", best, flush=True)
        del keys, values
        torch.cuda.empty_cache()
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
