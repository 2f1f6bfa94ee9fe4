"""Resume through the CLI: which overrides a resume honours, which it refuses (exit 2, nothing
written), extending a finished run, damaged and foreign checkpoints, and `podium eval` writing
beside, never over, the training-time predictions."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from podium.cli import app
from podium.engine import session
from podium.errors import UserError

TINY = ["experiment=digits", "data.image_size=16", "model.width=8", "model.blocks=2", "trainer.max_epochs=1",
        "trainer.num_workers=0", "trainer.progress_bar=false", "data.augment=[]"]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def flat(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def tracked(tmp_path_factory) -> Path:
    """A finished run logged to MLflow (the embedded SQLite store)."""
    root = tmp_path_factory.mktemp("tracked")
    result = invoke("train", *TINY, f"run.root={root}", "run.name=run")
    assert result.exit_code == 0, result.output
    return root / "run"


@pytest.fixture(scope="module")
def finished(digits_run) -> Path:
    return digits_run  # tests/conftest.py: TINY with tracking=none, trained once per worker; tests use `copy`


@pytest.fixture
def copy(finished, tmp_path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(finished, target)
    return target


def snapshot(run: Path) -> dict:
    return {name: (run / name).read_bytes() for name in ("config.yaml", "environment.json", "metrics.json")}


def mlflow_status(run: Path) -> str:
    from mlflow import MlflowClient

    state = json.loads((run / "tracking.json").read_text())
    return MlflowClient(tracking_uri=state["tracking_uri"]).get_run(state["run_id"]).info.status


@pytest.mark.parametrize("override", ["optim.lr=1e9", "model.width=16", "seed=3"])
def test_a_setting_the_saved_state_would_ignore_is_refused_and_nothing_is_written(tracked, override):
    before = snapshot(tracked)
    result = invoke("train", f"resume={tracked}", override)
    assert result.exit_code == 2, result.output
    assert f"cannot change on resume of {tracked}: {override.split('=')[0]}" in flat(result.output)
    assert snapshot(tracked) == before
    assert mlflow_status(tracked) == "FINISHED"


def test_a_failed_resume_keeps_the_files_and_the_mlflow_status_of_a_finished_run(tracked):
    last = tracked / "checkpoints" / "last.pt"
    good = last.read_bytes()
    before = snapshot(tracked)
    flip_a_byte(last)
    try:
        result = invoke("train", f"resume={tracked}", "trainer.max_epochs=2")
    finally:
        last.write_bytes(good)
    assert result.exit_code == 2, result.output
    assert snapshot(tracked) == before
    assert mlflow_status(tracked) == "FINISHED"


def test_raising_max_epochs_trains_on_and_config_tells_the_truth(copy):
    env_before = json.loads((copy / "environment.json").read_text())
    result = invoke("train", f"resume={copy}", "trainer.max_epochs=2")
    assert result.exit_code == 0, result.output
    assert "resume: trainer.max_epochs 1 -> 2" in result.output
    history = (copy / "history.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in history[1:]] == ["1", "2"]
    assert "max_epochs: 2" in (copy / "config.yaml").read_text()
    env = json.loads((copy / "environment.json").read_text())
    assert env["argv"] == env_before["argv"] and env["resumes"][0]["resumed_at_step"] > 0


def test_a_limit_below_the_progress_made_is_refused(copy):
    result = invoke("train", f"resume={copy}", "trainer.max_steps=2")
    assert result.exit_code == 2 and "already done" in flat(result.output)


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x20
    path.write_bytes(bytes(data))


def test_a_damaged_last_checkpoint_is_refused_and_best_is_used_only_when_asked(copy):
    flip_a_byte(copy / "checkpoints" / "last.pt")
    before = snapshot(copy)
    result = invoke("train", f"resume={copy}", "trainer.max_epochs=2")
    assert result.exit_code == 2, result.output
    assert f"{copy / 'checkpoints' / 'last.pt'} is corrupt" in flat(result.output)
    assert "resume_checkpoint=best" in flat(result.output)
    assert snapshot(copy) == before
    result = invoke("train", f"resume={copy}", "trainer.max_epochs=2", "resume_checkpoint=best")
    assert result.exit_code == 0, result.output


def test_eval_of_a_damaged_checkpoint_names_it(copy):
    flip_a_byte(copy / "checkpoints" / "best.pt")
    result = invoke("eval", copy, "--split", "val")
    assert result.exit_code == 2 and "best.pt is corrupt" in flat(result.output)
    assert "--checkpoint last" in flat(result.output)


def test_a_checkpoint_of_another_model_exits_2(copy, tmp_path):
    other = tmp_path / "other"
    result = invoke("train", *TINY, "tracking=none", "model.width=4", "trainer.max_steps=1", f"run.dir={other}")
    assert result.exit_code == 0, result.output
    result = invoke("eval", copy, "--checkpoint", other / "checkpoints" / "best.pt", "--split", "val")
    assert result.exit_code == 2, result.output
    assert "does not fit this run's model" in flat(result.output)


def test_eval_writes_its_own_folder_and_leaves_training_predictions_alone(copy):
    predictions = {p: p.read_bytes() for p in (copy / "predictions").rglob("*") if p.is_file()}
    plots = {p: p.stat().st_mtime_ns for p in (copy / "plots").rglob("*.png")}
    result = invoke("eval", copy, "--checkpoint", "last", "--split", "test", "data.corruption_severity=0.5")
    assert result.exit_code == 0, result.output
    assert {p: p.read_bytes() for p in predictions} == predictions
    assert {p: p.stat().st_mtime_ns for p in plots} == plots
    (folder,) = (copy / "eval").iterdir()
    assert folder.name.startswith("last-")
    assert (folder / "metrics.json").is_file() and any((folder / "predictions").iterdir())
    assert json.loads((folder / "eval.json").read_text())["overrides"] == ["data.corruption_severity=0.5"]


def test_a_deleted_best_checkpoint_is_not_reported_as_best(copy):
    (copy / "checkpoints" / "best.pt").unlink()
    result = invoke("train", f"resume={copy}")
    assert result.exit_code == 0, result.output
    text = flat(result.output)
    assert "final metrics (last weights: no best.pt)" in text and "(best checkpoint)" not in text
    result = invoke("eval", copy)
    assert result.exit_code == 2 and "best.pt does not exist" in flat(result.output)


def test_run_dir_pointing_at_a_file_exits_2(tmp_path):
    target = tmp_path / "a_file"
    target.write_text("mine")
    result = invoke("train", *TINY, "tracking=none", f"run.dir={target}")
    assert result.exit_code == 2 and "is a file" in flat(result.output)
    assert target.read_text() == "mine"


def test_a_read_only_run_folder_is_a_user_error(tmp_path, monkeypatch):
    def refuse(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(UserError, match="Read-only file system"):
        session._writable_run_dir(tmp_path / "run")


def test_a_full_disk_anywhere_in_a_command_exits_2_naming_the_file(copy, monkeypatch):
    """history.csv, metrics.json and plots are written outside the checkpoint code: the CLI
    maps a full disk there to exit 2 too."""
    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(session, "write_json", full)
    result = invoke("eval", copy, "--split", "val")
    assert result.exit_code == 2, result.output
    assert "No space left on device" in flat(result.output)
    assert f"cannot write {copy / 'eval' / 'best' / 'eval.json'}" in flat(result.output)


def test_tracking_credentials_never_reach_the_run_folder(tmp_path, monkeypatch):
    import os
    import socket

    with socket.socket() as s:  # a port nobody listens on: tracking is disabled after the check
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(name, "placeholder")  # restored after the test
    uri = f"http://alice:s3cret@127.0.0.1:{port}"
    result = invoke("train", *TINY, "trainer.max_steps=1", f"tracking.uri={uri}", "tracking.timeout_s=0.2",
                    f"run.dir={tmp_path / 'run'}")
    assert result.exit_code == 0, result.output
    for path in (tmp_path / "run").rglob("*"):
        if path.is_file() and path.suffix in (".yaml", ".json", ".csv"):
            assert "s3cret" not in path.read_text(), path
    assert f"uri: http://127.0.0.1:{port}" in (tmp_path / "run" / "config.yaml").read_text()
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "s3cret"
    # a resume may give the URI with its credentials again: it is the same URI
    result = invoke("train", f"resume={tmp_path / 'run'}", f"tracking.uri={uri}")
    assert result.exit_code == 0, result.output
