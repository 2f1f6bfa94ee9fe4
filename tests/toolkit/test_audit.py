"""`podium audit`: labels flipped on purpose rank on top of cleanlab's label issues; out-of-fold
probabilities are preferred, val is used with a warning; unusable sets exit 2 naming the file."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from podium.cli import app
from podium.engine.predictions import read_predictions, write_predictions
from podium.toolkit.audit import audit

runner = CliRunner()
CLASSES = [f"c{k}" for k in range(4)]
FLIPPED = [3, 17, 42, 88, 150]


def _oof(folder: Path, split: str = "oof", truth: bool = True) -> Path:
    """A set of 200 samples whose model is right with varied confidence (0.5 to 0.9), and whose
    given labels are flipped on FLIPPED, where the model is sure of the real class."""
    rng = np.random.default_rng(0)
    real = rng.integers(0, 4, 200)
    confidence = rng.uniform(0.5, 0.9, 200)
    confidence[FLIPPED] = 0.97
    probs = np.tile(((1 - confidence) / 3)[:, None], (1, 4))
    probs[np.arange(200), real] = confidence
    given = real.copy()
    given[FLIPPED] = (real[FLIPPED] + 1) % 4
    write_predictions(folder / "predictions" / split, "class_probs", [f"img{i:03d}" for i in range(200)],
                      {"probs": probs.astype(np.float32)}, truth={"labels": given} if truth else None,
                      split=split, task="classification", classes=CLASSES)
    return folder


def test_flipped_labels_rank_on_top_with_their_real_class_suggested(tmp_path):
    run = _oof(tmp_path / "cv")
    report = audit(run, top=10)
    top = report["top"][: len(FLIPPED)]
    assert {r["id"] for r in top} == {f"img{i:03d}" for i in FLIPPED}
    assert report["split"] == "oof" and report["warnings"] == [] and report["issues"] >= len(FLIPPED)
    s = read_predictions(run / "predictions" / "oof")
    for r in top:
        probs, given = s.sample("probs", r["id"]), int(s.sample("labels", r["id"]))
        assert r["given"] == CLASSES[given] and r["suggested"] == CLASSES[(given - 1) % 4]
        assert r["quality"] == pytest.approx(probs[given] / probs.sum(), rel=1e-5)  # self-confidence
    assert [r["rank"] for r in report["top"]] == list(range(1, len(report["top"]) + 1))
    with (run / "audit" / "audit.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == report["issues"] and rows[0]["id"] == top[0]["id"]
    assert json.loads((run / "audit" / "audit.json").read_text())["top"] == report["top"]
    assert report["grid"] is None and report["grid_skipped"]  # synthetic ids: no images, and it says so


def test_val_is_used_with_a_warning_when_there_is_no_oof_set(tmp_path):
    run = _oof(tmp_path / "run", split="val")
    report = audit(run, tmp_path / "out")
    assert report["split"] == "val" and "oof is missing" in report["warnings"][0]
    assert (tmp_path / "out" / "audit.csv").is_file()
    report = audit(_oof(tmp_path / "run2", split="train"), split="train")
    assert "in-sample" in report["warnings"][0]


def test_unusable_sets_exit_2_naming_the_file(tmp_path):
    result = runner.invoke(app, ["audit", str(_oof(tmp_path / "nolabels", truth=False))])
    assert result.exit_code == 2 and "no given labels" in result.output
    assert "oof" in result.output and "nolabels" in result.output  # the file
    write_predictions(tmp_path / "pts" / "predictions" / "oof", "points", ["a"], {"points": np.zeros((1, 2, 2))},
                      split="oof", task="landmarks")
    result = runner.invoke(app, ["audit", str(tmp_path / "pts")])
    assert result.exit_code == 2 and "class_probs" in result.output and "points" in result.output
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["audit", str(tmp_path / "empty")])
    assert result.exit_code == 2 and "podium cv" in result.output


def test_cli_on_a_real_run_audits_val_and_shows_the_digits(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs[0], run)
    result = runner.invoke(app, ["audit", str(run), "--top", "5"])
    assert result.exit_code == 0, result.output
    assert "warning" in result.output and "val" in result.output
    report = json.loads((run / "audit" / "audit.json").read_text())
    val = read_predictions(run / "predictions" / "val")
    assert report["count"] == len(val.ids) and len(report["top"]) == min(5, report["issues"])
    assert {r["id"] for r in report["top"]} <= set(val.ids)
    if report["issues"]:  # digits images through Task.sample_image
        assert report["grid"] and Path(report["grid"]).is_file(), report["grid_skipped"]
