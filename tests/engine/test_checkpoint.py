"""Atomic checkpoint saves and safe (weights_only) loads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from podium.engine import checkpoint
from podium.engine.checkpoint import atomic_save, cleanup_temp_files, load_checkpoint
from podium.errors import UserError


def _side_effect(path: str) -> str:
    Path(path).write_text("executed")
    return "payload"


class Malicious:
    """Unpickling this object calls `_side_effect` (if the loader allows arbitrary code)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (_side_effect, (self.marker,))


def sample_state():
    return {
        "model": {"weight": torch.randn(4, 3), "bias": torch.arange(4, dtype=torch.float64)},
        "optimizer": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 0.1, "params": [0]}]},
        "epoch": 2,
        "step": 17,
        "best": None,
        "config": {"name": "digits", "betas": [0.9, 0.999], "nested": {"deep": {"x": (1, 2)}}},
        "flags": [True, False],
        "ints": torch.tensor([1, 2, 3], dtype=torch.int64),
    }


def assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_round_trip_of_tensors_and_nested_dicts(tmp_path):
    state = sample_state()
    path = tmp_path / "checkpoints" / "last.pt"  # parent folder is created
    atomic_save(state, path)
    assert path.is_file()
    assert_same(state, load_checkpoint(path))
    assert temp_files(path.parent) == []


def test_save_overwrites_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    atomic_save({"step": 1}, path)
    atomic_save({"step": 2, "w": torch.ones(2)}, path)
    loaded = load_checkpoint(path)
    assert loaded["step"] == 2 and torch.equal(loaded["w"], torch.ones(2))
    assert temp_files(tmp_path) == []


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_crash_mid_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, error):
    path = tmp_path / "last.pt"
    previous = sample_state()
    atomic_save(previous, path)
    before = path.read_bytes()

    def crashing_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        f.flush()
        raise error

    monkeypatch.setattr(checkpoint.torch, "save", crashing_save)
    with pytest.raises(type(error)):
        atomic_save({"step": 999}, path)
    monkeypatch.undo()

    assert path.read_bytes() == before
    assert_same(previous, load_checkpoint(path))
    assert temp_files(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_crash_on_first_save_leaves_nothing(tmp_path, monkeypatch):
    def crashing_save(obj, f, *args, **kwargs):
        f.write(b"garbage")
        raise OSError("no space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", crashing_save)
    with pytest.raises(OSError):
        atomic_save({"step": 1}, tmp_path / "best.pt")
    assert list(tmp_path.iterdir()) == []


def test_missing_checkpoint_is_a_user_error(tmp_path):
    path = tmp_path / "nope.pt"
    with pytest.raises(UserError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_truncated_checkpoint_is_a_user_error_naming_the_path(tmp_path):
    good = tmp_path / "good.pt"
    atomic_save(sample_state(), good)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError) as info:
        load_checkpoint(truncated)
    assert str(truncated) in str(info.value)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all\n" * 10, os.urandom(2048)])
def test_garbage_file_is_a_user_error_naming_the_path(tmp_path, content):
    path = tmp_path / "garbage.pt"
    path.write_bytes(content)
    with pytest.raises(UserError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_load_does_not_execute_pickled_code(tmp_path):
    marker = tmp_path / "executed.txt"
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.ones(1)}, "payload": Malicious(marker)}, path)

    with pytest.raises(UserError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    assert not marker.exists()

    # Control: a full unpickler would have run the payload, so the check above is meaningful.
    assert torch.load(path, weights_only=False)["payload"] == "payload"
    assert marker.exists()


def test_cleanup_temp_files(tmp_path):
    (tmp_path / ".last.pt.abc123.tmp").write_bytes(b"partial")
    (tmp_path / ".best.pt.xyz.tmp").write_bytes(b"partial")
    (tmp_path / "last.pt").write_bytes(b"keep")
    (tmp_path / "notes.txt").write_text("keep")
    cleanup_temp_files(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "notes.txt"]
    cleanup_temp_files(tmp_path)  # nothing left to remove: no error


def test_temp_file_left_by_a_killed_save_is_cleaned_up(tmp_path, monkeypatch):
    # Simulate SIGKILL: the temp file stays because the `except` cleanup never ran.
    monkeypatch.setattr(checkpoint.os, "unlink", lambda p: None)

    def crashing_save(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise RuntimeError("killed")

    monkeypatch.setattr(checkpoint.torch, "save", crashing_save)
    with pytest.raises(RuntimeError):
        atomic_save({"step": 1}, tmp_path / "last.pt")
    monkeypatch.undo()
    assert len(temp_files(tmp_path)) == 1
    cleanup_temp_files(tmp_path)
    assert list(tmp_path.iterdir()) == []
