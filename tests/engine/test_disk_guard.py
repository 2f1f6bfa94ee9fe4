"""The disk guard and checkpoint retention (podium.engine.disk): numbered checkpoints kept by
run.keep_last / run.keep_best; on a full disk the run warns, prunes numbered checkpoints (never
last.pt or best.pt) and skips a checkpoint it cannot fit instead of crashing.

    .venv/bin/python -m pytest -q -p no:cacheprovider tests/engine/test_disk_guard.py
"""

from __future__ import annotations

import csv
from collections import namedtuple
from pathlib import Path

import torch
from rich.console import Console
from typer.testing import CliRunner

from podium.cli import app
from podium.engine import checkpoint as ckpt
from podium.engine import disk
from tests.conftest import DIGITS_TINY

Usage = namedtuple("Usage", "total used free")
MiB = 2**20


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def flat(text: str) -> str:
    return " ".join(text.split())


def fake_disk(monkeypatch, free_of):
    """shutil.disk_usage as the guard sees it: free bytes from `free_of()`."""
    monkeypatch.setattr(disk.shutil, "disk_usage", lambda path: Usage(10**12, 0, free_of()))


def checkpoints(folder: Path, epochs, size: int = MiB) -> None:
    for e in epochs:
        ckpt.atomic_save({"w": torch.zeros(size // 4)}, folder / disk.numbered_name(e))
    for name in ("last.pt", "best.pt"):
        ckpt.atomic_save({"w": torch.zeros(size // 4)}, folder / name)


def names(folder: Path) -> set[str]:
    return {p.name for p in folder.glob("*.pt")}


def test_the_policy_keeps_the_last_n_and_the_best_n(tmp_path):
    checkpoints(tmp_path, range(1, 7), size=1024)
    scores = {1: 0.5, 2: 0.9, 3: 0.7, 4: 0.6, 5: 0.4, 6: 0.3}
    removed = disk.apply_policy(tmp_path, keep_last=2, keep_best=1, scores=scores, mode="max")
    assert names(tmp_path) == {"epoch-0002.pt", "epoch-0005.pt", "epoch-0006.pt", "last.pt", "best.pt"}
    assert sorted(p.name for p in removed) == ["epoch-0001.pt", "epoch-0003.pt", "epoch-0004.pt"]
    assert not (tmp_path / "epoch-0001.pt.sha256").exists()  # the sidecar goes with its checkpoint
    disk.apply_policy(tmp_path, keep_last=0, keep_best=1, scores=scores, mode="min")
    assert names(tmp_path) == {"epoch-0006.pt", "last.pt", "best.pt"}


def test_enough_space_touches_nothing(tmp_path, monkeypatch):
    checkpoints(tmp_path, [1, 2])
    fake_disk(monkeypatch, lambda: 10 * MiB)
    assert disk.make_room(tmp_path, "last.pt", MiB, min_free_mb=5)
    assert names(tmp_path) == {"epoch-0001.pt", "epoch-0002.pt", "last.pt", "best.pt"}


def test_a_shortage_prunes_the_oldest_numbered_checkpoints_and_warns(tmp_path, monkeypatch, capsys):
    checkpoints(tmp_path, [1, 2, 3])
    # free space grows as files go, as on a real disk: 1 MiB now, + each pruned file's size
    start = sum(p.stat().st_size for p in tmp_path.glob("*.pt"))
    fake_disk(monkeypatch, lambda: MiB + start - sum(p.stat().st_size for p in tmp_path.glob("*.pt")))
    console = Console(stderr=True, width=300)
    assert disk.make_room(tmp_path, "last.pt", MiB, min_free_mb=0.9, console=console)
    assert names(tmp_path) == {"epoch-0002.pt", "epoch-0003.pt", "last.pt", "best.pt"}  # one was enough
    err = flat(capsys.readouterr().err)
    assert "disk guard:" in err and "pruning older numbered checkpoints" in err and "pruned epoch-0001.pt" in err


def test_when_pruning_is_not_enough_the_checkpoint_is_skipped_and_last_and_best_stay(tmp_path, monkeypatch, capsys):
    checkpoints(tmp_path, [1, 2])
    fake_disk(monkeypatch, lambda: 0)
    assert not disk.make_room(tmp_path, "last.pt", MiB, min_free_mb=1, console=Console(stderr=True, width=300))
    assert names(tmp_path) == {"last.pt", "best.pt"}
    assert "last.pt was NOT written" in flat(capsys.readouterr().err)


def test_the_expected_size_is_the_previous_file_else_the_tensors(tmp_path):
    state = {"model": {"w": torch.zeros(1000)}, "optimizer": {"state": {0: {"m": torch.zeros(1000)}}}}
    assert disk.expected_size(tmp_path, "last.pt", state) == 8000 + disk.OVERHEAD
    ckpt.atomic_save(state, tmp_path / "last.pt")
    assert disk.expected_size(tmp_path, "last.pt", state) == (tmp_path / "last.pt").stat().st_size


def test_a_run_keeps_numbered_checkpoints_by_policy(tmp_path):
    run = tmp_path / "run"
    result = invoke("train", *DIGITS_TINY, "trainer.max_epochs=3", "trainer.checkpoint_every_n_epochs=1",
                    "run.keep_last=1", "run.keep_best=1", f"run.dir={run}")
    assert result.exit_code == 0, result.output
    with (run / "history.csv").open() as f:
        rows = list(csv.DictReader(f))
    best_epoch = int(max(rows, key=lambda r: float(r["val/macro_f1"]))["epoch"])
    kept = {disk.numbered_name(3), disk.numbered_name(best_epoch)}
    assert names(run / "checkpoints") == kept | {"last.pt", "best.pt"}
    for name in kept:
        assert ckpt.verify(run / "checkpoints" / name)


def test_a_full_disk_during_training_warns_and_skips_checkpoints_without_crashing(tmp_path, monkeypatch):
    fake_disk(monkeypatch, lambda: 10 * MiB)
    run = tmp_path / "run"
    result = invoke("train", *DIGITS_TINY, "trainer.max_steps=2", "run.min_free_mb=100", f"run.dir={run}")
    assert result.exit_code == 0, result.output
    assert "best.pt was NOT written" in flat(result.output) and "last.pt was NOT written" in flat(result.output)
    assert not list((run / "checkpoints").iterdir())  # no checkpoint and no half-written temporary
    assert (run / "metrics.json").is_file()
    assert "last weights, not the best checkpoint" in flat(result.output)
