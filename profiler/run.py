"""`moa profile`: per-head, per-block attention influence of a model at several lengths."""
from __future__ import annotations

import argparse
import logging
import sys

DESCRIPTION = """\
Measure how much each attention entry matters to the model's own answers (MoA's
influence profile): one forward + backward per calibration sample with frozen weights
and full (dense) causal attention, loss on the answer tokens only. With A = softmax(S)
a head's attention and dS = dL/dS the gradient of the loss with respect to its scores,
dropping entry (i, j) and renormalising row i changes the loss by about
|dS_ij| / max(1 - A_ij, 1e-4) (the guard keeps a near-certain entry finite).
For each length N it writes DIR/influence_N.safetensors, float64 [layers, query heads,
ceil(N/B), ceil(N/B)] (B = --block-size; the last block may be short): the mean over
samples of that influence summed over each block, and DIR/influence_N.png (each head's
influence by distance: local vs far-reaching heads).

The calibration set must be one this model answered (its meta.json names the model's
shape and fingerprint); --allow-other-model profiles another model's answers anyway.

Samples: at length N the profiler uses the calibration items built for N (column
`length`) whose token count lies in [min-fill * N, N]; others are skipped and counted.

Long runs: sums are checkpointed (DIR/checkpoints/) every --checkpoint-every samples;
after a crash or Ctrl-C, rerun the same command to resume. Several GPUs:
    torchrun --nproc-per-node K -m moa_search.cli profile ...
splits the samples across ranks (sums all-reduced at each checkpoint, rank 0 writes).

Example:
    moa profile --model ckpt/ --data calib/ --lengths 2048,4096,8192 -o profiles/
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = DESCRIPTION
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--model", required=True, metavar="MODEL_DIR", help="Hugging Face checkpoint directory")
    p.add_argument("--data", required=True, metavar="CALIB_DIR", help="calibration folder written by `moa calibrate`")
    p.add_argument("--lengths", required=True, help="comma-separated lengths to profile, e.g. 2048,4096,8k")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="output folder for the profile files")
    p.add_argument("--block-size", type=int, default=64,
                   help="profile block size in tokens (default 64; the fused kernel needs a power of two in [16, 128])")
    p.add_argument("--max-samples", type=int, default=None, metavar="K", help="use at most K samples per length")
    p.add_argument("--min-fill", type=float, default=0.5,
                   help="skip samples with fewer than min-fill * N tokens at length N (default 0.5)")
    p.add_argument("--backend", default="auto", choices=["auto", "reference", "triton"],
                   help="influence computation: fused Triton kernel (auto on CUDA) or the chunked PyTorch reference")
    p.add_argument("--checkpoint-every", type=int, default=8, metavar="K",
                   help="checkpoint the running sums every K samples per rank (default 8)")
    p.add_argument("--restart", action="store_true", help="discard checkpoints and existing profiles in DIR")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available; LOCAL_RANK under torchrun)")
    from moa_search.models import add_device_map_argument

    add_device_map_argument(p)
    from moa_search.models import add_gguf_argument

    add_gguf_argument(p)
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="model dtype (auto: bfloat16 on CUDA, float32 on the CPU)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute each layer in backward (fits long lengths / big models; ~1.3x time)")
    p.add_argument("--no-plots", action="store_true", help="do not write the PNG per length")
    p.add_argument("--allow-other-model", action="store_true",
                   help="profile a calibration set that another model answered (its answers are not this model's own)")


def load_for_profiling(path: str, device: str | None, dtype: str, device_map=None, gguf_file=None):
    """The model in eval mode, weights frozen, on `device` (or placed by accelerate's device_map)."""
    import torch

    from moa_search import distributed
    from moa_search.models import load_model

    if device is None and device_map is None:
        device = distributed.default_device()
    if dtype == "auto":
        dtype = "bfloat16" if torch.cuda.is_available() and not str(device).startswith("cpu") else "float32"
    model, _ = load_model(path, device, dtype, device_map, tokenizer=False, gguf_file=gguf_file)  # refuses device + device_map
    model.requires_grad_(False)
    return model


class _StderrHandler(logging.StreamHandler):
    """Writes to sys.stderr as it is at each message (a test or a caller may have replaced it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def check_arguments(args) -> list[int]:
    """The flags' values, checked before anything loads; returns the lengths."""
    from moa_search.errors import MoaError, check_counts
    from moa_search.models import check_model
    from moa_search.rules import lengths_arg

    lengths = lengths_arg("--lengths", args.lengths)
    check_counts(("--block-size", args.block_size), ("--max-samples", args.max_samples),
                 ("--checkpoint-every", args.checkpoint_every))
    if not 0 <= args.min_fill <= 1:
        raise MoaError(f"--min-fill must be in [0, 1], got {args.min_fill:g}")
    check_model(args.model, getattr(args, "gguf_file", None))
    return lengths


def check_same_model(data, model) -> None:
    """Refuse a calibration set whose answers another model wrote (meta.json records its fingerprint)."""
    from moa_search.calibrate import CalibrationError, load_meta
    from moa_search.plan import ModelShape

    meta = load_meta(data)
    made_by = meta.get("fingerprint")
    if not made_by:   # a hand-made set: nothing to compare
        return
    shape = ModelShape.from_config(model.config)
    if made_by != shape.fingerprint:
        who = (meta.get("model") or {}).get("path") or "another model"
        raise CalibrationError(f"{data}: answered by another model ({who}, fingerprint {made_by}; this model's is "
                               f"{shape.fingerprint}); calibrate with this model, or pass --allow-other-model")


def run(args) -> int:
    from moa_search.calibrate import load_calibration

    lengths = check_arguments(args)
    ds = load_calibration(args.data)   # a wrong folder fails before torch loads

    from moa_search import distributed
    from moa_search.profiler.profile import enable_activation_checkpointing, profile_influence

    started = distributed.init()
    rank, _ = distributed.info()
    log = logging.getLogger("moa_search.profiler")   # ours only: the root logger at INFO would show other
    if not log.handlers:                              # libraries' notes (matplotlib's "generated new fontManager")
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("moa profile: %(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    try:
        from moa_search.models import parse_device_map

        model = load_for_profiling(args.model, args.device, args.dtype, parse_device_map(args.device_map),
                                   getattr(args, "gguf_file", None))
        if not args.allow_other_model:
            check_same_model(args.data, model)
        if args.gradient_checkpointing:
            enable_activation_checkpointing(model)
        out = profile_influence(model, ds, lengths, args.output, block_size=args.block_size,
                                max_samples=args.max_samples, backend=args.backend,
                                checkpoint_every=args.checkpoint_every, min_fill=args.min_fill,
                                restart=args.restart, plots=not args.no_plots)
        if rank == 0:
            print(f"wrote {len(out)} profile(s) in {args.output}: " + ", ".join(p.name for p in out.values()))
    finally:
        distributed.close(started)
    return 0
