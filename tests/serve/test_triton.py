"""`podium serve --engine triton` (podium.serve.triton) against the real tritonserver binary.

The server's own venv (nvidia-pytriton, numpy<2, onnxruntime) is created once by
`ensure_environment` (about 30-40 s with pip's cache warm); without it (no network, pip failure,
a binary that cannot run here) every test that needs the server is skipped with the reason.
"""

from __future__ import annotations

import csv
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import requests
from PIL import Image
from rich.console import Console

from podium.errors import UserError
from podium.serve import triton
from podium.serve.export import export_run, load_onnx_session

TOLERANCE = 1e-5


@pytest.fixture(scope="session")
def triton_env():
    if not sys.platform.startswith("linux"):
        pytest.skip("the bundled tritonserver is a Linux binary")
    try:
        return triton.ensure_environment()
    except UserError as err:
        pytest.skip(f"no Triton server environment here: {err}")


@pytest.fixture(scope="module")
def repository(digits_run, tmp_path_factory):
    """A `podium export --format triton` repository of the digits run: (folder, model name)."""
    folder = tmp_path_factory.mktemp("triton") / "repository"
    model = export_run(digits_run, "triton", folder, console=Console(quiet=True))
    return folder, model.name


@pytest.fixture(scope="module")
def server(triton_env, repository):
    with triton.TritonServer(repository[0], port=triton.free_port(), environment=triton_env) as running:
        yield running


def infer(server, model: str, batch: np.ndarray, datatype: str = "FP32", name: str = "image"):
    """A KServe v2 JSON infer request; the response."""
    body = {"inputs": [{"name": name, "shape": list(batch.shape), "datatype": datatype,
                        "data": batch.ravel().tolist()}]}
    return requests.post(f"{server.url}/v2/models/{model}/infer", json=body, timeout=30)


