"""`podium ensemble`: runs' saved sets are averaged by id and re-scored with the task; CSVs are
averaged by id or voted; mismatched members exit 2 naming what differs; `--search oof` fits the
weights on out-of-fold sets only and applies them to the other splits. (`runs`: tests/toolkit/conftest.py)"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from podium.cli import app
from podium.engine import registry
from podium.engine.predictions import read_predictions, write_predictions
from podium.engine.runcard import apply_card
from podium.engine.runconfig import load_run_config
from podium.errors import UserError
from podium.toolkit import weights as search
from podium.toolkit.ensemble import ensemble_runs

runner = CliRunner()


def test_runs_ensemble_is_the_weighted_mean_by_id_and_scored_like_the_written_set(runs, tmp_path):
    out = tmp_path / "ens"
    result = runner.invoke(app, ["ensemble", *map(str, runs), "--out", str(out), "--weights", "1,3",
                                 "--split", "test"])
    assert result.exit_code == 0, result.output
    assert "ensemble" in result.output and "macro_f1" in result.output
    a, b = (read_predictions(r / "predictions" / "test") for r in runs)
    ens = read_predictions(out / "predictions" / "test")
    assert not np.allclose(a.arrays["probs"], b.arrays["probs"])  # the members really differ
    for id_ in ens.ids[:50]:
        expected = 0.25 * a.sample("probs", id_) + 0.75 * b.sample("probs", id_)
        np.testing.assert_allclose(ens.sample("probs", id_), expected, rtol=1e-5, atol=1e-6)
        assert ens.sample("labels", id_) == a.sample("labels", id_)

    report = json.loads((out / "ensemble.json").read_text())
    assert report["weights"] == pytest.approx([0.25, 0.75]) and report["how"] == "mean"
    entry = report["splits"]["test"]
    assert set(entry["members"]) == {str(r) for r in runs}
    task = registry.build("task", "classification", load_run_config(runs[0]))
    apply_card(task, runs[0])
    assert entry["ensemble"] == pytest.approx(task.score_predictions(ens, "test"))
    assert entry["members"][str(runs[1])] == pytest.approx(task.score_predictions(b, "test"))
    best = max(s["macro_f1"] for s in entry["members"].values())
    assert entry["main_metric"] == "macro_f1" and entry["mode"] == "max"
    assert entry["gain"] == pytest.approx(entry["ensemble"]["macro_f1"] - best)


def test_default_splits_are_the_common_ones_and_a_missing_split_exits_2(runs, tmp_path):
    lacking = tmp_path / "lacking"
    shutil.copytree(runs[1], lacking)
    shutil.rmtree(lacking / "predictions" / "val")
    report = ensemble_runs([runs[0], lacking], tmp_path / "ens")
    assert set(report["splits"]) == {"test", "test_corrupted"}  # val is not in both

    result = runner.invoke(app, ["ensemble", str(runs[0]), str(lacking), "--out", str(tmp_path / "e2"),
                                 "--split", "val"])
    assert result.exit_code == 2
    assert str(lacking) in result.output and "val" in result.output


def test_runs_of_different_tasks_are_refused_naming_both(runs, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(runs[1], other)
    card = json.loads((other / "run.json").read_text())
    (other / "run.json").write_text(json.dumps({**card, "task": "landmarks"}))
    with pytest.raises(UserError, match="task classification.*task landmarks") as err:
        ensemble_runs([runs[0], other], tmp_path / "ens")
    assert str(runs[0]) in str(err.value) and str(other) in str(err.value)


def test_wrong_weight_count_and_mixed_inputs_exit_2(runs, tmp_path):
    result = runner.invoke(app, ["ensemble", *map(str, runs), "--out", str(tmp_path / "e"), "--weights", "1,2,3"])
    assert result.exit_code == 2 and "3 weights" in result.output
    csv_file = _write(tmp_path / "a.csv", ["id", "label"], [["x", "0"]])
    result = runner.invoke(app, ["ensemble", str(runs[0]), str(csv_file), "--out", str(tmp_path / "e")])
    assert result.exit_code == 2 and "not both" in result.output


# ---- CSVs ------------------------------------------------------------------------------------


def _write(path: Path, header: list[str], rows: list[list]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _read(path: Path) -> dict[str, dict]:
    with path.open(newline="") as f:
        return {r["id"]: r for r in csv.DictReader(f)}


PROBS = ["id", "label", "prob_cat", "prob_dog"]


def test_probability_csvs_average_by_id_whatever_the_row_order(tmp_path):
    a = _write(tmp_path / "a.csv", PROBS, [["x", "cat", 0.9, 0.1], ["y", "dog", 0.4, 0.6], ["z", "cat", 0.6, 0.4]])
    b = _write(tmp_path / "b.csv", PROBS, [["z", "dog", 0.0, 1.0], ["x", "cat", 0.7, 0.3], ["y", "cat", 0.8, 0.2]])
    out = tmp_path / "ens.csv"
    result = runner.invoke(app, ["ensemble", str(a), str(b), "--out", str(out), "--weights", "1,3"])
    assert result.exit_code == 0, result.output
    rows = _read(out)
    assert list(rows) == ["x", "y", "z"]  # the first file's order
    assert float(rows["x"]["prob_cat"]) == pytest.approx(0.25 * 0.9 + 0.75 * 0.7)
    assert float(rows["y"]["prob_dog"]) == pytest.approx(0.25 * 0.6 + 0.75 * 0.2)
    assert [rows[i]["label"] for i in "xyz"] == ["cat", "cat", "dog"]


def test_label_only_csvs_take_the_majority_vote_ties_to_the_first_file(tmp_path):
    header = ["id", "label"]
    a = _write(tmp_path / "a.csv", header, [["x", "cat"], ["y", "dog"], ["z", "bird"]])
    b = _write(tmp_path / "b.csv", header, [["y", "cat"], ["x", "dog"], ["z", "cat"]])
    c = _write(tmp_path / "c.csv", header, [["x", "dog"], ["z", "dog"], ["y", "cat"]])
    out = tmp_path / "vote.csv"
    assert runner.invoke(app, ["ensemble", str(a), str(b), str(c), "--out", str(out)]).exit_code == 0
    assert {i: r["label"] for i, r in _read(out).items()} == {"x": "dog", "y": "cat", "z": "bird"}  # z: 3-way tie


def test_csvs_with_other_ids_or_classes_exit_2_naming_the_files(tmp_path):
    a = _write(tmp_path / "a.csv", PROBS, [["x", "cat", 0.9, 0.1], ["y", "dog", 0.4, 0.6]])
    b = _write(tmp_path / "b.csv", PROBS, [["x", "cat", 0.9, 0.1], ["w", "dog", 0.4, 0.6]])
    c = _write(tmp_path / "c.csv", ["id", "label", "prob_cat", "prob_cow"], [["x", "cat", 0.9, 0.1], ["y", "cow", 0.4, 0.6]])
    for other, words in ((b, ["'y'", "'w'"]), (c, ["prob_dog", "prob_cow"])):
        result = runner.invoke(app, ["ensemble", str(a), str(other), "--out", str(tmp_path / "o.csv")])
        assert result.exit_code == 2, result.output
        text = " ".join(result.output.split())
        for word in [a.name, other.name, *words]:
            assert word in text, (word, result.output)


# ---- weights searched on out-of-fold predictions ----------------------------------------------------


def test_log_loss_search_matches_a_brute_force_grid_and_stays_on_the_simplex():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 300)
    good = rng.dirichlet(np.ones(4), 300) + 2.0 * np.eye(4)[labels]
    good /= good.sum(1, keepdims=True)
    noisy = rng.dirichlet(np.ones(4) * 0.5, 300)
    w = search.search_log_loss([good, noisy], labels)
    assert w.min() >= 0 and w.sum() == pytest.approx(1.0)
    P = search.true_class_probs([good, noisy], labels)
    grid = min(search.log_loss(P, np.array([a, 1 - a])) for a in np.linspace(0, 1, 1001))
    assert search.log_loss(P, w) <= grid + 1e-6
    assert search.log_loss(P, w) < search.log_loss(P, np.array([0.5, 0.5]))


def test_greedy_selection_finds_the_best_mix_of_counts():
    w, trace = search.greedy_selection(3, lambda w: -abs(w[0] - 0.75) - abs(w[1] - 0.25) - w[2], "max", steps=12)
    assert w == pytest.approx([0.75, 0.25, 0.0])
    assert max(trace) == pytest.approx(0.0)
    w, _ = search.greedy_selection(2, lambda w: abs(w[0] - 0.5), "min", steps=6)  # minimising works too
    assert w == pytest.approx([0.5, 0.5])


def _cv_member(run: Path, folder: Path, probs: np.ndarray, ids: list[str], labels: np.ndarray, classes) -> Path:
    """A `podium cv`-like folder: a fold run (config + card), the run's saved splits and an OOF set."""
    shutil.copytree(run, folder / "fold_0")
    shutil.copytree(run / "predictions", folder / "predictions")
    write_predictions(folder / "predictions" / "oof", "class_probs", ids, {"probs": probs.astype(np.float32)},
                      truth={"labels": labels}, split="oof", task="classification", classes=classes)
    return folder


