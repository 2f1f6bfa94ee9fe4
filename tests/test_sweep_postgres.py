"""Two `podium sweep` worker processes share one Optuna study in a real PostgreSQL 15 server
(the `postgres_url` fixture of tests/postgres.py starts it; skipped where PostgreSQL is absent).

    .venv/bin/python -m pytest -q tests/test_sweep_postgres.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from tests.conftest import DIGITS_TINY
from tests.postgres import create_database

PODIUM = [sys.executable, "-m", "podium"]
SPACE = "sweep.space={optim.lr: {type: float, low: 1e-3, high: 1e-2, log: true}, model.width: {type: int, low: 4, high: 8}}"


@pytest.mark.slow
def test_two_workers_share_one_study(postgres_url, tmp_path):
    storage = create_database(postgres_url, "sweep_two_workers")
    args = [*DIGITS_TINY, SPACE, "sweep.trials=4", "sweep.pruner=none", f"sweep.storage={storage}",
            "sweep.study=shared"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    workers = [subprocess.Popen([*PODIUM, "sweep", *args, f"sweep.dir={tmp_path / f'worker{i}'}"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
               for i in range(2)]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    for worker, output in zip(workers, outputs):
        assert worker.returncode == 0, output[-3000:]
    summaries = [json.loads((tmp_path / f"worker{i}" / "sweep.json").read_text()) for i in range(2)]
    ran = [s["trials_run_here"] for s in summaries]
    study = optuna.load_study(study_name="shared", storage=storage)
    finished = [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE,
                                                       optuna.trial.TrialState.PRUNED)]
    assert len(finished) == 4 == len(ran[0]) + len(ran[1])  # the study's total is the workers' sum
    assert sorted(ran[0] + ran[1]) == sorted(t.number for t in finished)  # no trial number twice
    assert all(ran), f"both workers should have taken trials: {ran}"
    assert len({t.user_attrs["worker"] for t in finished}) == 2
    for summary, numbers in zip(summaries, ran):
        assert summary["storage"] == storage and summary["study"] == "shared"
        for number in numbers:  # each worker's trials are run folders in its own sweep folder
            assert (Path(summary["trials"][number]["run_dir"]) / "metrics.json").is_file()
