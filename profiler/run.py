"""`moa profile`: per-head, per-block attention influence of a model at several lengths."""
from __future__ import annotations

import argparse
import logging
import sys

DESCRIPTION = """\
Measure how much each attention entry matters to the model's own answers (MoA's
influence profile, DESIGN.md section 4): one forward + backward per calibration sample
with frozen weights and full (dense) causal attention, loss on the answer tokens only.
For each length N it writes DIR/influence_N.safetensors, float64 [layers, query heads,
N/B, N/B]: the mean over samples of sum |dS_ij| / (1 - A_ij) over each B x B block, and
DIR/influence_N.png (each head's influence by distance: local vs far-reaching heads).

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


def run(args) -> int:
    from moa_search.calibrate import load_calibration
    from moa_search import distributed
    from moa_search.profiler.profile import ProfileSettings, enable_activation_checkpointing, profile_model
    from moa_search.rules import parse_lengths

    started = distributed.init()
    rank, _ = distributed.info()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="moa profile: %(message)s",
                        stream=sys.stderr)
    try:
        try:
            lengths = parse_lengths(args.lengths)
        except ValueError as e:
            from moa_search.plan import PlanError

            raise PlanError(str(e)) from None
        ds = load_calibration(args.data)
        from moa_search.models import parse_device_map

        model = load_for_profiling(args.model, args.device, args.dtype, parse_device_map(args.device_map),
                                   getattr(args, "gguf_file", None))
        if args.gradient_checkpointing:
            enable_activation_checkpointing(model)
        settings = ProfileSettings(lengths=lengths, block_size=args.block_size, max_samples=args.max_samples,
                                   backend=args.backend, checkpoint_every=args.checkpoint_every,
                                   min_fill=args.min_fill, restart=args.restart, plots=not args.no_plots)
        out = profile_model(model, ds, settings, args.output)
        if rank == 0:
            for n, path in out.items():
                print(f"{n}\t{path}")
    finally:
        distributed.close(started)
    return 0
