"""The plan file: which elastic rule every head of a model follows.

JSON, versioned, validated once on load. The format (its fields and their JSON Schema) is
defined in moa_search/schema.py; this module holds the Plan object, its I/O and builders.

`rules` holds one (alpha, beta) per head of the plan's granularity: per KV head (the
query heads of a GQA group share it) or per query head (a group's cache is then the max
span of its query heads).
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
from dataclasses import InitVar, asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import rules as R
from .errors import MoaError
from .schema import FORMAT, GRANULARITIES, VERSION, first_error
from .files import atomic_write_text
from .version import __version__

MOA_SINK = 64  # the official MoA tool keeps 64 sink tokens inside its span


class PlanError(MoaError):
    """A plan file or plan object is malformed or does not fit the model."""


# ----------------------------------------------------------------------------- model


@dataclass(frozen=True)
class ModelShape:
    """What a plan must agree with: the attention shape of a model."""

    architecture: str
    model_type: str
    num_layers: int
    num_query_heads: int
    num_kv_heads: int
    head_dim: int
    fingerprint: str = ""

    @property
    def group(self) -> int:
        """Query heads per KV head."""
        return self.num_query_heads // self.num_kv_heads

    @classmethod
    def from_config(cls, config) -> "ModelShape":
        """From a transformers config object or a config.json dict."""
        d = config if isinstance(config, dict) else config.to_dict()
        d = dict(d.get("text_config") or {}, **{k: v for k, v in d.items() if k != "text_config"}) if "num_hidden_layers" not in d else d
        missing = [k for k in ("num_hidden_layers", "num_attention_heads") if k not in d]
        if missing:
            raise PlanError(f"model config lacks {', '.join(missing)}: not a decoder-only transformer config")
        heads = int(d["num_attention_heads"])
        kv_heads = int(d.get("num_key_value_heads") or heads)
        head_dim = d.get("head_dim") or int(d["hidden_size"]) // heads
        archs = d.get("architectures") or [d.get("model_type", "unknown")]
        return cls(
            architecture=str(archs[0]),
            model_type=str(d.get("model_type", "unknown")),
            num_layers=int(d["num_hidden_layers"]),
            num_query_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=int(head_dim),
            fingerprint=config_fingerprint(d),
        )

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike) -> "ModelShape":
        """From a checkpoint directory or its config.json (only that file is read). A GGUF
        file's shape: moa_search.models.model_shape, which reads the file's metadata."""
        path = Path(model_dir)
        cfg = path / "config.json" if path.is_dir() else path
        if not cfg.exists():
            raise PlanError(f"{model_dir}: no config.json found (pass a model directory or its config.json)")
        try:
            d = json.loads(cfg.read_text())
        except json.JSONDecodeError as e:
            raise PlanError(f"{cfg}: not valid JSON ({e})") from None
        except UnicodeDecodeError:
            raise PlanError(f"{cfg}: not a JSON config (binary content)") from None
        if not isinstance(d, dict):
            raise PlanError(f"{cfg}: expected a JSON object (a model config), got {type(d).__name__}")
        try:
            return cls.from_config(d)
        except PlanError as e:
            raise PlanError(f"{cfg}: {e}") from None


_FINGERPRINT_KEYS = (
    "model_type", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "hidden_size", "intermediate_size", "vocab_size", "rope_theta", "max_position_embeddings",
)


def config_fingerprint(d: dict) -> str:
    """Short hash of the config fields that identify an architecture instance."""
    picked = {k: d.get(k) for k in _FINGERPRINT_KEYS}
    blob = json.dumps(picked, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# ----------------------------------------------------------------------------- plan


@dataclass
class Plan:
    """Per-layer, per-head elastic rules for one model.

    alpha, beta: [num_layers][heads] with heads = num_kv_heads (granularity 'kv_head')
    or num_query_heads ('query_head'). block_size: the profile's block size behind
    predicted_loss, provenance only (moa_search/schema.py). A plan built in code is validated
    here; `from_dict` validates the file's dict and builds with validated=True.
    """

    model: ModelShape
    alpha: list[list[float]]
    beta: list[list[float]]
    sink: int = 64
    block_size: int = 64
    min_span: int = 1
    granularity: str = "kv_head"
    budget: dict | None = None
    profiled_lengths: list[int] = field(default_factory=list)
    predicted_loss: dict = field(default_factory=dict)
    validation: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    validated: InitVar[bool] = False

    def __post_init__(self, validated: bool):
        if not validated:
            _validate(self.to_dict(), source="plan")

    # -- rules per query head (what attention executes) --------------------------
    def query_rules(self) -> tuple[np.ndarray, np.ndarray]:
        """(alpha, beta) as float64 arrays [num_layers, num_query_heads]."""
        a, b = np.asarray(self.alpha, dtype=np.float64), np.asarray(self.beta, dtype=np.float64)
        if self.granularity == "kv_head":
            a, b = np.repeat(a, self.model.group, axis=1), np.repeat(b, self.model.group, axis=1)
        return a, b

    def spans(self, n) -> np.ndarray:
        """Window length of every query head at length n: int64 [num_layers, num_query_heads]."""
        a, b = self.query_rules()
        return R.span(a, b, n, self.min_span)

    def kv_spans(self, n) -> np.ndarray:
        """Window each KV head must cache at length n (max over its group): [num_layers, num_kv_heads]."""
        return R.group_max(self.spans(n), self.model.group)

    def densities(self, n: int) -> dict:
        """Averages at length n: kv_density and compute_density over query heads, and
        kv_cache_density (what the cache really holds: per KV head, the group's max span)."""
        s = self.spans(n)
        return {
            "kv_density": float(R.kv_density(self.sink, s, n).mean()),
            "compute_density": float(R.compute_density(self.sink, s, n).mean()),
            "kv_cache_density": float(R.kv_density(self.sink, self.kv_spans(n), n).mean()),
        }

    def distinct_rules(self) -> int:
        a, b = self.query_rules()
        return len(set(zip(a.ravel().tolist(), b.ravel().tolist())))

    # -- (de)serialisation --------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "model": asdict(self.model),
            "sink": self.sink,
            "block_size": self.block_size,
            "min_span": self.min_span,
            "granularity": self.granularity,
            "rules": {"alpha": self.alpha, "beta": self.beta},
            "budget": self.budget,
            "profiled_lengths": list(self.profiled_lengths),
            "predicted_loss": self.predicted_loss,
            "validation": self.validation,
            "provenance": self.provenance,
        }

    @classmethod
    def from_dict(cls, d: Any, source: str = "plan") -> "Plan":
        _validate(d, source)
        return cls(
            model=ModelShape(**d["model"]),
            alpha=[[float(x) for x in row] for row in d["rules"]["alpha"]],
            beta=[[float(x) for x in row] for row in d["rules"]["beta"]],
            sink=int(d["sink"]),
            block_size=int(d.get("block_size", 64)),
            min_span=int(d.get("min_span", 1)),
            granularity=d["granularity"],
            budget=d.get("budget"),
            profiled_lengths=[int(n) for n in d.get("profiled_lengths") or []],
            predicted_loss=d.get("predicted_loss") or {},
            validation=d.get("validation") or {},
            provenance=d.get("provenance") or {},
            validated=True,
        )


