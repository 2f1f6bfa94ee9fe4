"""Experiment tracking with MLflow, which is never allowed to stop training.

Every run always writes its metrics, checkpoints and reports as local files in its run folder;
MLflow is a convenience on top. So `Tracker` swallows every backend error: the first one prints
one warning saying tracking is disabled and the tracker turns itself into a no-op.

Where runs go:

* `tracking.uri` unset: an embedded SQLite store at `<runs_root>/mlflow.db`, with artifacts under
  `<runs_root>/mlartifacts/<experiment>` (MLflow's default would be `./mlruns` in the cwd).
  `podium ui` (see `ui_command`) opens the MLflow UI on that store.
* `tracking.uri: http(s)://HOST:PORT`: a team tracking server. It is probed first with a short
  timeout, because MLflow's own HTTP client retries for minutes before giving up.

The MLflow run id is kept in `<run_dir>/tracking.json`, so resuming a run continues the same MLflow
run. `mlflow` is imported lazily: importing this module stays cheap (`podium --help`, workers).

What podium sends and writes carries no secrets and no machine layout: a password in the URI
(`https://user:password@host`) is redacted in params, tracking.json and messages
(`podium.common.redact`); the run's tag is its folder relative to the runs root, not an absolute
path.

MLflow's own usage telemetry is switched off (MLFLOW_DISABLE_TELEMETRY, unless the user set it):
besides reaching the internet, its client writes `_MLFLOW_TELEMETRY_SESSION_ID` into os.environ
on import and deletes it from a background thread when its config fetch fails; a request that
reads os.environ at that moment (requests' proxy lookup iterates it) failed with
KeyError('_MLFLOW_TELEMETRY_SESSION_ID'). `disable_mlflow_telemetry` also stops a client that an
earlier `import mlflow` (by the user, or a test module) already started.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional

from podium.common.redact import redact_text

TRACKING_FILE = "tracking.json"
DB_NAME = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"

# MLflow's limits (mlflow.utils.validation); copied so that importing them needs no mlflow.
MAX_PARAM_VALUE_LENGTH = 6000
MAX_KEY_LENGTH = 250
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000

RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")

# MLflow accepts alphanumerics, "_", "-", ".", " ", ":" and "/" in names; spaces and colons are
# replaced too, because they are awkward in the UI's search syntax and colons are invalid on Windows.
_BAD_NAME_CHARS = re.compile(r"[^\w.\-/]")


def sqlite_uri(runs_root: Path) -> str:
    """The embedded store's URI: an absolute path, so the run works from any cwd."""
    return "sqlite:///" + (Path(runs_root).resolve() / DB_NAME).as_posix()


def artifact_root(runs_root: Path) -> Path:
    return Path(runs_root).resolve() / ARTIFACTS_DIR


def disable_mlflow_telemetry() -> None:
    """Switch MLflow's usage telemetry off for this process and its children (see the module
    docstring); a user's explicit MLFLOW_DISABLE_TELEMETRY wins."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    telemetry = sys.modules.get("mlflow.telemetry")
    if telemetry is not None and telemetry.get_telemetry_client() is not None:
        telemetry.set_telemetry_client()  # re-reads the variable: drops the client, unsets the id


def ui_command(runs_root: Path, host: str = "127.0.0.1", port: int = 5000) -> list[str]:
    """The argv that starts the MLflow UI on the embedded store under `runs_root`; the server it
    starts inherits MLflow's telemetry switched off (`disable_mlflow_telemetry`)."""
    disable_mlflow_telemetry()
    # Prefer the `mlflow` script of this interpreter's environment, so `podium ui` works from a
    # virtual environment that is not activated (its bin/ is not on PATH then).
    script = Path(sys.executable).parent / ("mlflow.exe" if os.name == "nt" else "mlflow")
    exe = str(script) if script.exists() else "mlflow"
    return [
        exe,
        "ui",
        "--backend-store-uri",
        sqlite_uri(runs_root),
        "--default-artifact-root",
        str(artifact_root(runs_root)),
        "--host",
        host,
        "--port",
        str(port),
    ]


def sanitize_name(name: str) -> str:
    """Make `name` a valid MLflow param/metric key: "f1/class name" -> "f1/class_name".

    Slashes are kept (the UI groups metrics by them) but the name must not look like a path that
    resolves elsewhere: no empty, "." or ".." segments and no leading slash.
    """
    name = _BAD_NAME_CHARS.sub("_", str(name))
    parts = [p if p not in (".", "..") else p.replace(".", "_") for p in name.split("/") if p]
    name = "/".join(parts) or "_"
    return name[:MAX_KEY_LENGTH]


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{"optim": {"lr": 0.1}} -> {"optim.lr": "0.1"}; values stringified and truncated."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        full = f"{prefix}{key}"
        if isinstance(value, Mapping):
            if value:
                flat.update(flatten_params(value, prefix=f"{full}."))
                continue
            value = "{}"
        flat[sanitize_name(full)] = str(value)[:MAX_PARAM_VALUE_LENGTH]
    return flat


