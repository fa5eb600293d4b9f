"""Atomic file writes: every output of moa-search (plans, profiles, calibration sets, reports).

A reader never sees half a file and a crash leaves the old one: the content goes to a
temporary file in the same folder, which is then renamed over the target.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Write `path` by calling write(tmp) on a temp file in the same folder, then renaming it.
    The file gets the mode a plain open() would give (mkstemp alone makes it 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())   # after write: some writers (safetensors) recreate the file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    return atomic_write(path, write)


__all__ = ["atomic_write", "atomic_write_text", "current_umask"]
