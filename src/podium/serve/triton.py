"""`podium serve --engine triton`: a podium export behind a real NVIDIA Triton Inference Server.

    podium serve runs/<run> --engine triton --port 8000        # exports, then serves
    podium serve model_repository --engine triton              # a `podium export --format triton` folder
    curl localhost:8000/v2/health/ready
    curl -d '{"inputs": [{"name": "image", "shape": [1, 3, 16, 16], "datatype": "FP32", "data": [...]}]}' \\
         localhost:8000/v2/models/<run>/infer                  # KServe v2 protocol

From Python:

    from podium.serve.triton import TritonServer, ensure_environment
    with TritonServer("model_repository", port=8000) as server:
        print(server.url)                                      # http://127.0.0.1:8000

The server is the `tritonserver` binary that PyPI's nvidia-pytriton (0.7: Triton 2.51) bundles. It
runs without a GPU, but it has only the python backend; podium's repository says `platform:
"onnxruntime_onnx"`, which Triton maps to the backend named `onnxruntime`, and podium ships a
Python-based backend of that name (serve/triton_backend/onnxruntime/model.py, ONNX Runtime inside)
that `backend_directory` lays out next to the python backend. So the exported config.pbtxt loads
unchanged, and a full Triton build with its C++ onnxruntime backend serves the same folder.

The server gets its own virtual environment (`ensure_environment`, created once by pip, as `make`
creates .venv): pytriton's python backend stub is built against numpy 1.x, which podium's own
environment (numpy 2) cannot offer. The stub embeds the interpreter's libpython: it must be the
library of the Python the venv was made from (LD_LIBRARY_PATH = its sysconfig LIBDIR; the
system's libpython3.x would otherwise be picked), and it finds the venv through `python3` on PATH
(what pytriton itself does).

The server and its python stubs run in their own process group; `stop` ends the whole group
(SIGTERM, then SIGKILL after a grace period).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from podium.errors import UserError

REQUIREMENTS = ("nvidia-pytriton>=0.7,<0.8", "numpy<2", "onnxruntime>=1.18,<2")
MARKER = "podium-triton.json"  # written last: a venv without it is unfinished
BACKEND_SOURCE = Path(__file__).parent / "triton_backend"  # Python-based backends shipped with podium
READY_TIMEOUT_S = 120.0


def environment_root() -> Path:
    """$XDG_CACHE_HOME/podium/triton-venv (default ~/.cache/podium/triton-venv)."""
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "podium" / "triton-venv"


@dataclass(frozen=True)
class TritonEnvironment:
    """The server's virtual environment: where the binary lies and what it needs to run."""

    venv: Path
    libdir: str  # the libpython folder of the interpreter the venv was made from
    python_version: str  # "3.11": picks pytriton's stub build

    @property
    def pytriton(self) -> Path:
        return self.venv / "lib" / f"python{self.python_version}" / "site-packages" / "pytriton"

    @property
    def binary(self) -> Path:
        return self.pytriton / "tritonserver" / "bin" / "tritonserver"

    @property
    def stub(self) -> Path:
        return self.pytriton / "tritonserver" / "python_backend_stubs" / self.python_version / "triton_python_backend_stub"

    def env(self) -> dict[str, str]:
        """os.environ for the server: its libraries, and this venv's python3 first on PATH."""
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
        libs = [self.libdir, str(self.pytriton.parent / "nvidia_pytriton.libs")]
        env["LD_LIBRARY_PATH"] = os.pathsep.join([*libs, *filter(None, [os.environ.get("LD_LIBRARY_PATH")])])
        env["PATH"] = os.pathsep.join([str(self.venv / "bin"), os.environ.get("PATH", "/usr/bin:/bin")])
        env["VIRTUAL_ENV"] = str(self.venv)
        return env

    def check(self) -> None:
        """Raise UserError unless the binary and the stub start here (libraries, CPU, OS)."""
        for program, args in ((self.binary, ["--help"]), (self.stub, [])):
            if not program.is_file():
                raise UserError(f"the Triton environment {self.venv} has no {program.name} ({program}); "
                                f"delete the folder to have it rebuilt.")
            try:
                done = subprocess.run([str(program), *args], env=self.env(), capture_output=True, text=True,
                                      timeout=30)
            except OSError as err:
                raise UserError(f"{program} cannot run on this machine: {err}") from None
            text = done.stdout + done.stderr
            if "error while loading shared libraries" in text or done.returncode in (126, 127):
                raise UserError(f"{program} cannot run on this machine: {text.strip()[-500:]}")


