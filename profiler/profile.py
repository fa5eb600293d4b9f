"""The profiling loop: samples -> summed influence per length -> profile files, resumable.

For each profiled length L:

1. Select samples (`select_samples`). A sample is used at L when its `length` (the target
   length `moa calibrate` built it for) equals L, if the dataset has that column, and its
   real token count fits: min_fill * L <= n_tokens <= L. It is placed at positions 0..n-1
   of the L-token profile (positions count from the first token, as rules do), so blocks
   past its end receive nothing from it. Samples shorter or longer are never truncated:
   cutting the prompt would cut the long-range dependency, cutting the answer the loss.
   They are skipped and counted in the log and in the profile's metadata.
2. Per sample, one forward + backward of the dense model with frozen weights
   (`sample_influence`): gradients flow only from a response-masked cross-entropy (mean
   over the answer tokens) back to the input embeddings; every attention layer measures
   its influence in its backward pass (profiler/capture.py).
3. Sums are float64. Samples are processed in chunks of `checkpoint_every` per rank; after
   each chunk the chunk's sum is all-reduced across ranks (torchrun; one collective per
   checkpoint), added to the running total and rank 0 writes a checkpoint atomically.
   A rerun with the same settings resumes after the last checkpoint; because the chunking
   depends only on the settings, the resumed sums equal an uninterrupted run's bit for bit.
4. The profile file holds the mean over samples (profiler/io.py); the checkpoint is removed.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from moa_search import distributed
from moa_search import rules as R
from moa_search.apply import input_device
from moa_search.losses import response_loss
from moa_search.files import atomic_write
from moa_search.plan import ModelShape
from moa_search.profiler.capture import SampleInfluence, dense_profiling, resolve_backend
from moa_search.profiler.io import Profile, ProfileError, load_profile, profile_path, save_profile

log = logging.getLogger("moa_search.profiler")

CHECKPOINT_FORMAT = "moa-search-profile-checkpoint"


@dataclass
class ProfileSettings:
    lengths: list[int]
    block_size: int = 64
    max_samples: int | None = None
    backend: str = "auto"
    checkpoint_every: int = 8
    min_fill: float = 0.5
    restart: bool = False
    plots: bool = True
    progress: bool = True


@dataclass
class Selection:
    """The samples used at one length, and why the others were not."""

    length: int
    indices: list[int]
    skipped: dict = field(default_factory=dict)   # reason -> count

    def describe(self) -> str:
        why = ", ".join(f"{n} {r}" for r, n in self.skipped.items() if n) or "none skipped"
        return f"length {self.length}: {len(self.indices)} samples used ({why})"


# ----------------------------------------------------------------------------- data


REQUIRED = ("input_ids", "response_start", "response_end")


def check_dataset(ds, source: str = "calibration set") -> None:
    if ds is None or len(ds) == 0:
        raise ProfileError(f"{source}: the calibration set is empty (make one with `moa calibrate`)")
    missing = [c for c in REQUIRED if c not in ds.column_names]
    if missing:
        raise ProfileError(f"{source}: missing column(s) {missing} (the profiler needs input_ids and the "
                           "response span [response_start, response_end) of the model's answer); "
                           "build the set with `moa calibrate`")


def _ids(ds) -> list[str]:
    return [str(x) for x in ds["id"]] if "id" in ds.column_names else [str(i) for i in range(len(ds))]


def select_samples(ds, length: int, min_fill: float = 0.5, max_samples: int | None = None) -> Selection:
    """Which rows of `ds` profile length `length` (rule in the module docstring)."""
    n_tok = (np.asarray(ds["n_tokens"], dtype=np.int64) if "n_tokens" in ds.column_names
             else np.asarray([len(x) for x in ds["input_ids"]], dtype=np.int64))
    ok = np.ones(len(ds), dtype=bool)
    skipped = {}
    if "length" in ds.column_names:
        other = np.asarray(ds["length"], dtype=np.int64) != length
        skipped["built for another length"] = int(other.sum())
        ok &= ~other
    short = ok & (n_tok < min_fill * length)
    long = ok & (n_tok > length)
    skipped[f"shorter than {min_fill:g} x {length} tokens"] = int(short.sum())
    skipped[f"longer than {length} tokens"] = int(long.sum())
    ok &= ~short & ~long
    idx = np.nonzero(ok)[0].tolist()
    if max_samples is not None and len(idx) > max_samples:
        skipped["beyond --max-samples"] = len(idx) - max_samples
        idx = idx[:max_samples]
    return Selection(length, idx, skipped)


# ----------------------------------------------------------------------------- one sample


def sample_influence(model, input_ids, response_start: int, response_end: int, state: SampleInfluence,
                     sample_id: str = "?") -> tuple[torch.Tensor | None, float]:
    """Influence of one sample and its loss.

    Returns float64 [layers, Hq, nb_n, nb_n] on the model's input device, or None when
    `state.target` is set (then the influence has been added into it, layer by layer).
    Loss = mean cross-entropy of the answer tokens input_ids[response_start:response_end],
    each predicted from the position before it; only those logits are computed.
    Raises ProfileError naming the sample if the loss or any influence is not finite.
    """
    n = len(input_ids)
    rs, re = int(response_start), int(response_end)
    if not (1 <= rs < re <= n):
        raise ProfileError(f"sample {sample_id!r}: response span [{rs}, {re}) is invalid for {n} tokens "
                           "(need 1 <= response_start < response_end <= n_tokens)")
    dev = input_device(model)
    ids = torch.as_tensor(np.asarray(input_ids, dtype=np.int64), device=dev)[None]
    state.clear()
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    loss = response_loss(model, ids[0, rs:re], rs, inputs_embeds=emb, use_cache=False)
    loss.backward()
    loss_value = float(loss.detach())
    expected = model.config.get_text_config().num_hidden_layers
    got = state.reported()
    if len(got) != expected:
        raise RuntimeError(f"sample {sample_id!r}: {len(got)} of {expected} layers reported influence")
    if state.target is None:
        # with a device_map each layer's influence sits on that layer's device
        infl = torch.stack([state.layers[i].to(dev, torch.float64) for i in range(expected)])
        finite = [bool(torch.isfinite(infl[i]).all()) for i in range(expected)]
    else:
        infl = None
        finite = [bool(state.finite[i]) for i in range(expected)]
    state.clear()
    if not np.isfinite(loss_value) or not all(finite):
        bad = [i for i, ok in enumerate(finite) if not ok]
        raise ProfileError(f"sample {sample_id!r} (n_tokens {n}): non-finite "
                           + (f"loss ({loss_value})" if not np.isfinite(loss_value) else f"gradient in layer(s) {bad}")
                           + "; the run stopped here (check the model's dtype: try --dtype float32 or bfloat16)")
    return infl, loss_value


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_path(out_dir, length: int) -> Path:
    return Path(out_dir) / "checkpoints" / f"influence_{int(length)}.partial.safetensors"


def _save_checkpoint(path: Path, total: torch.Tensor, meta: dict) -> None:
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file({"sum": total.contiguous()}, tmp,
                                             metadata={"format": CHECKPOINT_FORMAT, "state": json.dumps(meta)}))


def _load_checkpoint(path: Path):
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != CHECKPOINT_FORMAT:
                raise ProfileError(f"{path}: not a profiler checkpoint")
            return f.get_tensor("sum"), json.loads(meta["state"])
    except ProfileError:
        raise
    except Exception as e:
        raise ProfileError(f"{path}: unreadable checkpoint ({e}); delete it or pass --restart") from None


def run_key(shape: ModelShape, calib_hash: str, block_size: int, length: int, sample_ids: list[str]) -> dict:
    """What must match for a checkpoint or an existing profile to be reused."""
    ids = hashlib.sha256(json.dumps(sample_ids).encode()).hexdigest()[:16]
    return {"fingerprint": shape.fingerprint, "calibration_hash": calib_hash, "block_size": int(block_size),
            "length": int(length), "samples": len(sample_ids), "sample_ids_hash": ids}


def _key_diff(have: dict, want: dict) -> str:
    return "; ".join(f"{k}: {have.get(k)!r} there, {v!r} now" for k, v in want.items() if have.get(k) != v)


# ----------------------------------------------------------------------------- one length


@dataclass
class RunningSum:
    """A length's influence summed so far: over samples [0, next) of its selection."""

    total: torch.Tensor               # float64 [layers, Hq, nb, nb], CPU
    next: int = 0
    count: int = 0                    # samples summed (all ranks)
    loss_sum: float = 0.0


