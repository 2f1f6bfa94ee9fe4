"""benchmarks/corruption_cv.py runs end to end on tiny settings and writes its JSON.

Only the shape is checked (every section present, scores in [0, 1], the offline set and the
ensemble's searched weights on the simplex): the figures themselves need the full run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "corruption_cv.py"
SPLITS = ("test", "test_corrupted")


def _score(value) -> bool:
    return isinstance(value, float) and 0.0 <= value <= 1.0


@pytest.mark.slow
def test_corruption_cv_tiny_writes_every_section(tmp_path):
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--tiny", "--json", str(out),
                           "--out", str(tmp_path / "runs")], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "fold ensemble + D4 TTA" in proc.stdout and "offline-augmented" in proc.stdout
    data = json.loads(out.read_text())
    assert data["folds"] == 2 and data["archs"] == ["small_cnn", "resnet10t"]
    for arch, r in data["models"].items():
        assert set(r["folds"]) == {"0", "1"}
        for s in SPLITS:
            assert _score(r["fold_ensemble"][s]) and _score(r["tta_fold_ensemble"][s])
            assert _score(r["single_plain"][s]["mean"]) and r["single_tta_d4"][s]["std"] >= 0
        # both architectures ran on the same folds
        assert (tmp_path / "runs" / arch / "splits.json").read_text() == (tmp_path / "runs" / "small_cnn" / "splits.json").read_text()
    ens = data["ensemble"]
    assert len(ens["weights_oof_search"]) == 2 and abs(sum(ens["weights_oof_search"]) - 1) < 1e-6
    assert all(_score(ens[f"{w}_{v}"][s]) for w in ("equal", "searched") for v in ("plain", "tta_d4") for s in SPLITS)
    off = data["offline"]
    assert off["n"] == 200 and all(_score(off["scores"][s]) for s in SPLITS)
    assert len(list((tmp_path / "runs" / "augmented" / "train").rglob("*.png"))) == 200