def _pip_tail(text: str, lines: int = 15) -> str:
    """pip's last lines, without the one-per-package notes about unreachable local indexes."""
    kept = [line for line in text.splitlines() if not line.startswith("WARNING: Location")]
    return "\n".join(kept[-lines:])


def _read_marker(venv: Path) -> dict | None:
    try:
        return json.loads((venv / MARKER).read_text())
    except (OSError, ValueError):
        return None


def ensure_environment(root: Path | str | None = None, console=None, timeout_s: float = 1800) -> TritonEnvironment:
    """The Triton server's venv under `root` (default `environment_root()`), created on first use
    with `python -m venv` + pip; UserError with pip's last lines when that fails.

    Built in a temporary folder beside `root`, then renamed into place: an interrupted build
    leaves no half environment, and of two processes building at once the first rename wins and
    the other drops its copy. (A venv moved by rename keeps working for this use: Python finds it
    through pyvenv.cfg next to bin/python; only the activate scripts name the old folder.)"""
    root = Path(root) if root is not None else environment_root()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    marker = _read_marker(root)
    if marker is None or marker.get("requirements") != list(REQUIREMENTS):
        if root.exists() and marker is not None:
            # an environment for other requirements (an older podium): rebuild it beside, then swap
            old = root.parent / f".{root.name}.old-{os.getpid()}"
            os.rename(root, old)
            shutil.rmtree(old, ignore_errors=True)
        elif root.exists():
            raise UserError(f"{root} exists but is not a finished Triton environment (no {MARKER}); "
                            f"delete it and run again.")
        _build(root, version, console, timeout_s)
        marker = _read_marker(root)
    environment = TritonEnvironment(root, marker["libdir"], marker["python_version"])
    environment.check()
    return environment


