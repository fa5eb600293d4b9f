"""`moa bench decode`: compressed-cache decode vs transformers' dense SDPA decode.

A model of the named shape with random weights (bf16) decodes from a prompt of
--prompt-len tokens, two ways, in the same run:

  dense   transformers' SDPA attention with its default cache (DynamicCache)
  moa     the plan applied (moa_search.apply_plan) with the compressed per-head cache
          (moa_search.MoaCache) and the Triton split-K decode kernel

Reported for each: KV cache bytes (at prompt + new tokens), peak GPU memory, per-step
latency at batch 1 (median), and decode throughput (tokens/s) at the largest batch that
fits in GPU memory (found by doubling, then bisecting, on out-of-memory; capped by
--max-batch). Then the decode attention kernel alone on one layer at --kernel-batch
sequences, against (kept KV bytes / measured HBM bandwidth) and against SDPA's dense decode.

The caches are filled with random keys/values as if a --prompt-len prefill had run (the
prefill is not timed: it is the prefill kernel's business, `moa bench prefill`); then
--steps decode steps are timed. Random weights are fine: the cost of decoding does not
depend on the values.

Examples:
    moa bench decode --model-shape llama-7b --density 0.5 --prompt-len 16384 --new-tokens 256
    moa bench decode --model-shape llama-7b --plan plan.json --json out.json
"""
from __future__ import annotations

import gc
import json
import statistics
import sys
import time

import torch

from .apply import cache_kwarg
from .bench import MODEL_SHAPES, random_model


def add_arguments(p) -> None:
    p.add_argument("--model-shape", default="llama-7b", choices=list(MODEL_SHAPES),
                   help="architecture shape (random weights); default llama-7b (32 layers, 32 heads, MHA)")
    p.add_argument("--layers", type=int, default=None, help="use fewer decoder layers than the shape has (say so when reporting)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--plan", help="plan JSON made for this shape")
    g.add_argument("--density", type=float, help="uniform plan: every head keeps 64 sink tokens + a window so that "
                                                 "the KV density at prompt + new tokens is D")
    p.add_argument("--prompt-len", type=int, default=16384, help="prompt tokens already in the cache (default 16384)")
    p.add_argument("--new-tokens", type=int, default=256, help="the cache is sized for prompt + new tokens (default 256)")
    p.add_argument("--steps", type=int, default=16, help="timed decode steps per measurement (default 16)")
    p.add_argument("--max-batch", type=int, default=64, help="cap of the largest-batch search (default 64)")
    p.add_argument("--kernel-batch", type=int, default=8, help="batch of the kernel-alone timing (default 8)")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (a smoke test: reference path, no OOM search)")
    p.add_argument("--json", help="also write the results to this JSON file")


# ----------------------------------------------------------------------------- model and caches


def build_plan(model, args):
    from .plan import ModelShape, load_plan, uniform_plan

    if args.plan:
        return load_plan(args.plan)
    final = args.prompt_len + args.new_tokens
    sink = 64
    fraction = (args.density * final - sink) / final
    if not 0 < fraction <= 1:
        from .errors import MoaError

        raise MoaError(f"--density {args.density} leaves no window at {final} tokens with a {sink}-token sink")
    return uniform_plan(ModelShape.from_config(model.config), sink=sink, span_fraction=fraction)


def dense_cache(model, batch, length, dtype, device):
    from transformers import DynamicCache

    cfg = model.config
    hkv, d = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    cache = DynamicCache(config=cfg)
    for i in range(cfg.num_hidden_layers):
        k = torch.randn(batch, hkv, length, d, dtype=dtype, device=device)
        cache.update(k, torch.randn_like(k), i)
    return cache


def moa_cache(model, batch, length, final, dtype, device):
    from .hf_adapter import MoaCache

    cache = MoaCache(model, max_length=final)
    cache.fill_for_benchmark(batch, length, dtype, device)
    return cache


