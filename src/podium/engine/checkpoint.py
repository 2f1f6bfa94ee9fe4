"""Atomic checkpoint save and safe load.

A save writes a temporary file in the same folder, fsyncs it, renames it over the target and
fsyncs the folder: a crash (even SIGKILL or power loss) at any moment leaves either the old or
the new checkpoint, never a torn one. Loading uses `torch.load(weights_only=True)`, so a
checkpoint cannot execute code; everything we store is tensors and plain containers.

Contents (see `Trainer._checkpoint_state`): model, optimizer, scheduler, precision (grad
scaler), EMA, auxiliary modules, epoch/step/position in the epoch, RNG states, best metric,
early-stopping counter and the resolved config.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from podium.errors import UserError


def atomic_save(obj, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist.")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # a truncated or foreign file
        raise UserError(f"checkpoint {path} cannot be loaded ({type(err).__name__}: {err}).") from err


def cleanup_temp_files(folder: Path) -> None:
    """Remove temporary files a killed save left behind."""
    for tmp in Path(folder).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
