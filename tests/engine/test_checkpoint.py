"""Atomic checkpoint saves and safe (weights_only) loads."""

from __future__ import annotations

import errno
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
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "last.pt.sha256"]


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


# ---- content hash ---------------------------------------------------------------------------


def flip_a_byte(path: Path, offset_from_end: int = 2000) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) - offset_from_end] ^= 0x40
    path.write_bytes(bytes(data))


def test_a_flipped_byte_is_refused_naming_the_file_and_the_other_checkpoint(tmp_path):
    path = tmp_path / "best.pt"
    atomic_save({"w": torch.arange(4096, dtype=torch.float32)}, path)
    assert (tmp_path / "best.pt.sha256").read_text().split()[1] == "best.pt"  # sha256sum format
    flip_a_byte(path)
    torch.load(path, weights_only=True)  # still unpickles: only the hash can tell
    with pytest.raises(UserError, match=r"best\.pt is corrupt.*--checkpoint last"):
        load_checkpoint(path)


def test_a_checkpoint_without_a_hash_loads_unverified(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"step": 3}, path)
    assert load_checkpoint(path)["step"] == 3


def test_a_crash_between_the_two_renames_leaves_a_loadable_checkpoint(tmp_path, monkeypatch):
    """The sidecar lists the old and the new hash while the checkpoint is renamed."""
    path = tmp_path / "last.pt"
    atomic_save({"step": 1}, path)
    real = checkpoint._write_text_atomic
    calls = []

    def second_write_dies(target, text):
        calls.append(text)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed after the checkpoint was renamed
        real(target, text)

    monkeypatch.setattr(checkpoint, "_write_text_atomic", second_write_dies)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"step": 2}, path)
    monkeypatch.undo()
    assert len((tmp_path / "last.pt.sha256").read_text().splitlines()) == 2
    assert load_checkpoint(path)["step"] == 2


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_a_full_or_read_only_disk_is_a_user_error_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, code):
    path = tmp_path / "checkpoints" / "last.pt"
    atomic_save({"step": 1}, path)

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"PK partial")
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    with pytest.raises(UserError, match=rf"{path}.*{os.strerror(code)}"):
        atomic_save({"step": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert temp_files(path.parent) == []


def test_a_checkpoint_of_another_model_is_a_user_error_naming_both(tmp_path):
    path = tmp_path / "best.pt"
    atomic_save({"model": {"weight": torch.ones(3, 3)}, "config": {"task": {"name": "landmarks"},
                                                                  "model": {"name": "hrnet"}}}, path)
    data = load_checkpoint(path)
    with pytest.raises(UserError, match=r"best\.pt does not fit this run's model \(task=classification.*"
                                        r"saved by task=landmarks model=hrnet"):
        checkpoint.load_model_state(torch.nn.Linear(2, 2), data["model"], path, data,
                                    "task=classification model=small_cnn")
