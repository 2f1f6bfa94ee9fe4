"""`podium sweep` on tiny digits runs: TPE over a space, SQLite by default, --resume, the grid of
`podium train ... -m`, median pruning, plots, MLflow nesting, and the user errors (exit 2).

    .venv/bin/python -m pytest -q tests/toolkit/test_sweep.py
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
from typer.testing import CliRunner

from podium.cli import app
from podium.toolkit import sweep as sweep_module
from tests.conftest import DIGITS_TINY

SPACE = "sweep.space={optim.lr: {type: float, low: 1e-3, high: 1e-2, log: true}, model.width: {type: int, low: 4, high: 8}}"
NO_TRACKING = [a for a in DIGITS_TINY if a != "tracking=none"]


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def load(sweep_dir: Path) -> dict:
    return json.loads((sweep_dir / "sweep.json").read_text())


@pytest.fixture(scope="module")
def tpe_sweep(tmp_path_factory) -> tuple[Path, str]:
    """Three unpruned TPE trials logged to the embedded MLflow store under run.root."""
    root = tmp_path_factory.mktemp("sweep")
    result = invoke("sweep", *NO_TRACKING, "tracking=mlflow", f"run.root={root}", SPACE, "sweep.trials=3",
                    "sweep.pruner=none", f"sweep.dir={root / 'tpe'}")
    assert result.exit_code == 0, result.output
    return root / "tpe", result.output


def test_tpe_sweep_writes_trials_table_json_and_sqlite(tpe_sweep):
    sweep_dir, output = tpe_sweep
    summary = load(sweep_dir)
    assert summary["metric"] == "val/macro_f1" and summary["direction"] == "maximize"  # the task's monitor
    assert summary["storage"] == f"sqlite:///{(sweep_dir / 'study.db').resolve()}"
    assert [t["state"] for t in summary["trials"]] == ["COMPLETE"] * 3 and summary["trials_run_here"] == [0, 1, 2]
    for trial in summary["trials"]:
        run = Path(trial["run_dir"])
        assert run.parent == (sweep_dir / "trials").resolve()
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["val/macro_f1"] == pytest.approx(trial["value"])
        assert 1e-3 <= trial["params"]["optim.lr"] <= 1e-2 and 4 <= trial["params"]["model.width"] <= 8
        # the sampled values are what the run trained with
        config = (run / "config.yaml").read_text()
        assert f"width: {trial['params']['model.width']}" in config
    best = max(summary["trials"], key=lambda t: t["value"])
    assert summary["best"]["number"] == best["number"]
    assert "sweep tpe: val/macro_f1 (maximize)" in output and f"best: trial {best['number']}" in output
    study = optuna.load_study(study_name="tpe", storage=summary["storage"])
    assert len(study.trials) == 3


def test_plots_are_written(tpe_sweep):
    sweep_dir, _ = tpe_sweep
    plots = load(sweep_dir)["plots"]
    for name in ("history", "importance", "parallel"):
        path = Path(plots[name])
        assert path == sweep_dir / "plots" / f"{name}.png" and path.stat().st_size > 5000
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_trials_are_mlflow_runs_nested_under_the_sweep(tpe_sweep):
    from mlflow import MlflowClient

    sweep_dir, _ = tpe_sweep
    parent = json.loads((sweep_dir / "tracking.json").read_text())
    client = MlflowClient(tracking_uri=parent["tracking_uri"])
    children = client.search_runs([parent["experiment_id"]],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent['run_id']}'")
    assert sorted(r.data.tags["podium.trial"] for r in children) == ["0", "1", "2"]
    assert {r.info.status for r in children} == {"FINISHED"}
    sweep_run = client.get_run(parent["run_id"])
    assert sweep_run.info.status == "FINISHED" and sweep_run.data.params["sweep.metric"] == "val/macro_f1"
    assert "best_value" in sweep_run.data.metrics


def test_resume_runs_the_missing_trials(tpe_sweep, tmp_path):
    sweep_dir = tmp_path / "moved"  # a copy: the shared sweep stays as the other tests read it
    shutil.copytree(tpe_sweep[0], sweep_dir)
    result = invoke("sweep", "--resume", str(sweep_dir), "sweep.trials=4")
    assert result.exit_code == 0, result.output
    summary = load(sweep_dir)
    assert [t["number"] for t in summary["trials"]] == [0, 1, 2, 3] and summary["trials_run_here"] == [3]
    assert (sweep_dir / "trials" / "trial-0003" / "metrics.json").is_file()
    # a finished study: resuming runs nothing
    again = invoke("sweep", "--resume", str(sweep_dir), "sweep.trials=4")
    assert again.exit_code == 0 and load(sweep_dir)["trials_run_here"] == []
    refused = invoke("sweep", "--resume", str(sweep_dir), "optim.lr=0.1")
    assert refused.exit_code == 2 and "only sweep.trials= and sweep.storage=" in refused.output


def test_train_multirun_is_a_grid_sweep(tmp_path):
    result = invoke("train", *DIGITS_TINY, "optim.lr=1e-3,3e-3", f"sweep.dir={tmp_path / 'grid'}", "-m")
    assert result.exit_code == 0, result.output
    summary = load(tmp_path / "grid")
    assert sorted(t["params"]["optim.lr"] for t in summary["trials"]) == [1e-3, 3e-3]
    assert {t["state"] for t in summary["trials"]} == {"COMPLETE"}
    for trial in summary["trials"]:
        assert f"lr: {trial['params']['optim.lr']}" in (Path(trial["run_dir"]) / "config.yaml").read_text()


def test_a_hopeless_trial_is_pruned(tmp_path):
    """lr 1e-2 learns in one epoch, lr 1e-7 does not: with one finished trial the median pruner
    stops the second after its first validation, and its MLflow run is marked KILLED."""
    result = invoke("sweep", *NO_TRACKING, "tracking=mlflow", f"run.root={tmp_path}",
                    "sweep.space={optim.lr: {type: float, low: 1e-7, high: 1e-2, log: true}}",
                    "sweep.enqueue=[{optim.lr: 1e-2}, {optim.lr: 1e-7}]", "sweep.trials=2",
                    "sweep.startup_trials=1", f"sweep.dir={tmp_path / 'pruned'}")
    assert result.exit_code == 0, result.output
    trials = load(tmp_path / "pruned")["trials"]
    assert [t["params"]["optim.lr"] for t in trials] == [1e-2, 1e-7]
    assert [t["state"] for t in trials] == ["COMPLETE", "PRUNED"] and trials[1]["validations"] == 1
    pruned_run = Path(trials[1]["run_dir"])
    assert (pruned_run / "history.csv").is_file() and not (pruned_run / "metrics.json").exists()
    assert "trial 1 pruned" in result.output
    from mlflow import MlflowClient

    state = json.loads((pruned_run / "tracking.json").read_text())
    run = MlflowClient(tracking_uri=state["tracking_uri"]).get_run(state["run_id"])
    assert run.info.status == "KILLED" and run.data.tags["podium.trial_state"] == "PRUNED"


def test_pruning_hook_reports_each_validation_and_prunes_below_the_median():
    """The hook the trainer calls, on a deterministic fake objective: trials 0-2 climb to 0.9;
    a trial at 0.1 after its first validation is pruned there, one at 0.95 is not."""
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.MedianPruner(n_startup_trials=3))

    def fake_training(values):
        def objective(trial):
            hook = sweep_module.pruning_hook(trial, "val/f1")
            trainer = SimpleNamespace(state=SimpleNamespace(history=[]))
            for value in values:
                trainer.state.history.append({"val/f1": value})
                hook(trainer, trainer.state.history[-1])
            return values[-1]
        return objective

    for _ in range(3):
        study.optimize(fake_training([0.5, 0.9]), n_trials=1)
    study.optimize(fake_training([0.1, 0.2]), n_trials=1)
    study.optimize(fake_training([0.95, 0.97]), n_trials=1)
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE"] * 3 + ["PRUNED", "COMPLETE"]
    assert study.trials[3].intermediate_values == {1: 0.1}  # stopped at its first validation


@pytest.mark.parametrize("space, message", [
    ("{optim.lr: {type: uniform, low: 1, high: 2}}", "sweep.space.optim.lr.type='uniform' is not valid"),
    ("{optim.lr: {type: float, low: 0.1, high: 0.01}}", "sweep.space.optim.lr: low=0.1 > high=0.01"),
    ("{optim.nope: {type: float, low: 0.1, high: 1}}", "sweep.space.optim.nope: 'optim.nope' is not a key"),
    ("{optim.lr: {type: float, low: 0, high: 0.1}}", "sweep.space.optim.lr: optim.lr=0 is refused"),
    ("{optim.name: {type: categorical, choices: []}}", "sweep.space.optim.name.choices must be"),
    ("{model.width: {type: int, low: 4, high: 8, lo: 1}}", "sweep.space.model.width: unknown field(s) lo"),
])
def test_bad_space_exits_2_naming_the_key(tmp_path, space, message):
    result = invoke("sweep", *DIGITS_TINY, f"sweep.space={space}", f"sweep.dir={tmp_path / 's'}")
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()), result.output
    assert not (tmp_path / "s").exists()  # refused before anything is written


def test_other_user_errors_exit_2(tmp_path):
    empty = invoke("sweep", *DIGITS_TINY)
    assert empty.exit_code == 2 and "sweep.space is empty" in empty.output
    shared = invoke("sweep", *DIGITS_TINY, SPACE, "sweep.storage=postgresql://u@127.0.0.1:1/db")
    assert shared.exit_code == 2 and "sweep.study=NAME" in shared.output
    run_dir = invoke("sweep", *DIGITS_TINY, SPACE, f"run.dir={tmp_path}")
    assert run_dir.exit_code == 2 and "sweep.dir=" in run_dir.output
    not_a_sweep = invoke("sweep", "--resume", str(tmp_path))
    assert not_a_sweep.exit_code == 2 and "not a sweep folder" in not_a_sweep.output


def test_split_multirun_and_override_formatting():
    plain, grid = sweep_module.split_multirun(["experiment=digits", "optim.lr=1e-3,3e-4",
                                               "model.width=range(8,17,8)", "optim.name=adamw", "-m"])
    assert plain == ["experiment=digits", "optim.name=adamw"]
    assert grid == {"optim.lr": [1e-3, 3e-4], "model.width": [8, 16]}
    assert sweep_module.override("optim.lr", 1e-05) == "optim.lr=1e-05"
    assert sweep_module.override("optim.nesterov", True) == "optim.nesterov=true"
    assert sweep_module.override("run.name", "a b") == "run.name='a b'"