def existing_profile(final: Path, key: dict, settings: ProfileSettings) -> bool:
    """True when `final` already holds this run's profile (skip the length); raises when it
    holds another run's and --restart was not given."""
    if not final.exists() or settings.restart:
        return False
    done = load_profile(final)
    diff = _key_diff(done.extra.get("run_key", {}), key)
    if diff:
        raise ProfileError(f"{final} exists from another run ({diff}); pass --restart to overwrite it "
                           "or choose another output folder")
    return True


def resume_sum(ckpt: Path, key: dict, settings: ProfileSettings, shape: ModelShape, nb: int, length: int,
               samples: int) -> RunningSum:
    """The running sum of this length: from its checkpoint, or zero."""
    run = RunningSum(torch.zeros(shape.num_layers, shape.num_query_heads, nb, nb, dtype=torch.float64))
    if ckpt.exists() and not settings.restart:
        saved, info = _load_checkpoint(ckpt)
        diff = _key_diff(info.get("key", {}), key)
        if diff:
            raise ProfileError(f"{ckpt}: checkpoint of another run ({diff}); pass --restart to discard it")
        run = RunningSum(saved, int(info["next"]), int(info["count"]), float(info["loss_sum"]))
        log.info("length %d: resuming after sample %d of %d (%s)", length, run.next, samples, ckpt)
    return run


