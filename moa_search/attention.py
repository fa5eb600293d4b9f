"""One layer's sparse attention over a prompt, independent of any model library.

A `LayerRule` holds one layer's per-query-head (alpha, beta); `attend` turns it into spans
(once per call) and runs a backend from the registry (the kernels' contract,
moa_search.kernels). The transformers seam (moa_search.hf_adapter) and the per-model state
(moa_search.runtime) call this; nothing here knows about caches or transformers.

A layer whose every head keeps every causal key at this length, over an unpadded prompt, is
plain causal attention: it goes to SDPA (cuDNN / flash), which no sparse kernel beats on dense
work. That choice is made on the host from the plan alone, without a device sync.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from . import rules as R


@dataclass
class LayerRule:
    """Rules of one layer, per query head. alpha, beta: float64 [Hq] (on the layer's device)."""

    sink: int
    alpha: torch.Tensor
    beta: torch.Tensor
    min_span: int = 1
    backend: str = "auto"  # "auto" (Triton on CUDA, cpu_window on CPU), "reference", "cpu_window", or registered
    # host copies, read once: "is this layer dense at N?" must not sync with the GPU
    _host: tuple = field(init=False, repr=False)

    def __post_init__(self):
        self._host = (self.alpha.detach().cpu().numpy(), self.beta.detach().cpu().numpy())

    def host_spans(self, n: int) -> np.ndarray:
        """int64 [Hq]: every head's window at length n, computed on the host (rules.span)."""
        return R.span(*self._host, n, self.min_span)

    def spans(self, n: torch.Tensor) -> torch.Tensor:
        """n: int64 [B] lengths (on the device) -> int64 [B, Hq] windows (rules.span)."""
        return R.span(self.alpha.to(n.device)[None, :], self.beta.to(n.device)[None, :], n[:, None], self.min_span)


Backend = Callable[..., torch.Tensor]
BACKENDS: dict[str, Backend] = {}
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


def run_backend(rule: LayerRule, q, k, v, span, start, end, scale, width: float | None = None) -> torch.Tensor:
    """The rule's backend on the kernels' contract (span already computed by the caller)."""
    name = pick_backend(rule, q)
    hints = {"width": width} if name in _TAKES_HINTS and width is not None else {}
    return BACKENDS[name](q, k, v, rule.sink, span, start, end, scale, **hints)


def dense_causal(q, k, v, scale) -> torch.Tensor:
    """Plain causal attention (SDPA) for a layer that keeps every key; GQA without repeating K/V."""
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                            enable_gqa=q.shape[1] != k.shape[1])


def attend(rule: LayerRule, query, key, value, start, end, scale, unpadded: bool, capture=None,
           length: torch.Tensor | None = None) -> torch.Tensor:
    """One layer's attention under its rule: query [B, Hq, Nq, D], key/value [B, Hkv, Nk, D]
    -> [B, Hq, Nq, D]; queries are the last Nq of the Nk keys (kernels' contract).

    start/end: int64 [B] real keys; unpadded: every key of every row is real (start 0, end Nk).
    length: int64 [B] the length whose spans apply (default end - start). The spans are
    computed once here: on the host when every row has the same length (then copied), on the
    device otherwise. A dense layer over an unpadded prompt goes to SDPA. capture: the
    profiler's wrapper, which must see the sparse backend (so it never takes the SDPA path).
    """
    B, Hq, Nq, _ = query.shape
    Nk = key.shape[2]
    host = rule.host_spans(Nk)                                               # [Hq], also the width hint
    if unpadded and length is None:
        if Nq == Nk and rule.backend == "auto" and capture is None and bool((host >= Nk).all()):
            return dense_causal(query, key, value, scale)
        span = torch.as_tensor(host, device=query.device).expand(B, Hq)
    else:
        span = rule.spans(end - start if length is None else length)
    if capture is not None:  # the profiler wraps the backend to see Q, K, V, O and dO
        fn = BACKENDS[pick_backend(rule, query)]
        return capture(fn, query, key, value, rule.sink, span, start, end, scale)
    return run_backend(rule, query, key, value, span, start, end, scale, width=float(host.mean()) / max(Nk, 1))


def padding_bounds(attention_mask: torch.Tensor | None, batch: int, nk: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(start, end) int64 [B] of each sequence's real keys among the last nk of a 2D [B, N] mask
    (True/1 = real); all real when the mask is None.

    Real tokens must be contiguous (left or right padding, as tokenizers produce): checked on
    the device on CUDA (no host sync), on the host otherwise.
    """
    if attention_mask is None:
        return (torch.zeros(batch, dtype=torch.long, device=device),
                torch.full((batch,), nk, dtype=torch.long, device=device))
    if attention_mask.dim() != 2:
        raise ValueError(f"moa attention expects a 2D padding mask, got shape {tuple(attention_mask.shape)}")
    m = attention_mask[:, -nk:].bool()
    n_real = m.sum(-1)
    start = torch.where(n_real > 0, m.float().argmax(-1), torch.zeros_like(n_real))
    end = start + n_real
    j = torch.arange(m.shape[1], device=m.device)
    contiguous = (((j[None] >= start[:, None]) & (j[None] < end[:, None])) == m).all()
    msg = "moa attention needs each sequence's real tokens to be contiguous (left or right padding only)"
    if m.is_cuda:
        torch._assert_async(contiguous, msg)
    elif not bool(contiguous):
        raise ValueError(msg)
    return start.to(device), end.to(device)


def _imported_on_first_call(module: str, name: str) -> Backend:
    # pick_backend sends only CUDA queries to triton, so CPU paths never import it
    def backend(q, k, v, sink, span, start, end, scale, **hints):
        return getattr(importlib.import_module(module), name)(q, k, v, sink, span, start, end, scale, **hints)

    return backend


register_backend("reference", _imported_on_first_call("moa_search.kernels.reference", "sparse_attention_reference"))
register_backend("cpu_window", _imported_on_first_call("moa_search.kernels.cpu_window", "window_attention_cpu"))
register_backend("triton", _imported_on_first_call("moa_search.kernels.prefill", "prefill_backend"), hints=True)

__all__ = ["LayerRule", "BACKENDS", "register_backend", "pick_backend", "run_backend", "dense_causal", "attend",
           "padding_bounds"]
