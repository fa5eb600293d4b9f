"""moa-search: per-head elastic sparse attention (MoA) for Hugging Face models.

    plan = moa_search.load_plan("plan.json")
    model = moa_search.apply_plan(model, plan)   # model(...) and model.generate(...) now sparse
"""
__version__ = "0.1.0"

from .plan import ModelShape, Plan, PlanError, load_plan, save_plan, uniform_plan, plan_from_moa  # noqa: E402

# torch and transformers load on first use: `moa` checks a command's arguments before paying for them
_LAZY = {"apply_plan": "apply", "cache_kwarg": "apply", "generate": "apply", "make_cache": "apply",
         "remove_plan": "apply", "MoaCache": "cache"}

__all__ = ["__version__", "ModelShape", "Plan", "PlanError", "load_plan", "save_plan", "uniform_plan",
           "plan_from_moa", "apply_plan", "remove_plan", "make_cache", "generate", "cache_kwarg", "MoaCache"]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'moa_search' has no attribute {name!r}")
