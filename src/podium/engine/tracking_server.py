"""A team MLflow tracking server on a SQL database (PostgreSQL), and listing the runs it holds.

    podium tracking-server --backend-store-uri postgresql://podium@db-host/mlflow \\
        --artifacts-root /srv/mlartifacts --port 5000
    # -> tracking.uri=http://127.0.0.1:5000
    podium train experiment=digits tracking.uri=http://127.0.0.1:5000
    podium runs --tracking-uri http://127.0.0.1:5000

This starts MLflow's own server (`mlflow server`, https://mlflow.org/docs/latest/self-hosting/),
nothing home-made: runs, params and metrics go to the backend store (any SQLAlchemy URL MLflow
accepts: postgresql://, mysql://, sqlite://); artifacts are *proxied* by the server
(`--artifacts-destination`), so a client on another machine uploads and downloads them over
HTTP and needs no access to the artifact folder or bucket itself.

Choices, and why:
* The database is checked with SQLAlchemy before MLflow starts: a wrong password or an
  unreachable host then fails in a second with the driver's reason (exit 2), instead of a
  server that never gets healthy and a screen of uvicorn tracebacks.
* 127.0.0.1 unless `host` says otherwise. MLflow has no authentication by default, so binding
  to every interface is only done when asked for, with a warning.
* The server runs in its own session (process group): Ctrl-C in the terminal reaches podium only,
  and `stop()` terminates the whole group (mlflow spawns uvicorn workers), so nothing is left
  holding the port.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Optional

from podium.common.redact import redact_text
from podium.errors import UserError

LOOPBACK = "127.0.0.1"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: assume it is reachable from elsewhere


def network_warning(host: str) -> Optional[str]:
    """The warning to print when `host` exposes the server beyond this machine, or None."""
    if is_loopback(host):
        return None
    return (f"the tracking server listens on {host}: it is reachable from the network, and MLflow "
            "asks for no password by default. Bind it to 127.0.0.1 (the default) and reach it "
            "through an SSH tunnel or a reverse proxy with authentication, unless this network is trusted.")


def store_url(uri: str) -> str:
    """`uri` with a PostgreSQL driver SQLAlchemy can load: postgres:// and postgresql:// become
    postgresql+psycopg2:// unless psycopg 3 is installed.

    SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3, while podium depends on psycopg2-binary;
    without this a plain URL would fail with "No module named 'psycopg'" here and in the server.
    "postgres://" (Heroku style) is not accepted by SQLAlchemy 2 at all.
    """
    scheme, sep, rest = uri.partition("://")
    if sep and scheme in ("postgres", "postgresql"):
        import importlib.util

        driver = "postgresql" if importlib.util.find_spec("psycopg") is not None else "postgresql+psycopg2"
        return f"{driver}://{rest}"
    return uri


def check_backend_store(uri: str, timeout_s: float = 5.0) -> None:
    """Connect to the backend store once and run `SELECT 1`; UserError with the reason if not."""
    shown = redact_text(uri)
    if "://" not in uri:
        raise UserError(f"--backend-store-uri {shown!r} is not a database URL; expected e.g. "
                        "postgresql://USER:PASSWORD@HOST:5432/DATABASE")
    try:
        import sqlalchemy
        from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError
    except ImportError as exc:  # pragma: no cover - mlflow depends on SQLAlchemy
        raise UserError(f"SQLAlchemy is needed to check the backend store: {exc}") from exc
    url = store_url(uri)
    connect_args: dict[str, Any] = {}
    if url.startswith("postgresql"):
        connect_args["connect_timeout"] = max(1, int(timeout_s))  # libpq waits forever otherwise
    try:
        engine = sqlalchemy.create_engine(url, connect_args=connect_args, poolclass=sqlalchemy.pool.NullPool)
    except (ArgumentError, NoSuchModuleError, ValueError) as exc:
        raise UserError(f"--backend-store-uri {shown!r} is not a database URL SQLAlchemy understands: "
                        f"{redact_text(str(exc))}") from exc
    except ModuleNotFoundError as exc:
        hint = " (pip install 'psycopg2-binary>=2.9,<3')" if url.startswith("postgresql") else ""
        raise UserError(f"the database driver for {shown!r} is not installed: {exc.name}{hint}") from exc
    try:
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text("SELECT 1"))
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        reason = " ".join(line.strip() for line in reason[:3])
        raise UserError(f"cannot connect to the backend store {shown}: {redact_text(reason)}") from exc
    finally:
        engine.dispose()


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        # As uvicorn binds: a port whose old connections linger in TIME_WAIT is free to reuse.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _mlflow_executable() -> str:
    # The mlflow script of this interpreter's environment: works from a venv that isn't activated.
    script = Path(sys.executable).parent / ("mlflow.exe" if os.name == "nt" else "mlflow")
    return str(script) if script.exists() else "mlflow"


def _artifacts_destination(artifacts_root: str) -> str:
    """A local folder made absolute (and created); a URL (s3://, gs://, file://) passed as is."""
    if "://" in artifacts_root:
        return artifacts_root
    path = Path(artifacts_root).expanduser().resolve()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--artifacts-root {artifacts_root}: cannot create the folder ({exc.strerror})") from exc
    return str(path)


def server_command(artifacts_root: str, host: str = LOOPBACK, port: int = 5000,
                   workers: Optional[int] = None) -> list[str]:
    """The `mlflow server` argv: artifacts proxied by the server from `artifacts_root`.

    The backend store goes in the environment (MLFLOW_BACKEND_STORE_URI, which `mlflow server`
    reads), not in argv: any user of the machine can read a process's argv (`ps`), and the URL
    usually holds the database password.
    """
    cmd = [_mlflow_executable(), "server",
           "--serve-artifacts", "--artifacts-destination", _artifacts_destination(artifacts_root),
           # Always explicit: MLflow would otherwise read MLFLOW_HOST from the environment.
           "--host", host, "--port", str(port)]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    return cmd


def _client_host(host: str) -> str:
    """Where a client on this machine reaches a server bound to `host`."""
    if host in ("0.0.0.0", "::", ""):
        return LOOPBACK
    return f"[{host}]" if ":" in host else host


def live_group_members(pgid: int) -> list[int]:
    """Pids of the running (not zombie) processes of process group `pgid`.

    Zombies are left out: an orphan is reaped by init, and a container's init may never reap it,
    though it holds no port and no memory.
    """
    proc = Path("/proc")
    if not proc.is_dir():  # not Linux: the group exists or it doesn't
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return []
        return [pgid]
    members = []
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)"
        except (OSError, IndexError):
            continue  # exited meanwhile
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(stat.parent.name))
    return members