def decode_steps(model, cache, batch, start, steps, device):
    """Run warm-up + `steps` one-token forwards; return per-step seconds of the timed ones."""
    kw = cache_kwarg(model)
    tok = torch.randint(0, model.config.vocab_size, (batch, 1), device=device)
    times = []
    cuda = torch.device(device).type == "cuda"
    for s in range(steps + 2):
        pos = torch.full((batch, 1), start + s, device=device)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model(input_ids=tok, position_ids=pos, use_cache=True, logits_to_keep=1, **{kw: cache})
        tok = out.logits[:, -1:].argmax(-1)
        if cuda:
            torch.cuda.synchronize()
        if s >= 2:
            times.append(time.perf_counter() - t0)
    return times


def free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measure(model, kind, batch, args, dtype, device):
    """One configuration: fill, decode; returns dict or None on out-of-memory."""
    final = args.prompt_len + args.new_tokens
    cache = None
    try:
        free()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        if kind == "dense":
            cache = dense_cache(model, batch, args.prompt_len, dtype, device)
        else:
            cache = moa_cache(model, batch, args.prompt_len, final, dtype, device)
        times = decode_steps(model, cache, batch, args.prompt_len, args.steps, device)
        res = {"batch": batch, "step_ms": 1e3 * statistics.median(times),
               "tokens_per_s": batch * len(times) / sum(times),
               "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}
        return res
    except torch.OutOfMemoryError:
        return None
    finally:
        del cache
        free()


def max_batch(model, kind, args, dtype, device, log, one):
    """Largest batch that runs: doubling from 2 (batch 1 = `one`), then bisection up to the first OOM."""
    best, b, fail = one, 2, None
    while b <= args.max_batch:
        r = measure(model, kind, b, args, dtype, device)
        log(f"  {kind} batch {b}: " + ("out of memory" if r is None else f"{r['tokens_per_s']:.1f} tok/s, peak {r['peak_gib']} GiB"))
        if r is None:
            fail = b
            break
        best, b = r, b * 2
    if best is not None and fail is not None:
        lo, hi = best["batch"], fail
        while hi - lo > 1:
            mid = (lo + hi) // 2
            r = measure(model, kind, mid, args, dtype, device)
            log(f"  {kind} batch {mid}: " + ("out of memory" if r is None else f"{r['tokens_per_s']:.1f} tok/s"))
            if r is None:
                hi = mid
            else:
                best, lo = r, mid
    return best


# ----------------------------------------------------------------------------- kernel alone


def hbm_bandwidth(device) -> float:
    """Bytes/s of a large device-to-device copy (read + write)."""
    import triton

    x = torch.empty(2 * 2**30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=5, rep=50)
    del x, y
    return 2 * 2 * 2**30 / (ms * 1e-3)


def kernel_alone(model, args, dtype, device):
    import triton
    import torch.nn.functional as F

    from .kernels.decode import packed_decode_attention, sm_count, work_items

    B, P = args.kernel_batch, args.prompt_len
    final = P + args.new_tokens
    cache = moa_cache(model, B, P, final, dtype, device)
    kv = cache.kv
    rule = kv.rules[0]
    hq = rule.alpha.numel()
    d = kv.keys[0].shape[-1]
    q = torch.randn(B, hq, d, dtype=dtype, device=device)
    n = torch.full((B,), P, device=device)
    span = rule.spans(n)
    scale = d ** -0.5

    def run(**launch):
        return packed_decode_attention(q, kv.keys[0], kv.values[0], kv.off32[0], kv.cap32[0], kv.s0, rule.sink,
                                       span, n, scale, **launch)

    ms = triton.testing.do_bench(lambda: run(work=kv.work[0]), warmup=10, rep=100)
    variants = {}
    for bn, nw, ns in ((128, 4, 2), (64, 4, 3), (128, 8, 3), (32, 4, 4)):
        wk = [torch.as_tensor(x, device=device) for x in work_items(kv.s0 + kv.cap[0].cpu().numpy(), bn, B,
                                                                      sm_count(device))]

        def run_v(bn=bn, nw=nw, ns=ns, wk=wk):
            return run(block_n=bn, num_warps=nw, num_stages=ns, work=wk)
        variants[f"block_n={bn},warps={nw},stages={ns}"] = triton.testing.do_bench(run_v, warmup=10, rep=50)
    # bytes the kernel must read at this length: each head's kept tokens (sink + window) of K and V
    _, valid = kv.kept_positions(0)
    kept_bytes = int(valid.sum()) * d * 2 * kv.keys[0].element_size()
    bw = hbm_bandwidth(device)
    hkv = kv.num_kv_heads
    k = torch.randn(B, hkv, P, d, dtype=dtype, device=device)
    v = torch.randn_like(k)
    qd = q[:, :, None]
    sdpa_ms = triton.testing.do_bench(lambda: F.scaled_dot_product_attention(qd, k, v, enable_gqa=hkv != hq),
                                      warmup=10, rep=100)
    dense_bytes = 2 * k.numel() * k.element_size()
    del cache, k, v
    free()
    return {"batch": B, "context": P, "kernel_ms": ms, "kept_kv_bytes": kept_bytes, "hbm_gbps": bw / 1e9,
            "bound_ms": kept_bytes / bw * 1e3, "variants_ms": variants, "ratio_to_bound": ms / (kept_bytes / bw * 1e3),
            "sdpa_dense_ms": sdpa_ms, "dense_kv_bytes": dense_bytes, "sdpa_ratio_to_bound": sdpa_ms / (dense_bytes / bw * 1e3)}


# ----------------------------------------------------------------------------- main


def check_arguments(args) -> None:
    """Flags that cannot work together, before any model is built."""
    from .errors import MoaError, check_counts

    check_counts(("--prompt-len", args.prompt_len), ("--new-tokens", args.new_tokens), ("--steps", args.steps),
                 ("--max-batch", args.max_batch), ("--kernel-batch", args.kernel_batch))
    if args.density is not None and not 0 < args.density <= 1:
        raise MoaError(f"--density must be in (0, 1], got {args.density:g}")
    # the cache holds prompt + new tokens; a measurement decodes 2 warm-up steps + --steps
    if args.new_tokens < args.steps + 2:
        raise MoaError(f"--new-tokens ({args.new_tokens}) must be at least --steps + 2 ({args.steps + 2}): the cache "
                       "is sized for prompt + new tokens and each measurement decodes 2 warm-up steps and --steps timed ones")
    if args.steps + 2 > 64:
        raise MoaError(f"--steps must be at most 62, got {args.steps} (the fixed-cost measurement decodes 64 tokens)")


def run(args) -> int:
    from .apply import apply_plan, remove_plan
    from .plan import load_plan

    check_arguments(args)
    if args.plan:
        load_plan(args.plan)   # a broken file fails before the model is built
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("moa bench decode: no CUDA device (use --device cpu for a smoke test)", file=sys.stderr)
        return 2
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    final = args.prompt_len + args.new_tokens

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    model = random_model(args.model_shape, args.layers, final, device, dtype)
    plan = build_plan(model, args)
    dens = plan.densities(final)
    cfg = model.config
    d = cfg.hidden_size // cfg.num_attention_heads
    dense_bytes_1 = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * final * d * torch.finfo(dtype).bits // 8
    res = {"model_shape": args.model_shape, "layers": cfg.num_hidden_layers, "prompt_len": args.prompt_len,
           "new_tokens": args.new_tokens, "steps": args.steps, "plan": args.plan or f"uniform density {args.density}",
           "plan_kv_density": dens["kv_cache_density"], "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
           "versions": _versions()}

    # cache bytes at the final length, batch 1
    apply_plan(model, plan)
    mc = moa_cache(model, 1, args.prompt_len, final, dtype, device)
    res["kv_bytes"] = {"dense": dense_bytes_1, "moa": mc.nbytes(), "measured_density": mc.nbytes() / dense_bytes_1}
    del mc
    free()

    out = {}
    for kind in ("dense", "moa"):
        if kind == "dense":
            remove_plan(model)
        else:
            apply_plan(model, plan)
        log(f"{kind}: batch 1")
        one = measure(model, kind, 1, args, dtype, device)
        if one is None:
            log(f"{kind}: batch 1 does not fit")
            out[kind] = {"batch1": None, "max": None}
            continue
        big = max_batch(model, kind, args, dtype, device, log, one) if device.type == "cuda" else one
        out[kind] = {"batch1": one, "max": big}
        if kind == "dense":  # the fixed cost of a step (weights, host overhead): same model, 64-token context
            import copy

            short = copy.copy(args)
            short.prompt_len, short.new_tokens = 64, 64
            res["dense_step_ms_at_64_tokens"] = measure(model, kind, 1, short, dtype, device)["step_ms"]
    res["decode"] = out
    if out["dense"]["max"] and out["moa"]["max"]:
        res["max_batch_throughput_ratio"] = out["moa"]["max"]["tokens_per_s"] / out["dense"]["max"]["tokens_per_s"]
    if device.type == "cuda":
        res["kernel"] = kernel_alone(model, args, dtype, device)
    print(format_table(res))
    if args.json:
        from .files import atomic_write_text

        atomic_write_text(args.json, json.dumps(res, indent=1) + "\n")
    return 0


def _versions() -> dict:
    import transformers

    v = {"torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import triton

        v["triton"] = triton.__version__
    except ImportError:
        pass
    return v


def format_table(res) -> str:
    gib = 2**30
    kb = res["kv_bytes"]
    lines = [
        f"{res['model_shape']} ({res['layers']} layers), prompt {res['prompt_len']} + {res['new_tokens']} new, "
        f"plan: {res['plan']} (KV cache density {res['plan_kv_density']:.4f}), {res['device']}",
        f"KV cache bytes per sequence at {res['prompt_len'] + res['new_tokens']} tokens: dense {kb['dense'] / gib:.3f} GiB, "
        f"moa {kb['moa'] / gib:.3f} GiB (x{kb['measured_density']:.4f})",
        "",
        "| path | batch-1 step (ms) | batch-1 peak (GiB) | max batch | tokens/s at max batch | peak at max (GiB) |",
        "|---|---|---|---|---|---|",
    ]
    for kind, r in res["decode"].items():
        one, big = r["batch1"], r["max"]
        if one is None:
            lines.append(f"| {kind} | does not fit | | | | |")
            continue
        fmt = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
        lines.append(f"| {kind} | {one['step_ms']:.2f} | {fmt(one['peak_gib'])} | {big['batch']} | "
                     f"{big['tokens_per_s']:.1f} | {fmt(big['peak_gib'])} |")
    if "dense_step_ms_at_64_tokens" in res:
        lines.append(f"\nfixed cost of a step (dense, batch 1, 64-token context): {res['dense_step_ms_at_64_tokens']:.2f} ms")
    if "max_batch_throughput_ratio" in res:
        lines.append(f"\nmax-batch throughput moa / dense: {res['max_batch_throughput_ratio']:.2f}x")
    k = res.get("kernel")
    if k:
        lines.append(
            f"\ndecode kernel alone (one layer, batch {k['batch']}, context {k['context']}): {k['kernel_ms'] * 1e3:.1f} us; "
            f"kept KV {k['kept_kv_bytes'] / 2**20:.1f} MiB / HBM {k['hbm_gbps']:.0f} GB/s = {k['bound_ms'] * 1e3:.1f} us "
            f"-> {k['ratio_to_bound']:.2f}x the bound; dense SDPA decode {k['sdpa_dense_ms'] * 1e3:.1f} us "
            f"({k['sdpa_ratio_to_bound']:.2f}x its own bound)")
        lines.append("  other launch configs (us): " + ", ".join(f"{c} {v * 1e3:.1f}" for c, v in k["variants_ms"].items()))
    return "\n".join(lines)
