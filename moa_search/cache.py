"""The compressed per-head KV cache of a plan: a transformers `Cache` for `generate()`.

    model = moa_search.apply_plan(model, plan)
    cache = moa_search.MoaCache(model, max_new_tokens=256)      # or moa_search.make_cache(...)
    out = model.generate(**enc, max_new_tokens=256, **{cache_kwarg(model): cache})   # or moa_search.generate

Each layer keeps, per sequence and per KV head, the first `sink` real tokens and a ring
buffer of that head's window, packed into one [B, T, D] buffer per layer for keys (and
one for values) with T = sum over KV heads of (sink + capacity): memory is the plan's KV
density times the dense cache, not heads x the largest window (layout:
moa_search.kernels.decode).

Capacity. A head's window at total length N is span(N) (moa_search.rules); its ring holds
span(N_final) tokens (for a GQA group of query-head rules, the group's max), with N_final =
prompt + max_new_tokens (or max_length), resolved at the first forward (the prefill).
span grows with N, so every length reached fits; going past N_final is refused.

What runs where. `update` only stages the new keys; the "moa" attention function
(moa_search.attention) sees that this cache staged them and calls `attend`, which knows
the padding (sink = first real tokens of each sequence, left padding):
  - prefill (empty cache): the plan's sparse attention over the prompt, then only the kept
    tokens are written;
  - decode (one token): append (wrap the ring), then the split-K Triton kernel (CUDA) or
    the PyTorch reference reads the packed cache;
  - a chunk on a filled cache (multi-turn): attends over the cache plus the chunk with the
    exact rule (PyTorch reference), then appends. Same result as the dense cache as long as
    the total stays within N_final.
Beam search works (the buffers are reordered along the batch). `crop` (assisted decoding)
is refused.
"""
from __future__ import annotations

import weakref

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from . import rules as R
from .attention import LayerRule, attend


class MoaCacheError(RuntimeError):
    """The compressed cache cannot serve this request (capacity, usage)."""


