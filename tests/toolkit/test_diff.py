"""`podium diff A B`: disagreements by id between two runs' saved sets or two CSVs, the confusion
between them, who is right, per-sample mask / point differences, a PNG grid; bad pairs exit 2."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from podium.cli import app
from podium.engine.predictions import read_predictions, write_predictions
from podium.toolkit.diff import diff

runner = CliRunner()
CLASSES = ["cat", "dog", "owl"]


def _probs(labels: list[int], confidence: float = 0.8) -> np.ndarray:
    p = np.full((len(labels), 3), (1 - confidence) / 2, dtype=np.float32)
    p[np.arange(len(labels)), labels] = confidence
    return p


def _run(folder: Path, labels: list[int], truth: list[int] | None = None, split="test", ids=None, **meta) -> Path:
    ids = ids or [f"s{i}" for i in range(len(labels))]
    write_predictions(folder / "predictions" / split, "class_probs", ids, {"probs": _probs(labels)},
                      truth=None if truth is None else {"labels": np.array(truth)}, split=split,
                      **{"task": "classification", "classes": CLASSES, **meta})
    return folder


def test_class_disagreements_confusion_and_who_is_right(tmp_path):
    truth = [0, 1, 2, 0, 1, 2]
    a = _run(tmp_path / "a", [0, 1, 2, 1, 1, 0], truth)   # wrong on s3, s5
    b = _run(tmp_path / "b", [0, 2, 2, 0, 1, 1], truth)   # wrong on s1, s5
    report = diff(a, b, tmp_path / "out")
    assert report["split"] == "test" and report["count"] == 6
    assert {r["id"] for r in report["rows"]} == {"s1", "s3", "s5"}
    assert report["agreement"] == pytest.approx(0.5) and report["disagreements"] == 3
    s5 = next(r for r in report["rows"] if r["id"] == "s5")
    assert (s5["a"], s5["b"], s5["truth"]) == ("cat", "dog", "owl") and s5["a_confidence"] == pytest.approx(0.8)
    m = np.array(report["confusion"]["matrix"])  # rows: A's labels, columns: B's labels
    assert report["confusion"]["labels"] == CLASSES and m.sum() == 6
    # pairs (A, B): (cat, cat) (dog, owl) (owl, owl) (dog, cat) (dog, dog) (cat, dog)
    assert m.tolist() == [[1, 1, 0], [1, 1, 1], [0, 0, 1]]
    assert report["right_on_disagreements"] == {"a": 1, "b": 1, "neither": 1}
    assert report["accuracy"] == pytest.approx({"a": 4 / 6, "b": 4 / 6})
    assert json.loads((tmp_path / "out" / "diff.json").read_text())["rows"] == report["rows"]
    assert report["grid"] is None and "not image files" in report["grid_skipped"]  # said, not silent


def test_csvs_whose_ids_are_image_files_get_a_grid(tmp_path):
    paths = []
    for i in range(4):
        paths.append(tmp_path / f"img{i}.png")
        Image.fromarray(np.full((10, 10, 3), 40 * i, np.uint8)).save(paths[-1])
    rows_a = [[str(p), lab, *(_probs([CLASSES.index(lab)])[0])] for p, lab in zip(paths, ["cat", "dog", "owl", "cat"])]
    a = _csv(tmp_path / "a.csv", ["id", "label", *[f"prob_{c}" for c in CLASSES]], rows_a)
    b = _csv(tmp_path / "b.csv", ["id", "label"], [[str(p), lab] for p, lab in zip(paths, ["cat", "owl", "owl", "dog"])])
    result = runner.invoke(app, ["diff", str(a), str(b), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "diff.json").read_text())
    assert [r["id"] for r in report["rows"]] == [str(paths[1]), str(paths[3])]
    assert report["rows"][0]["b_confidence"] is None and "truth" not in result.output.split("confusion")[1]
    assert report["grid"] and Image.open(report["grid"]).size[0] > 100


def _csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_masks_give_the_per_sample_fraction_of_pixels_that_differ(tmp_path):
    ids = ["m0", "m1", "m2"]
    a = [np.zeros((4, 4), np.float32) for _ in ids]
    b = [x.copy() for x in a]
    b[1][:2] = 0.9  # half of m1 differs
    b[2][0, 0] = 0.7  # one pixel of m2
    for name, masks in (("a", a), ("b", b)):
        write_predictions(tmp_path / name / "predictions" / "val", "mask_probs", ids, {"probs": masks},
                          truth={"target": [np.zeros((4, 4), np.int64)] * 3}, split="val", task="segmentation",
                          classes=["background", "vessel"], threshold=0.5)
    report = diff(tmp_path / "a", tmp_path / "b", tmp_path / "out", top=2)
    assert [r["id"] for r in report["top"]] == ["m1", "m2"]
    assert report["top"][0]["disagreement"] == pytest.approx(0.5) and report["top"][1]["disagreement"] == pytest.approx(1 / 16)
    assert report["mean"] == pytest.approx((0.5 + 1 / 16) / 3)
    assert report["grid"] and Path(report["grid"]).is_file()  # the disagreement maps


def test_multiclass_masks_compare_the_argmax_and_points_the_distance(tmp_path):
    p = np.zeros((3, 2, 2), np.float32)
    p[0] = 1
    q = p.copy()
    q[:, 0, 0] = [0, 0, 1]
    for name, m in (("a", p), ("b", q)):
        write_predictions(tmp_path / name / "predictions" / "test", "mask_probs", ["x"], {"probs": [m]},
                          split="test", task="segmentation", classes=["bg", "a", "b"])
    assert diff(tmp_path / "a", tmp_path / "b", tmp_path / "o1")["top"][0]["disagreement"] == pytest.approx(0.25)

    pts = np.zeros((2, 2, 2))
    moved = pts.copy()
    moved[0, 0] = [3, 4]  # one of two landmarks of p0 moves by 5 px
    for name, x in (("c", pts), ("d", moved)):
        write_predictions(tmp_path / name / "predictions" / "test", "points", ["p0", "p1"], {"points": x},
                          truth={"spacing": np.full((2, 2), 0.1)}, split="test", task="landmarks", landmarks=["A", "B"])
    report = diff(tmp_path / "c", tmp_path / "d", tmp_path / "o2")
    assert report["top"][0] == pytest.approx({"id": "p0", "mean_distance_px": 2.5, "mean_distance_mm": 0.25})
    assert report["top"][1]["mean_distance_px"] == 0 and "no per-sample map" in report["grid_skipped"]


@pytest.mark.parametrize("change, words", [
    ({"ids": ["s0", "s1", "zz"]}, ["'zz'", "different ids"]),
    ({"classes": ["cat", "dog", "cow"]}, ["different classes", "cow"]),
    ({"task": "other"}, ["different tasks", "other"]),
])
def test_pairs_that_cannot_be_compared_exit_2_naming_both(tmp_path, change, words):
    a = _run(tmp_path / "a", [0, 1, 2])
    b = _run(tmp_path / "b", [0, 1, 2], **({"ids": change["ids"]} if "ids" in change else {}),
             **{k: v for k, v in change.items() if k != "ids"})
    result = runner.invoke(app, ["diff", str(a), str(b), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    for word in [str(a), str(b), *words]:
        assert word in text, (word, result.output)


def test_other_kinds_and_missing_splits_exit_2(tmp_path):
    a = _run(tmp_path / "a", [0, 1])
    write_predictions(tmp_path / "b" / "predictions" / "test", "points", ["s0", "s1"], {"points": np.zeros((2, 1, 2))},
                      split="test", task="classification")
    result = runner.invoke(app, ["diff", str(a), str(tmp_path / "b"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "class_probs vs points" in result.output
    result = runner.invoke(app, ["diff", str(a), str(a), "--split", "val", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "'val'" in result.output and str(a) in result.output


def test_cli_on_two_real_runs_shows_the_disagreeing_digits(runs, tmp_path):
    out = tmp_path / "diff"
    result = runner.invoke(app, ["diff", *map(str, runs), "--split", "test_corrupted", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "confusion" in result.output and "agreement" in result.output
    report = json.loads((out / "diff.json").read_text())
    a, b = (read_predictions(r / "predictions" / "test_corrupted") for r in runs)
    classes = a.manifest["classes"]
    differ = {i for i in a.ids if int(a.sample("probs", i).argmax()) != int(b.sample("probs", i).argmax())}
    assert {r["id"] for r in report["rows"]} == differ and report["count"] == len(a.ids)
    for r in report["rows"][:5]:
        assert r["a"] == classes[int(a.sample("probs", r["id"]).argmax())]
        assert r["truth"] == classes[int(a.sample("labels", r["id"]))]
    if differ:  # the digits' images come from the run's task (Task.sample_image)
        assert report["grid"] and Path(report["grid"]).is_file(), report["grid_skipped"]
