"""JSON Schema (draft 2020-12) of the plan file, for other tools. `moa plan schema` prints it.

Structure only; `moa_search.plan` validates the cross-field rules (rows per layer, values
per head) with messages that name the layer and head.
"""
_number_table = {"type": "array", "items": {"type": "array", "items": {"type": "number"}}}

PLAN_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "moa-search plan",
    "type": "object",
    "required": ["format", "version", "model", "sink", "granularity", "rules"],
    "properties": {
        "format": {"const": "moa-search-plan"},
        "version": {"type": "integer", "minimum": 1},
        "model": {
            "type": "object",
            "required": ["architecture", "model_type", "num_layers", "num_query_heads", "num_kv_heads", "head_dim"],
            "additionalProperties": False,
            "properties": {
                "architecture": {"type": "string"},
                "model_type": {"type": "string"},
                "num_layers": {"type": "integer", "minimum": 1},
                "num_query_heads": {"type": "integer", "minimum": 1},
                "num_kv_heads": {"type": "integer", "minimum": 1},
                "head_dim": {"type": "integer", "minimum": 1},
                "fingerprint": {"type": "string"},
            },
        },
        "sink": {"type": "integer", "minimum": 0},
        "block_size": {"type": "integer", "minimum": 1},
        "min_span": {"type": "integer", "minimum": 1},
        "granularity": {"enum": ["kv_head", "query_head"]},
        "rules": {
            "type": "object",
            "required": ["alpha", "beta"],
            "properties": {"alpha": _number_table,
                           "beta": {"type": "array", "items": {"type": "array", "items": {"type": "number", "minimum": 0}}}},
        },
        "budget": {
            "type": ["object", "null"],
            "properties": {"kind": {"enum": ["kv", "compute"]},
                           "density": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
                           "lengths": {"type": "array", "items": {"type": "integer", "minimum": 1}}},
        },
        "profiled_lengths": {"type": "array", "items": {"type": "integer", "minimum": 1}},
        "predicted_loss": {"type": "object"},
        "validation": {"type": "object"},
        "provenance": {"type": "object"},
    },
}
