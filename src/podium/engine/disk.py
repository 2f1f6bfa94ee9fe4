"""Disk guard and checkpoint retention: never fill the disk with checkpoints.

A rented box that runs out of disk is at best a crashed run and at worst a machine its provider
shuts down. Before each checkpoint the trainer asks `make_room`: the free space of the run
folder's filesystem (shutil.disk_usage) must hold the checkpoint's expected size (the previous
file of that name, else the size of the tensors it holds) plus `run.min_free_mb`. The expected
size is needed in full even when last.pt is overwritten, because atomic_save writes the new file
beside the old one before the rename.

Numbered checkpoints (`checkpoints/epoch-0005.pt`, written when trainer.checkpoint_every_n_epochs
> 0) are kept by policy: the `run.keep_last` most recent and the `run.keep_best` best by the
monitored metric; the others are pruned after each new one. On shortage the guard warns and prunes
numbered checkpoints, oldest first, never last.pt or best.pt; if that is still not enough it warns
and the checkpoint is skipped (training goes on, the previous checkpoint stays intact) rather
than a half-written file being left on a full disk.

    podium train experiment=digits trainer.checkpoint_every_n_epochs=1 run.keep_last=2 run.keep_best=1
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch

NUMBERED = re.compile(r"^epoch-(\d+)\.pt$")
OVERHEAD = 64 << 10  # pickle framing and the non-tensor parts of a checkpoint


def numbered_name(epoch: int) -> str:
    return f"epoch-{epoch:04d}.pt"


def numbered_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """[(epoch, path)] of the numbered checkpoints, oldest first."""
    found = []
    for path in Path(ckpt_dir).glob("epoch-*.pt"):
        match = NUMBERED.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def tensor_bytes(obj) -> int:
    """Bytes of the tensors inside nested dicts / lists: a checkpoint's size before it exists."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def expected_size(ckpt_dir: Path, name: str, state: dict) -> int:
    previous = Path(ckpt_dir) / name
    if previous.is_file():
        return previous.stat().st_size
    return tensor_bytes(state) + OVERHEAD


def free_bytes(folder: Path) -> int:
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent  # the checkpoints folder may not exist yet
    return shutil.disk_usage(folder).free


def _remove(path: Path) -> int:
    size = path.stat().st_size if path.is_file() else 0
    path.unlink(missing_ok=True)
    path.with_name(path.name + ".sha256").unlink(missing_ok=True)
    return size


def apply_policy(ckpt_dir: Path, keep_last: int, keep_best: int, scores: dict[int, float],
                 mode: str = "max") -> list[Path]:
    """Prune numbered checkpoints outside the policy; return those removed. keep_last <= 0 with
    keep_best <= 0 keeps all. A checkpoint without a score is kept only by keep_last."""
    found = numbered_checkpoints(ckpt_dir)
    if keep_last <= 0 and keep_best <= 0:
        return []
    keep = {e for e, _ in found[-keep_last:]} if keep_last > 0 else set()
    if keep_best > 0:
        scored = [(scores[e], e) for e, _ in found if e in scores]
        scored.sort(reverse=(mode == "max"))
        keep |= {e for _, e in scored[:keep_best]}
    removed = [path for e, path in found if e not in keep]
    for path in removed:
        _remove(path)
    return removed


def make_room(ckpt_dir: Path, name: str, needed: int, min_free_mb: float, console=None) -> bool:
    """True when `needed` bytes plus the margin fit, after pruning numbered checkpoints (oldest
    first, never `name` itself, last.pt or best.pt) if they did not; False (warned) otherwise."""
    margin = int(min_free_mb * 2**20)
    free = free_bytes(ckpt_dir)
    if free >= needed + margin:
        return True
    say = console.print if console is not None else (lambda *a, **k: None)
    say(f"[yellow]disk guard: {free / 2**20:.0f} MiB free on the run folder's disk, {name} needs about "
        f"{needed / 2**20:.1f} MiB plus run.min_free_mb={min_free_mb:g}; pruning older numbered checkpoints.",
        highlight=False)
    pruned = []
    for _, path in numbered_checkpoints(ckpt_dir):
        if path.name == name:
            continue
        _remove(path)
        pruned.append(path.name)
        free = free_bytes(ckpt_dir)
        if free >= needed + margin:
            break
    if pruned:
        say(f"[yellow]disk guard: pruned {', '.join(pruned)}", highlight=False)
    if free >= needed + margin:
        return True
    say(f"[bold yellow]disk guard: still only {free / 2**20:.0f} MiB free; {name} was NOT written (the previous "
        f"{name if (Path(ckpt_dir) / name).is_file() else 'checkpoints'} stay intact). Free some disk space or "
        "lower run.min_free_mb; training goes on.", highlight=False)
    return False