@dataclass
class TrackingServer:
    """A running `mlflow server`; `stop()` ends its whole process group."""

    process: subprocess.Popen
    uri: str
    command: list[str] = field(repr=False)
    log_file: Optional[Path] = None

    def healthy(self, timeout_s: float = 1.0) -> bool:
        try:
            with urllib.request.urlopen(self.uri + "/health", timeout=timeout_s) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def stop(self, timeout_s: float = 10.0) -> int:
        """SIGTERM to the group, SIGKILL after `timeout_s`; returns the server's exit code."""
        if self.process.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.process.wait(timeout_s)
        # Workers that outlived their parent (they share its group): nothing may keep the port.
        deadline = time.monotonic() + timeout_s
        while live_group_members(self.process.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if live_group_members(self.process.pid):
            self._signal(signal.SIGKILL)
        return self.process.returncode

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.process.pid, sig)  # the group id is the pid: start_new_session=True
        except (ProcessLookupError, PermissionError):
            pass

    def wait(self) -> int:
        return self.process.wait()

    def __enter__(self) -> "TrackingServer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _tail(path: Optional[Path], chars: int = 2000) -> str:
    if path is None or not path.is_file():
        return ""
    return "\n" + redact_text(path.read_text(errors="replace")[-chars:])


def start_tracking_server(backend_store_uri: str, artifacts_root: str | Path, host: str = LOOPBACK,
                          port: int = 5000, workers: Optional[int] = None, startup_timeout_s: float = 120.0,
                          log_file: Optional[Path] = None, check_timeout_s: float = 5.0) -> TrackingServer:
    """Check the database, start `mlflow server`, and return once /health answers.

    Output goes to `log_file` (appended) when given, else to this process's stdout/stderr.
    UserError (exit 2) for a bad or unreachable store, a taken port, or a server that exits early.
    """
    if not 0 < int(port) < 65536:
        raise UserError(f"--port {port}: expected 1-65535")
    check_backend_store(backend_store_uri, timeout_s=check_timeout_s)
    if not port_is_free(host, port):
        raise UserError(f"port {port} on {host} is already in use; pick another with --port")
    cmd = server_command(str(artifacts_root), host, port, workers)
    env = dict(os.environ)
    env["MLFLOW_BACKEND_STORE_URI"] = store_url(backend_store_uri)
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # the server must not call home either
    # MLflow 3's job runner (GenAI judges, trace roll-ups; nothing podium logs) starts 7 more
    # processes; on a 2-core machine they stretched the server's start from ~10 s to ~40 s.
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    out: Optional[IO] = None
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        out = open(log_file, "ab")
    try:
        process = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT if out else None,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    finally:
        if out is not None:
            out.close()  # the child holds its own copy
    server = TrackingServer(process, f"http://{_client_host(host)}:{port}", cmd, log_file)
    deadline = time.monotonic() + startup_timeout_s
    try:
        while not server.healthy():
            code = process.poll()
            if code is not None:
                where = _tail(log_file) or " (its output is above)"
                raise UserError(f"the MLflow server exited with code {code} before it was ready{where}")
            if time.monotonic() > deadline:
                raise UserError(f"the MLflow server did not answer {server.uri}/health within "
                                f"{startup_timeout_s:g} s{_tail(log_file)}")
            time.sleep(0.25)
    except BaseException:
        server.stop()
        raise
    return server