def test_search_oof_fits_weights_on_oof_only_and_applies_them_to_the_other_splits(runs, tmp_path):
    val = read_predictions(runs[0] / "predictions" / "val")
    labels = np.asarray(val.arrays["labels"])
    classes = val.manifest["classes"]
    rng = np.random.default_rng(0)
    good = rng.dirichlet(np.ones(10), len(labels)) + 3.0 * np.eye(10)[labels]
    good /= good.sum(1, keepdims=True)
    noisy = rng.dirichlet(np.ones(10), len(labels))
    members = [_cv_member(r, tmp_path / f"cv{k}", p, val.ids, labels, classes)
               for k, (r, p) in enumerate(zip(runs, (good, noisy)))]
    out = tmp_path / "ens"
    result = runner.invoke(app, ["ensemble", *map(str, members), "--out", str(out), "--search", "oof"])
    assert result.exit_code == 0, result.output
    assert "out-of-fold" in result.output and "searched weights" in result.output

    report = json.loads((out / "ensemble.json").read_text())
    fitted = report["search"]
    expected = search.search_log_loss([good.astype(np.float32), noisy.astype(np.float32)], labels)
    assert fitted["weights"] == pytest.approx(expected.tolist(), abs=1e-6)
    assert report["weights"] == pytest.approx(fitted["weights"]) and fitted["weights"][0] > 0.8
    assert fitted["searched"]["log_loss"] <= fitted["equal"]["log_loss"]
    assert {"macro_f1", "log_loss"} <= set(fitted["searched"]) and fitted["main_metric"] == "macro_f1"
    assert "out-of-fold predictions only" in fitted["fitted_on"]
    assert "oof" not in report["splits"] and {"test", "val"} <= set(report["splits"])
    a, b = (read_predictions(r / "predictions" / "test") for r in runs)
    ens = read_predictions(out / "predictions" / "test")
    w = fitted["weights"]
    np.testing.assert_allclose(np.asarray(ens.arrays["probs"]),
                               w[0] * np.asarray(a.arrays["probs"]) + w[1] * np.asarray(b.arrays["probs"]), atol=1e-5)


def test_search_without_oof_or_with_weights_exits_2(runs, tmp_path):
    result = runner.invoke(app, ["ensemble", *map(str, runs), "--out", str(tmp_path / "e"), "--search", "oof"])
    assert result.exit_code == 2 and str(runs[0]) in result.output and "oof" in result.output
    result = runner.invoke(app, ["ensemble", *map(str, runs), "--out", str(tmp_path / "e"), "--search", "oof",
                                 "--weights", "1,2"])
    assert result.exit_code == 2 and "not both" in result.output
    result = runner.invoke(app, ["ensemble", *map(str, runs), "--out", str(tmp_path / "e"), "--search", "test"])
    assert result.exit_code == 2 and "--search oof" in result.output
