"""A tiny run's saved prediction set (predictions/<split>/) read back and scored with
`Task.score_predictions` reproduces the run's metrics.json: the saved set is complete."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from podium.cli import app
from podium.engine.predictions import combine, read_predictions
from podium.engine.runcard import task_for_run
from tests.test_e2e_classification import TINY


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cls") / "run"
    result = CliRunner().invoke(app, ["train", *TINY, f"run.dir={run_dir}"])
    assert result.exit_code == 0, result.output
    return run_dir


def test_saved_probabilities_reproduce_the_run_metrics(run_dir):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    task = task_for_run(run_dir)
    for split in ("val", "test", "test_corrupted"):
        saved = read_predictions(run_dir / "predictions" / split)
        assert saved.kind == "class_probs" and saved.manifest["classes"] == task.classes
        assert len(set(saved.ids)) == len(saved.ids) and all(i.startswith("digits-") for i in saved.ids)
        scored = task.score_predictions(saved, split)
        assert scored, split
        for name, value in scored.items():
            assert value == pytest.approx(metrics[f"{split}/{name}"], abs=1e-9), (split, name)


def test_an_ensemble_of_the_run_with_itself_scores_the_same(run_dir):
    task = task_for_run(run_dir)
    saved = read_predictions(run_dir / "predictions" / "test")
    twice = combine([saved, saved], weights=[1, 2])
    np.testing.assert_allclose(twice.arrays["probs"], saved.arrays["probs"], rtol=1e-6)
    assert task.score_predictions(twice, "test")["macro_f1"] == pytest.approx(
        task.score_predictions(saved, "test")["macro_f1"])
