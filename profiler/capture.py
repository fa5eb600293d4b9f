"""Dense attention that measures influence in its backward pass, plugged into the "moa" attention seam.

The model's Runtime (moa_search.runtime) calls `capture(fn, q, k, v, sink, span, start, end,
scale)` in place of the attention backend while `moa_search.hf_adapter.profiling` is active.
During profiling every layer gets a dense (full causal) rule and a `LayerCapture`; its `DenseInfluenceAttention`
(a torch.autograd.Function) runs dense causal attention forward, saves Q, K, V, O and the
row log-sum-exp, and in backward, given dO, computes the block-summed influence of the
layer (reference or fused Triton kernel) before returning dQ, dK, dV. No model class is
patched and no N x N matrix is kept.

Dense attention itself: on CUDA in fp16/bf16 PyTorch's FlashAttention ops (which return
the log-sum-exp we need); elsewhere the chunked PyTorch math of profiler/reference.py.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from moa_search.profiler import reference as ref

BACKENDS = ("auto", "reference", "triton")


def resolve_backend(backend: str, device: torch.device) -> str:
    """'auto' -> 'triton' on CUDA, else 'reference'. 'triton' off CUDA needs TRITON_INTERPRET=1 (tests)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown profiler backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "reference"
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("--backend triton needs a CUDA device (or TRITON_INTERPRET=1, slow, for tests); "
                         "use --backend reference on the CPU")
    return backend


def layer_influence(backend: str, q, k, v, do, lse, scale: float, block_size: int) -> torch.Tensor:
    """[B, Hq, nb, nb] influence of one layer from saved tensors (see profiler/reference.py).

    backend "triton" runs the fused kernel on CUDA layers; a layer that a device_map put on
    the CPU takes the reference path.
    """
    if backend == "triton" and (q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        from moa_search.kernels.influence import influence_triton

        return influence_triton(q, k, v, do, lse, scale, block_size)
    # bigger chunks on a GPU (a few [rows, N] float32 temporaries of 256 MB), small on the CPU
    return ref.influence_reference(q, k, v, do, lse, scale, block_size, chunk_elems=(1 << 26) if q.is_cuda else (1 << 24))


# ----------------------------------------------------------------------------- dense attention


def _flash_ok(q: torch.Tensor) -> bool:
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256
            and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention"))


def _repeat_kv(t: torch.Tensor, group: int) -> torch.Tensor:
    # The FlashAttention ops of PyTorch want equal head counts; the influence kernel does not.
    return t if group == 1 else t.repeat_interleave(group, dim=1)


def dense_forward(q, k, v, scale: float):
    """-> (o [B,Hq,N,D], lse [B,Hq,N] float32/64, aux for dense_backward)."""
    if _flash_ok(q):
        g = q.shape[1] // k.shape[1]
        res = torch.ops.aten._scaled_dot_product_flash_attention(
            q, _repeat_kv(k, g), _repeat_kv(v, g), 0.0, True, False, scale=scale)
        o, lse = res[0], res[1]
        return o, lse, ("flash", res[2:8])
    o, lse = ref.dense_forward(q, k, v, scale)
    return o, lse, ("math", None)


def dense_backward(do, q, k, v, o, lse, scale: float, aux):
    kind, extra = aux
    if kind == "flash":
        g = q.shape[1] // k.shape[1]
        cum_q, cum_k, max_q, max_k, seed, offset = extra
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            do, q, _repeat_kv(k, g), _repeat_kv(v, g), o, lse, cum_q, cum_k, max_q, max_k, 0.0, True,
            seed, offset, scale=scale)
        if g > 1:
            B, Hkv, N, D = k.shape
            dk = dk.view(B, Hkv, g, N, D).sum(2)
            dv = dv.view(B, Hkv, g, N, D).sum(2)
        return dq, dk, dv
    return ref.dense_backward(do, q, k, v, o, lse, scale)


