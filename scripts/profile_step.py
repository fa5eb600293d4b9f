"""Where the time of one compiled decode step goes (GPU): the step of `moa_search.generate`
(compiled, captured; --unfused-too: also with transformers' forward instead of
moa_search.fused's) on a named shape with random bf16 weights, profiled over a few replays
(torch.profiler, CUDA kernels grouped by name), next to what the weight GEMVs alone cost
(every layer's projections as separate matmuls, then with q/k/v and gate/up concatenated),
each captured in a CUDA graph over all layers with distinct weights (so nothing sits in L2).

    python3 scripts/profile_step.py --model-shape llama3-8b --batches 1,32 --json $OUT/profile.json

Explains a BENCHMARKS.md number (issue 18); it is not one itself.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from moa_search import apply_plan
from moa_search.bench import graph_ms, random_model
from moa_search.generation import GreedyDecoder, prefill
from moa_search.hf_adapter import MoaCache
from moa_search.plan import ModelShape, uniform_plan


def gemv(cfg, batch: int) -> dict:
    """The projections of every layer at `batch` tokens: separate (7 matmuls) vs fused (4)."""
    H, I, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = H // hq
    dt, dev = torch.bfloat16, "cuda"
    x = torch.randn(batch, H, dtype=dt, device=dev)
    xi = torch.randn(batch, I, dtype=dt, device=dev)
    shapes = {"q": (hq * d, H), "k": (hkv * d, H), "v": (hkv * d, H), "o": (H, hq * d), "gate": (I, H), "up": (I, H),
              "down": (H, I)}
    W = {k: [torch.randn(s, dtype=dt, device=dev) * 0.01 for _ in range(L)] for k, s in shapes.items()}
    nbytes = sum(w.numel() * 2 for ws in W.values() for w in ws)
    res = {"batch": batch, "weight_gib": nbytes / 2**30}
    for name in shapes:   # one projection alone, over all layers
        inp = xi if name == "down" else x
        res[f"{name}_ms"] = graph_ms(lambda: [F.linear(inp, w) for w in W[name]])

    def separate():
        for i in range(L):
            for name in ("q", "k", "v", "o", "gate", "up"):
                F.linear(x, W[name][i])
            F.linear(xi, W["down"][i])

    res["separate_ms"] = graph_ms(separate)
    qkv = [torch.cat([W["q"][i], W["k"][i], W["v"][i]]) for i in range(L)]
    gu = [torch.cat([W["gate"][i], W["up"][i]]) for i in range(L)]
    for name in ("q", "k", "v", "gate", "up"):
        del W[name]

    def fused():
        for i in range(L):
            F.linear(x, qkv[i])
            F.linear(x, W["o"][i])
            F.linear(x, gu[i])
            F.linear(xi, W["down"][i])

    res["fused_ms"] = graph_ms(fused)
    res["floor_ms"] = 1e3 * nbytes / 4.24e12
    del qkv, gu, W
    torch.cuda.empty_cache()
    return res


def profile_step(model, batch: int, prompt_len: int, compile, fuse: bool = True) -> dict:
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt_len), device="cuda")
    new = 48
    cache = MoaCache(model, max_length=prompt_len + new)
    with torch.no_grad():
        first = prefill(model, cache, ids, chunk=4096).argmax(-1)
        dec = GreedyDecoder(model, cache, first, torch.full_like(first, prompt_len), new, [], 0, compile=compile,
                            fuse=fuse)
        t0 = time.perf_counter()
        dec.capture()
        torch.cuda.synchronize()
        cap = time.perf_counter() - t0
        for _ in range(4):
            dec.replay()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(20):
            dec.replay()
        torch.cuda.synchronize()
        ms = 1e3 * (time.perf_counter() - t0) / 20
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                dec.replay()
            torch.cuda.synchronize()
    kernels = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t:
            kernels.append({"name": e.key[:120], "calls_per_step": e.count / 10, "us_per_step": t / 10})
    kernels.sort(key=lambda k: -k["us_per_step"])
    del dec, cache
    torch.cuda.empty_cache()
    return {"batch": batch, "compile": str(compile), "fuse": fuse, "step_ms": ms, "capture_s": cap,
            "gpu_us_per_step": sum(k["us_per_step"] for k in kernels),
            "launches_per_step": sum(k["calls_per_step"] for k in kernels), "kernels": kernels}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model-shape", default="llama3-8b")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--prompt-len", type=int, default=16384)
    p.add_argument("--density", type=float, default=0.5)
    p.add_argument("--no-gemv", action="store_true")
    p.add_argument("--unfused-too", action="store_true",
                   help="also profile the step with transformers' forward (separate q/k/v, gate/up matmuls)")
    p.add_argument("--json")
    args = p.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    torch.manual_seed(0)
    out = {"shape": args.model_shape, "prompt_len": args.prompt_len, "density": args.density,
           "device": torch.cuda.get_device_name(), "torch": torch.__version__, "gemv": [], "steps": []}

    def save():
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)

    from moa_search.bench import MODEL_SHAPES
    from transformers import LlamaConfig

    if not args.no_gemv:
        cfg = LlamaConfig(**MODEL_SHAPES[args.model_shape])
        for b in batches:
            out["gemv"].append(gemv(cfg, b))
            print("gemv", {k: round(v, 3) if isinstance(v, float) else v for k, v in out["gemv"][-1].items()}, flush=True)
            save()
    final = args.prompt_len + 48
    model = random_model(args.model_shape, None, final, "cuda", torch.bfloat16)
    shape = ModelShape.from_config(model.config)
    apply_plan(model, uniform_plan(shape, sink=64, span_fraction=(args.density * final - 64) / final))
    for b, fuse in [(b, f) for b in batches for f in ((True, False) if args.unfused_too else (True,))]:
        r = profile_step(model, b, args.prompt_len, True, fuse)
        out["steps"].append(r)
        print(f"step batch {b}{'' if fuse else ' (unfused)'}: {r['step_ms']:.3f} ms, GPU busy {r['gpu_us_per_step'] / 1e3:.3f} ms, "
              f"{r['launches_per_step']:.0f} launches, capture {r['capture_s']:.1f} s", flush=True)
        for k in r["kernels"][:25]:
            print(f"  {k['us_per_step']:9.1f} us {k['calls_per_step']:6.1f}x  {k['name']}", flush=True)
        save()


if __name__ == "__main__":
    main()
