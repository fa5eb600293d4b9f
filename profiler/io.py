"""Profile files: one safetensors file per profiled length.

    influence_{N}.safetensors
      tensor "influence": float64 [num_layers, num_query_heads, nb, nb], nb = ceil(N / block_size)
          I[l, h, bq, bk] = mean over calibration samples of the sum, over the causal (i, j)
          of block (bq, bk), of |dS_ij| / max(1 - A_ij, 1e-4)   (profiler/reference.py)
      metadata (str -> str): format, version, length, block_size, samples, model (JSON of
          ModelShape), calibration_hash, plus free-form extras

The loss increase of dropping a set of entries is the influence summed over them.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from moa_search.files import atomic_write
from moa_search.rules import block_count
from moa_search.plan import ModelShape, PlanError

FORMAT = "moa-search-profile"
VERSION = 1


class ProfileError(PlanError):
    """A profile file is malformed or belongs to another model."""


@dataclass
class Profile:
    influence: torch.Tensor          # float64 [L, Hq, nb, nb], mean over samples
    length: int
    block_size: int
    samples: int
    model: ModelShape
    calibration_hash: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def num_blocks(self) -> int:
        return self.influence.shape[-1]


def profile_path(folder: str | os.PathLike, length: int) -> Path:
    return Path(folder) / f"influence_{int(length)}.safetensors"


def save_profile(profile: Profile, path: str | os.PathLike) -> Path:
    """Atomic: written to a temp file in the same folder, then renamed."""
    from safetensors.torch import save_file

    meta = {
        "format": FORMAT, "version": str(VERSION), "length": str(profile.length),
        "block_size": str(profile.block_size), "samples": str(profile.samples),
        "model": json.dumps(asdict(profile.model)), "calibration_hash": profile.calibration_hash,
        "extra": json.dumps(profile.extra),
    }
    tensors = {"influence": profile.influence.detach().to(torch.float64).contiguous().cpu()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_profile(path: str | os.PathLike, expect_model: ModelShape | None = None) -> Profile:
    """Read one profile file; refuses files of another format or (if given) another model."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise ProfileError(f"{path}: no such profile file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ProfileError(f"{path}: not a moa-search profile (metadata 'format' is {meta.get('format')!r})")
            if int(meta.get("version", 0)) > VERSION:
                raise ProfileError(f"{path}: profile version {meta['version']} is newer than this moa-search reads ({VERSION})")
            influence = f.get_tensor("influence")
    except ProfileError:
        raise
    except Exception as e:  # safetensors raises its own error types for truncated files
        raise ProfileError(f"{path}: cannot read as safetensors ({e})") from None
    model = ModelShape(**json.loads(meta["model"]))
    prof = Profile(influence=influence, length=int(meta["length"]), block_size=int(meta["block_size"]),
                   samples=int(meta["samples"]), model=model, calibration_hash=meta.get("calibration_hash", ""),
                   extra=json.loads(meta.get("extra") or "{}"))
    L, H = model.num_layers, model.num_query_heads
    nb = block_count(prof.length, prof.block_size)
    if tuple(influence.shape) != (L, H, nb, nb):
        raise ProfileError(f"{path}: influence has shape {tuple(influence.shape)}, expected {(L, H, nb, nb)} "
                           f"(layers, query heads, blocks, blocks) for length {prof.length}")
    if expect_model is not None:
        diffs = [f"{k}: profile has {getattr(model, k)}, expected {getattr(expect_model, k)}"
                 for k in ("num_layers", "num_query_heads", "num_kv_heads", "head_dim", "fingerprint")
                 if getattr(model, k) != getattr(expect_model, k)]
        if diffs:
            raise ProfileError(f"{path}: profile is from another model: " + "; ".join(diffs))
    return prof


def load_profiles(folder: str | os.PathLike, expect_model: ModelShape | None = None) -> dict[int, Profile]:
    """All influence_*.safetensors in a folder, keyed by length; they must agree on the model."""
    folder = Path(folder)
    files = sorted(folder.glob("influence_*.safetensors"))
    if not files:
        raise ProfileError(f"{folder}: no influence_*.safetensors files (run `moa profile` first)")
    out = {}
    for p in files:
        prof = load_profile(p, expect_model)
        expect_model = expect_model or prof.model
        out[prof.length] = prof
    return dict(sorted(out.items()))