def _build(root: Path, version: str, console, timeout_s: float) -> None:
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    if console is not None:
        console.print(f"creating the Triton server environment in {root} (pip: {', '.join(REQUIREMENTS)}; "
                      f"once, about a minute) ...", soft_wrap=True, highlight=False)
    try:
        steps = ([sys.executable, "-m", "venv", str(tmp)],
                 [str(tmp / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check", "-q",
                  *REQUIREMENTS])
        for command in steps:
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
            except subprocess.TimeoutExpired:
                raise UserError(f"creating the Triton environment timed out after {timeout_s:.0f} s "
                                f"({' '.join(command[:4])} ...).") from None
            if done.returncode != 0:
                raise UserError(f"creating the Triton environment failed ({' '.join(command[:4])} ... exit "
                                f"{done.returncode}); pip said:\n{_pip_tail(done.stdout + done.stderr)}")
        stub = TritonEnvironment(tmp, "", version).stub
        if not stub.is_file():
            raise UserError(f"nvidia-pytriton has no python backend stub for Python {version} ({stub}).")
        (tmp / MARKER).write_text(json.dumps({"requirements": list(REQUIREMENTS), "python_version": version,
                                              "libdir": sysconfig.get_config_var("LIBDIR") or "",
                                              "python": sys.executable}, indent=2) + "\n")
        try:
            os.rename(tmp, root)
        except OSError:
            if _read_marker(root) is None:  # not another process's finished build: a real failure
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def backend_directory(environment: TritonEnvironment, folder: Path) -> Path:
    """`folder` laid out as Triton's --backend-directory: python/ (pytriton's python backend and
    the stub for this Python) and onnxruntime/model.py (podium's Python-based backend)."""
    python = folder / "python"
    python.mkdir(parents=True, exist_ok=True)
    source = environment.pytriton / "tritonserver" / "backends" / "python"
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        shutil.copy2(source / name, python / name)
    shutil.copy2(environment.stub, python / "triton_python_backend_stub")
    shutil.copytree(BACKEND_SOURCE / "onnxruntime", folder / "onnxruntime", dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    return folder


def is_model_repository(path: Path) -> bool:
    """A folder of model folders, at least one with a config.pbtxt."""
    return path.is_dir() and any(p.is_file() for p in path.glob("*/config.pbtxt"))


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as err:
            raise UserError(f"port {port} on {host} is not free ({err.strerror}); choose another with --port.") \
                from None


class TritonServer:
    """A tritonserver process serving `repository` on `host:port` (HTTP; gRPC on `grpc_port`, a
    free port by default; metrics off). `start()` returns once /v2/health/ready answers 200."""

    def __init__(self, repository, host: str = "127.0.0.1", port: int = 8000, grpc_port: int | None = None,
                 environment: TritonEnvironment | None = None, workdir=None, ready_timeout_s: float = READY_TIMEOUT_S):
        self.repository = Path(repository).resolve()
        if not is_model_repository(self.repository):
            raise UserError(f"{repository} is not a Triton model repository (no <model>/config.pbtxt inside); "
                            f"make one with `podium export RUN --format triton --out FOLDER`.")
        self.host, self.port, self.grpc_port = host, int(port), grpc_port
        self.environment = environment
        self.ready_timeout_s = ready_timeout_s
        self._workdir = Path(workdir) if workdir is not None else None
        self._own_workdir = None
        self.process: subprocess.Popen | None = None
        self.log_path: Path | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> "TritonServer":
        environment = self.environment or ensure_environment()
        _check_port_free(self.host, self.port)
        self.grpc_port = self.grpc_port or free_port(self.host)
        if self._workdir is None:
            self._own_workdir = tempfile.TemporaryDirectory(prefix="podium-triton-")
            self._workdir = Path(self._own_workdir.name)
        backends = backend_directory(environment, self._workdir / "backends")
        self.log_path = self._workdir / "tritonserver.log"
        command = [str(environment.binary), f"--model-repository={self.repository}",
                   f"--backend-directory={backends}", f"--http-address={self.host}", f"--http-port={self.port}",
                   f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}", "--allow-metrics=false",
                   "--exit-timeout-secs=5", "--exit-on-error=true"]
        with open(self.log_path, "wb") as log:
            # its own session: stop() reaches the python stubs too, and Ctrl-C in the terminal
            # reaches only podium, which then stops the group in order
            self.process = subprocess.Popen(command, env=environment.env(), stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except (OSError, AttributeError):
            return ""

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise UserError(f"tritonserver exited with code {self.process.returncode} before it was ready "
                                f"(repository {self.repository}); its log ends:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/v2/health/ready", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise UserError(f"tritonserver was not ready after {self.ready_timeout_s:.0f} s; its log ends:\n"
                        f"{self.log_tail()}")

    def stop(self, grace_s: float = 10.0) -> int | None:
        """End the server's process group (SIGTERM, SIGKILL after `grace_s`); its exit code."""
        process, self.process = self.process, None
        if process is not None:
            for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(process.pid, sig)
                except ProcessLookupError:
                    pass
                try:
                    process.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
            try:  # stubs left behind by a server that died first
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self._own_workdir is not None:
            self._own_workdir.cleanup()
            self._own_workdir, self._workdir = None, None
        return process.returncode if process is not None else None

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(path, host: str = "127.0.0.1", port: int = 8000, console=None, export_options: dict | None = None) -> None:
    """Serve a run folder (exported first, to a temporary repository) or a model repository
    (used as is) until Ctrl-C or SIGTERM; blocks."""
    from rich.console import Console

    console = console or Console(stderr=True)
    path = Path(path)
    environment = ensure_environment(console=console)
    with tempfile.TemporaryDirectory(prefix="podium-triton-") as workdir:
        repository = path
        if not is_model_repository(path):
            from podium.engine.runs import existing_run_dir
            from podium.serve.export import export_run

            target = export_run(existing_run_dir(path), "triton", Path(workdir) / "repository", console=console,
                                **(export_options or {}))
            repository = target.parent
        server = TritonServer(repository, host, port, environment=environment, workdir=Path(workdir) / "server")
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            server.start()
            models = sorted(p.parent.name for p in repository.glob("*/config.pbtxt"))
            console.print(f"Triton serving {', '.join(models)} at {server.url} "
                          f"(POST {server.url}/v2/models/{models[0]}/infer; Ctrl-C stops)",
                          soft_wrap=True, highlight=False)
            while server.process.poll() is None:
                time.sleep(0.5)
            raise UserError(f"tritonserver exited with code {server.process.returncode}; its log ends:\n"
                            f"{server.log_tail()}")
        except KeyboardInterrupt:
            console.print("stopping Triton ...")
        finally:
            server.stop()
            signal.signal(signal.SIGTERM, previous)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt
