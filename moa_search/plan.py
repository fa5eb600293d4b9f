"""The plan file: which elastic rule every head of a model follows.

JSON, versioned, validated on load. Layout (version 1):

    {
      "format": "moa-search-plan", "version": 1,
      "model": {"architecture", "model_type", "num_layers", "num_query_heads",
                "num_kv_heads", "head_dim", "fingerprint"},
      "sink": 64, "block_size": 64, "min_span": 1,
      "granularity": "kv_head" | "query_head",
      "rules": {"alpha": [[...] per layer], "beta": [[...] per layer]},   # per KV or query head
      "budget": {"kind": "kv" | "compute", "density": 0.5, "lengths": [...]} | null,
      "profiled_lengths": [...], "predicted_loss": {...}, "validation": {...},
      "provenance": {"tool_version", "created", "calibration", "source", ...}
    }

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
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import rules as R
from .errors import MoaError

FORMAT = "moa-search-plan"
VERSION = 1
GRANULARITIES = ("kv_head", "query_head")
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
        """From a checkpoint directory (only its config.json is read) or a GGUF file (its metadata)."""
        path = Path(model_dir)
        from moa_search.models import model_shape, resolve_gguf

        if resolve_gguf(path) is not None:
            return model_shape(path)
        cfg = path / "config.json" if path.is_dir() else path
        if not cfg.exists():
            raise PlanError(f"{model_dir}: no config.json found (pass a model directory or its config.json)")
        try:
            d = json.loads(cfg.read_text())
        except json.JSONDecodeError as e:
            raise PlanError(f"{cfg}: not valid JSON ({e})") from None
        return cls.from_config(d)


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
    or num_query_heads ('query_head').
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

    def __post_init__(self):
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
        )


def _validate(d: Any, source: str) -> None:
    """Raise PlanError naming the file, the field, and (for rules) the layer and head."""

    def fail(msg):
        raise PlanError(f"{source}: {msg}")

    if not isinstance(d, dict):
        fail(f"expected a JSON object at the top level, got {type(d).__name__}")
    if d.get("format") != FORMAT:
        if "alphas" in d and "betas" in d:
            fail("this is an official MoA plan ({'alphas', 'betas'}); import it with "
                 "`moa plan convert --from-moa FILE --model MODEL_DIR -o OUT.json`")
        fail(f"field 'format' must be {FORMAT!r}, got {d.get('format')!r}")
    version = d.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        fail(f"field 'version' must be an integer, got {version!r}")
    if version > VERSION:
        fail(f"plan version {version} was written by a newer moa-search (this one reads up to {VERSION}); upgrade moa-search")
    if version < 1:
        fail(f"field 'version' must be >= 1, got {version}")
    for key in ("model", "sink", "granularity", "rules"):
        if key not in d:
            fail(f"missing required field {key!r}")
    m = d["model"]
    if not isinstance(m, dict):
        fail(f"field 'model' must be an object, got {type(m).__name__}")
    for key in ("num_layers", "num_query_heads", "num_kv_heads", "head_dim"):
        v = m.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            fail(f"field 'model.{key}' must be a positive integer, got {v!r}")
    for key in ("architecture", "model_type"):
        if not isinstance(m.get(key), str):
            fail(f"field 'model.{key}' must be a string, got {m.get(key)!r}")
    extra = set(m) - {"architecture", "model_type", "num_layers", "num_query_heads", "num_kv_heads", "head_dim", "fingerprint"}
    if extra:
        fail(f"unknown field(s) in 'model': {sorted(extra)}")
    if m["num_query_heads"] % m["num_kv_heads"]:
        fail(f"model.num_query_heads ({m['num_query_heads']}) must be a multiple of model.num_kv_heads ({m['num_kv_heads']})")
    for key, lo in (("sink", 0), ("block_size", 1), ("min_span", 1)):
        v = d.get(key, lo)
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            fail(f"field {key!r} must be an integer >= {lo}, got {v!r}")
    if d["granularity"] not in GRANULARITIES:
        fail(f"field 'granularity' must be one of {GRANULARITIES}, got {d['granularity']!r}")
    heads = m["num_kv_heads"] if d["granularity"] == "kv_head" else m["num_query_heads"]
    rules = d["rules"]
    if not isinstance(rules, dict) or "alpha" not in rules or "beta" not in rules:
        fail("field 'rules' must be an object with 'alpha' and 'beta'")
    for name in ("alpha", "beta"):
        table = rules[name]
        if not isinstance(table, list) or len(table) != m["num_layers"]:
            got = len(table) if isinstance(table, list) else type(table).__name__
            fail(f"rules.{name} must have one row per layer ({m['num_layers']}), got {got}")
        for layer, row in enumerate(table):
            if not isinstance(row, list) or len(row) != heads:
                got = len(row) if isinstance(row, list) else type(row).__name__
                fail(f"rules.{name}[{layer}] (layer {layer}) must have {heads} values, one per "
                     f"{d['granularity'].replace('_', ' ')}, got {got}")
            for head, v in enumerate(row):
                if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                    fail(f"rules.{name}[{layer}][{head}] (layer {layer}, head {head}) must be a finite number, got {v!r}")
                if name == "beta" and v < 0:
                    fail(f"rules.beta[{layer}][{head}] (layer {layer}, head {head}) must be >= 0, got {v!r}")
    budget = d.get("budget")
    if budget is not None:
        if not isinstance(budget, dict):
            fail("field 'budget' must be an object or null")
        if budget.get("kind") not in ("kv", "compute"):
            fail(f"field 'budget.kind' must be 'kv' or 'compute', got {budget.get('kind')!r}")
        dens = budget.get("density")
        if not isinstance(dens, (int, float)) or not 0 < dens <= 1:
            fail(f"field 'budget.density' must be in (0, 1], got {dens!r}")
    pl = d.get("profiled_lengths") or []
    if not isinstance(pl, list) or not all(isinstance(n, int) and n > 0 for n in pl):
        fail(f"field 'profiled_lengths' must be a list of positive integers, got {pl!r}")


# ----------------------------------------------------------------------------- I/O


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Write `path` by calling write(tmp) on a temp file in the same folder, then renaming it:
    readers never see half a file and a crash leaves the old one. The file gets the mode a
    plain open() would give (mkstemp alone makes it 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    return atomic_write(path, write)


def save_plan(plan: Plan, path: str | os.PathLike) -> Path:
    atomic_write_text(path, json.dumps(plan.to_dict(), indent=1) + "\n")
    return Path(path)


def load_plan(path: str | os.PathLike) -> Plan:
    """Read and validate a plan file; errors name the file and the field."""
    path = Path(path)
    if not path.exists():
        raise PlanError(f"{path}: no such plan file")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PlanError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
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


def provenance(**extra) -> dict:
    from . import __version__

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
    "FORMAT", "VERSION", "PlanError", "ModelShape", "Plan", "load_plan", "save_plan", "check_plan_fits",
    "uniform_plan", "plan_from_moa", "atomic_write", "atomic_write_text", "config_fingerprint", "provenance",
]
