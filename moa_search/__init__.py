"""moa-search: per-head elastic sparse attention (MoA) for Hugging Face models.

    plan = moa_search.load_plan("plan.json")
    model = moa_search.apply_plan(model, plan)   # model(...) and model.generate(...) now sparse
    out = moa_search.generate(model, **enc, max_new_tokens=256)   # compressed cache, captured decode

The pipeline steps, from Python (each is what its `moa` subcommand runs; README "From Python"):

    data, meta = moa_search.build_calibration(model, tokenizer, lengths=[1024, 2048])  # moa calibrate
    files = moa_search.profile_influence(model, data, [1024, 2048], "prof/")           # moa profile
    result = moa_search.search_plans("prof/", 0.5, "search/")                          # moa search
    table = moa_search.evaluate("ckpt/", configs, [1024, 4096], "eval/")               # moa eval

The step modules `moa_search.calibrate` and `moa_search.search` keep their names, so the
entries are named for what they do; they are imported on first use (the steps pull in
datasets, optuna and the solvers).
"""
from .version import __version__

from .plan import ModelShape, Plan, PlanError, load_plan, save_plan, uniform_plan, plan_from_moa  # noqa: E402

# name -> (module, attribute): imported on first use
_LAZY = {
    # the runtime pulls in transformers (seconds), which plan tools do not need
    "apply_plan": ("moa_search.apply", "apply_plan"),
    "remove_plan": ("moa_search.apply", "remove_plan"),
    "make_cache": ("moa_search.apply", "make_cache"),
    "cache_kwarg": ("moa_search.hf_adapter", "cache_kwarg"),
    "MoaCache": ("moa_search.hf_adapter", "MoaCache"),
    "generate": ("moa_search.generation", "generate"),
    "build_calibration": ("moa_search.calibrate", "calibrate"),
    "load_calibration": ("moa_search.calibrate", "load_calibration"),
    "save_calibration": ("moa_search.calibrate", "save_calibration"),
    "profile_influence": ("moa_search.profiler.profile", "profile_influence"),
    "search_plans": ("moa_search.search", "search_plans"),
    "evaluate": ("moa_search.eval", "evaluate"),
}

__all__ = ["__version__", "ModelShape", "Plan", "PlanError", "load_plan", "save_plan", "uniform_plan",
           "plan_from_moa", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'moa_search' has no attribute {name!r}")
