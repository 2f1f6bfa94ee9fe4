"""The benchmark scripts on the real image datasets (ISBI 2015 cephalograms, DRIVE) run end to
end and write their JSON; each skips when its ../shared/data folder is absent.

Split from tests/test_benchmarks.py so that pytest-xdist (--dist loadfile) can run the two
halves on different workers. As there, only the shape of the output is checked, never a timing.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


ISBI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "isbi2015_ceph"


@pytest.mark.slow
@pytest.mark.realdata
@pytest.mark.skipif(not ISBI.is_dir(), reason="../shared/data/isbi2015_ceph is absent")
def test_landmarks_isbi_quick_reports_test1_per_landmark(tmp_path):
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "landmarks_isbi.py"), "--quick", "--json", str(out),
                           "--run-dir", str(tmp_path / "run")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads(out.read_text())
    assert data["ground_truth"] == "senior" and _positive(data["loading"]["speedup"])
    # the split the run really had (--quick: 12 images per split, 4 carved for val)
    assert data["split"] == "train 12 / val 4 (carved from train) / test1 12"
    training = data["training"]
    assert _positive(training["metrics"]["test1/mre_mm"])
    rows = training["per_landmark_test1"]
    assert len(rows) == 19 and rows[0]["landmark"] == "sella"
    for row in rows:
        assert _positive(row["mre_mm"]) and math.hypot(row["offset_x_mm"], row["offset_y_mm"]) <= row["mre_mm"] + 1e-3


@pytest.mark.realdata
@pytest.mark.skipif(not ISBI.is_dir(), reason="../shared/data/isbi2015_ceph is absent")
def test_isbi_annotation_drift_finds_the_test1_drift_and_scores_a_run(tmp_path):
    import csv

    # a stand-in run: its Test1 predictions are the senior truth with menton moved 30 px (3 mm)
    with (ISBI / "test1_senior.csv").open() as f:
        truth = list(csv.DictReader(f))
    from podium.tasks.landmarks.readers import ISBI2015_LANDMARKS as names

    run = tmp_path / "run"
    (run / "predictions").mkdir(parents=True)
    with (run / "predictions" / "test1.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", *[f"{n}_{a}" for n in names for a in "xy"]])
        for row in truth:
            values = [float(row[f"{k}_{a}"]) for k in range(1, 20) for a in "xy"]
            values[2 * names.index("menton")] += 30
            writer.writerow([Path(row["image_path"]).stem, *values])
    out = tmp_path / "drift.json"
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "isbi_annotation_drift.py"), "--run-dir", str(run),
                           "--json", str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads(out.read_text())
    # gonion and soft-tissue pogonion are annotated elsewhere on Test1 than on the training images
    assert {"gonion", "soft_tissue_pogonion"} <= set(data["significant"])
    gonion = next(r for r in data["drift"] if r["landmark"] == "gonion")
    assert gonion["drift"] > 1.5 and gonion["p_value"] < 1e-3
    assert data["control_min_p"] > 1e-3  # two halves of the training set: nothing to find
    scored = data["runs"][0]
    assert scored["as_scored"]["mre_mm"] == pytest.approx(3.0 / 19, rel=1e-6)
    assert scored["offsets_mm"]["menton"] == pytest.approx([3.0, 0.0], abs=1e-6)
    # the truth with the drift undone moves only the drifted landmarks: the error grows there
    assert scored["drift_undone"]["mre_mm"] > scored["as_scored"]["mre_mm"]
    assert Path(data["plot"]).is_file()
    bad = subprocess.run([sys.executable, str(BENCHMARKS / "isbi_annotation_drift.py"), "--run-dir",
                          str(tmp_path / "nothing")], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "predictions/test1.csv does not exist" in bad.stderr


DRIVE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "drive" / "training"


@pytest.mark.slow
@pytest.mark.realdata
@pytest.mark.skipif(not DRIVE.is_dir(), reason="../shared/data/drive is absent")
def test_drive_init_quick_writes_the_chosen_variants(tmp_path):
    out = tmp_path / "out.json"
    command = [sys.executable, str(BENCHMARKS / "drive_init.py"), "--quick", "--json", str(out),
               "--out-dir", str(tmp_path / "runs"), "--variants", "random,moco+recon"]
    proc = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads(out.read_text())
    assert set(data["variants"]) == {"random", "moco+recon"}  # the other two: the same code paths
    assert data["variants"]["moco+recon"]["overrides"][0].endswith("encoder.pt")
    assert len(data["pretrain"]["images"]) == 15  # the non-test images only
    for variant in data["variants"].values():
        for metric in ("test/dice", "test/auc_roc", "test/aupr"):
            assert 0.0 <= variant[metric] <= 1.0
    assert (tmp_path / "runs" / "pretrain" / "encoder.pt").is_file()
