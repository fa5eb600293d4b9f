"""Tiny random models and brute-force references shared by the tests."""
from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import torch

from moa_search.plan import ModelShape, Plan


def tiny_model(family: str = "llama", layers: int = 2, heads: int = 4, kv_heads: int = 2, head_dim: int = 16,
               vocab: int = 97, seed: int = 0, attn: str = "sdpa"):
    """A randomly initialised causal LM of the given family, in eval mode."""
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

    torch.manual_seed(seed)
    kw = dict(vocab_size=vocab, hidden_size=heads * head_dim, intermediate_size=2 * heads * head_dim,
              num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
              max_position_embeddings=1024, attn_implementation=attn)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**kw))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**kw, use_sliding_window=False))
    elif family == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**kw, head_dim=head_dim, use_sliding_window=False))
    elif family == "mistral":
        model = MistralForCausalLM(MistralConfig(**kw, sliding_window=None))
    else:
        raise ValueError(family)
    return model.eval()


def random_plan(model, granularity="query_head", sink=3, seed=0, max_alpha=24) -> Plan:
    """Per-head rules drawn at random: a mix of small fixed windows and elastic ones."""
    shape = ModelShape.from_config(model.config)
    rng = np.random.default_rng(seed)
    heads = shape.num_query_heads if granularity == "query_head" else shape.num_kv_heads
    alpha = rng.integers(1, max_alpha, size=(shape.num_layers, heads)).astype(float)
    beta = rng.choice([0.0, 0.125, 0.25, 0.5], size=(shape.num_layers, heads))
    return Plan(model=shape, alpha=alpha.tolist(), beta=beta.tolist(), sink=sink, granularity=granularity)


def brute_mask(plan: Plan, layer: int, pad: list[int], total: int, row_len) -> torch.Tensor:
    """Per-head additive mask [B, Hq, total, total] from the rule's definition, one entry at a time.

    Sequence b has pad[b] left-pad tokens; row i (real index r = i - pad) uses span at
    length row_len(b, r) (prefill: the prompt's real length; decode: r + 1 for generated rows).
    """
    a, bt = plan.query_rules()
    B, H = len(pad), a.shape[1]
    m = torch.full((B, H, total, total), torch.finfo(torch.float32).min)
    for b in range(B):
        for h in range(H):
            for i in range(pad[b], total):
                r = i - pad[b]
                n = row_len(b, r)
                span = int(min(max(math.floor(a[layer, h] + bt[layer, h] * n), plan.min_span), n))
                for j in range(pad[b], i + 1):
                    rj = j - pad[b]
                    if rj < plan.sink or r - rj < span:
                        m[b, h, i, j] = 0.0
            for i in range(pad[b]):      # padding rows: attend to themselves (ignored)
                m[b, h, i, i] = 0.0
    return m


def eager_with_masks(model, input_ids, attention_mask, masks_per_layer):
    """Run `model` (eager attention) with a different 4D mask per layer, via forward pre-hooks."""
    from moa_search.apply import attention_modules

    handles = []
    for layer, mod in enumerate(attention_modules(model)):
        def hook(module, args, kwargs, m=masks_per_layer[layer]):
            kwargs["attention_mask"] = m.to(kwargs["hidden_states"].dtype)
            return args, kwargs
        handles.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        pos = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        with torch.no_grad():
            return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos).logits
    finally:
        for h in handles:
            h.remove()


def run_cli(args: list[str], ranks: int = 1, port: int = 29500, cuda_visible: str | None = None,
            timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m moa_search.cli ARGS` in a fresh process, or under torchrun with `ranks`
    processes (gloo on the CPU, NCCL on GPUs with NVLink multicast off). Asserts exit code 0."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", NCCL_NVLS_ENABLE="0")
    if cuda_visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = cuda_visible
    launcher = [sys.executable]
    if ranks > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-port", str(port)]
    res = subprocess.run(launcher + ["-m", "moa_search.cli", *args], env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def interrupt_on_call(monkeypatch, owner, name: str, n: int) -> list:
    """Patch owner.name to raise KeyboardInterrupt (Ctrl-C) on its n-th call; returns the list
    that counts the calls (clear it to count again)."""
    real, calls = getattr(owner, name), []

    def wrapper(*a, **kw):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(owner, name, wrapper)
    return calls