def outputs(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    out = response.json()["outputs"][0]
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


def test_the_repository_loads_unchanged_and_answers_as_podium_predict(digits_run, repository, server, tmp_path):
    """Images preprocessed by the task, sent to Triton: the probabilities `podium predict` writes."""
    from podium.common.images import decode_image_bytes
    from podium.engine import session
    from podium.serve.server import task_for_run

    folder, model = repository
    assert 'platform: "onnxruntime_onnx"' in (folder / model / "config.pbtxt").read_text()  # as exported
    assert requests.get(f"{server.url}/v2/models/{model}/ready", timeout=10).status_code == 200
    rng = np.random.default_rng(0)
    for k, size in enumerate((12, 20, 33)):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(tmp_path / f"img{k}.png")
    expected = {}
    with open(session.predict(digits_run, [tmp_path], tmp_path / "pred.csv", Console(quiet=True))) as f:
        for row in csv.DictReader(f):
            expected[os.path.basename(row["id"])] = [float(v) for key, v in row.items() if key.startswith("prob_")]
    task = task_for_run(digits_run)
    channels = int(task.cfg.data.channels)
    for name, probabilities in expected.items():
        image = decode_image_bytes((tmp_path / name).read_bytes(), channels)
        tensor, _ = task.serving_preprocess(image)
        got = outputs(infer(server, model, tensor[None].numpy()))[0]
        # `podium predict` writes 6 decimals; the rest is ONNX Runtime against PyTorch
        np.testing.assert_allclose(got, probabilities, atol=TOLERANCE)


def test_a_batch_of_8_equals_8_single_requests_and_the_onnx_model(repository, server):
    folder, model = repository
    batch = np.random.default_rng(1).normal(size=(8, 3, 16, 16)).astype(np.float32)
    together = outputs(infer(server, model, batch))
    singles = np.concatenate([outputs(infer(server, model, batch[i:i + 1])) for i in range(8)])
    own = load_onnx_session(folder / model, threads=1).run(None, {"image": batch})[0]
    assert together.shape == (8, 10)
    np.testing.assert_allclose(together, singles, atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(together, own, atol=TOLERANCE, rtol=0)
    assert not np.allclose(together[0], together[1])  # distinct rows: the split back is tested


def test_bad_requests_get_4xx(repository, server):
    folder, model = repository
    good = np.zeros((1, 3, 16, 16), dtype=np.float32)
    cases = {"wrong shape": infer(server, model, np.zeros((1, 3, 8, 8), dtype=np.float32)),
             "wrong dtype": infer(server, model, good.astype(np.int32), datatype="INT32"),
             "unknown input": infer(server, model, good, name="pixels"),
             "over max_batch_size": infer(server, model, np.zeros((9, 3, 16, 16), dtype=np.float32)),
             "unknown model": infer(server, "no_such_model", good)}
    for case, response in cases.items():
        assert 400 <= response.status_code < 500, (case, response.status_code, response.text)
        assert "error" in response.json(), case
    # Triton 2.51 itself answers a body that is not JSON with 500 (its HTTP front end, not podium's
    # backend, which never sees it): an error, named, and the server keeps serving.
    malformed = requests.post(f"{server.url}/v2/models/{model}/infer", data=b"{not json", timeout=30)
    assert malformed.status_code >= 400 and "parse" in malformed.json()["error"]
    assert outputs(infer(server, model, good)).shape == (1, 10)  # still serving


def _port_is_free(port: int) -> bool:
    """Nothing listens, and a new server can bind it (SO_REUSEADDR, as servers do: the client
    connections just closed leave TIME_WAIT entries behind)."""
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", port)) == 0:
            return False
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


@pytest.mark.parametrize("source", ["run", "repository"])
def test_cli_serves_and_stops_on_sigterm(triton_env, digits_run, repository, source):
    """`podium serve RUN_DIR|REPO --engine triton`: a run is exported first, a repository served
    as is; ready, answers, then SIGTERM ends the whole process group (server and python stubs)
    and frees the port."""
    folder, model = repository
    port = triton.free_port()
    target = digits_run if source == "run" else folder
    proc = subprocess.Popen([sys.executable, "-m", "podium", "serve", str(target), "--engine", "triton",
                             "--port", str(port)], start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if requests.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else ""
            time.sleep(0.3)
        body = {"inputs": [{"name": "image", "shape": [1, 3, 16, 16], "datatype": "FP32", "data": [0.5] * 768}]}
        assert requests.post(f"{url}/v2/models/{model}/infer", json=body, timeout=30).status_code == 200
    finally:
        os.kill(proc.pid, signal.SIGTERM)  # podium only: it stops its server's group itself
        output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output
    # the test may send SIGTERM as soon as Triton is ready, before podium prints its own "at URL" line
    assert "Traceback" not in output
    with pytest.raises(ProcessLookupError):  # nothing left of podium's group, no stub either
        os.killpg(proc.pid, 0)
    assert _port_is_free(port)


def test_a_folder_that_is_neither_run_nor_repository_exits_2(triton_env, tmp_path):
    done = subprocess.run([sys.executable, "-m", "podium", "serve", str(tmp_path), "--engine", "triton"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "not a podium run folder" in done.stdout + done.stderr


def test_a_busy_port_and_an_unknown_engine_are_user_errors(triton_env, repository):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(UserError, match="not free"):
            triton.TritonServer(repository[0], port=busy.getsockname()[1], environment=triton_env).start()
    done = subprocess.run([sys.executable, "-m", "podium", "serve", str(repository[0]), "--engine", "tf-serving"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "litserve or triton" in done.stdout + done.stderr


def test_a_broken_model_fails_start_with_the_server_log(triton_env, repository, tmp_path):
    folder, model = repository
    broken = tmp_path / "repository"
    shutil.copytree(folder, broken)
    (broken / model / "1" / "model.onnx").write_bytes(b"not an onnx model")
    server = triton.TritonServer(broken, port=triton.free_port(), environment=triton_env, ready_timeout_s=60)
    with pytest.raises(UserError, match="log ends"):
        server.start()
    assert server.process is None


# ---- the environment, without the server ----------------------------------------------------


def test_a_pip_failure_is_a_user_error_with_pips_lines_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(triton, "REQUIREMENTS", ("podium-no-such-package-xyz==0.0.1",))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # fail fast, offline
    root = tmp_path / "cache" / "triton-venv"
    with pytest.raises(UserError, match="(?s)failed.*podium-no-such-package-xyz"):
        triton.ensure_environment(root)
    assert not root.exists() and list(root.parent.iterdir()) == []  # the temporary folder is gone


def test_an_unfinished_environment_folder_is_refused(tmp_path):
    root = tmp_path / "triton-venv"
    (root / "bin").mkdir(parents=True)
    with pytest.raises(UserError, match="not a finished Triton environment"):
        triton.ensure_environment(root)


def test_the_backend_ships_with_podium_and_is_laid_out(triton_env, tmp_path):
    folder = triton.backend_directory(triton_env, tmp_path / "backends")
    assert (folder / "onnxruntime" / "model.py").read_text() == \
        (triton.BACKEND_SOURCE / "onnxruntime" / "model.py").read_text()
    assert {p.name for p in (folder / "python").iterdir()} >= {"libtriton_python.so", "triton_python_backend_stub"}
    assert triton.environment_root().name == "triton-venv"