def list_tracked_runs(uri: str, experiment: Optional[str] = None, timeout_s: float = 5.0,
                      max_results: int = 1000) -> list[dict]:
    """The newest runs a tracking store holds, oldest first: [{"run", "run_id", "experiment", "status",
    "metrics", "run_dir"}]; UserError when the server does not answer or the experiment is unknown."""
    from podium.engine.tracking import disable_mlflow_telemetry

    shown = redact_text(uri)
    if uri.lower().startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as response:
                response.read()
        except urllib.error.HTTPError as exc:
            raise UserError(f"--tracking-uri {shown}: /health answered HTTP {exc.code}") from exc
        except Exception as exc:  # noqa: BLE001 - URLError, timeouts, bad URLs alike
            reason = getattr(exc, "reason", exc)
            raise UserError(f"--tracking-uri {shown}: the tracking server does not answer ({reason})") from exc
        # MLflow's client would otherwise retry a failing request for minutes.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, int(timeout_s))))
    disable_mlflow_telemetry()
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=uri)
    try:
        if experiment is not None:
            found = client.get_experiment_by_name(experiment)
            if found is None:
                names = sorted(e.name for e in client.search_experiments())
                raise UserError(f"--experiment {experiment!r} is not on {shown}; it holds: {', '.join(names) or 'none'}")
            experiments = [found]
        else:
            experiments = client.search_experiments()
        names = {e.experiment_id: e.name for e in experiments}
        if not names:
            return []
        # The newest `max_results`, shown oldest first like `podium runs --root`.
        runs = client.search_runs(list(names), max_results=max_results, order_by=["attributes.start_time DESC"])[::-1]
    except MlflowException as exc:
        raise UserError(f"--tracking-uri {shown}: {redact_text(exc.message)}") from exc
    return [{"run": r.info.run_name or r.info.run_id, "run_id": r.info.run_id,
             "experiment": names.get(r.info.experiment_id, r.info.experiment_id),
             "status": r.info.status.lower(), "metrics": dict(r.data.metrics),
             "run_dir": r.data.tags.get("podium.run_dir")} for r in runs]
