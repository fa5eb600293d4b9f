"""Issue 3 benchmark: peak GPU memory and time of profiling one sample, fused vs reference,
against one plain forward+backward of the same model at the same length.

Model: Llama-7B shape (hidden 4096, 32 heads, MHA, head_dim 128, MLP 11008, vocab 32000),
random weights, bf16, `--layers` decoder layers (default 4; the time of attention and
MLP scales linearly in layers, memory of activations too). Optionally the full 32 layers
at the longest length with gradient checkpointing (`--full-model`).

"plain forward+backward" = the same computation without the profiler: SDPA (FlashAttention)
attention, frozen weights, gradients w.r.t. the input embeddings only, loss on the last
128 tokens; it is the lower bound of what one profiling step must cost.
Times: median of --reps runs after one warm-up, torch.cuda.synchronize around each.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def llama7b(layers: int, max_len: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=max_len,
                      attn_implementation="sdpa", architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)      # random init directly in bf16 on the GPU
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    model.requires_grad_(False)
    return model.eval()


def plain_step(model, ids, answer=128):
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    out = model(inputs_embeds=emb, use_cache=False, logits_to_keep=answer + 1)
    loss = torch.nn.functional.cross_entropy(out.logits[0, :answer].float(), ids[0, -answer:])
    loss.backward()


def timed(fn, reps):
    fn()  # warm-up (Triton compile, allocator)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    ts = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), torch.cuda.max_memory_allocated() / 2**30


def kernel_bench(n: int):
    """One layer's tensors at length n: influence kernel vs PyTorch FlashAttention fwd and fwd+bwd."""
    import triton

    from moa_search.kernels.influence import influence_triton
    from moa_search.profiler import capture

    g = torch.Generator(device="cuda").manual_seed(0)
    mk = lambda: torch.randn(1, 32, n, 128, device="cuda", dtype=torch.bfloat16, generator=g)  # noqa: E731
    q, k, v, do = mk(), mk(), mk(), mk() * 0.01
    o, lse, aux = capture.dense_forward(q, k, v, 128 ** -0.5)
    t_inf = triton.testing.do_bench(lambda: influence_triton(q, k, v, do, lse, 128 ** -0.5, 64), warmup=50, rep=300)
    t_fwd = triton.testing.do_bench(lambda: capture.dense_forward(q, k, v, 128 ** -0.5), warmup=50, rep=300)
    t_bwd = triton.testing.do_bench(lambda: capture.dense_backward(do, q, k, v, o, lse, 128 ** -0.5, aux), warmup=50, rep=300)
    return {"n": n, "influence_ms": t_inf, "flash_fwd_ms": t_fwd, "flash_bwd_ms": t_bwd}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="8192,16384,32768")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--reference-max", type=int, default=32768, help="skip the reference above this length")
    ap.add_argument("--full-model", action="store_true", help="also the 32-layer model at the longest length")
    ap.add_argument("--budget-s", type=float, default=150, help="skip remaining optional parts past this time")
    ap.add_argument("--out", default="profiler_bench.json")
    args = ap.parse_args()
    from moa_search.profiler.capture import SampleInfluence, dense_profiling
    from moa_search.profiler.profile import sample_influence

    t_start = time.time()
    lengths = [int(x) for x in args.lengths.split(",")]
    rows, kernels = [], []
    model = llama7b(args.layers, max(lengths))
    weights = torch.cuda.memory_allocated() / 2**30
    print(f"model: Llama-7B shape, {args.layers} layers, weights {weights:.2f} GiB", flush=True)
    for n in lengths:
        g = torch.Generator().manual_seed(n)
        ids = torch.randint(0, 32000, (1, n), generator=g).cuda()
        row = {"length": n, "layers": args.layers, "weights_gib": weights}
        row["plain_s"], row["plain_peak_gib"] = timed(lambda: plain_step(model, ids), args.reps)
        results = {}
        for backend in ("triton", "reference"):
            if backend == "reference" and n > args.reference_max:
                continue
            state = SampleInfluence(backend=backend, block_size=64)
            box = {}

            def step():
                box["infl"], _ = sample_influence(model, ids[0].tolist(), n - 128, n, state, "bench")

            with dense_profiling(model, state):
                reps = args.reps if backend == "triton" else 1
                row[f"{backend}_s"], row[f"{backend}_peak_gib"] = timed(step, reps)
            results[backend] = box.pop("infl").float()
        if "reference" in results:
            a, b = results["triton"], results["reference"]
            row["rel_diff_fused_vs_ref"] = float((a - b).abs().max() / b.abs().max())
        del results
        row["fused_over_plain"] = row["triton_s"] / row["plain_s"]
        rows.append(row)
        print(json.dumps(row), flush=True)
        torch.cuda.empty_cache()
    for n in lengths:
        kernels.append(kernel_bench(n))
        print(json.dumps(kernels[-1]), flush=True)
    full = None
    if args.full_model and time.time() - t_start < args.budget_s:
        del model
        torch.cuda.empty_cache()
        n = max(lengths)
        model = llama7b(32, n)
        from moa_search.profiler.profile import enable_activation_checkpointing

        enable_activation_checkpointing(model)
        ids = torch.randint(0, 32000, (1, n), generator=torch.Generator().manual_seed(1)).cuda()
        full = {"length": n, "layers": 32, "gradient_checkpointing": True,
                "weights_gib": torch.cuda.memory_allocated() / 2**30}
        full["plain_s"], full["plain_peak_gib"] = timed(lambda: plain_step(model, ids), 1)
        state = SampleInfluence(backend="triton", block_size=64)
        with dense_profiling(model, state):
            full["triton_s"], full["triton_peak_gib"] = timed(
                lambda: sample_influence(model, ids[0].tolist(), n - 128, n, state, "bench"), 1)
        full["fused_over_plain"] = full["triton_s"] / full["plain_s"]
        print(json.dumps(full), flush=True)
    with open(args.out, "w") as f:
        json.dump({"rows": rows, "kernels": kernels, "full_model": full, "gpu": torch.cuda.get_device_name(),
                   "elapsed_s": time.time() - t_start}, f, indent=1)
    print(f"total {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
