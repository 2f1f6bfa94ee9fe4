"""A tiny segmentation run's saved mask probabilities (predictions/<split>/, float16, one file
per image) read back and scored with `Task.score_predictions` reproduce its metrics.json."""

from __future__ import annotations

import json

import numpy as np
import pytest

from podium.engine.predictions import read_predictions
from podium.engine.runcard import task_for_run
from tests.tasks.segmentation.test_e2e_segmentation import invoke, synth


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("seg")
    result = invoke("train", *synth(tmp, epochs=1), f"run.dir={tmp / 'run'}")
    assert result.exit_code == 0, result.output
    return tmp / "run"


def test_saved_mask_probabilities_reproduce_the_run_metrics(run_dir):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    task = task_for_run(run_dir)
    for split in ("val", "test"):
        saved = read_predictions(run_dir / "predictions" / split)
        assert saved.kind == "mask_probs" and len(saved.ids) == 2
        first = saved.sample("probs", saved.ids[0])
        assert first.dtype == np.float32 and first.shape == saved.sample("target", saved.ids[0]).shape
        scored = task.score_predictions(saved, split)
        assert "dice" in scored
        for name, value in scored.items():
            assert value == pytest.approx(metrics[f"{split}/{name}"], abs=1e-9, nan_ok=True), (split, name)
