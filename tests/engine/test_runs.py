"""Run folders: unique names, history.csv, listing and status."""

from __future__ import annotations

import csv
import json
import os

import pytest

from podium.engine import runs
from podium.engine.runs import existing_run_dir, find_runs, new_run_dir, run_summary, write_history, write_json
from podium.errors import UserError


@pytest.fixture
def frozen_time(monkeypatch):
    monkeypatch.setattr(runs.time, "strftime", lambda fmt: "20261124-101500")


def test_new_run_dir_default_name(tmp_path, frozen_time):
    path = new_run_dir(str(tmp_path), None, "digits")
    assert path == tmp_path / "20261124-101500-digits"
    assert not path.exists()  # the caller creates it


def test_new_run_dir_is_unique_within_the_same_second(tmp_path, frozen_time):
    seen = []
    for _ in range(3):
        path = new_run_dir(str(tmp_path), None, "digits")
        assert path not in seen
        path.mkdir()
        seen.append(path)
    assert [p.name for p in seen] == ["20261124-101500-digits", "20261124-101500-digits-2",
                                      "20261124-101500-digits-3"]


def test_new_run_dir_with_explicit_name(tmp_path):
    first = new_run_dir(str(tmp_path), "baseline", "digits")
    assert first == tmp_path / "baseline"
    first.mkdir()
    assert new_run_dir(str(tmp_path), "baseline", "digits") == tmp_path / "baseline-2"


def test_write_history_with_varying_keys(tmp_path):
    rows = [
        {"epoch": 0, "train/loss": 1.5},
        {"epoch": 1, "train/loss": 1.2, "val/acc": 0.5},
        {"epoch": 2, "val/acc": 0.75, "lr": 0.001},
    ]
    path = tmp_path / "history.csv"
    write_history(path, rows)
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["epoch", "train/loss", "val/acc", "lr"]
        read = list(reader)
    assert read == [
        {"epoch": "0", "train/loss": "1.5", "val/acc": "", "lr": ""},
        {"epoch": "1", "train/loss": "1.2", "val/acc": "0.5", "lr": ""},
        {"epoch": "2", "train/loss": "", "val/acc": "0.75", "lr": "0.001"},
    ]
    write_history(path, rows[:1])  # rewritten in place
    assert path.read_text().splitlines() == ["epoch,train/loss", "0,1.5"]
    assert [p.name for p in tmp_path.iterdir()] == ["history.csv"]  # no temp file left


def test_write_json(tmp_path):
    path = tmp_path / "metrics.json"
    write_json(path, {"val/acc": 0.5})
    assert json.loads(path.read_text()) == {"val/acc": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def make_run(root, name, *, metrics=None, last=False, mtime=None):
    path = root / name
    path.mkdir(parents=True)
    (path / "config.yaml").write_text("name: x\n")
    if metrics is not None:
        (path / "metrics.json").write_text(json.dumps(metrics))
    if last:
        (path / "checkpoints").mkdir()
        (path / "checkpoints" / "last.pt").write_bytes(b"x")
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def test_find_runs_and_statuses(tmp_path):
    root = tmp_path / "runs"
    finished = make_run(root, "b-finished", metrics={"val/acc": 0.9}, last=True, mtime=3_000)
    resumable = make_run(root, "a-resumable", last=True, mtime=1_000)
    incomplete = make_run(root, "c-incomplete", mtime=2_000)
    nested = make_run(root, "sweep/d-nested", metrics={"val/acc": 0.1}, mtime=4_000)
    make_run(root, "mlartifacts/1/abc/artifacts")  # MLflow's artifact store is not a run
    (root / "not-a-run").mkdir()

    found = find_runs(root)
    assert found == [resumable, incomplete, finished, nested]  # oldest first

    summaries = {p.name: run_summary(p) for p in found}
    assert summaries["b-finished"] == {"run": str(finished), "status": "finished", "metrics": {"val/acc": 0.9}}
    assert summaries["a-resumable"]["status"] == "resumable"
    assert summaries["a-resumable"]["metrics"] == {}
    assert summaries["c-incomplete"]["status"] == "incomplete"
    assert summaries["d-nested"]["status"] == "finished"


def test_find_runs_on_a_missing_root(tmp_path):
    assert find_runs(tmp_path / "nothing") == []


def test_existing_run_dir(tmp_path):
    run = make_run(tmp_path, "r")
    assert existing_run_dir(str(run)) == run
    with pytest.raises(UserError, match="not a podium run folder"):
        existing_run_dir(tmp_path / "missing")
