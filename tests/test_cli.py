"""The command line: help with an example everywhere, doctor, ui, list."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from typer.testing import CliRunner

from podium.cli import app

COMMANDS = ["train", "eval", "predict", "doctor", "runs", "ui", "augment", "export", "serve", "ensemble"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example(command):
    result = CliRunner().invoke(app, [command, "--help"])
    assert result.exit_code == 0
    assert "Example" in result.output and "podium " + command in result.output.replace("\n", " ")


@pytest.mark.parametrize("what", ["models", "datasets", "losses", "experiments"])
def test_list(what):
    result = CliRunner().invoke(app, ["list", what])
    assert result.exit_code == 0
    expected = {"models": "small_cnn", "datasets": "digits", "losses": "focal", "experiments": "digits"}[what]
    assert expected in result.output


def test_doctor_reports_the_build_and_recommends_workers():
    result = CliRunner().invoke(app, ["doctor", "experiment=digits", "--batches", "2", "trainer.batch_size=16"])
    assert result.exit_code == 0, result.output
    assert "torch" in result.output and "Recommended: trainer.num_workers=" in result.output


def test_doctor_flags_a_missing_dataset_path(tmp_path):
    result = CliRunner().invoke(app, ["doctor", "data=image_folder", f"data.root={tmp_path / 'nope'}"])
    assert result.exit_code == 2
    text = " ".join(result.output.replace("│", " ").split())  # the report wraps long paths in a panel
    assert "data.root" in text and "does not exist" in text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ui_serves_mlflow_on_loopback_and_training_logs_to_a_server(tmp_path):
    """`podium ui` starts an MLflow server on 127.0.0.1; a run with tracking.uri=http://... logs
    to it as it would to a team server."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "podium", "ui", "--root", str(tmp_path), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline, ok = time.time() + 90, False
        while time.time() < deadline and not ok:
            try:
                ok = urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200
            except OSError:
                time.sleep(0.5)
        assert ok, proc.stdout.read1().decode() if proc.poll() is not None else "no answer"
        uri = f"http://127.0.0.1:{port}"
        result = CliRunner().invoke(app, ["train", "experiment=digits", "data.image_size=16", "model.width=4",
                                          "model.blocks=1", "trainer.max_steps=3", "trainer.num_workers=0",
                                          "data.augment=[]", f"tracking.uri={uri}", f"run.root={tmp_path}",
                                          "run.name=served"])
        assert result.exit_code == 0, result.output
        assert "tracking disabled" not in result.output
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        (run,) = client.search_runs([client.get_experiment_by_name("digits").experiment_id])
        assert run.info.status == "FINISHED" and "test/macro_f1" in run.data.metrics
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