class DenseInfluenceAttention(torch.autograd.Function):
    """o = causal_attention(q, k, v); backward also hands the layer's influence to `sink(I)`."""

    @staticmethod
    def forward(ctx, q, k, v, scale, sink):
        o, lse, aux = dense_forward(q, k, v, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale, ctx.sink, ctx.aux = scale, sink, aux
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        ctx.sink.receive(q, k, v, do, lse, ctx.scale)
        dq, dk, dv = dense_backward(do, q, k, v, o, lse, ctx.scale, ctx.aux)
        return dq, dk, dv, None, None


# ----------------------------------------------------------------------------- per-sample state


@dataclass
class SampleInfluence:
    """Influence of the current sample, filled layer by layer during backward.

    Without `target`, each layer's [Hq, nb, nb] block sums are kept in `layers`. With a
    float64 `target` [layers, Hq, NB, NB] (NB >= nb), they are added into its top-left
    corner as they arrive, so a sample never holds a second full-size copy (at 32k a 7B
    profile is 2 GiB in float64); `finite` records per layer whether they were finite.
    """

    backend: str
    block_size: int
    layers: dict = field(default_factory=dict)   # layer -> [Hq, nb, nb] (batch 1)
    target: torch.Tensor | None = None
    finite: dict = field(default_factory=dict)   # layer -> bool tensor (no host sync until checked)

    def clear(self) -> None:
        self.layers.clear()
        self.finite.clear()

    def reported(self) -> set:
        return set(self.layers) | set(self.finite)


class LayerCapture:
    """One layer's capture during profiling (the Runtime calls it in place of the attention backend)."""

    def __init__(self, layer: int, state: SampleInfluence):
        self.layer, self.state = layer, state

    def __call__(self, fn, q, k, v, sink, span, start, end, scale):
        nq, nk = q.shape[2], k.shape[2]
        if nq != nk or bool((start != 0).any()) or bool((end != nk).any()):
            raise RuntimeError("the influence profiler runs one unpadded sequence at a time without a KV cache "
                               f"(got {nq} queries over {nk} keys, start={start.tolist()}, end={end.tolist()})")
        if not q.requires_grad and not k.requires_grad and not v.requires_grad:
            raise RuntimeError("profiling needs gradients through attention: run the model on inputs_embeds "
                               "that require grad (see moa_search.profiler.profile.sample_influence)")
        return DenseInfluenceAttention.apply(q, k, v, scale, self)

    def receive(self, q, k, v, do, lse, scale) -> None:
        if q.shape[0] != 1:
            raise RuntimeError("the influence profiler expects batch size 1")
        infl = layer_influence(self.state.backend, q, k, v, do.contiguous(), lse, scale, self.state.block_size)
        # Gradient checkpointing still runs a layer's backward once; anything else would be a bug.
        if self.layer in self.state.reported():
            raise RuntimeError(f"layer {self.layer} produced two backward passes for one sample")
        target = self.state.target
        if target is None:
            self.state.layers[self.layer] = infl[0]
            return
        nb = infl.shape[-1]
        self.state.finite[self.layer] = torch.isfinite(infl).all().to(target.device)
        target[self.layer, :, :nb, :nb] += infl[0].to(target.device, target.dtype)


@contextmanager
def dense_profiling(model, state: SampleInfluence):
    """Route every attention layer through DenseInfluenceAttention; restore the model afterwards."""
    from moa_search.attention import LayerRule
    from moa_search.hf_adapter import attention_modules, profiling

    mods = attention_modules(model)
    if not mods:
        raise RuntimeError(f"{type(model).__name__}: found no attention modules with a layer_idx to profile")
    heads = model.config.num_attention_heads
    # A dense rule: sink 0, span = clamp(0 + 1 * N, 1, N) = N, i.e. full causal attention.
    dense = LayerRule(sink=0, alpha=torch.zeros(heads, dtype=torch.float64),
                      beta=torch.ones(heads, dtype=torch.float64), min_span=1, backend="reference")
    with profiling(model, [dense] * len(mods), [LayerCapture(layer, state) for layer in range(len(mods))]):
        yield model
