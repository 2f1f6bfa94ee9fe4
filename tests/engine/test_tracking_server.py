"""`podium tracking-server` and `podium runs --tracking-uri`, end to end on loopback.

    .venv/bin/python -m pytest -q tests/engine/test_tracking_server.py
    # the PostgreSQL test is skipped, with the reason, where PostgreSQL 15 is absent (tests/postgres.py)

One MLflow server on a real PostgreSQL store receives two tiny digits runs over HTTP; the runs are
listed back through the CLI and an artifact is downloaded through the server and compared with
the run folder's file. The CLI command itself is exercised on an SQLite store (no PostgreSQL
needed): ready line, SIGTERM, exit 0, port free.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from podium.cli import app
from podium.engine import tracking_server as ts
from podium.errors import UserError
from tests.conftest import DIGITS_TINY
from tests.postgres import create_database

runner = CliRunner()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def group_alive(pgid: int) -> bool:
    return bool(ts.live_group_members(pgid))


# -- without a database server -----------------------------------------------------------------


def test_server_binds_loopback_unless_told_and_warns_for_the_network(tmp_path):
    argv = ts.server_command(str(tmp_path / "art"), port=5123)
    assert "--backend-store-uri" not in argv  # passed in the environment: argv is public (ps)
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert argv[argv.index("--artifacts-destination") + 1] == str((tmp_path / "art").resolve())
    assert "--serve-artifacts" in argv and "--workers" not in argv
    assert ts.network_warning("127.0.0.1") is None and ts.network_warning("localhost") is None
    assert "reachable from the network" in ts.network_warning("0.0.0.0")
    assert "reachable from the network" in ts.network_warning("10.1.2.3")


@pytest.mark.parametrize("uri, expected", [
    ("not-a-url", "not a database URL"),
    ("nosuchdb://u@h/x", "not a database URL SQLAlchemy understands"),
    ("postgresql://podium:s3cret@127.0.0.1:{port}/mlflow", "cannot connect to the backend store"),
])
def test_bad_or_unreachable_backend_store_exits_2_with_the_reason(tmp_path, uri, expected):
    uri = uri.format(port=free_port())  # nothing listens there: connection refused at once
    result = runner.invoke(app, ["tracking-server", "--backend-store-uri", uri, "--artifacts-root",
                                 str(tmp_path / "art"), "--port", str(free_port())])
    assert result.exit_code == 2, result.output
    assert expected in result.output
    assert "s3cret" not in result.output  # the password is redacted
    assert "Traceback" not in result.output


def test_store_url_picks_the_installed_postgres_driver():
    import importlib.util

    driver = "postgresql" if importlib.util.find_spec("psycopg") else "postgresql+psycopg2"
    assert ts.store_url("postgres://u:p@h/db") == f"{driver}://u:p@h/db"
    assert ts.store_url("postgresql://u@h/db") == f"{driver}://u@h/db"
    assert ts.store_url("postgresql+psycopg2://u@h/db") == "postgresql+psycopg2://u@h/db"
    assert ts.store_url("sqlite:///m.db") == "sqlite:///m.db"


def test_all_interfaces_only_when_asked_and_with_a_warning(tmp_path):
    result = runner.invoke(app, ["tracking-server", "--host", "0.0.0.0", "--backend-store-uri", "not-a-url",
                                 "--artifacts-root", str(tmp_path / "art")])
    assert result.exit_code == 2
    assert "reachable from the network" in result.output


def test_taken_port_is_a_user_error(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(UserError, match=f"port {port} .* already in use"):
            ts.start_tracking_server(f"sqlite:///{tmp_path}/m.db", tmp_path / "art", port=port)


def test_runs_on_an_unreachable_server_exits_2():
    result = runner.invoke(app, ["runs", "--tracking-uri", f"http://127.0.0.1:{free_port()}"])
    assert result.exit_code == 2, result.output
    assert "does not answer" in result.output


def test_cli_prints_the_uri_and_stops_on_sigterm(tmp_path):
    """The command as users run it (on SQLite: no PostgreSQL needed): ready line, SIGTERM, exit 0."""
    port = free_port()
    # The store from the environment, as a password-holding URL should be given.
    env = {**os.environ, "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp_path}/m.db"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "podium.cli", "tracking-server", "--artifacts-root", str(tmp_path / "art"),
         "--port", str(port), "--workers", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, env=env)
    try:
        lines = []
        for line in proc.stdout:  # the server's own log lines come first
            lines.append(line)
            if "tracking.uri=" in line:
                break
        assert f"tracking.uri=http://127.0.0.1:{port}" in lines[-1], "".join(lines)[-3000:]
        assert (tmp_path / "m.db").is_file()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, proc.stdout.read()[-3000:]
        assert not group_alive(proc.pid)  # mlflow and its workers shared podium's group
        assert ts.port_is_free("127.0.0.1", port)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.stdout.close()


# -- a real PostgreSQL store -------------------------------------------------------------------


def test_two_runs_logged_to_a_postgres_backed_server_are_listed_and_their_artifacts_fetched(
        postgres_url, tmp_path, monkeypatch):
    # The tracker sets MLflow's HTTP retry variables for the process: restored after the test.
    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    # A plain postgresql:// URL, as users write it (SQLAlchemy 2.1 would look for psycopg 3 there).
    store = create_database(postgres_url, "tracking_server_e2e").replace("postgresql+psycopg2://", "postgresql://")
    artifacts = tmp_path / "server-artifacts"
    server = ts.start_tracking_server(store, artifacts, port=free_port(), workers=1, log_file=tmp_path / "server.log")
    pgid = server.process.pid
    try:
        assert server.uri.startswith("http://127.0.0.1:") and server.healthy()
        flags = [f for f in DIGITS_TINY if f != "tracking=none"]
        runs = {}
        for name in ("first", "second"):
            run = tmp_path / "runs" / name
            result = runner.invoke(app, ["train", *flags, f"run.dir={run}", f"run.root={tmp_path / 'runs'}",
                                         f"tracking.uri={server.uri}", "tracking.experiment=team"])
            assert result.exit_code == 0, result.output
            assert "tracking disabled" not in result.output, result.output
            runs[name] = run

        listed = runner.invoke(app, ["runs", "--tracking-uri", server.uri, "--json"])
        assert listed.exit_code == 0, listed.output
        rows = json.loads(listed.stdout)
        assert sorted(r["run"] for r in rows) == ["first", "second"]
        assert {r["experiment"] for r in rows} == {"team"} and {r["status"] for r in rows} == {"finished"}
        table = runner.invoke(app, ["runs", "--tracking-uri", server.uri, "--experiment", "team"])
        assert table.exit_code == 0 and "first" in table.output and "second" in table.output, table.output

        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=server.uri)
        for row in rows:
            local = runs[row["run"]]
            assert row["metrics"]["test/accuracy"] == pytest.approx(json.loads((local / "metrics.json").read_text())["test/accuracy"])
            fetched = client.download_artifacts(row["run_id"], "metrics.json", str(tmp_path / "fetched" / row["run"]))
            assert Path(fetched).read_bytes() == (local / "metrics.json").read_bytes()
            assert "plots/history.png" in {a.path for a in client.list_artifacts(row["run_id"], "plots")}
        # Stored by the server under its artifacts root (proxied: the client never wrote there).
        assert len(list(artifacts.rglob("metrics.json"))) == 2
    finally:
        code = server.stop()
    assert code is not None
    assert not group_alive(pgid)
    assert ts.port_is_free("127.0.0.1", int(server.uri.rsplit(":", 1)[1]))
