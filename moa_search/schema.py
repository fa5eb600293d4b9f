"""The plan file format, defined once: its JSON Schema (draft 2020-12), and the checks it drives.

`moa plan schema` prints PLAN_SCHEMA for other tools; `first_error(d)` walks the same schema
over a plan dict and returns the first violation in words, naming the field (and, inside the
rule tables, the layer and head). What a schema cannot say (a version newer than this tool,
heads that must divide, one row per layer and one value per head) is checked after it by
`moa_search.plan`, with the same kind of message.

Fields (version 1):

    format, version        "moa-search-plan", 1
    model                  the attention shape the plan fits (architecture, model_type, num_layers,
                           num_query_heads, num_kv_heads, head_dim, config fingerprint)
    sink, min_span         every head keeps the first `sink` tokens; spans are at least min_span
    block_size             the profile's block size (tokens) behind predicted_loss: provenance only.
                           Kernels pick their own tiles (the kept set is exact at token level), so
                           nothing executes by it; old files without it read as 64
    granularity            kv_head: rules.alpha/beta hold one value per KV head; query_head: per query head
    rules                  alpha, beta: [layer][head]; span(N) = clamp(floor(alpha + beta N), min_span, N)
    budget                 what the search held: {kind: kv | compute, density, lengths, ...} or null
    profiled_lengths, predicted_loss, validation, provenance: what made the plan
"""
from __future__ import annotations

import math
from typing import Any

FORMAT = "moa-search-plan"
VERSION = 1
GRANULARITIES = ("kv_head", "query_head")
DENSITY_KINDS = ("kv", "compute")


def _integer(minimum: int) -> dict:
    return {"type": "integer", "minimum": minimum}


def _rule_table(**number) -> dict:
    # "x-index-names" names the indices in messages: rules.beta[2][1] (layer 2, head 1)
    return {"type": "array", "items": {"type": "array", "items": {"type": "number", **number}},
            "x-index-names": ["layer", "head"]}


PLAN_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "moa-search plan",
    "type": "object",
    "required": ["format", "version", "model", "sink", "granularity", "rules"],
    "properties": {
        "format": {"const": FORMAT},
        "version": _integer(1),
        "model": {
            "type": "object",
            "required": ["architecture", "model_type", "num_layers", "num_query_heads", "num_kv_heads", "head_dim"],
            "additionalProperties": False,
            "properties": {
                "architecture": {"type": "string"},
                "model_type": {"type": "string"},
                "num_layers": _integer(1),
                "num_query_heads": _integer(1),
                "num_kv_heads": _integer(1),
                "head_dim": _integer(1),
                "fingerprint": {"type": "string"},
            },
        },
        "sink": _integer(0),
        "block_size": _integer(1),
        "min_span": _integer(1),
        "granularity": {"enum": list(GRANULARITIES)},
        "rules": {
            "type": "object",
            "required": ["alpha", "beta"],
            "properties": {"alpha": _rule_table(), "beta": _rule_table(minimum=0)},
        },
        "budget": {
            "type": ["object", "null"],
            "properties": {"kind": {"enum": list(DENSITY_KINDS)},
                           "density": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
                           "lengths": {"type": "array", "items": _integer(1)}},
            "required": ["kind", "density"],
        },
        "profiled_lengths": {"type": "array", "items": _integer(1)},
        "predicted_loss": {"type": "object"},
        "validation": {"type": "object"},
        "provenance": {"type": "object"},
    },
}

_TYPE_WORDS = {"object": "an object", "array": "a list", "string": "a string", "null": "null",
               "integer": "an integer", "number": "a finite number"}


def _is(value: Any, kind: str) -> bool:
    if kind == "object":
        return isinstance(value, dict)
    if kind == "array":
        return isinstance(value, list)
    if kind == "string":
        return isinstance(value, str)
    if kind == "null":
        return value is None
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":   # a JSON number is finite: NaN and inf are not numbers of the format
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    raise ValueError(f"schema type {kind!r} is not handled")


def _name(path: str, where: str) -> str:
    """'field 'sink'', or for an entry of a rule table 'rules.beta[2][1] (layer 2, head 1)'."""
    return f"{path}{where}" if where else f"field {path!r}"


def _check(value: Any, node: dict, path: str, where: str = "") -> str | None:
    """First violation of `node` by `value` at `path`, in words; None if it conforms."""
    field = _name(path, where)
    if "const" in node and value != node["const"]:
        return f"{field} must be {node['const']!r}, got {value!r}"
    if "enum" in node and value not in node["enum"]:
        return f"{field} must be one of {tuple(node['enum'])}, got {value!r}"
    kinds = node.get("type")
    if kinds is not None:
        kinds = [kinds] if isinstance(kinds, str) else kinds
        if not any(_is(value, k) for k in kinds):
            if kinds == ["integer"] and node.get("minimum") is not None:
                lo = node["minimum"]
                return f"{field} must be {'a positive integer' if lo == 1 else f'an integer >= {lo}'}, got {value!r}"
            return f"{field} must be {' or '.join(_TYPE_WORDS[k] for k in kinds)}, got {value!r}"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        lo, hi, xlo = node.get("minimum"), node.get("maximum"), node.get("exclusiveMinimum")
        if xlo is not None and hi is not None and not xlo < value <= hi:
            return f"{field} must be in ({xlo}, {hi}], got {value!r}"
        if lo is not None and value < lo:
            if node.get("type") == "integer":
                return f"{field} must be {'a positive integer' if lo == 1 else f'an integer >= {lo}'}, got {value!r}"
            return f"{field} must be >= {lo}, got {value!r}"
        if hi is not None and value > hi:
            return f"{field} must be <= {hi}, got {value!r}"
    if isinstance(value, dict):
        for key in node.get("required", []):
            if key not in value:
                return f"missing required field {(path + '.' if path else '') + key!r}"
        props = node.get("properties", {})
        if node.get("additionalProperties") is False:
            extra = sorted(set(value) - set(props))
            if extra:
                return f"unknown field(s) in {path!r}: {extra}"
        for key, sub in props.items():
            if key in value:
                err = _check(value[key], sub, f"{path}.{key}" if path else key)
                if err:
                    return err
    if isinstance(value, list) and "items" in node:
        return _check_items(value, node, path, node.get("x-index-names", []), [])
    return None


def _check_items(value: list, node: dict, path: str, names: list[str], index: list[int]) -> str | None:
    for i, item in enumerate(value):
        at = index + [i]
        sub = node["items"]
        where = f" ({', '.join(f'{n} {k}' for n, k in zip(names, at))})" if names else ""
        if isinstance(item, list) and "items" in sub:
            err = _check_items(item, sub, f"{path}[{i}]", names, at)
        else:
            err = _check(item, sub, f"{path}[{i}]", where)
        if err:
            return err
    return None


def first_error(d: Any) -> str | None:
    """The first way `d` breaks PLAN_SCHEMA, in words (naming the field; in rule tables the
    layer and head), or None."""
    if not isinstance(d, dict):
        return f"expected a JSON object at the top level, got {type(d).__name__}"
    return _check(d, PLAN_SCHEMA, "")


__all__ = ["FORMAT", "VERSION", "GRANULARITIES", "DENSITY_KINDS", "PLAN_SCHEMA", "first_error"]
