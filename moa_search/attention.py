"""The one attention function registered with transformers (name "moa").

transformers 5.x attention modules call `ALL_ATTENTION_FUNCTIONS[config._attn_implementation]`
with (module, query, key, value, attention_mask, scaling=..., ...) after updating the
cache. `apply_plan` attaches a `LayerRule` to each attention module (`module.moa_rule`);
this function turns it into per-sequence spans and runs the sparse attention backend.

The mask hook registered under the same name passes the 2D padding mask through (as the
flash-attention path does), so the function knows where each sequence's real tokens start.

A layer whose every head keeps every causal key at this length, with no padding, is plain
causal attention: it goes to SDPA (cuDNN / flash), which no sparse kernel beats on dense work.
That choice is made on the host from the plan alone, without a device sync.
"""
from __future__ import annotations

import importlib
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from . import rules as R

ATTN_NAME = "moa"


@dataclass
class LayerRule:
    """Rules of one layer, per query head. alpha, beta: float64 [Hq]."""

    sink: int
    alpha: torch.Tensor
    beta: torch.Tensor
    min_span: int = 1
    backend: str = "auto"  # "auto" (Triton on CUDA, cpu_window on CPU), "reference", "cpu_window"

    def __post_init__(self):
        # host copies, read once here: "is this layer dense at N?" must not sync with the GPU
        self._host = (self.alpha.detach().cpu().numpy(), self.beta.detach().cpu().numpy())

    def spans(self, n: torch.Tensor) -> torch.Tensor:
        """n: int64 [B] real lengths -> int64 [B, Hq] windows."""
        return R.span(self.alpha.to(n.device)[None, :], self.beta.to(n.device)[None, :], n[:, None], self.min_span)

    def dense_at(self, n: int) -> bool:
        """True when every head's span reaches n at length n (all causal keys kept)."""
        return bool((R.span(*self._host, n, self.min_span) >= n).all())

    def width_at(self, n: int) -> float:
        """Mean window over the heads as a fraction of n, at length n (host side, no sync)."""
        return float(np.mean(R.span(*self._host, n, self.min_span))) / max(n, 1)


