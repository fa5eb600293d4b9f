"""moa-search: per-head elastic sparse attention (MoA) for Hugging Face models.

    plan = moa_search.load_plan("plan.json")
    model = moa_search.apply_plan(model, plan)   # model(...) and model.generate(...) now sparse
    out = moa_search.generate(model, **enc, max_new_tokens=256)   # compressed cache, captured decode
"""
__version__ = "0.1.0"

from .plan import ModelShape, Plan, PlanError, load_plan, save_plan, uniform_plan, plan_from_moa  # noqa: E402

__all__ = ["__version__", "ModelShape", "Plan", "PlanError", "load_plan", "save_plan", "uniform_plan",
           "plan_from_moa", "apply_plan", "remove_plan", "make_cache", "generate", "cache_kwarg", "MoaCache"]

# imported on first use: they pull in transformers (seconds), which plan tools do not need
_LAZY = {"apply_plan": "apply", "remove_plan": "apply", "make_cache": "apply", "cache_kwarg": "hf_adapter",
         "MoaCache": "hf_adapter", "generate": "generation"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'moa_search' has no attribute {name!r}")
