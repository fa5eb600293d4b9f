"""Load a plan into a Hugging Face model: `apply_plan(model, plan)`.

No model class is patched: the plan becomes one Runtime (moa_search.runtime), attached once
to the model by the transformers adapter (moa_search.hf_adapter), whose registered "moa"
attention function hands every layer call to it.
"""
from __future__ import annotations

import warnings

import torch

from .attention import BACKENDS, LayerRule
from .fused import unfuse
# attention_modules and cache_kwarg are re-exported: callers find them here
from .hf_adapter import MoaCache, attach, attention_modules, cache_kwarg, layer_devices  # noqa: F401
from .plan import ModelShape, Plan, check_plan_fits, load_plan
from .runtime import Runtime


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
    devices = layer_devices(model)
    if len(devices) != shape.num_layers:
        raise RuntimeError(f"found {len(devices)} attention modules with layer_idx, expected {shape.num_layers}")
    alpha, beta = plan.query_rules()
    # each layer's rules on its own device, so that attention never copies them at a step
    rules = [LayerRule(sink=plan.sink, alpha=torch.as_tensor(alpha[i], device=dev),
                       beta=torch.as_tensor(beta[i], device=dev), min_span=plan.min_span, backend=backend)
             for i, dev in enumerate(devices)]
    attach(model, Runtime(rules, plan))
    model.moa_plan = plan
    return model


def remove_plan(model):
    """Undo apply_plan: back to the attention implementation the model had before, and every
    projection weight in its own storage again (moa_search.fused)."""
    unfuse(model)
    attach(model, None)
    model.moa_plan = None
    return model


def input_device(model) -> torch.device:
    """Where a model's input ids go: its embedding's device (the first shard under a device_map)."""
    return model.get_input_embeddings().weight.device


def make_cache(model, max_new_tokens: int | None = None, max_length: int | None = None) -> MoaCache:
    """The compressed per-head KV cache of the plan applied to `model`, for generate():

        cache = make_cache(model, max_new_tokens=256)
        model.generate(**enc, max_new_tokens=256, **{cache_kwarg(model): cache})

    (moa_search.generate does both, and decodes through a CUDA graph where it can.)
    Without it, generate() uses transformers' dense DynamicCache: outputs are the same (the
    attention function applies the plan's rules on it) but the memory is not saved.
    Sized at the first forward for prompt + max_new_tokens (or max_length in total).
    """
    return MoaCache(model, max_new_tokens=max_new_tokens, max_length=max_length)
