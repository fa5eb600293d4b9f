"""Load a plan into a Hugging Face model: `apply_plan(model, plan)`.

No model class is patched: each attention module gets a `moa_rule` attribute and the
model's attention implementation is switched to the registered "moa" function.
"""
from __future__ import annotations

import inspect
import warnings

import torch

from .attention import BACKENDS
from .attention import ATTN_NAME, LayerRule, register
from .plan import ModelShape, Plan, check_plan_fits, load_plan


def attention_modules(model) -> list:
    """The model's self-attention modules ordered by layer_idx (one per decoder layer)."""
    found = {}
    for mod in model.modules():
        idx = getattr(mod, "layer_idx", None)
        if idx is not None and hasattr(mod, "num_key_value_groups") and type(mod).__name__.endswith("Attention"):
            found.setdefault(int(idx), mod)
    return [found[i] for i in sorted(found)]


def apply_plan(model, plan: Plan | str, backend: str = "auto"):
    """Attach `plan`'s rules to `model` and route attention through moa-search. Returns the model.

    plan: a Plan or a path to a plan file. backend: "auto" (the Triton kernels on CUDA, the
    windowed PyTorch path on the CPU), "cpu_window", or "reference" (the exact masked oracle).
    Raises PlanError if the plan's shape differs from the model's, naming the fields.
    """
    if not isinstance(plan, Plan):
        plan = load_plan(plan)
    shape = ModelShape.from_config(model.config)
    check_plan_fits(plan, shape)
    if plan.model.fingerprint and shape.fingerprint and plan.model.fingerprint != shape.fingerprint:
        warnings.warn(f"plan was profiled on a model with config fingerprint {plan.model.fingerprint}, this model has "
                      f"{shape.fingerprint}: same attention shape, other config (fine-tune or variant?)", stacklevel=2)
    if backend not in ("auto", *BACKENDS):
        raise ValueError(f"backend must be 'auto' or one of {sorted(BACKENDS)}, got {backend!r}")
    mods = attention_modules(model)
    if len(mods) != shape.num_layers:
        raise RuntimeError(f"found {len(mods)} attention modules with layer_idx, expected {shape.num_layers}")
    register()
    alpha, beta = plan.query_rules()
    for layer, mod in enumerate(mods):
        # on the layer's own device, so that attention does not copy the rules there at every step;
        # a layer accelerate offloaded (weights on "meta" until it runs) keeps them on the CPU and
        # they follow the queries at each call
        dev = next(mod.parameters()).device
        if dev.type == "meta":
            dev = torch.device("cpu")
        mod.moa_rule = LayerRule(sink=plan.sink, alpha=torch.as_tensor(alpha[layer], device=dev),
                                 beta=torch.as_tensor(beta[layer], device=dev), min_span=plan.min_span, backend=backend)
    if getattr(model, "moa_plan", None) is None:
        model._moa_previous_attn = model.config._attn_implementation
    model.moa_plan = plan
    model.set_attn_implementation(ATTN_NAME)
    return model


def remove_plan(model):
    """Undo apply_plan: back to the attention implementation the model had before."""
    for mod in attention_modules(model):
        if hasattr(mod, "moa_rule"):
            del mod.moa_rule
    prev = getattr(model, "_moa_previous_attn", None) or "sdpa"
    model.moa_plan = None
    model.set_attn_implementation(prev)
    return model


def input_device(model) -> torch.device:
    """Where a model's input ids go: its embedding's device (the first shard under a device_map)."""
    return model.get_input_embeddings().weight.device


def cache_kwarg(model) -> str:
    """The keyword that passes a cache to this transformers version's forward and generate:
    "cache" (transformers >= 5.2x, which deprecates the old name) or "past_key_values"."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def generate(model, max_new_tokens: int | None = None, max_length: int | None = None, **kwargs):
    """model.generate(**kwargs) with the plan's compressed KV cache (see make_cache):

        out = moa_search.generate(model, **enc, max_new_tokens=256)
    """
    cache = make_cache(model, max_new_tokens=max_new_tokens, max_length=max_length)
    kwargs.update({k: v for k, v in (("max_new_tokens", max_new_tokens), ("max_length", max_length)) if v is not None})
    return model.generate(**kwargs, **{cache_kwarg(model): cache})


def make_cache(model, max_new_tokens: int | None = None, max_length: int | None = None):
    """The compressed per-head KV cache of the plan applied to `model`, for generate():

        cache = make_cache(model, max_new_tokens=256)
        model.generate(**enc, max_new_tokens=256, **{cache_kwarg(model): cache})

    (moa_search.generate does both.)
    Without it, generate() uses transformers' dense DynamicCache: outputs are the same (the
    attention function applies the plan's rules on it) but the memory is not saved.
    transformers has no public hook to make generate() build a custom cache by itself, so
    the cache is passed explicitly. Sized at the first forward for prompt + max_new_tokens
    (or max_length in total); see moa_search.cache.
    """
    from .cache import MoaCache

    return MoaCache(model, max_new_tokens=max_new_tokens, max_length=max_length)
