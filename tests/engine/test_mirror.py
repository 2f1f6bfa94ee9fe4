"""run.mirror: every file of a run reaches the mirror, committed atomically, from a thread that a
slow or failing mirror cannot stop; resume from the mirror after SIGKILL continues exactly.

    .venv/bin/python -m pytest -q -p no:cacheprovider tests/engine/test_mirror.py
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import pytest
import torch
from fsspec.implementations.memory import MemoryFileSystem
from typer.testing import CliRunner

from podium.cli import app
from podium.engine import checkpoint as ckpt
from podium.engine.mirror import INDEX, MARKER, PART, Mirror, resolve_resume
from tests.conftest import DIGITS_TINY


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def flat(text: str) -> str:
    return " ".join(text.split())


def says(output: str, expected: str) -> bool:
    """`expected` is in the console output, whitespace ignored: rich wraps long paths anywhere."""
    return "".join(expected.split()) in "".join(output.split())


def far_files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


# ---------------------------------------------------------------------- filesystems for the tests
class SpyFileSystem(MemoryFileSystem):
    """An in-memory filesystem that records every write and move (protocol spy://)."""

    protocol = "spy"
    store: dict = {}
    pseudo_dirs = [""]
    log: list = []

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        prefix = f"{cls.protocol}://"
        return super()._strip_protocol(path[len(prefix):] if path.startswith(prefix) else path)

    def open(self, path, mode="rb", **kwargs):
        if "w" in mode:
            self.log.append(("write", self._strip_protocol(path)))
        return super().open(path, mode, **kwargs)

    def pipe_file(self, path, value, **kwargs):
        self.log.append(("write", self._strip_protocol(path)))
        return super().pipe_file(path, value, **kwargs)

    def mv(self, path1, path2, **kwargs):
        self.log.append(("mv", self._strip_protocol(path1), self._strip_protocol(path2)))
        return super().mv(path1, path2, **kwargs)


class BrokenFileSystem(MemoryFileSystem):
    """Every write fails, after a delay (protocol broken://): a dead, slow remote."""

    protocol = "broken"
    store: dict = {}
    pseudo_dirs = [""]
    delay = 0.0

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        prefix = f"{cls.protocol}://"
        return super()._strip_protocol(path[len(prefix):] if path.startswith(prefix) else path)

    def open(self, path, mode="rb", **kwargs):
        if "w" in mode:
            time.sleep(self.delay)
            raise ConnectionError("remote unreachable")
        return super().open(path, mode, **kwargs)

    def pipe_file(self, path, value, **kwargs):
        time.sleep(self.delay)
        raise ConnectionError("remote unreachable")


fsspec.register_implementation("spy", SpyFileSystem, clobber=True)
fsspec.register_implementation("broken", BrokenFileSystem, clobber=True)


def small_run(tmp_path: Path) -> Path:
    """A fake run folder: a checkpoint with its sidecar and two text files."""
    run = tmp_path / "run"
    ckpt.atomic_save({"w": torch.arange(1000.0)}, run / "checkpoints" / "last.pt")
    (run / "config.yaml").write_text("seed: 0\n")
    (run / "plots").mkdir()
    (run / "plots" / "history.png").write_bytes(b"\x89PNG fake")
    return run


# ---------------------------------------------------------------------- the mirror itself
def test_each_file_is_written_to_a_temporary_name_in_its_far_folder_then_moved(tmp_path):
    SpyFileSystem.store.clear()
    SpyFileSystem.log.clear()
    run = small_run(tmp_path)
    mirror = Mirror("spy://backup", run)
    mirror.submit(run / "checkpoints" / "last.pt", run / "config.yaml", run / "plots")
    outcome = mirror.close(timeout_s=30)
    assert outcome["copied"] == 3 and not outcome["failed"] and not outcome["pending"]
    fs = SpyFileSystem()
    moves = {dst: src for kind, *paths in SpyFileSystem.log if kind == "mv" for src, dst in [paths]}
    for rel in ("checkpoints/last.pt", "checkpoints/last.pt.sha256", "config.yaml", "plots/history.png",
                MARKER):
        final = f"/backup/run/{rel}"
        tmp = moves[final]  # committed by a move, from ...
        folder, name = tmp.rsplit("/", 1)
        assert folder == final.rsplit("/", 1)[0] and name.startswith(".") and name.endswith(PART)
        assert ("write", tmp) in SpyFileSystem.log and ("write", final) not in SpyFileSystem.log
        if rel != MARKER:
            assert fs.cat_file(final) == (run / rel).read_bytes()
    assert not [p for p in fs.find("/backup") if p.endswith(PART)]


def test_a_memory_url_mirror_holds_a_checkpoint_whose_sidecar_verifies(tmp_path):
    run = small_run(tmp_path)
    mirror = Mirror("memory://mirror-test", run)
    mirror.submit(run / "checkpoints" / "last.pt")
    ckpt.atomic_save({"w": torch.zeros(10)}, run / "checkpoints" / "last.pt")  # rewritten: copied again
    mirror.submit(run / "checkpoints" / "last.pt")
    assert mirror.close(timeout_s=30)["failed"] == {}
    fs = fsspec.filesystem("memory")
    data = fs.cat_file("/mirror-test/run/checkpoints/last.pt")
    assert data == (run / "checkpoints" / "last.pt").read_bytes()
    sidecar = fs.cat_file("/mirror-test/run/checkpoints/last.pt.sha256").decode()
    assert sidecar == f"{hashlib.sha256(data).hexdigest()}  last.pt\n"


def test_a_slow_dead_mirror_never_blocks_submit_and_the_drain_is_bounded(tmp_path, capsys):
    from rich.console import Console

    BrokenFileSystem.delay = 0.3
    run = small_run(tmp_path)
    mirror = Mirror("broken://far", run, console=Console(stderr=True, width=200))
    start = time.perf_counter()
    for _ in range(20):
        mirror.submit(run / "checkpoints" / "last.pt", run / "config.yaml", run / "plots")
    assert time.perf_counter() - start < 0.2  # the training loop only appends to a queue
    start = time.perf_counter()
    outcome = mirror.close(timeout_s=0.5)
    assert time.perf_counter() - start < 2.0
    assert outcome["failed"] and outcome["copied"] == 0
    err = flat(capsys.readouterr().err)
    assert "mirror: could not copy" in err and "remote unreachable" in err and "training goes on" in err
    assert "0 file copies sent to broken://far/run" in err


def test_a_failing_mirror_does_not_stop_training(tmp_path):
    BrokenFileSystem.delay = 0.0
    run = tmp_path / "run"
    result = invoke("train", *DIGITS_TINY, "trainer.max_steps=2", f"run.dir={run}", "run.mirror=broken://far")
    assert result.exit_code == 0, result.output
    assert (run / "metrics.json").is_file() and (run / "checkpoints" / "last.pt").is_file()
    assert "mirror: could not copy" in flat(result.output) and "failed" in flat(result.output)


def test_an_unknown_protocol_exits_2_naming_run_mirror_before_the_run_folder_is_made(tmp_path):
    run = tmp_path / "run"
    result = invoke("train", *DIGITS_TINY, f"run.dir={run}", "run.mirror=nosuch://bucket/runs")
    assert result.exit_code == 2, result.output
    assert says(result.output, "run.mirror=nosuch://bucket/runs: Protocol not known: nosuch")
    assert not run.exists()


def test_resume_from_something_that_is_not_a_mirror_exits_2(tmp_path):
    (tmp_path / "far" / "a").mkdir(parents=True)
    (tmp_path / "far" / "a" / MARKER).write_text("{}")
    result = invoke("train", "resume=file://" + str(tmp_path / "far"))
    assert result.exit_code == 2, result.output
    assert says(result.output, "is not a podium run mirror") and says(result.output, f"{tmp_path / 'far'}/a")


# ---------------------------------------------------------------------- through `podium train`
@pytest.fixture(scope="module")
def mirrored(tmp_path_factory) -> tuple[Path, Path]:
    """A finished tiny run mirrored to a file:// URL, with numbered checkpoints."""
    root = tmp_path_factory.mktemp("mirrored")
    run = root / "runs" / "m"
    result = invoke("train", *DIGITS_TINY, f"run.dir={run}", f"run.mirror=file://{root / 'far'}",
                    "trainer.checkpoint_every_n_epochs=1")
    assert result.exit_code == 0, result.output
    assert says(result.output, f"mirror: file://{root / 'far'}/m is up to date")
    return run, root / "far" / "m"


def test_every_kind_of_run_file_reaches_the_mirror_and_no_temporary_name_remains(mirrored):
    run, far = mirrored
    files = far_files(far)
    for rel in ("config.yaml", "environment.json", "run.json", "history.csv", "metrics.json",
                "checkpoints/last.pt", "checkpoints/last.pt.sha256", "checkpoints/best.pt",
                "checkpoints/epoch-0001.pt", "plots/history.png", "predictions/val/manifest.json", MARKER):
        assert rel in files, rel
    assert not [f for f in files if f.endswith((PART, ".tmp"))]
    for rel in files - {MARKER}:
        assert (far / rel).read_bytes() == (run / rel).read_bytes(), rel
    assert ckpt.verify(far / "checkpoints" / "last.pt") and ckpt.verify(far / "checkpoints" / "best.pt")


def test_a_deleted_run_folder_is_fetched_back_from_the_mirror_recorded_beside_it(mirrored, tmp_path):
    run, far = mirrored
    copy_root = tmp_path / "runs"
    shutil.copytree(far, tmp_path / "far" / "m")
    copy_root.mkdir()
    (copy_root / INDEX).write_text(f'{{"m": "{tmp_path / "far" / "m"}"}}')
    fetched = resolve_resume(str(copy_root / "m"))
    assert fetched == copy_root / "m"
    assert far_files(fetched) == far_files(far) - {MARKER}
    assert (fetched / "checkpoints" / "last.pt").read_bytes() == (run / "checkpoints" / "last.pt").read_bytes()
    assert not list(tmp_path.glob("runs/.*fetching"))
    # the run recorded its own mirror the same way, beside its folder
    assert json.loads((run.parent / INDEX).read_text()) == {"m": f"file://{far}"}


def state_dicts_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_from_the_mirror_after_sigkill_equals_an_uninterrupted_run(tmp_path):
    epochs = 6  # the first last.pt (epoch 1) is mirrored long before the run ends, even on a loaded machine
    args = [*DIGITS_TINY, f"trainer.max_epochs={epochs}"]
    reference = tmp_path / "reference"
    result = invoke("train", *args, f"run.dir={reference}")
    assert result.exit_code == 0, result.output

    local, far_root = tmp_path / "runs" / "killed", tmp_path / "far"
    far = far_root / "killed"
    log = tmp_path / "killed.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "podium", "train", *args, f"run.dir={local}",
                             f"run.mirror={far_root}"], stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 120
        while not (far / "checkpoints" / "last.pt").is_file():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)
        assert proc.poll() is None, "the run finished before it could be killed:\n" + log.read_text()
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    shutil.rmtree(local)

    result = invoke("train", f"resume={far}")
    assert result.exit_code == 0, result.output
    assert says(result.output, f"into {local}")
    resumed = torch.load(local / "checkpoints" / "last.pt", weights_only=True)
    expected = torch.load(reference / "checkpoints" / "last.pt", weights_only=True)
    assert resumed["state"]["step"] == expected["state"]["step"] and resumed["state"]["epoch"] == epochs
    assert state_dicts_equal(resumed["model"], expected["model"])
    assert "resumed from" in result.output and f"at epoch {epochs}," not in result.output  # mid-run


def test_checkpoints_pruned_by_the_policy_are_removed_from_the_mirror_too(tmp_path):
    run = small_run(tmp_path)
    numbered = run / "checkpoints" / "epoch-0001.pt"
    ckpt.atomic_save({"w": torch.ones(3)}, numbered)
    mirror = Mirror("memory://forget-test", run)
    mirror.submit(numbered, run / "config.yaml")
    mirror.forget(numbered)
    assert mirror.close(timeout_s=30)["failed"] == {}
    fs = fsspec.filesystem("memory")
    assert fs.exists("/forget-test/run/config.yaml")
    assert not fs.exists("/forget-test/run/checkpoints/epoch-0001.pt")
    assert not fs.exists("/forget-test/run/checkpoints/epoch-0001.pt.sha256")
