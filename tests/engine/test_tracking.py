"""Tracker: MLflow on an embedded SQLite store, resume, and "never fatal" degradation."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import warnings

import pytest

from podium.engine.schema import TrackingConfig
from podium.engine.tracking import Tracker, flatten_params, sanitize_name, sqlite_uri, ui_command

pytest.importorskip("mlflow")


def make_tracker(tmp_path, cfg=None, run="run1", **kwargs):
    return Tracker(
        cfg or TrackingConfig(),
        run_dir=tmp_path / "runs" / run,
        runs_root=tmp_path / "runs",
        experiment="exp",
        run_name=run,
        **kwargs,
    )


def test_importing_tracking_does_not_import_mlflow():
    code = "import sys, podium.engine.tracking; print('mlflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_helpers():
    assert sanitize_name("f1/class name") == "f1/class_name"
    assert sanitize_name("/a//b/../c:") == "a/b/__/c_"
    assert flatten_params({"optim": {"lr": 0.1, "betas": [0.9, 0.99]}, "seed": 1}) == {
        "optim.lr": "0.1",
        "optim.betas": "[0.9, 0.99]",
        "seed": "1",
    }
    assert len(flatten_params({"long": "x" * 10_000})["long"]) == 6000


def test_sqlite_logs_params_metrics_artifacts_and_resumes(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)  # anything written to the cwd would show up here
    tracker = make_tracker(tmp_path)
    assert tracker.active and tracker.run_id
    assert (tmp_path / "runs" / "mlflow.db").exists()
    assert (tmp_path / "runs" / "run1" / "tracking.json").exists()

    params = {"optim": {"lr": 0.001}, "model": {"name": "resnet"}, "many": {f"p{i}": i for i in range(150)}}
    tracker.log_params(params)
    tracker.log_metrics(
        {"train/loss": 0.5, "f1/class name": 0.75, "bad": float("nan"), "inf": float("inf")}, step=3
    )
    report = tmp_path / "report.txt"
    report.write_text("hello")
    tracker.log_artifact(report)
    folder = tmp_path / "plots"
    folder.mkdir()
    (folder / "a.txt").write_text("a")
    tracker.log_artifact(folder, artifact_path="plots")
    tracker.log_artifact(tmp_path / "missing.txt")  # skipped, tracking stays on
    assert tracker.active
    tracker.finish()
    assert not tracker.active
    tracker.log_metrics({"after": 1.0}, step=4)  # no-op after finish

    client = MlflowClient(tracking_uri=sqlite_uri(tmp_path / "runs"))
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["optim.lr"] == "0.001"
    assert run.data.params["many.p149"] == "149"
    assert run.data.metrics == {"train/loss": 0.5, "f1/class_name": 0.75}
    assert [m.step for m in client.get_metric_history(tracker.run_id, "train/loss")] == [3]
    artifacts = {a.path for a in client.list_artifacts(tracker.run_id)}
    assert artifacts == {"report.txt", "plots"}
    assert [a.path for a in client.list_artifacts(tracker.run_id, "plots")] == ["plots/a.txt"]
    experiment = client.get_experiment_by_name("exp")
    assert str(tmp_path / "runs" / "mlartifacts" / "exp") in experiment.artifact_location
    assert not (tmp_path / "mlruns").exists()

    # Resume: same run folder -> same MLflow run, reopened; a changed param is not fatal.
    again = make_tracker(tmp_path)
    assert again.active and again.run_id == tracker.run_id
    assert client.get_run(again.run_id).info.status == "RUNNING"
    again.log_params({"optim": {"lr": 0.5}, "new": 1})
    again.log_metrics({"train/loss": 0.25}, step=4)
    again.finish("FAILED")
    assert again.run_id == tracker.run_id
    run = client.get_run(again.run_id)
    assert run.info.status == "FAILED"
    assert run.data.params["optim.lr"] == "0.001" and run.data.params["new"] == "1"
    history = client.get_metric_history(again.run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(3, 0.5), (4, 0.25)]

    # Another run folder -> another MLflow run in the same experiment.
    other = make_tracker(tmp_path, run="run2")
    assert other.active and other.run_id != tracker.run_id
    other.finish()


def test_unreachable_server_disables_quickly(tmp_path):
    cfg = TrackingConfig(uri="http://127.0.0.1:9", timeout_s=0.5)
    start = time.monotonic()
    with pytest.warns(RuntimeWarning, match="tracking disabled"):
        tracker = make_tracker(tmp_path, cfg)
    assert not tracker.active and tracker.run_id is None
    tracker.log_params({"a": 1})
    tracker.log_metrics({"loss": 1.0}, step=1)
    tracker.log_artifact(tmp_path)
    tracker.finish()
    assert time.monotonic() - start < 3


def test_warning_goes_to_console_when_given(tmp_path):
    from rich.console import Console

    console = Console(record=True, width=200)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warnings.warn when a console is given
        tracker = make_tracker(tmp_path, TrackingConfig(uri="http://127.0.0.1:9", timeout_s=0.5), console=console)
    assert not tracker.active
    assert "tracking disabled" in console.export_text()


@pytest.mark.parametrize("kwargs", [{"cfg": TrackingConfig(backend="none")}, {"enabled": False}])
def test_noop_trackers(tmp_path, kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tracker = make_tracker(tmp_path, **kwargs)
        assert not tracker.active and tracker.run_id is None
        tracker.log_params({"a": 1})
        tracker.log_metrics({"loss": 1.0}, step=1)
        tracker.log_artifact(tmp_path)
        tracker.finish()
    assert not (tmp_path / "runs").exists()


def test_backend_error_mid_run_warns_once(tmp_path, monkeypatch):
    tracker = make_tracker(tmp_path)
    assert tracker.active

    def broken(*args, **kwargs):
        raise ConnectionError("server went away")

    monkeypatch.setattr(tracker._client, "log_batch", broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker.log_metrics({"loss": 1.0}, step=1)
        tracker.log_metrics({"loss": 0.5}, step=2)
        tracker.log_params({"a": 1})
        tracker.finish()
    messages = [str(w.message) for w in caught if "tracking disabled" in str(w.message)]
    assert len(messages) == 1
    assert "server went away" in messages[0] and "local files" in messages[0]
    assert not tracker.active


def test_ui_command(tmp_path):
    argv = ui_command(tmp_path / "runs", port=5123)
    assert argv[0].endswith("mlflow") and argv[1] == "ui"
    assert argv[argv.index("--backend-store-uri") + 1] == sqlite_uri(tmp_path / "runs")
    assert argv[argv.index("--default-artifact-root") + 1] == str((tmp_path / "runs" / "mlartifacts").resolve())
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert argv[argv.index("--port") + 1] == "5123"


def test_server_that_passes_health_but_fails_api_disables_quickly(tmp_path, monkeypatch):
    """MLflow's HTTP client must not retry for minutes (retries are turned off for our process)."""
    # The tracker sets these for the process; monkeypatch restores them after the test.
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 503)
            self.end_headers()
            self.wfile.write(b"OK")

        do_POST = do_GET

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        cfg = TrackingConfig(uri=f"http://127.0.0.1:{server.server_port}", timeout_s=1)
        start = time.monotonic()
        with pytest.warns(RuntimeWarning, match="tracking disabled"):
            tracker = make_tracker(tmp_path, cfg)
        assert not tracker.active
        assert time.monotonic() - start < 10
    finally:
        server.shutdown()


