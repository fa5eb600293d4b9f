"""moa-search: per-head elastic sparse attention (MoA) for Hugging Face models.

    plan = moa_search.load_plan("plan.json")
    model = moa_search.apply_plan(model, plan)   # model(...) and model.generate(...) now sparse
"""
from .version import __version__

from .plan import ModelShape, Plan, PlanError, load_plan, save_plan, uniform_plan, plan_from_moa  # noqa: E402
from .apply import apply_plan, cache_kwarg, generate, make_cache, remove_plan  # noqa: E402

__all__ = ["__version__", "ModelShape", "Plan", "PlanError", "load_plan", "save_plan", "uniform_plan",
           "plan_from_moa", "apply_plan", "remove_plan", "make_cache", "generate", "cache_kwarg", "MoaCache"]


def __getattr__(name):
    if name == "MoaCache":  # imported lazily: it pulls in transformers
        from .cache import MoaCache

        return MoaCache
    raise AttributeError(f"module 'moa_search' has no attribute {name!r}")
