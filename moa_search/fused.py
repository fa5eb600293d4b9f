"""The compiled decode step's model forward for the Llama family, with concatenated projections.

At batch 1 a decode step is a string of matrix-vector products, each bound by reading its
weights; a small one (Llama-3-8B's k and v: 8 MiB) does not reach the bandwidth a large one
does. So, as gpt-fast does, q, k and v are one matmul and gate and up another: 4 per layer
instead of 7. Measured on the H200 (scripts/profile_step.py, the projections of all 32 layers
of the Llama-3-8B shape, CUDA graph): 4.39 ms as 7 matmuls, 3.84 ms as 4, floor 3.29 ms.

    fused = fuse(model)                          # once; None when the model is not of the family
    logits = decode_forward(model, fused, tok, pos)    # [B, 1] tokens -> [B, V], decode-only mode

`fuse` concatenates each layer's weights into one buffer and points the q/k/v (gate/up)
Linear weights at its rows, so no memory is added and transformers' own forward (prefill, the
uncompiled step) reads the same numbers; save_pretrained writes the same tensors (tested).
`unfuse` gives every Linear its own storage back (remove_plan calls it).

`decode_forward` is the decoder of LlamaForCausalLM (and Mistral, Qwen2 with its q/k/v bias,
Qwen3 with its q/k norms) for one token per sequence: the model's own modules for the
embedding, rotary table, norms, o and down projections, activation and head, the fused
matmuls in between, and attention through the plan's Runtime (decode-only mode:
moa_search.runtime). Other architectures keep transformers' forward in the compiled step.
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .hf_adapter import runtime_of

FAMILY = ("llama", "mistral", "qwen2", "qwen3")


@dataclass
class FusedLayer:
    """One decoder layer's concatenated projections: qkv [Nq + 2 Nkv, H] (+ bias), gate_up [2 I, H]."""
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    gate_up: torch.Tensor
    splits: tuple[int, int, int]          # rows of q, k, v in qkv
    rope: Callable                        # the modeling module's apply_rotary_pos_emb(q, k, cos, sin)


def _why_not(model) -> str | None:
    """Why `decode_forward` cannot run this model (None: it can)."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if getattr(cfg, "model_type", None) not in FAMILY:
        return f"model type {getattr(cfg, 'model_type', None)!r} is not one of {FAMILY}"
    base = getattr(model, "model", None)
    if base is None or not all(hasattr(base, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return "no model.model.{embed_tokens, layers, norm, rotary_emb}"
    if not hasattr(model, "lm_head"):
        return "no lm_head"
    if not hasattr(sys.modules[type(base.layers[0].self_attn).__module__], "apply_rotary_pos_emb"):
        return "no apply_rotary_pos_emb in the modeling module"
    if any(hasattr(m, "_hf_hook") for m in model.modules()):
        return "accelerate hooks (offloaded or dispatched layers)"
    for layer in base.layers:
        attn, mlp = layer.self_attn, layer.mlp
        lins = [attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj]
        if any(type(x) is not torch.nn.Linear for x in lins):
            return "a projection is not a plain torch.nn.Linear (quantized?)"
        w = lins[0].weight
        if any(x.weight.dtype != w.dtype or x.weight.device != w.device or not x.weight.is_floating_point()
               for x in lins):
            return "projections differ in dtype or device"
        if len({x.bias is None for x in lins[:3]}) > 1 or mlp.gate_proj.bias is not None or mlp.up_proj.bias is not None:
            return "biases on some projections only"
    return None


def _fused_of(layer) -> FusedLayer | None:
    """The FusedLayer the layer's weights are views of already (None: not fused)."""
    rec = getattr(layer, "_moa_fused", None)
    if rec is None:
        return None
    q = layer.self_attn.q_proj.weight
    g = layer.mlp.gate_proj.weight
    return rec if q.data_ptr() == rec.qkv.data_ptr() and g.data_ptr() == rec.gate_up.data_ptr() else None


@torch.no_grad()
def fuse(model) -> list[FusedLayer] | None:
    """Concatenate every layer's q/k/v and gate/up weights (see the module doc); None when the
    model is not of the family `decode_forward` runs. Idempotent."""
    if _why_not(model) is not None:
        return None
    out = []
    for layer in model.model.layers:
        rec = _fused_of(layer)
        if rec is None:
            attn, mlp = layer.self_attn, layer.mlp
            parts = [attn.q_proj, attn.k_proj, attn.v_proj]
            qkv = torch.cat([p.weight for p in parts])
            bias = torch.cat([p.bias for p in parts]) if parts[0].bias is not None else None
            gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
            rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
            rec = FusedLayer(qkv, bias, gate_up, tuple(p.weight.shape[0] for p in parts), rope)
            # the Linear weights become views of the fused rows: the old storage is freed
            r0 = 0
            for p, n in zip(parts, rec.splits):
                p.weight.data = qkv[r0:r0 + n]
                if bias is not None:
                    p.bias.data = bias[r0:r0 + n]
                r0 += n
            i = mlp.gate_proj.weight.shape[0]
            mlp.gate_proj.weight.data, mlp.up_proj.weight.data = gate_up[:i], gate_up[i:]
            layer._moa_fused = rec
        out.append(rec)
    return out


@torch.no_grad()
def unfuse(model) -> None:
    """Give every fused Linear its own storage again (the values are unchanged)."""
    base = getattr(model, "model", None)
    for layer in getattr(base, "layers", []):
        if getattr(layer, "_moa_fused", None) is None:
            continue
        attn, mlp = layer.self_attn, layer.mlp
        for p in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
            p.weight.data = p.weight.data.clone()
            if p.bias is not None:
                p.bias.data = p.bias.data.clone()
        del layer._moa_fused


def decode_forward(model, fused: list[FusedLayer], input_ids, position_ids) -> torch.Tensor:
    """One token per sequence through the decoder, attention on the runtime's compressed cache in
    decode-only mode: input_ids, position_ids [B, 1] -> logits [B, V] (the model's dtype)."""
    runtime = runtime_of(model)
    base = model.model
    B = input_ids.shape[0]
    h = base.embed_tokens(input_ids)                                          # [B, 1, H]
    cos, sin = base.rotary_emb(h, position_ids)
    for i, (layer, rec) in enumerate(zip(base.layers, fused)):
        attn, mlp = layer.self_attn, layer.mlp
        D = attn.head_dim
        x = layer.input_layernorm(h)
        q, k, v = F.linear(x, rec.qkv, rec.qkv_bias).split(rec.splits, -1)
        q, k, v = q.view(B, 1, -1, D), k.view(B, 1, -1, D), v.view(B, 1, -1, D)
        if hasattr(attn, "q_norm"):                                           # Qwen3
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = rec.rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)       # [B, H, 1, D]
        o = runtime.attention(i, q, k, v.transpose(1, 2), None, attn.scaling)   # [B, Hq, 1, D]
        h = h + attn.o_proj(o.transpose(1, 2).reshape(B, 1, -1))
        x = layer.post_attention_layernorm(h)
        gate, up = F.linear(x, rec.gate_up).chunk(2, -1)
        h = h + mlp.down_proj(mlp.act_fn(gate) * up)
    return model.lm_head(base.norm(h))[:, -1]


__all__ = ["FusedLayer", "fuse", "unfuse", "decode_forward", "FAMILY"]
