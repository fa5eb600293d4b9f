"""Calibration and evaluation data: synthetic long-range task builders, user-data sources,
and the small shipped default sets.

    tasks.py      TASKS, make_item, build_items, is_correct, approx_count_tokens
    sources.py    `moa calibrate --source ...`: 'default', 'synthetic:...', or user files
    defaults.py   the default calibration / eval recipes and their shipped JSONL files
"""
from moa_search.calibration_data.tasks import TASKS, approx_count_tokens, build_items, is_correct, make_item

__all__ = ["TASKS", "approx_count_tokens", "build_items", "is_correct", "make_item"]