TELEMETRY_CHILD = """
import os, sys
import mlflow.telemetry as telemetry  # imported first, telemetry on: as a test module's importorskip did
if telemetry.get_telemetry_client() is None:
    print("telemetry-off-already")
    sys.exit(0)
assert "_MLFLOW_TELEMETRY_SESSION_ID" in os.environ
from podium.engine.schema import TrackingConfig
from podium.engine.tracking import Tracker
root = sys.argv[1]
tracker = Tracker(TrackingConfig(), run_dir=root + "/runs/r", runs_root=root + "/runs", experiment="e",
                  run_name="r")
assert tracker.active
print(telemetry.get_telemetry_client() is None, "_MLFLOW_TELEMETRY_SESSION_ID" in os.environ)
"""


def test_tracking_stops_mlflow_telemetry_that_an_earlier_import_started(tmp_path):
    """The flaky `podium ui` test: mlflow imported at collection (no CI variable, no
    PYTEST_CURRENT_TEST yet) started its telemetry, whose thread later deleted
    _MLFLOW_TELEMETRY_SESSION_ID from os.environ while requests iterated it (KeyError in
    runs/create). podium's tracker must leave no telemetry client and no such variable."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTEST_CURRENT_TEST", "CI", "GITHUB_ACTIONS", "MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK")}
    env.update(HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path / ".config"))  # mlflow's installation id file
    out = subprocess.run([sys.executable, "-c", TELEMETRY_CHILD, str(tmp_path)], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    if out.stdout.strip() == "telemetry-off-already":
        pytest.skip("this environment turns MLflow telemetry off by itself (a CI variable)")
    assert out.stdout.split()[-2:] == ["True", "False"]


def test_ui_command_turns_telemetry_off_for_the_server(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_DISABLE_TELEMETRY", raising=False)
    ui_command(tmp_path)
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"  # the subprocess inherits it


def test_no_password_or_absolute_path_reaches_mlflow_or_disk(tmp_path):
    from mlflow import MlflowClient
    from rich.console import Console

    tracker = make_tracker(tmp_path)
    tracker.log_params({"tracking": {"uri": "https://alice:s3cret@mlflow.example"}})
    tracker.finish()
    run = MlflowClient(tracking_uri=sqlite_uri(tmp_path / "runs")).get_run(tracker.run_id)
    assert run.data.params["tracking.uri"] == "https://alice:***@mlflow.example"
    assert run.data.tags["podium.run_dir"] == "run1"  # relative to the runs root, not /home/...

    tracker._save_state("https://alice:s3cret@mlflow.example", "abc", "0")
    assert "s3cret" not in (tmp_path / "runs" / "run1" / "tracking.json").read_text()

    console = Console(record=True, width=300)
    make_tracker(tmp_path, TrackingConfig(uri="http://alice:s3cret@127.0.0.1:9", timeout_s=0.5), run="r2",
                 console=console)
    text = console.export_text()
    assert "tracking disabled" in text and "s3cret" not in text and "alice:***@127.0.0.1:9" in text