class MoaLayer(CacheLayerMixin):
    """One layer: sink + per-head ring buffers packed in keys/values [B, T, D]."""

    is_compileable = False
    is_sliding = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, owner: "MoaCache", layer_idx: int, rule: LayerRule, num_kv_heads: int):
        super().__init__()
        self.owner = weakref.ref(owner)
        self.layer_idx = layer_idx
        self.rule = rule
        self.num_kv_heads = num_kv_heads
        self.seen = 0            # tokens passed through (padding included): what transformers calls the cache length
        self.n = None            # int64 [B]: real tokens written per sequence
        self.pending = None      # (key, value) staged by update for the attention function

    # -- allocation ----------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        final = self.owner().final_length
        B, Hkv, _, D = key_states.shape
        if Hkv != self.num_kv_heads:
            raise MoaCacheError(f"layer {self.layer_idx}: got {Hkv} KV heads, the model config says {self.num_kv_heads}")
        dev = key_states.device
        Hq = self.rule.alpha.numel()
        span = self.rule.spans(torch.tensor([final], device=dev))[0]           # [Hq] at the final length
        self.s0 = min(self.rule.sink, final)
        cap = span.view(Hkv, Hq // Hkv).amax(-1).clamp(max=final - self.s0).clamp_min(0)
        self.cap = cap.to(torch.int64)
        slots = self.s0 + self.cap
        self.off = (torch.cumsum(slots, 0) - slots).to(torch.int64)
        self.cap32, self.off32 = self.cap.to(torch.int32), self.off.to(torch.int32)
        self.max_slots = self.s0 + int(self.cap.max())
        total = int(slots.sum())
        self.keys = torch.zeros(B, total, D, dtype=key_states.dtype, device=dev)
        self.values = torch.zeros(B, total, D, dtype=value_states.dtype, device=dev)
        self.n = torch.zeros(B, dtype=torch.int64, device=dev)
        # apply_plan puts the rules on the layer's device; .to() only matters if the model moved since
        self.alpha, self.beta = self.rule.alpha.to(dev)[None, :], self.rule.beta.to(dev)[None, :]
        self.device = dev
        self.is_initialized = True

    # -- transformers API ------------------------------------------------------------
    def update(self, key_states, value_states, *args, **kwargs):
        """Stage [B, Hkv, Nq, D] keys/values; `attend` (called by the attention function) writes them."""
        owner = self.owner()
        if self.pending is not None:
            raise MoaCacheError(
                f"layer {self.layer_idx}: the previous keys were never consumed by the 'moa' attention function; "
                "MoaCache only works on a model whose plan is applied (moa_search.apply_plan) and whose attention "
                "implementation is still 'moa'")
        nq = key_states.shape[2]
        if owner.final_length is None:
            owner._resolve(self.seen + nq)
        if self.seen + nq > owner.final_length:
            raise MoaCacheError(
                f"MoaCache was sized for {owner.final_length} tokens (prompt + max_new_tokens at the first forward) but "
                f"this forward brings the sequence to {self.seen + nq}; the heads' windows may not fit. Make a cache with "
                f"a larger max_length (moa_search.MoaCache(model, max_length=...)) or a larger max_new_tokens")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        elif key_states.shape[0] != self.keys.shape[0]:
            raise MoaCacheError(f"layer {self.layer_idx}: batch {key_states.shape[0]} differs from the cache's "
                                f"{self.keys.shape[0]}; use a fresh cache (or cache.reset())")
        owner._bind(self.layer_idx)
        self.pending = (key_states, value_states)
        self.seen += nq
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        final = self.owner().final_length
        return -1 if final is None else final

    def reset(self) -> None:
        if self.is_initialized:
            self.keys.zero_()
            self.values.zero_()
            self.n.zero_()
        self.seen = 0
        self.pending = None

    def crop(self, tokens_to_remove: int) -> None:
        raise MoaCacheError("MoaCache cannot be cropped (evicted tokens are gone): assisted/speculative decoding "
                            "is not supported with the compressed cache")

    def _select_batch(self, index: torch.Tensor) -> None:
        if self.is_initialized:
            index = index.to(self.keys.device)
            self.keys = self.keys.index_select(0, index)
            self.values = self.values.index_select(0, index)
            self.n = self.n.index_select(0, index)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_batch(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_batch(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._select_batch(torch.arange(self.keys.shape[0], device=self.keys.device).repeat_interleave(repeats))

    # -- writes ------------------------------------------------------------------------
    def _ring_slot(self, p: torch.Tensor) -> torch.Tensor:
        """Positions p [B, Hkv, ...] -> rows of the packed buffer (sink slot or ring slot)."""
        cap = self.cap.view(1, -1, *([1] * (p.dim() - 2)))
        off = self.off.view_as(cap)
        return off + torch.where(p < self.s0, p, self.s0 + (p - self.s0) % cap.clamp_min(1))

    def _write_one(self, k, v, real):
        """Decode append without a host sync. k, v: [B, Hkv, 1, D]; real: bool [B]."""
        B, Hkv = k.shape[:2]
        rows = self._ring_slot(self.n[:, None].expand(B, Hkv))                # [B, Hkv]
        bidx = torch.arange(B, device=k.device)[:, None].expand(B, Hkv)
        keep = real.view(B, 1, 1)
        # a padding token (never made by generate) writes the old value back instead of evicting
        self.keys[bidx, rows] = torch.where(keep, k[:, :, 0], self.keys[bidx, rows])
        self.values[bidx, rows] = torch.where(keep, v[:, :, 0], self.values[bidx, rows])
        self.n += real.long()

    def _write_chunk(self, k, v, start, end):
        """Append the real tokens [start, end) of a chunk k, v [B, Hkv, Nq, D]; keep only what a head keeps."""
        B, Hkv, Nq, _ = k.shape
        j = torch.arange(Nq, device=k.device)
        real = (j[None] >= start[:, None]) & (j[None] < end[:, None])         # [B, Nq]
        p = self.n[:, None] + j[None] - start[:, None]                         # positions of the chunk's tokens
        n_new = self.n + (end - start)
        p3 = p[:, None, :].expand(B, Hkv, Nq)
        store = real[:, None, :] & ((p3 < self.s0) | (p3 >= n_new[:, None, None] - self.cap.view(1, -1, 1)))
        rows = self._ring_slot(p3)
        bidx = torch.arange(B, device=k.device).view(B, 1, 1).expand(B, Hkv, Nq)
        self.keys[bidx[store], rows[store]] = k[store]
        self.values[bidx[store], rows[store]] = v[store]
        self.n = n_new

    # -- attention -----------------------------------------------------------------------
    def attend(self, query, start, end, scale, unpadded: bool = False):
        """Consume the staged keys: attention output [B, Hq, Nq, D] for query [B, Hq, Nq, D].

        start/end: int64 [B] real-token bounds inside this chunk (from the padding mask);
        unpadded: no padding mask at all (a dense layer's prefill may then run SDPA).
        """
        k, v = self.pending
        self.pending = None
        rule = self.rule
        B, Hq, Nq, D = query.shape
        if self.seen == Nq:                                                    # prefill on an empty cache
            out = attend(rule, query, k, v, start, end, scale, unpadded)
            self._write_chunk(k, v, start, end)
            return out
        if Nq == 1:                                                            # decode
            self._write_one(k, v, end > start)
            span = R.span(self.alpha, self.beta, self.n[:, None], rule.min_span)          # [B, Hq] at length n
            if rule.backend != "reference" and query.is_cuda:
                from moa_search.kernels.decode import packed_decode_attention

                out = packed_decode_attention(query[:, :, 0], self.keys, self.values, self.off32, self.cap32,
                                              self.s0, rule.sink, span, self.n, scale, max_slots=self.max_slots)
            else:
                from moa_search.kernels.decode import packed_decode_reference

                out = packed_decode_reference(query[:, :, 0], self.keys, self.values, self.s0, self.cap, rule.sink,
                                              span, self.n, scale)
            return out[:, :, None]
        # a chunk on a filled cache (multi-turn): exact rule over cache + chunk, then append
        from moa_search.kernels.decode import packed_attention_reference

        j = torch.arange(Nq, device=query.device)
        real = (j[None] >= start[:, None]) & (j[None] < end[:, None])
        new_pos = torch.where(real, self.n[:, None] + j[None] - start[:, None], -1)
        span = rule.spans(self.n + (end - start))
        out = packed_attention_reference(query, self.keys, self.values, self.s0, self.cap, rule.sink, span, self.n,
                                         new_pos, new_k=k, new_v=v, new_pos=new_pos, scale=scale)
        self._write_chunk(k, v, start, end)
        return out

    def kept_positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(pos, valid) [B, T]: the position each slot holds (for inspection and tests)."""
        from moa_search.kernels.decode import slot_positions

        return slot_positions(self.n, self.s0, self.cap)


class MoaCache(Cache):
    """Compressed KV cache of the plan applied to `model` (see the module doc).

    max_new_tokens: the final length is the first forward's length + max_new_tokens.
    max_length: or give the final total length directly (e.g. for several turns).
    """

    def __init__(self, model, max_new_tokens: int | None = None, max_length: int | None = None):
        from .apply import attention_modules

        if (max_new_tokens is None) == (max_length is None):
            raise ValueError("MoaCache needs exactly one of max_new_tokens (the final length is then the prompt length "
                             "+ max_new_tokens) or max_length (the total length it must hold)")
        mods = attention_modules(model)
        missing = [i for i, m in enumerate(mods) if getattr(m, "moa_rule", None) is None]
        if not mods or missing:
            raise ValueError("MoaCache needs a model with a plan applied: call moa_search.apply_plan(model, plan) first")
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        hkv = int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
        super().__init__(layers=[MoaLayer(self, i, m.moa_rule, hkv) for i, m in enumerate(mods)])
        self._modules = mods
        self._ref = weakref.ref(self)
        self.max_new_tokens = max_new_tokens
        self.final_length = max_length

    def _resolve(self, first_length: int) -> None:
        self.final_length = first_length + self.max_new_tokens

    def _bind(self, layer_idx: int) -> None:
        # the attention function finds the cache that staged this layer's keys through the module
        self._modules[layer_idx].moa_cache = self._ref

    def owns(self, layer_idx: int, key: torch.Tensor) -> bool:
        """True iff `key` is what this cache's `update` just staged for the layer."""
        pending = self.layers[layer_idx].pending
        return pending is not None and pending[0] is key

    def attend(self, layer_idx, query, start, end, scale, unpadded: bool = False):
        return self.layers[layer_idx].attend(query, start, end, scale, unpadded)

    def reset(self):
        super().reset()
        if self.max_new_tokens is not None:
            self.final_length = None
            for layer in self.layers:  # capacity is resolved again at the next first forward
                layer.is_initialized = False
                layer.keys = layer.values = layer.n = None

    def fill_for_benchmark(self, batch: int, length: int, dtype, device) -> None:
        """As if a prefill of `length` real tokens had run: random keys/values in every kept slot."""
        if self.final_length is None:
            self._resolve(length)
        for layer in self.layers:
            d = self._modules[layer.layer_idx].head_dim
            fake = torch.empty(batch, layer.num_kv_heads, 0, d, dtype=dtype, device=device)
            layer.lazy_initialization(fake, fake)
            layer.keys.normal_()
            layer.values.normal_()
            layer.n.fill_(length)
            layer.seen = length

    def nbytes(self) -> int:
        """Bytes held by the keys and values of every layer."""
        return sum(l.keys.numel() * l.keys.element_size() * 2 for l in self.layers if l.is_initialized)

    def dense_nbytes(self) -> int:
        """Bytes a dense cache would hold at the final length (for the same batch and dtype)."""
        out = 0
        for l in self.layers:
            if l.is_initialized:
                B, _, D = l.keys.shape
                out += 2 * B * l.num_kv_heads * self.final_length * D * l.keys.element_size()
        return out


__all__ = ["MoaCache", "MoaLayer", "MoaCacheError"]
