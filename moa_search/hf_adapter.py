"""The transformers seam: the only module that knows transformers' AttentionInterface,
AttentionMaskInterface and Cache API. Another model library gets its own adapter calling the
same Runtime (moa_search.runtime).

transformers 5.x attention modules call `cache.update(key, value, layer_idx)` and then
`ALL_ATTENTION_FUNCTIONS[config._attn_implementation](module, query, key, value, mask, ...)`.
Here: the function registered as "moa" hands the call to the model's Runtime (attached once to
each attention module by `attach`); `MoaCache.update` stages the new keys in the Runtime, so
the attention call knows they belong to the compressed cache. The mask hook registered under
the same name passes the 2D padding mask through (as the flash-attention path does).
"""
from __future__ import annotations

import inspect
import weakref
from contextlib import contextmanager

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .attention import LayerRule
from .cache import CompressedKV, MoaCacheError
from .runtime import Runtime

ATTN_NAME = "moa"
_ATTR = "moa_runtime"  # the one attribute set on attention modules (and the model), by attach()


# ----------------------------------------------------------------------------- model structure


def attention_modules(model) -> list:
    """The model's self-attention modules ordered by layer_idx (one per decoder layer)."""
    found = {}
    for mod in model.modules():
        idx = getattr(mod, "layer_idx", None)
        if idx is not None and hasattr(mod, "num_key_value_groups") and type(mod).__name__.endswith("Attention"):
            found.setdefault(int(idx), mod)
    return [found[i] for i in sorted(found)]


def layer_devices(model) -> list[torch.device]:
    """Each attention module's device; a layer accelerate offloaded (weights on "meta" until it
    runs) counts as the CPU."""
    out = []
    for mod in attention_modules(model):
        dev = next(mod.parameters()).device
        out.append(torch.device("cpu") if dev.type == "meta" else dev)
    return out


def text_config(model):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def cache_kwarg(model) -> str:
    """The keyword that passes a cache to this transformers version's forward and generate:
    "cache" (transformers >= 5.2x, which deprecates the old name) or "past_key_values"."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def runtime_of(model) -> Runtime | None:
    return getattr(model, _ATTR, None)


def attach(model, runtime: Runtime | None) -> None:
    """Attach `runtime` to the model and its attention modules (None: detach) and route attention
    through "moa" (or back to the implementation the model had before)."""
    mods = attention_modules(model)
    if runtime is None:
        for m in (model, *mods):
            if hasattr(m, _ATTR):
                delattr(m, _ATTR)
        model.set_attn_implementation(getattr(model, "_moa_previous_attn", None) or "sdpa")
        return
    register()
    if runtime_of(model) is None:
        model._moa_previous_attn = model.config._attn_implementation
    for m in (model, *mods):
        setattr(m, _ATTR, runtime)
    model.set_attn_implementation(ATTN_NAME)


# ----------------------------------------------------------------------------- attention


def moa_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query [B, Hq, Nq, D], key/value [B, Hkv, Nk, D] -> ([B, Nq, Hq, D], None)."""
    runtime: Runtime | None = getattr(module, _ATTR, None)
    if runtime is None:
        raise RuntimeError(
            f"{type(module).__name__} (layer {getattr(module, 'layer_idx', '?')}) runs the 'moa' attention "
            "but has no plan attached; use moa_search.apply_plan(model, plan)")
    if dropout and module.training:
        raise NotImplementedError("moa attention has no dropout; call model.eval()")
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    out = runtime.attention(module.layer_idx, query, key, value, attention_mask, scale)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register the attention function and its mask hook with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(ATTN_NAME, moa_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, flash_attention_mask)


@contextmanager
def profiling(model, rules: list[LayerRule], captures: list):
    """Run every attention layer of `model` under `rules` with a profiler capture each (the
    influence profiler's seam); the model's plan, if any, and attention are restored afterwards."""
    own = runtime_of(model)
    previous_impl = model.config._attn_implementation
    runtime = own or Runtime(rules)
    if own is None:
        attach(model, runtime)
    else:
        model.set_attn_implementation(ATTN_NAME)
    try:
        with runtime.capturing(rules, captures):
            yield model
    finally:
        if own is None:
            attach(model, None)
        model.set_attn_implementation(previous_impl)


# ----------------------------------------------------------------------------- the Cache


