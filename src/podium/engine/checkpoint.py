"""Atomic checkpoint save, content-hash verification and safe load.

A save writes a temporary file in the same folder, fsyncs it, renames it over the target and
fsyncs the folder: a crash (even SIGKILL or power loss) at any moment leaves either the old or
the new checkpoint, never a torn one. Loading uses `torch.load(weights_only=True)`, so a
checkpoint cannot execute code; everything we store is tensors and plain containers.

Each checkpoint has a sidecar `NAME.pt.sha256` (the `sha256sum` format) with the SHA-256 of
its bytes, checked on every load: a flipped bit in a weight still unpickles cleanly, and only
the hash tells. The checkpoint and its sidecar cannot be renamed in one step, so during a save
the sidecar lists both the new and the previous hash; a crash between the two renames leaves
a sidecar that accepts whichever checkpoint survived. A checkpoint without a sidecar (an older
run, a file from elsewhere) loads unverified.

    sha256sum -c runs/x/checkpoints/last.pt.sha256   # the same check from a shell

Contents (see `Trainer._checkpoint_state`): model, optimizer, scheduler, precision (grad
scaler), EMA, auxiliary modules, epoch/step/position in the epoch, RNG states, best metric,
early-stopping counter and the resolved config.
"""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from pathlib import Path

import torch

from podium.errors import UserError

HASH_SUFFIX = ".sha256"
# Failures of the disk rather than of podium: the user frees space or fixes permissions.
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def hash_path(path: Path) -> Path:
    return Path(path).with_name(Path(path).name + HASH_SUFFIX)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _known_hashes(path: Path) -> list[str]:
    sidecar = hash_path(path)
    if not sidecar.is_file():
        return []
    return [line.split()[0] for line in sidecar.read_text().splitlines() if line.strip()]


def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _fsync_dir(folder: Path) -> None:
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def disk_error(err: OSError, path: Path, what: str) -> UserError | None:
    """A UserError for a full, read-only or forbidden disk; None for other OS errors."""
    if err.errno not in DISK_ERRNOS:
        return None
    reason = os.strerror(err.errno) if err.errno else str(err)
    hint = {errno.ENOSPC: "free some space", errno.EDQUOT: "free some space (quota)"}.get(
        err.errno, "make the folder writable or choose another run.root / run.dir")
    return UserError(f"cannot write {what} {path}: {reason}. Nothing already saved was changed; "
                     f"{hint} and continue with `podium train resume={path.parent.parent}`."
                     if what == "checkpoint" else f"cannot write {what} {path}: {reason}; {hint}.")


def atomic_save(obj, path: Path) -> None:
    """Save `obj` to `path` atomically with its content hash. A full or read-only disk raises
    UserError; the previous checkpoint and its hash are left as they were."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise (disk_error(err, path, "checkpoint") or err) from None
    sidecar = hash_path(path)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        new = file_sha256(Path(tmp))
        old = file_sha256(path) if path.is_file() else None
        lines = [f"{new}  {path.name}"] + ([f"{old}  {path.name}"] if old and old != new else [])
        _write_text_atomic(sidecar, "\n".join(lines) + "\n")  # accepts the old and the new file
        os.replace(tmp, path)
        _write_text_atomic(sidecar, lines[0] + "\n")  # now only the new one
        _fsync_dir(path.parent)
    except OSError as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise (disk_error(err, path, "checkpoint") or err) from None
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def verify(path: Path) -> bool:
    """True when `path` matches its sidecar hash, or has none (unverifiable, loaded as is)."""
    known = _known_hashes(path)
    return not known or file_sha256(path) in known


def other_checkpoint(path: Path) -> str:
    """The other of best/last, for messages that offer a fallback."""
    return {"best.pt": "last", "last.pt": "best"}.get(Path(path).name, "best")


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist.")
    if not verify(path):
        raise UserError(
            f"checkpoint {path} is corrupt: its SHA-256 does not match {hash_path(path).name}, "
            f"written when it was saved (the file changed on disk since). It was not loaded. "
            f"Use the other checkpoint if you accept its weights (--checkpoint {other_checkpoint(path)}, "
            f"or resume_checkpoint={other_checkpoint(path)} with `podium train resume=...`).")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # a truncated or foreign file
        raise UserError(f"checkpoint {path} cannot be loaded ({type(err).__name__}: {err}).") from err


def describe_origin(data: dict) -> str:
    """'task=X model=Y' from the config stored in a checkpoint, for mismatch messages."""
    cfg = data.get("config") if isinstance(data, dict) else None
    if not isinstance(cfg, dict):
        return "an unknown run"
    task = (cfg.get("task") or {}).get("name", "?")
    model = (cfg.get("model") or {}).get("name", "?")
    return f"task={task} model={model}"


def load_model_state(module: torch.nn.Module, state: dict, path: Path, data: dict | None = None,
                     expected: str = "") -> None:
    """`module.load_state_dict(state)`, with a mismatch (a checkpoint of another task or
    model) turned into a UserError naming the file and both origins."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError, AttributeError) as err:
        first = str(err).strip().splitlines()
        detail = "; ".join(line.strip() for line in first[:3])
        raise UserError(
            f"checkpoint {path} does not fit this run's model{f' ({expected})' if expected else ''}: it was "
            f"saved by {describe_origin(data or {})}. {detail[:400]}") from None


def cleanup_temp_files(folder: Path) -> None:
    """Remove temporary files a killed save left behind."""
    for tmp in Path(folder).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