def sum_chunk(model, columns, sel: Selection, sample_ids: list[str], c0: int, c1: int, state: SampleInfluence,
              bar) -> torch.Tensor:
    """Add the influence of samples [c0, c1) of the selection into state.target (this rank's
    share: every world-th sample), all-reduced over ranks. Returns float64 [3] on the device:
    samples done, their loss sum, ranks that failed."""
    import torch.distributed as dist

    rank, world = distributed.info()
    delta = state.target
    delta.zero_()
    stats = torch.zeros(3, dtype=torch.float64, device=delta.device)   # samples, loss sum, failed ranks
    error = None
    for pos in range(c0 + rank, c1, world):
        row = columns[sel.indices[pos]]
        try:
            _, loss = sample_influence(model, row["input_ids"], row["response_start"],
                                       row["response_end"], state, sample_ids[pos])
        except ProfileError as e:      # delta is spoilt, but the run stops at this chunk
            if world == 1:
                raise
            error, stats[2] = e, 1.0
            break
        stats[0] += 1
        stats[1] += loss
        if world == 1:
            bar.update(1)
    if world > 1:
        dist.all_reduce(delta)
        dist.all_reduce(stats)
        if stats[2] > 0:
            raise error or ProfileError(f"length {sel.length}: another rank stopped on a non-finite "
                                        "gradient (its log names the sample)")
        bar.update(c1 - c0)
    return stats


def write_profile(final: Path, ckpt: Path, run: RunningSum, sel: Selection, settings: ProfileSettings,
                  shape: ModelShape, calib_hash: str, key: dict, backend: str, dtype, first: int,
                  seconds: float) -> None:
    """The profile file of one length (the mean over samples); its checkpoint is removed."""
    _, world = distributed.info()
    extra = {"run_key": key, "skipped": sel.skipped, "loss_mean": run.loss_sum / max(run.count, 1),
             "backend": backend, "world_size": world, "dtype": str(dtype).replace("torch.", ""),
             "min_fill": settings.min_fill,
             # this run's loop (a resumed run counts only what it did): throughput for BENCHMARKS
             "run_samples": run.next - first, "run_seconds": round(seconds, 3)}
    prof = Profile(influence=run.total / max(run.count, 1), length=sel.length, block_size=settings.block_size,
                   samples=run.count, model=shape, calibration_hash=calib_hash, extra=extra)
    save_profile(prof, final)
    ckpt.unlink(missing_ok=True)
    try:
        ckpt.parent.rmdir()          # only when no other length's checkpoint is left
    except OSError:
        pass


def profile_length(model, ds, sel: Selection, settings: ProfileSettings, out_dir, shape: ModelShape,
                   calib_hash: str, backend: str) -> Path:
    """Profile one length (resuming from its checkpoint); returns the profile file's path."""
    rank, world = distributed.info()
    nb = R.block_count(sel.length, settings.block_size)
    ids_all = _ids(ds)
    sample_ids = [ids_all[i] for i in sel.indices]
    key = run_key(shape, calib_hash, settings.block_size, sel.length, sample_ids)
    final = profile_path(out_dir, sel.length)
    ckpt = checkpoint_path(out_dir, sel.length)
    if existing_profile(final, key, settings):
        log.info("length %d: %s already holds this profile, skipping", sel.length, final)
        return final
    run = resume_sum(ckpt, key, settings, shape, nb, sel.length, len(sel.indices))

    from tqdm.auto import tqdm

    dev = input_device(model)
    chunk = max(1, settings.checkpoint_every) * world
    bar = tqdm(total=len(sel.indices), initial=run.next, desc=f"profile {sel.length}", unit="sample",
               disable=not settings.progress or rank != 0, dynamic_ncols=True)
    columns = ds.select_columns(list(REQUIRED))
    delta = torch.zeros(shape.num_layers, shape.num_query_heads, nb, nb, dtype=torch.float64, device=dev)
    state = SampleInfluence(backend=backend, block_size=settings.block_size, target=delta)  # a chunk's sum (this rank)
    t0, first = time.perf_counter(), run.next
    with dense_profiling(model, state):
        for c0 in range(run.next, len(sel.indices), chunk):
            c1 = min(len(sel.indices), c0 + chunk)
            stats = sum_chunk(model, columns, sel, sample_ids, c0, c1, state, bar)
            run.total += delta.cpu()
            run.count += int(stats[0])
            run.loss_sum += float(stats[1])
            run.next = c1
            if rank == 0:
                _save_checkpoint(ckpt, run.total, {"key": key, "next": run.next, "count": run.count,
                                                   "loss_sum": run.loss_sum})
            distributed.barrier()
    bar.close()
    seconds = time.perf_counter() - t0
    log.info("length %d: %d samples in %.1f s on %d rank(s) (%.3f samples/s)", sel.length, run.next - first, seconds,
             world, (run.next - first) / max(seconds, 1e-9))
    if rank == 0:
        write_profile(final, ckpt, run, sel, settings, shape, calib_hash, key, backend, model.dtype, first, seconds)
    distributed.barrier()
    return final