def _validate(d: Any, source: str) -> None:
    """Raise PlanError naming the file, the field, and (for rules) the layer and head.

    The format and version first (a newer file may be laid out differently), then the
    schema (moa_search.schema), then what a schema cannot say: heads that divide, one row
    per layer and one value per head of the plan's granularity."""

    def fail(msg):
        raise PlanError(f"{source}: {msg}")

    if isinstance(d, dict) and d.get("format") != FORMAT and "alphas" in d and "betas" in d:
        fail("this is an official MoA plan ({'alphas', 'betas'}); import it with "
             "`moa plan convert --from-moa FILE --model MODEL_DIR -o OUT.json`")
    if isinstance(d, dict) and d.get("format") == FORMAT:
        version = d.get("version")
        if not isinstance(version, int) or isinstance(version, bool):
            fail(f"field 'version' must be an integer, got {version!r}")
        if version > VERSION:
            fail(f"plan version {version} was written by a newer moa-search (this one reads up to {VERSION}); "
                 "upgrade moa-search")
    error = first_error(d)
    if error:
        fail(error)
    m = d["model"]
    if m["num_query_heads"] % m["num_kv_heads"]:
        fail(f"model.num_query_heads ({m['num_query_heads']}) must be a multiple of model.num_kv_heads ({m['num_kv_heads']})")
    heads = m["num_kv_heads"] if d["granularity"] == "kv_head" else m["num_query_heads"]
    for name in ("alpha", "beta"):
        table = d["rules"][name]
        if len(table) != m["num_layers"]:
            fail(f"rules.{name} must have one row per layer ({m['num_layers']}), got {len(table)}")
        for layer, row in enumerate(table):
            if len(row) != heads:
                fail(f"rules.{name}[{layer}] (layer {layer}) must have {heads} values, one per "
                     f"{d['granularity'].replace('_', ' ')}, got {len(row)}")


# ----------------------------------------------------------------------------- I/O


def save_plan(plan: Plan, path: str | os.PathLike) -> Path:
    atomic_write_text(path, json.dumps(plan.to_dict(), indent=1) + "\n")
    return Path(path)


def load_plan(path: str | os.PathLike) -> Plan:
    """Read and validate a plan file; errors name the file and the field."""
    path = Path(path)
    if not path.exists():
        raise PlanError(f"{path}: no such plan file")
    if path.is_dir():
        raise PlanError(f"{path}: is a folder, expected a plan JSON file (e.g. {path / 'plan.json'})")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PlanError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except UnicodeDecodeError:
        raise PlanError(f"{path}: not a JSON plan file (binary content, not UTF-8 text)") from None
    return Plan.from_dict(d, source=str(path))