class MoaLayer(CacheLayerMixin):
    """transformers' view of one layer of a MoaCache: sizes and the hand-over of new keys."""

    is_compileable = False   # generate's torch.compile would specialise on the host counters; see generation.py
    is_sliding = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, owner: "MoaCache", layer_idx: int):
        super().__init__()
        self.owner = weakref.ref(owner)
        self.layer_idx = layer_idx
        self.seen = 0            # tokens passed through (padding included): transformers' cache length

    def lazy_initialization(self, key_states, value_states) -> None:
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        """Stage [B, Hkv, Nq, D] keys/values for the attention call, which writes the kept ones."""
        owner = self.owner()
        nq = key_states.shape[2]
        if owner.final_length is None:
            owner.final_length = self.seen + nq + owner.max_new_tokens
        if self.seen + nq > owner.final_length:
            raise MoaCacheError(
                f"MoaCache was sized for {owner.final_length} tokens (prompt + max_new_tokens at the first forward) but "
                f"this forward brings the sequence to {self.seen + nq}; the heads' windows may not fit. Make a cache with "
                f"a larger max_length (moa_search.MoaCache(model, max_length=...)) or a larger max_new_tokens")
        if self.layer_idx == 0 and runtime_of(owner.model()) is not owner.runtime:
            raise MoaCacheError("the model's plan was applied again (or removed) after this MoaCache was made; "
                                "make a new cache (moa_search.make_cache) for the plan now applied")
        kv = owner.storage(key_states)
        owner.runtime.stage(self.layer_idx, key_states, value_states, kv, first=self.seen == 0)
        self.seen += nq
        self.is_initialized = True
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        final = self.owner().final_length
        return -1 if final is None else final

    def reset(self) -> None:
        self.seen = 0

    def crop(self, tokens_to_remove: int) -> None:
        raise MoaCacheError("MoaCache cannot be cropped (evicted tokens are gone): assisted/speculative decoding "
                            "is not supported with the compressed cache")

    def reorder_cache(self, beam_idx) -> None:  # the whole cache reorders once (MoaCache)
        pass


class MoaCache(Cache):
    """The plan's compressed KV cache for generate() (moa_search.cache.CompressedKV behind
    transformers' Cache API):

        cache = MoaCache(model, max_new_tokens=256)          # or moa_search.make_cache(...)
        model.generate(**enc, max_new_tokens=256, **{cache_kwarg(model): cache})

    max_new_tokens: the final length is the first forward's length + max_new_tokens.
    max_length: or the final total length directly (e.g. for several turns).
    The buffers are allocated once, at the first forward (its batch, dtype and device).
    Beam search works (the buffers are reordered along the batch); `crop` is refused.
    """

    def __init__(self, model, max_new_tokens: int | None = None, max_length: int | None = None):
        if (max_new_tokens is None) == (max_length is None):
            raise ValueError("MoaCache needs exactly one of max_new_tokens (the final length is then the prompt length "
                             "+ max_new_tokens) or max_length (the total length it must hold)")
        runtime = runtime_of(model)
        mods = attention_modules(model)
        if runtime is None or not mods:
            raise ValueError("MoaCache needs a model with a plan applied: call moa_search.apply_plan(model, plan) first")
        cfg = text_config(model)
        self.num_kv_heads = int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        super().__init__(layers=[MoaLayer(self, i) for i in range(len(mods))])
        self.runtime = runtime
        self.model = weakref.ref(model)
        runtime.clear_staged()   # keys a cache staged on a model whose attention was switched away
        self.devices = layer_devices(model)
        self.max_new_tokens = max_new_tokens
        self.final_length = max_length
        self.kv: CompressedKV | None = None

    def storage(self, key_states) -> CompressedKV:
        """The buffers, allocated at the first forward for its batch."""
        B = key_states.shape[0]
        if self.kv is None:
            if key_states.shape[1] != self.num_kv_heads:
                raise MoaCacheError(f"got {key_states.shape[1]} KV heads, the model config says {self.num_kv_heads}")
            self.kv = CompressedKV(self.runtime.rules, self.num_kv_heads, B, self.final_length, key_states.shape[-1],
                                   key_states.dtype, self.devices)
        elif B != self.kv.batch:
            raise MoaCacheError(f"batch {B} differs from the cache's {self.kv.batch}; use a fresh cache "
                                "(or cache.reset())")
        return self.kv

    def reset(self):
        super().reset()
        self.runtime.clear_staged()
        if self.max_new_tokens is not None:   # sized again at the next first forward
            self.final_length = None
            self.kv = None
        elif self.kv is not None:
            self.kv.reset()

    def reorder_cache(self, beam_idx):
        if self.kv is not None:
            self.kv.select(beam_idx)

    def batch_select_indices(self, indices):
        self.reorder_cache(indices)

    def batch_repeat_interleave(self, repeats: int):
        if self.kv is not None:
            self.kv.select(torch.arange(self.kv.batch, device=self.kv.device).repeat_interleave(repeats))

    def kept_positions(self, layer: int):
        """(pos, valid) [B, T]: the position each slot of a layer holds (inspection and tests)."""
        return self.kv.kept_positions(layer)

    def fill_for_benchmark(self, batch: int, length: int, dtype, device) -> None:
        """As if a prefill of `length` real tokens had run: random keys/values in every kept slot."""
        if self.final_length is None:
            self.final_length = length + self.max_new_tokens
        fake = torch.empty(batch, self.num_kv_heads, 0, self.head_dim, dtype=dtype, device=device)
        kv = self.storage(fake)
        for k, v in zip(kv.keys, kv.values):
            k.normal_()
            v.normal_()
        kv.n.fill_(length)
        for layer in self.layers:
            layer.seen = length
            layer.is_initialized = True

    def nbytes(self) -> int:
        """Bytes held by the keys and values of every layer."""
        return 0 if self.kv is None else self.kv.nbytes()

    def dense_nbytes(self) -> int:
        """Bytes a dense cache would hold at the final length (same batch and dtype)."""
        return 0 if self.kv is None else self.kv.dense_nbytes()


__all__ = ["ATTN_NAME", "attention_modules", "attach", "runtime_of", "register", "moa_attention_forward",
           "profiling", "MoaCache", "MoaLayer", "cache_kwarg"]
