"""torchrun support for the data-parallel steps (`moa profile`, `moa calibrate`).

Each rank holds the whole model on its own GPU (LOCAL_RANK), takes every world-th piece of
the work, and rank 0 writes the result. Without torchrun (WORLD_SIZE unset or 1) every
function here is the single-process identity, so the steps have one code path.
"""
from __future__ import annotations

import os


def launched() -> bool:
    """Whether this process is one of several that torchrun started."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init() -> bool:
    """Join torchrun's process group (NCCL on GPUs, gloo on the CPU); False when not under torchrun."""
    import torch
    import torch.distributed as dist

    if not launched() or dist.is_initialized():
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend)
    dist.barrier()   # NCCL sets up its communicator on the first collective: here, not in the timed work
    return True


def close(started: bool) -> None:
    if started:
        import torch.distributed as dist

        dist.destroy_process_group()


def info() -> tuple[int, int]:
    """(rank, world_size); (0, 1) without an initialised process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def default_device() -> str:
    """This rank's GPU (cuda:LOCAL_RANK), or the CPU on a machine without CUDA."""
    import torch

    return f"cuda:{local_rank()}" if torch.cuda.is_available() else "cpu"


def gather(obj) -> list:
    """Every rank's `obj` in rank order, on every rank ([obj] in a single process)."""
    import torch.distributed as dist

    _, world = info()
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    import torch.distributed as dist

    if info()[1] > 1:
        dist.barrier()


__all__ = ["launched", "init", "close", "info", "local_rank", "default_device", "gather", "barrier"]