def check_plan_fits(plan: Plan, shape: ModelShape) -> None:
    """Refuse a plan made for another attention shape, naming every field that differs."""
    diffs = [
        f"{k}: plan has {getattr(plan.model, k)}, model has {getattr(shape, k)}"
        for k in ("num_layers", "num_query_heads", "num_kv_heads", "head_dim")
        if getattr(plan.model, k) != getattr(shape, k)
    ]
    if diffs:
        raise PlanError(
            f"plan was made for {plan.model.architecture} and does not fit this {shape.architecture}: " + "; ".join(diffs)
        )


SINK_SHARE_WARN = 0.25


def sink_share_warnings(plan, name: str = "plan", threshold: float = SINK_SHARE_WARN) -> list[str]:
    """Warnings for a searched plan whose sink takes a large share of its KV budget at the
    shortest profiled length: there every head keeps the sink, so only budget - sink tokens
    are left to tell heads apart (a 64-token sink is half of a 0.25 budget at 512 tokens,
    and the search then has few distinct rules to choose from). `moa search` prints them for
    the plan it writes, `moa eval` for each plan it runs."""
    b = plan.budget or {}
    lengths = list(plan.profiled_lengths or b.get("lengths") or [])
    if b.get("kind") != "kv" or not b.get("density") or not lengths or plan.sink <= 0:
        return []
    n = min(lengths)
    tokens = float(b["density"]) * n
    share = plan.sink / tokens
    if share < threshold:
        return []
    return [f"{name}: the {plan.sink}-token sink takes {share:.0%} of the KV budget at the shortest profiled length "
            f"{n} (density {b['density']:g} = {tokens:.0f} tokens): heads differ only in the remaining "
            f"{max(tokens - plan.sink, 0):.0f}; profile from a longer shortest length, or use a smaller sink"]


def provenance(**extra) -> dict:
    return {"tool": "moa-search", "tool_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **extra}


# ----------------------------------------------------------------------------- builders


def uniform_plan(shape: ModelShape, sink: int = 64, span_fraction: float | None = None,
                 span_tokens: int | None = None, block_size: int = 64) -> Plan:
    """StreamingLLM baseline: every head keeps `sink` + the same window.

    span_fraction f gives span(N) = floor(f N) (elastic); span_tokens w gives a fixed
    window span(N) = w. Exactly one of them.
    """
    if (span_fraction is None) == (span_tokens is None):
        raise PlanError("give exactly one of span_fraction or span_tokens")
    if span_fraction is not None and not 0 < span_fraction <= 1:
        raise PlanError(f"span_fraction must be in (0, 1], got {span_fraction}")
    if span_tokens is not None and span_tokens < 1:
        raise PlanError(f"span_tokens must be >= 1, got {span_tokens}")
    a = float(span_tokens or 0)
    b = float(span_fraction or 0.0)
    heads = shape.num_kv_heads
    return Plan(
        model=shape, alpha=[[a] * heads for _ in range(shape.num_layers)],
        beta=[[b] * heads for _ in range(shape.num_layers)], sink=sink, block_size=block_size,
        granularity="kv_head", provenance=provenance(source="uniform"),
    )


def plan_from_moa(obj: Any, shape: ModelShape, source: str = "MoA plan") -> Plan:
    """Import the official MoA format {"alphas": [[per query head] per layer], "betas": [...]}.

    MoA's span counts its 64 sink tokens; ours does not: alpha_ours = alpha_moa - 64.
    """
    if not isinstance(obj, dict) or "alphas" not in obj or "betas" not in obj:
        raise PlanError(f"{source}: expected an object with 'alphas' and 'betas' (the official MoA format)")
    out = {}
    for name in ("alphas", "betas"):
        table = obj[name]
        if not isinstance(table, list) or len(table) != shape.num_layers:
            got = len(table) if isinstance(table, list) else type(table).__name__
            raise PlanError(f"{source}: '{name}' must have one row per layer ({shape.num_layers}), got {got}")
        for layer, row in enumerate(table):
            if not isinstance(row, list) or len(row) != shape.num_query_heads:
                got = len(row) if isinstance(row, list) else type(row).__name__
                raise PlanError(f"{source}: '{name}'[{layer}] (layer {layer}) must have {shape.num_query_heads} "
                                f"values, one per query head, got {got}")
            for head, v in enumerate(row):
                if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                    raise PlanError(f"{source}: '{name}'[{layer}][{head}] (layer {layer}, head {head}) must be a number, got {v!r}")
        out[name] = [[float(v) for v in row] for row in table]
    alpha = [[a - MOA_SINK for a in row] for row in out["alphas"]]
    return Plan(model=shape, alpha=alpha, beta=out["betas"], sink=MOA_SINK, granularity="query_head",
                provenance=provenance(source=f"imported from official MoA format: {source}"))


__all__ = [
    "sink_share_warnings",
    "FORMAT", "VERSION", "PlanError", "ModelShape", "Plan", "load_plan", "save_plan", "check_plan_fits",
    "uniform_plan", "plan_from_moa", "config_fingerprint", "provenance",
]