def _to_float(value: Any) -> Optional[float]:
    """A finite float, or None (tensors and numpy scalars convert through float())."""
    try:
        number = float(value)
    except (TypeError, ValueError, RuntimeError):
        return None
    return number if math.isfinite(number) else None


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    """cfg.key for a dataclass/DictConfig, cfg[key] for a plain dict."""
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def _is_http(uri: Optional[str]) -> bool:
    return bool(uri) and uri.lower().startswith(("http://", "https://"))


class Tracker:
    """Logs one training run to MLflow; every failure degrades to "local files only".

    `enabled=False` (every rank but 0 in distributed runs) makes every method a no-op.
    """

    def __init__(
        self,
        cfg: Any,
        *,
        run_dir: Path,
        runs_root: Path,
        experiment: str,
        run_name: str,
        enabled: bool = True,
        console: Any = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.runs_root = Path(runs_root)
        self.console = console
        self.run_id: Optional[str] = None
        self.tracking_uri: Optional[str] = None
        self.experiment_name: str = _get(cfg, "experiment") or experiment
        self._client: Any = None
        self._active = False
        self._warned = False
        # Params already on the run: MLflow params are immutable, so re-logging one with another
        # value (e.g. an override on resume) would be an error; such keys are skipped.
        self._logged_params: dict[str, str] = {}

        backend = str(_get(cfg, "backend", "mlflow") or "none").lower()
        if not enabled or backend == "none":
            return
        if backend != "mlflow":
            self._disable(f"unknown tracking.backend {backend!r} (expected mlflow | none)")
            return
        try:
            self._start(cfg, run_name)
        except Exception as exc:  # noqa: BLE001 - tracking must never stop training
            self._disable("could not start the MLflow run", exc)

    # -- setup ---------------------------------------------------------------------------------

    def _start(self, cfg: Any, run_name: str) -> None:
        uri = _get(cfg, "uri") or None
        timeout_s = float(_get(cfg, "timeout_s", 5.0) or 5.0)
        artifact_location: Optional[str] = None
        if uri is None:
            self.runs_root.mkdir(parents=True, exist_ok=True)
            uri = sqlite_uri(self.runs_root)
        if _is_http(uri):
            if not self._server_reachable(uri, timeout_s):
                return  # _server_reachable already warned
            # MLflow's HTTP client otherwise retries with backoff for minutes on a dead server.
            os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
            os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(max(1, math.ceil(timeout_s)))
        elif uri.startswith("sqlite:"):
            # Without an explicit location MLflow puts artifacts in ./mlruns of the cwd.
            artifact_location = str(artifact_root(self.runs_root) / self.experiment_name)
            # The first use of a new store runs its schema migrations and logs them at INFO.
            for name in ("mlflow.store.db.utils", "alembic"):
                logging.getLogger(name).setLevel(logging.WARNING)
        self.tracking_uri = uri

        disable_mlflow_telemetry()  # before the import: mlflow starts its telemetry on import
        from mlflow import MlflowClient  # lazy: mlflow takes seconds to import
        disable_mlflow_telemetry()  # mlflow imported earlier by someone else

        # An explicit client (not the fluent mlflow.* API with its global active run), so that
        # two trackers in one process, or a user's own mlflow calls, don't interfere.
        self._client = MlflowClient(tracking_uri=uri)
        run_id = self._resume_run_id(uri)
        if run_id is None:
            experiment_id = self._experiment_id(artifact_location)
            run = self._client.create_run(
                experiment_id,
                run_name=run_name,
                tags={"podium.run_dir": self._run_label()},
            )
            run_id = run.info.run_id
            self._save_state(uri, run_id, experiment_id)
        self.run_id = run_id
        self._active = True

    def _run_label(self) -> str:
        """The run folder relative to the runs root (its name when it lies elsewhere): an absolute
        path would publish the machine's layout to everyone who reads the tracking server."""
        try:
            return self.run_dir.resolve().relative_to(self.runs_root.resolve()).as_posix()
        except ValueError:
            return self.run_dir.resolve().name

    def _server_reachable(self, uri: str, timeout_s: float) -> bool:
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response:
                if response.status < 400:
                    return True
                reason = f"HTTP {response.status}"
        except urllib.error.HTTPError as exc:
            reason = f"HTTP {exc.code}"
        except Exception as exc:  # noqa: BLE001 - URLError, timeouts, bad URLs alike
            reason = str(getattr(exc, "reason", exc)) or type(exc).__name__
        self._disable(f"tracking server {uri} is unreachable ({reason} within {timeout_s:g} s)")
        return False

    def _experiment_id(self, artifact_location: Optional[str]) -> str:
        experiment = self._client.get_experiment_by_name(self.experiment_name)
        if experiment is not None:
            if experiment.lifecycle_stage == "deleted":
                # A deleted experiment's name stays taken until it is purged; bring it back.
                self._client.restore_experiment(experiment.experiment_id)
            return experiment.experiment_id
        try:
            return self._client.create_experiment(
                self.experiment_name, artifact_location=artifact_location
            )
        except Exception:
            # Another process may have created it in the meantime.
            experiment = self._client.get_experiment_by_name(self.experiment_name)
            if experiment is None:
                raise
            return experiment.experiment_id

    def _resume_run_id(self, uri: str) -> Optional[str]:
        """The MLflow run of a previous attempt at this run folder, reopened; or None."""
        path = self.run_dir / TRACKING_FILE
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        run_id = state.get("run_id") if isinstance(state, dict) else None
        if not run_id or state.get("tracking_uri") != redact_text(uri):
            return None  # another store: that run isn't there, start a new one
        try:
            run = self._client.get_run(run_id)
        except Exception:  # noqa: BLE001 - deleted from the store: start over
            return None
        if run.info.lifecycle_stage == "deleted":
            return None
        if run.info.status != "RUNNING":
            self._client.update_run(run_id, status="RUNNING")
        self._logged_params = dict(run.data.params)
        return run_id

    def _save_state(self, uri: str, run_id: str, experiment_id: str) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        state = {
            "backend": "mlflow",
            "tracking_uri": redact_text(uri),  # compared redacted on resume
            "experiment": self.experiment_name,
            "experiment_id": experiment_id,
            "run_id": run_id,
        }
        (self.run_dir / TRACKING_FILE).write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")

    # -- failure handling ----------------------------------------------------------------------

    def _disable(self, reason: str, exc: Optional[BaseException] = None) -> None:
        """Turn into a no-op, warning once."""
        self._active = False
        if self._warned:
            return
        self._warned = True
        detail = f": {type(exc).__name__}: {exc}" if exc is not None else ""
        detail = detail if len(detail) < 500 else detail[:500] + "..."
        message = redact_text(
            f"MLflow tracking disabled - {reason}{detail}. Training continues; metrics and "
            f"checkpoints are still written as local files in {self.run_dir}."
        )
        if self.console is not None:
            try:
                from rich.markup import escape

                self.console.print(f"[yellow]{escape(message)}[/yellow]")
                return
            except Exception:  # noqa: BLE001 - a broken console must not hide the warning
                pass
        warnings.warn(message, RuntimeWarning, stacklevel=3)

    @property
    def active(self) -> bool:
        return self._active

    # -- logging -------------------------------------------------------------------------------

    def log_params(self, params: Mapping[str, Any]) -> None:
        if not self._active:
            return
        try:
            from mlflow.entities import Param

            flat = {k: redact_text(v) for k, v in flatten_params(params).items()}
            new = {k: v for k, v in flat.items() if k not in self._logged_params}
            items = [Param(k, v) for k, v in new.items()]
            for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
                self._client.log_batch(self.run_id, params=items[start : start + MAX_PARAMS_PER_BATCH])
            self._logged_params.update(new)
        except Exception as exc:  # noqa: BLE001
            self._disable("logging params failed", exc)

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        if not self._active:
            return
        try:
            from mlflow.entities import Metric

            timestamp = int(time.time() * 1000)
            # A dict so that two names that sanitise alike don't make a duplicate in one batch.
            values: dict[str, float] = {}
            for name, value in metrics.items():
                number = _to_float(value)
                if number is not None:  # NaN/Inf: skipped, MLflow's charts can't show them
                    values[sanitize_name(name)] = number
            items = [Metric(k, v, timestamp, int(step)) for k, v in values.items()]
            for start in range(0, len(items), MAX_METRICS_PER_BATCH):
                self._client.log_batch(self.run_id, metrics=items[start : start + MAX_METRICS_PER_BATCH])
        except Exception as exc:  # noqa: BLE001
            self._disable("logging metrics failed", exc)

    def log_artifact(self, path: Path, artifact_path: Optional[str] = None) -> None:
        """Upload a file, or a directory's contents, under `artifact_path` of the run."""
        if not self._active:
            return
        path = Path(path)
        if not path.exists():
            return  # not a backend problem: nothing to upload, tracking stays on
        try:
            if path.is_dir():
                self._client.log_artifacts(self.run_id, str(path), artifact_path)
            else:
                self._client.log_artifact(self.run_id, str(path), artifact_path)
        except Exception as exc:  # noqa: BLE001
            self._disable(f"uploading artifact {path.name} failed", exc)

    def finish(self, status: str = "FINISHED") -> None:
        """Mark the MLflow run FINISHED | FAILED | KILLED; later calls are no-ops."""
        if not self._active:
            return
        status = str(status).upper()
        if status not in RUN_STATUSES:
            status = "FAILED"
        try:
            self._client.set_terminated(self.run_id, status=status)
        except Exception as exc:  # noqa: BLE001
            self._disable("closing the MLflow run failed", exc)
        self._active = False
