"""End-to-end runs of the CLI on tiny CPU configs: train / eval / predict / runs, DDP with two
processes, SIGKILL in the middle of an epoch then resume, Ctrl-C, bad input, MLflow tracking."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from podium.cli import app

TINY = ["experiment=digits", "data.image_size=16", "model.width=8", "model.blocks=2", "trainer.max_epochs=1",
        "trainer.num_workers=0", "tracking=none", "trainer.progress_bar=false", "data.augment=[]"]


def podium(*args, timeout=300, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "podium", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, **kwargs)


def model_weights(run_dir: Path, name="last.pt") -> dict:
    return torch.load(run_dir / "checkpoints" / name, map_location="cpu", weights_only=True)["model"]


def write_png(path: Path, value: int, size=12, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((size, size, 3), value, np.uint8)
    arr[: size // 2, : size // 2] = 255 - value
    Image.fromarray(arr).convert(mode).save(path)


def test_train_eval_predict_runs(tmp_path, digits_run, digits_train_output):
    runner = CliRunner()
    # the TINY run of tests/conftest.py (trained once per worker), copied: eval writes into it
    run_dir = shutil.copytree(digits_run, tmp_path / "run")
    for name in ("config.yaml", "environment.json", "metrics.json", "history.csv", "checkpoints/last.pt",
                 "checkpoints/best.pt", "plots/history.png", "plots/confusion_test_corrupted.png",
                 "plots/misclassified_test.png", "predictions/test.csv"):
        assert (run_dir / name).is_file(), name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {"val/macro_f1", "test/macro_f1", "test_corrupted/macro_f1", "test/accuracy"} <= set(metrics)
    env = json.loads((run_dir / "environment.json").read_text())
    assert {"git", "packages", "torch_build", "devices"} <= set(env)
    assert "test_corrupted" in digits_train_output and "macro_f1" in digits_train_output

    result = runner.invoke(app, ["eval", str(run_dir), "--split", "test"])
    assert result.exit_code == 0, result.output
    evaluated = json.loads((run_dir / "eval" / "best" / "metrics.json").read_text())
    assert evaluated["test/macro_f1"] == pytest.approx(metrics["test/macro_f1"])

    images = tmp_path / "images"
    write_png(images / "a.png", 30)
    write_png(images / "b.png", 200)
    out = tmp_path / "pred.csv"
    result = runner.invoke(app, ["predict", str(run_dir), str(images), "--out", str(out)])
    assert result.exit_code == 0, result.output
    lines = out.read_text().splitlines()
    assert lines[0].startswith("id,label,prob_0") and len(lines) == 3
    probs = [float(x) for x in lines[1].split(",")[2:]]
    assert sum(probs) == pytest.approx(1.0, abs=1e-4)

    result = runner.invoke(app, ["runs", "--root", str(tmp_path), "--json"])
    assert result.exit_code == 0
    listed = json.loads(result.output)
    assert listed[0]["status"] == "finished" and "test/macro_f1" in listed[0]["metrics"]

    result = runner.invoke(app, ["list", "models"])
    assert "small_cnn" in result.output and "timm" in result.output


def test_mlflow_tracking_records_the_run(tmp_path):
    from mlflow import MlflowClient

    runner = CliRunner()
    args = [a for a in TINY if a != "tracking=none"] + [f"run.root={tmp_path}", "run.name=tracked"]
    result = runner.invoke(app, ["train", *args])
    assert result.exit_code == 0, result.output
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("digits")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert "test_corrupted/macro_f1" in run.data.metrics
    assert run.data.params["optim.name"] == "adamw"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "plots"} <= artifacts


@pytest.mark.slow
def test_ddp_two_processes_equals_one_process_with_the_global_batch(tmp_path):
    """Two gloo processes with batch 16 each see the same samples per step as one process with
    batch 32 (the sampler shards each epoch's order by rank), so without batch statistics or
    dropout the weights must agree."""
    common = TINY + ["model.norm=none", "model.drop_rate=0", "trainer.max_steps=6", "trainer.accelerator=cpu"]
    single = podium("train", *common, "trainer.batch_size=32", f"run.dir={tmp_path / 'single'}")
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = podium("train", *common, "trainer.batch_size=16", "trainer.devices=2", f"run.dir={tmp_path / 'ddp'}")
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a, b = model_weights(tmp_path / "single"), model_weights(tmp_path / "ddp")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)
    # validation gathered every sample from both ranks exactly once
    m_single = json.loads((tmp_path / "single/metrics.json").read_text())
    m_ddp = json.loads((tmp_path / "ddp/metrics.json").read_text())
    assert m_ddp["val/accuracy"] == pytest.approx(m_single["val/accuracy"], abs=1e-6)
    # rank 0 alone wrote the run folder: one config, one history
    assert len(list(tmp_path.glob("*/config.yaml"))) == 2


def _wait_for_checkpoint(path: Path, proc, condition, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"training ended before the condition: {proc.stderr.read()[-2000:]}")
        if path.is_file():
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)["state"]
            except Exception:
                state = None
            if state and condition(state):
                return state
        time.sleep(0.02)
    pytest.fail("no checkpoint met the condition in time")


KILL_RUN = ["experiment=digits", "data.image_size=16", "model.width=16", "trainer.max_epochs=2",
            "trainer.batch_size=16", "trainer.num_workers=1", "tracking=none", "trainer.progress_bar=false",
            "trainer.checkpoint_every_n_steps=5"]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_gives_the_same_weights(tmp_path):
    full = podium("train", *KILL_RUN, f"run.dir={tmp_path / 'full'}")
    assert full.returncode == 0, full.stderr[-3000:]

    cut_dir = tmp_path / "cut"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "podium", "train", *KILL_RUN, f"run.dir={cut_dir}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        # kill once a mid-epoch checkpoint of the second epoch exists: the process is then
        # somewhere between two checkpoints, in the middle of an epoch
        state = _wait_for_checkpoint(cut_dir / "checkpoints/last.pt", proc,
                                     lambda s: s["epoch"] == 1 and s["batch_in_epoch"] >= 10)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not (cut_dir / "metrics.json").exists()
    assert state["batch_in_epoch"] > 0

    resumed = podium("train", f"resume={cut_dir}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    a, b = model_weights(tmp_path / "full"), model_weights(cut_dir)
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    full_metrics = json.loads((tmp_path / "full/metrics.json").read_text())
    cut_metrics = json.loads((cut_dir / "metrics.json").read_text())
    assert cut_metrics == full_metrics


@pytest.mark.slow
def test_ctrl_c_saves_a_resumable_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    # many epochs: on a loaded machine the signal must still find the run in training. The child
    # gets SIGINT's default disposition, as in a terminal: a test process that ignores SIGINT
    # (some launchers set SIG_IGN, and children inherit it) would otherwise pass that on.
    proc = subprocess.Popen([sys.executable, "-m", "podium", "train", *KILL_RUN, "trainer.max_epochs=50",
                             f"run.dir={run_dir}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    _wait_for_checkpoint(run_dir / "checkpoints/last.pt", proc, lambda s: s["step"] >= 5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "resumable checkpoint saved" in out + err
    state = torch.load(run_dir / "checkpoints/last.pt", map_location="cpu", weights_only=True)["state"]
    assert state["step"] >= 5 and not state["finished"]


# ---- bad input ---------------------------------------------------------------------------------


def _folder_dataset(root: Path, corrupt: bool = False):
    for split in ("train", "val"):
        for cls, value in (("cat", 40), ("dog", 220)):
            for i in range(4):
                write_png(root / split / cls / f"{i}.png", value + i)
    if corrupt:
        (root / "train" / "dog" / "broken.png").write_bytes(b"this is not an image")


FOLDER = ["data=image_folder", "data.image_size=12", "model.width=4", "model.blocks=1", "trainer.max_epochs=1",
          "trainer.batch_size=4", "tracking=none", "trainer.progress_bar=false"]


def test_corrupt_image_names_the_file_and_exits_2(tmp_path):
    _folder_dataset(tmp_path / "data", corrupt=True)
    result = podium("train", *FOLDER, f"data.root={tmp_path / 'data'}", f"run.dir={tmp_path / 'run'}")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "broken.png" in result.stderr and "Traceback" not in result.stderr


def test_corrupt_image_is_skipped_and_counted(tmp_path):
    _folder_dataset(tmp_path / "data", corrupt=True)
    runner = CliRunner()
    result = runner.invoke(app, ["train", *FOLDER, f"data.root={tmp_path / 'data'}", "data.on_error=skip",
                                 f"run.dir={tmp_path / 'run'}"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "run/metrics.json").read_text())
    assert metrics["val/train_skipped_images"] == 1


@pytest.mark.parametrize("args, expected", [
    (["data.root=/nonexistent/folder"], "/nonexistent/folder"),
    (["data.classes=[cat]"], "dog"),  # a label outside the declared classes
])
def test_bad_data_exits_2_with_a_clear_message(tmp_path, args, expected):
    _folder_dataset(tmp_path / "data")
    result = podium("train", *FOLDER, f"data.root={tmp_path / 'data'}", *args, f"run.dir={tmp_path / 'run'}")
    assert result.returncode == 2, result.stderr[-2000:]
    assert expected in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()


def test_existing_run_is_never_overwritten(tmp_path, digits_run):
    runner = CliRunner()
    run_dir = shutil.copytree(digits_run, tmp_path / "run")  # a finished TINY run (tests/conftest.py)
    before = (run_dir / "checkpoints/last.pt").read_bytes()
    result = runner.invoke(app, ["train", *TINY, f"run.dir={run_dir}"])
    assert result.exit_code == 2 and "already holds a run" in result.output
    assert (run_dir / "checkpoints/last.pt").read_bytes() == before
