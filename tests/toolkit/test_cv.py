"""`podium cv`: one run per fold, out-of-fold predictions covering the pool once, per-fold scores
with mean ± std; reruns skip finished folds; splits.json reused by another model; bad splits
exit 2 naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from podium.cli import app
from podium.engine.predictions import read_predictions
from tests.test_e2e_classification import TINY

runner = CliRunner()
CV = [*TINY, "cv.folds=2", "optim.lr=1e-2"]


@pytest.fixture(scope="module")
def cv_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cv") / "digits"
    result = runner.invoke(app, ["cv", *CV, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "mean ± std" in result.output and "out-of-fold" in result.output
    return out


def test_every_fold_trains_and_the_oof_set_covers_the_pool_once(cv_dir):
    splits = json.loads((cv_dir / "splits.json").read_text())
    assert splits["folds"] == 2 and splits["method"] == "StratifiedKFold"
    for k in range(2):
        run = cv_dir / f"fold_{k}"
        assert (run / "metrics.json").is_file() and (run / "checkpoints" / "best.pt").is_file()
        val = read_predictions(run / "predictions" / "val")
        assert sorted(val.ids) == sorted(splits["ids"][str(k)])  # the val split is the held-out fold
    oof = read_predictions(cv_dir / "predictions" / "oof")
    assert sorted(oof.ids) == sorted(splits["pool"]) and len(oof.ids) == len(set(oof.ids))
    fold1 = read_predictions(cv_dir / "fold_1" / "predictions" / "val")
    for id_ in fold1.ids[:20]:
        np.testing.assert_array_equal(oof.sample("probs", id_), fold1.sample("probs", id_))
    test = read_predictions(cv_dir / "predictions" / "test")
    members = [read_predictions(cv_dir / f"fold_{k}" / "predictions" / "test") for k in range(2)]
    np.testing.assert_allclose(test.sample("probs", test.ids[0]),
                               np.mean([m.sample("probs", test.ids[0]) for m in members], axis=0), rtol=1e-5)


def test_cv_json_reports_each_fold_and_their_mean_and_std(cv_dir):
    report = json.loads((cv_dir / "cv.json").read_text())
    f1 = [fold["macro_f1"] for fold in report["per_fold"]]
    assert report["main_metric"] == "macro_f1" and report["mode"] == "max"
    assert report["mean"]["macro_f1"] == pytest.approx(np.mean(f1))
    assert report["std"]["macro_f1"] == pytest.approx(np.std(f1))
    metrics = json.loads((cv_dir / "fold_0" / "metrics.json").read_text())
    assert report["per_fold"][0]["macro_f1"] == pytest.approx(metrics["val/macro_f1"])
    assert report["oof"]["count"] == len(json.loads((cv_dir / "splits.json").read_text())["pool"])
    assert 0 <= report["oof"]["scores"]["macro_f1"] <= 1
    assert set(report["test"]) == {"test", "test_corrupted"}


def test_a_rerun_skips_finished_folds_and_keeps_the_splits(cv_dir):
    before = {k: (cv_dir / f"fold_{k}" / "checkpoints" / "last.pt").stat().st_mtime_ns for k in range(2)}
    splits = (cv_dir / "splits.json").read_text()
    result = runner.invoke(app, ["cv", *CV, "--out", str(cv_dir)])
    assert result.exit_code == 0, result.output
    assert result.output.count("finished, skipped") == 2
    assert (cv_dir / "splits.json").read_text() == splits
    assert before == {k: (cv_dir / f"fold_{k}" / "checkpoints" / "last.pt").stat().st_mtime_ns for k in range(2)}


def test_another_model_reuses_the_folds_and_a_finished_fold_of_another_model_is_refused(cv_dir, tmp_path):
    other = tmp_path / "other"
    result = runner.invoke(app, ["cv", *TINY, "model.width=4", f"cv.splits={cv_dir / 'splits.json'}",
                                 "--out", str(other), "--folds-only"])
    assert result.exit_code == 0, result.output
    assert json.loads((other / "splits.json").read_text())["ids"] == \
        json.loads((cv_dir / "splits.json").read_text())["ids"]
    result = runner.invoke(app, ["cv", *CV, "model.width=4", "--out", str(cv_dir)])
    assert result.exit_code == 2 and "fold_0 was trained with another model config" in result.output


def test_bad_splits_or_no_folds_exit_2_naming_the_problem(cv_dir, tmp_path):
    splits = json.loads((cv_dir / "splits.json").read_text())
    splits["ids"]["0"].append("not-a-sample")
    splits["pool"].append("not-a-sample")
    bad = tmp_path / "bad_splits.json"
    bad.write_text(json.dumps(splits))
    result = runner.invoke(app, ["cv", *TINY, f"cv.splits={bad}", "--out", str(tmp_path / "x"), "--folds-only"])
    assert result.exit_code == 2 and "bad_splits.json" in result.output and "not in the data" in result.output
    result = runner.invoke(app, ["cv", *TINY, "--out", str(tmp_path / "y")])
    assert result.exit_code == 2 and "cv.folds=N" in result.output
    result = runner.invoke(app, ["cv", *TINY, "cv.folds=3", f"cv.splits={cv_dir / 'splits.json'}",
                                 "--out", str(tmp_path / "z")])
    assert result.exit_code == 2 and "has 2 folds" in result.output


def test_help_has_an_example():
    result = runner.invoke(app, ["cv", "--help"])
    assert result.exit_code == 0 and "podium cv experiment=digits cv.folds=5" in result.output.replace("\n", " ")