# ----------------------------------------------------------------------------- all lengths


def enable_activation_checkpointing(model, on: bool = True):
    """Recompute each decoder layer in backward (transformers >= 5.24 renamed the method)."""
    if on:
        fn = getattr(model, "activation_checkpointing_enable", None)
        if fn is not None:
            fn(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()  # transformers recomputes layers only in train mode; profiling has no dropout
    else:
        fn = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
        fn()
        model.eval()
    return model


def model_max_length(config) -> int | None:
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    m = getattr(cfg, "max_position_embeddings", None)
    return int(m) if m else None


def calibration_hash_of(ds) -> str:
    from moa_search.calibrate import calibration_hash

    return calibration_hash(ds) if "id" in ds.column_names else str(getattr(ds, "_fingerprint", ""))


def profile_influence(model, calibration, lengths, out_dir, **settings) -> dict[int, Path]:
    """The `moa profile` step from Python: {length: profile file} in out_dir.

    model: a causal LM (weights are frozen here); calibration: a calibration set (the dataset
    `build_calibration` returns or `load_calibration` reads) or its folder; lengths: the
    lengths to profile; settings: the other fields of ProfileSettings (block_size,
    max_samples, backend, checkpoint_every, min_fill, restart, plots, progress)."""
    if isinstance(calibration, (str, os.PathLike)):
        from moa_search.calibrate import load_calibration

        calibration = load_calibration(calibration)
    return profile_model(model, calibration, ProfileSettings(lengths=[int(n) for n in lengths], **settings), out_dir)


def profile_model(model, ds, settings: ProfileSettings, out_dir, calib_hash: str | None = None) -> dict[int, Path]:
    """Profile `model` on calibration set `ds` at every length of `settings`; write files into out_dir.

    Checks everything (lengths, data, selection) before the first sample so that a bad
    input fails in seconds, not after hours.
    """
    rank, _ = distributed.info()
    check_dataset(ds)
    shape = ModelShape.from_config(model.config)
    bs = int(settings.block_size)
    if bs < 1:
        raise ProfileError(f"block size must be positive, got {bs}")
    max_len = model_max_length(model.config)
    too_long = [n for n in settings.lengths if max_len is not None and n > max_len]
    if too_long:
        raise ProfileError(f"length(s) {too_long} exceed the model's max_position_embeddings ({max_len}); "
                           "profile at lengths the model supports")
    dev = input_device(model)
    try:
        backend = resolve_backend(settings.backend, dev)
    except ValueError as e:
        raise ProfileError(str(e)) from None
    if backend == "triton" and (bs < 16 or bs > 128 or bs & (bs - 1)):
        raise ProfileError(f"--backend triton needs a block size that is a power of two in [16, 128], got {bs}")
    calib_hash = calibration_hash_of(ds) if calib_hash is None else calib_hash
    sels = [select_samples(ds, n, settings.min_fill, settings.max_samples) for n in settings.lengths]
    for s in sels:
        if rank == 0:
            log.info(s.describe())
    empty = [s for s in sels if not s.indices]
    if empty:
        raise ProfileError("no usable samples at " + "; ".join(s.describe() for s in empty)
                           + f" (of {len(ds)} in the set). Calibrate at these lengths "
                           "(`moa calibrate --lengths ...`) or lower --min-fill")
    for p in model.parameters():
        p.requires_grad_(False)
    out = {}
    for s in sels:
        out[s.length] = profile_length(model, ds, s, settings, out_dir, shape, calib_hash, backend)
    if settings.plots and rank == 0:
        from moa_search.profiler.plots import plot_distance_mass

        for n, path in out.items():
            png = path.with_suffix(".png")
            plot_distance_mass(load_profile(path), png)
            log.info("length %d: wrote %s and %s", n, path, png)
    return out
