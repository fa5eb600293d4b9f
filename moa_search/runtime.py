"""What a plan adds to one model, in one object: the layers' rules, the compressed cache in
use, the profiler's capture. The attention function of the transformers adapter
(moa_search.hf_adapter) hands every layer call to `Runtime.attention`; nothing is looked up
on modules or masks at run time.

A layer call takes one of four paths (five: see `decoding`):

    no compressed cache staged this layer's keys    the plan's attention over the given keys
                                                    (moa_search.attention.attend)
    prompt on an empty compressed cache            the same, then the kept tokens are written
    chunk on a filled cache                        the chunk attends to sink + window + itself
                                                    through the prompt kernels (CompressedKV.window)
    one token on a filled cache (decode)           append + the split-K decode kernel

The first layer of a forward also advances the cache's shared state (CompressedKV.begin).

Decode-only mode (`decoding`, used by moa_search.generation's compiled step): the model runs
without a transformers Cache (use_cache=False), every layer call is one token per sequence on
the filled compressed cache, and goes straight to the cache's decode op (append + split-K
attention as one custom op). Nothing on the host changes per token in that mode (no staging,
no counters), so torch.compile traces the forward once and every step reuses it; the caller
runs `CompressedKV.begin` before the forward and fixes the host counters afterwards.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from .attention import LayerRule, attend, padding_bounds, pick_backend, run_backend
from .cache import CompressedKV, MoaCacheError


class Runtime:
    """Per-model state of an applied plan.

    rules: one LayerRule per decoder layer (device tensors). capture: None, or one profiler
    capture per layer (see profiler/capture.py). prompt_length: int64 [B] set while a long
    prompt is prefilled in chunks, so that every chunk's rows use the spans of the whole
    prompt, as a one-shot prefill does (None: the spans at the length reached).
    """

    def __init__(self, rules: list[LayerRule], plan=None):
        self.rules = rules
        self.plan = plan
        self.capture: list | None = None
        self.prompt_length: torch.Tensor | None = None
        self._staged: list = [None] * len(rules)     # (key, value, CompressedKV, first) per layer
        self._bounds = (None, 0, None)               # (mask, nk, (start, end)): once per forward
        self.decoding: CompressedKV | None = None    # decode-only mode: the cache every layer call decodes on

    # -- the cache side ---------------------------------------------------------------------------
    def stage(self, layer: int, key, value, kv: CompressedKV, first: bool) -> None:
        """A compressed cache received this layer's new keys; the attention call consumes them.
        first: the cache held no token before this forward."""
        if self._staged[layer] is not None:
            raise MoaCacheError(
                f"layer {layer}: the previous keys were never consumed by the 'moa' attention function; the "
                "compressed cache only works on a model whose plan is applied (moa_search.apply_plan) and whose "
                "attention implementation is still 'moa'")
        self._staged[layer] = (key, value, kv, first)

    def clear_staged(self) -> None:
        self._staged = [None] * len(self.rules)

    # -- the attention side -------------------------------------------------------------------------
    def bounds(self, mask, batch: int, nk: int, device):
        """padding_bounds of the last nk keys, computed once per forward (every layer gets the same mask)."""
        m, n, b = self._bounds
        if mask is None or m is not mask or n != nk:
            b = padding_bounds(mask, batch, nk, device)
            self._bounds = (mask, nk, b) if mask is not None else (None, 0, None)
        return b

    def attention(self, layer: int, query, key, value, mask, scale) -> torch.Tensor:
        """query [B, Hq, Nq, D], key/value [B, Hkv, Nk, D], mask a 2D padding mask or None
        -> [B, Hq, Nq, D]."""
        rule = self.rules[layer]
        B, Hq, Nq, D = query.shape
        if self.decoding is not None:
            if Nq != 1 or mask is not None:
                raise MoaCacheError(f"decode-only mode takes one token per sequence and no padding mask, got {Nq} "
                                    f"tokens{'' if mask is None else ' and a mask'}")
            return self.decoding.decode_step(layer, query, key, value, scale, pick_backend(rule, query) == "triton")
        staged = self._staged[layer]
        if staged is None or staged[0] is not key:
            start, end = self.bounds(mask, B, key.shape[2], query.device)
            cap = self.capture[layer] if self.capture is not None else None
            return attend(rule, query, key, value, start, end, scale, mask is None, cap)
        self._staged[layer] = None
        _, _, kv, first = staged
        if Nq == 1 and not first:                                          # decode
            real = None
            if mask is not None:
                start, end = self.bounds(mask, B, 1, query.device)
                real = end > start
            if layer == 0:
                kv.begin(1 if real is None else real.long(), decode=True)
            kv.write_one(layer, key, value, real)
            return kv.decode(layer, query, scale, triton=pick_backend(rule, query) == "triton")
        start, end = self.bounds(mask, B, Nq, query.device)
        if layer == 0:
            kv.begin(end - start, decode=False)
        if first:                                                          # prompt on an empty cache
            out = attend(rule, query, key, value, start, end, scale, mask is None and self.prompt_length is None,
                         length=self.prompt_length)
        else:                                                              # chunk on a filled cache
            out = self._chunk(layer, rule, kv, query, key, value, start, end, scale)
        kv.write_chunk(layer, key, value, start, end)
        return out

    def _chunk(self, layer, rule, kv: CompressedKV, query, key, value, start, end, scale):
        """A chunk's queries over the cached sink + window and the chunk itself (CompressedKV.window):
        one sequence per (sequence, KV head), its G query heads as the heads."""
        B, Hq, Nq, D = query.shape
        Hkv = key.shape[1]
        G = Hq // Hkv
        length = self.prompt_length if self.prompt_length is not None else kv.n.to(query.device)
        span = rule.spans(length.to(query.device)).view(B * Hkv, G)
        kw, vw, st, en = kv.window(layer, key, value, start, end)
        out = run_backend(rule, query.reshape(B * Hkv, G, Nq, D), kw, vw, span, st, en, scale)
        return out.view(B, Hq, Nq, D)

    @contextmanager
    def decode_only(self, kv: CompressedKV):
        """Run the enclosed forwards in decode-only mode on `kv` (see the module doc)."""
        if self.decoding is not None:
            raise MoaCacheError("decode-only mode is already on")
        self.decoding = kv
        try:
            yield self
        finally:
            self.decoding = None

    @contextmanager
    def capturing(self, rules: list[LayerRule], captures: list):
        """Run with other rules and a profiler capture per layer; restore both afterwards."""
        saved = self.rules, self.capture
        self.rules, self.capture = rules, captures
        try:
            yield self
        finally:
            self.rules, self.capture = saved


__all__ = ["Runtime"]
