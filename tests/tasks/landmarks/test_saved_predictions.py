"""A tiny landmark run's saved points (predictions/<split>/) read back and scored with
`Task.score_predictions` reproduce the run's metrics.json (MRE / SDR in mm)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from podium.cli import app
from podium.engine.predictions import read_predictions
from podium.engine.runcard import task_for_run
from tests.tasks.landmarks.test_e2e_landmarks import SMALL_UNET, SPACING, K, synth_args


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lm")
    result = CliRunner().invoke(app, ["train", *synth_args(tmp, epochs=1), *SMALL_UNET, f"run.dir={tmp / 'run'}"])
    assert result.exit_code == 0, result.output
    return tmp / "run"


def test_saved_points_reproduce_the_run_metrics(run_dir):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    task = task_for_run(run_dir)
    for split in ("val", "test"):
        saved = read_predictions(run_dir / "predictions" / split)
        assert saved.kind == "points" and saved.manifest["landmarks"] == task.landmark_names
        assert np.asarray(saved.arrays["points"]).shape == (3, K, 2)
        np.testing.assert_allclose(saved.arrays["spacing"], SPACING)
        with (run_dir / "predictions" / f"{split}.csv").open() as f:  # the same ids as the CSV
            assert saved.ids == [line.split(",")[0] for line in f.read().splitlines()[1:]]
        scored = task.score_predictions(saved, split)
        assert "mre_mm" in scored and "sdr_2mm" in scored
        for name, value in scored.items():
            assert value == pytest.approx(metrics[f"{split}/{name}"], abs=1e-9, nan_ok=True), (split, name)
