"""`moa bench`: speed and memory of a plan against the dense baselines, measured side by side.

    moa bench prefill   the block-sparse prefill kernel vs dense SDPA and FlexAttention (GPU)
    moa bench decode    decode with the compressed KV cache vs transformers' dense cache:
                        cache bytes, step latency, throughput at the largest batch that fits
    moa bench e2e       whole-model generate, every path side by side: time to first token,
                        decode tokens/s at batch 1 and the largest batch, peak memory, the floor (GPU)

Models are random-weight stand-ins of a named shape (--model-shape llama-7b, llama3-8b,
mistral-7b, qwen2-7b, ...): speed does not depend on the weights. Give a plan made for that
shape (--plan), or a density (--density) for a synthetic one.

examples:
    moa bench prefill --model-shape llama3-8b --density 0.5,0.25 --lengths 8192,16384,32768
    moa bench prefill --plan search/plan.json --lengths 16k,32k --json prefill.json
    moa bench decode  --model-shape llama-7b --density 0.5 --prompt-len 16384 --new-tokens 256
    moa bench decode  --model-shape tiny --density 0.5 --device cpu --prompt-len 256 --new-tokens 32   # smoke test

`moa bench prefill --help` and `moa bench decode --help` list every option.
"""
from __future__ import annotations

import argparse
import importlib

# Model shapes both modes build from (random weights): LlamaConfig fields. head_dim = hidden / heads.
MODEL_SHAPES = {
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=32000),
    "llama-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                      num_key_value_heads=40, vocab_size=32000),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
    "mistral-7b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=32000),
    "qwen2-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                     num_key_value_heads=4, vocab_size=152064),
    "llama3-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256),
}

MODES = {"prefill": "moa_search.bench_prefill", "decode": "moa_search.bench_decode", "e2e": "moa_search.bench_e2e"}


def random_model(shape: str, layers: int | None, max_len: int, device, dtype):
    """A random-weight LlamaForCausalLM of a named shape (speed does not depend on the weights),
    built straight on `device` in `dtype`, in eval mode with no gradients."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = dict(MODEL_SHAPES[shape])
    if layers:
        fields["num_hidden_layers"] = layers
    cfg = LlamaConfig(max_position_embeddings=max(max_len, 4096), attn_implementation="sdpa", **fields)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    return model.eval().requires_grad_(False)


def graph_ms(fn, reps: int = 20) -> float:
    """ms per call of fn (CUDA): run once on a side stream (compiles, cuBLAS choices), captured
    once as a CUDA graph, then the mean of `reps` replays (no launch overhead in the number)."""
    import time

    import torch

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        g.replay()
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - t0) / reps


def add_arguments(p) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.description = __doc__
    p.add_argument("mode", choices=list(MODES), help="prefill or decode")
    p.add_argument("options", nargs=argparse.REMAINDER, metavar="...", help="the mode's options (moa bench MODE --help)")


def run(args) -> int:
    mod = importlib.import_module(MODES[args.mode])
    parser = argparse.ArgumentParser(prog=f"moa bench {args.mode}", description=mod.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    mod.add_arguments(parser)
    return int(mod.run(parser.parse_args(args.options)) or 0)