def padding_bounds(attention_mask: torch.Tensor | None, batch: int, nk: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(start, end) int64 [B] of each sequence's real keys, from a 2D [B, Nk] mask (True/1 = real).

    Real tokens must be contiguous (left or right padding, as tokenizers produce). Every layer
    of a forward gets the same mask tensor, so the bounds are kept on it (`_moa_bounds`) and
    computed once per forward, not once per layer.
    """
    if attention_mask is None:
        return (torch.zeros(batch, dtype=torch.long, device=device),
                torch.full((batch,), nk, dtype=torch.long, device=device))
    if attention_mask.dim() != 2:
        raise ValueError(f"moa attention expects a 2D padding mask, got shape {tuple(attention_mask.shape)}")
    key = (nk, torch.device(device))
    memo = getattr(attention_mask, "_moa_bounds", None)
    if memo is not None and memo[0] == key:
        return memo[1]
    m = attention_mask[:, -nk:].bool()
    n_real = m.sum(-1)
    start = torch.where(n_real > 0, m.float().argmax(-1), torch.zeros_like(n_real))
    end = start + n_real
    j = torch.arange(nk, device=m.device)
    contiguous = (((j[None] >= start[:, None]) & (j[None] < end[:, None])) == m).all()
    msg = "moa attention needs each sequence's real tokens to be contiguous (left or right padding only)"
    if m.is_cuda:
        torch._assert_async(contiguous, msg)  # no host sync in every layer of every decode step
    elif not bool(contiguous):
        raise ValueError(msg)
    bounds = start.to(device), end.to(device)
    attention_mask._moa_bounds = (key, bounds)
    return bounds


Backend = Callable[..., torch.Tensor]
BACKENDS: dict[str, Backend] = {}
# How many calls took each path ("sdpa" for dense layers, else the backend's name). Host-side
# counter; the dispatch tests read it.
DISPATCH: Counter = Counter()


# Backends that take keyword hints besides the contract's arguments (tuning only, never
# semantics): width = the layer's mean window / N, a host float.
_TAKES_HINTS: set[str] = set()


def register_backend(name: str, fn: Backend, hints: bool = False) -> None:
    """Attention backends by name: "reference" (the oracle), "cpu_window", "triton", or your own.

    fn(q, k, v, sink, span, start, end, scale) (contract: moa_search.kernels); with hints=True
    it is also given width=... (see _TAKES_HINTS).
    """
    BACKENDS[name] = fn
    (_TAKES_HINTS.add if hints else _TAKES_HINTS.discard)(name)


def pick_backend(rule: LayerRule, query: torch.Tensor) -> str:
    if rule.backend != "auto":
        return rule.backend
    # CUDA: the block-sparse Triton kernel. CPU: the windowed path, which touches only the
    # kept keys (the reference scores all N^2 pairs; it stays the oracle the tests compare to).
    return "triton" if query.is_cuda else "cpu_window"


def moa_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query [B, Hq, Nq, D], key/value [B, Hkv, Nk, D] -> ([B, Nq, Hq, D], None)."""
    rule: LayerRule | None = getattr(module, "moa_rule", None)
    if rule is None:
        raise RuntimeError(
            f"{type(module).__name__} (layer {getattr(module, 'layer_idx', '?')}) runs the 'moa' attention "
            "but has no plan attached; use moa_search.apply_plan(model, plan)"
        )
    if dropout and module.training:
        raise NotImplementedError("moa attention has no dropout; call model.eval()")
    B, Hq, Nq, D = query.shape
    Nk = key.shape[2]
    start, end = padding_bounds(attention_mask, B, Nk, query.device)
    scale = D ** -0.5 if scaling is None else scaling
    cache_ref = getattr(module, "moa_cache", None)  # set by moa_search.cache.MoaCache.update
    cache = cache_ref() if cache_ref is not None else None
    unpadded = attention_mask is None
    if cache is not None and cache.owns(module.layer_idx, key):
        # compressed KV cache: key/value are only this forward's tokens; the cache attends
        # over its packed sink + window buffers with the right positions
        out = cache.attend(module.layer_idx, query, start, end, scale, unpadded=unpadded)
        return out.transpose(1, 2).contiguous(), None
    out = attend(rule, query, key, value, start, end, scale, unpadded, getattr(module, "moa_capture", None))
    return out.transpose(1, 2).contiguous(), None


def attend(rule: LayerRule, query, key, value, start, end, scale, unpadded: bool, capture=None) -> torch.Tensor:
    """One layer's attention under its rule: [B, Hq, Nq, D] -> [B, Hq, Nq, D].

    A dense layer (every span reaches N) over an unpadded prompt is plain causal attention and
    goes to SDPA; anything else to the rule's backend. capture: the profiler's wrapper, which
    must see the sparse backend (so it never takes the SDPA path).
    """
    Nq, Nk = query.shape[2], key.shape[2]
    if unpadded and Nq == Nk and rule.backend == "auto" and capture is None and rule.dense_at(Nk):
        DISPATCH["sdpa"] += 1
        return torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale,
                                                                enable_gqa=query.shape[1] != key.shape[1])
    span = rule.spans(end - start)
    name = pick_backend(rule, query)
    DISPATCH[name] += 1
    fn = BACKENDS[name]
    if capture is not None:  # the profiler wraps the backend to see Q, K, V, O and dO
        return capture(fn, query, key, value, rule.sink, span, start, end, scale)
    hints = {"width": rule.width_at(Nk)} if name in _TAKES_HINTS else {}
    return fn(query, key, value, rule.sink, span, start, end, scale, **hints)


def _imported_on_first_call(module: str, name: str) -> Backend:
    # pick_backend sends only CUDA queries to triton, so CPU paths never import it
    def backend(q, k, v, sink, span, start, end, scale, **hints):
        return getattr(importlib.import_module(module), name)(q, k, v, sink, span, start, end, scale, **hints)

    return backend


register_backend("reference", _imported_on_first_call("moa_search.kernels.reference", "sparse_attention_reference"))
register_backend("cpu_window", _imported_on_first_call("moa_search.kernels.cpu_window", "window_attention_cpu"))
register_backend("triton", _imported_on_first_call("moa_search.kernels.prefill", "prefill_backend"), hints=True)


def register() -> None:
    """Register the attention function and its mask hook with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(ATTN_NAME, moa_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, flash_attention_mask)
