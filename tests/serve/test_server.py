"""`podium.serve.server`: the served answer equals `podium predict`, bad requests get a 4xx JSON
error without disturbing their neighbours in a batch, and the server stays healthy.

A tiny digits run (tests/conftest.py `digits_run`) is trained once; two servers (ONNX Runtime and PyTorch) start in child
processes on free loopback ports, side by side, and are stopped at the end of the module.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import csv
import io
import json
import os
import random
import time

import numpy as np
import pytest
import requests
import torch
from fastapi import HTTPException
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

from podium.cli import app
from podium.common.images import decode_image_bytes
from podium.errors import UserError
from podium.serve.server import (
    RequestReader,
    ServeConfig,
    ServerProcess,
    build_server,
    default_max_pixels,
    draft_size,
    free_port,
    task_for_run,
)

CHILD_ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TOLERANCE = {"torch": 1e-5, "onnxruntime": 1e-4}  # what the issue asks of each backend


@pytest.fixture(scope="module")
def run_dir(digits_run):
    return digits_run  # tests/conftest.py: the DIGITS_TINY run, trained once per worker (read only)


def encode(array: np.ndarray, fmt: str = "PNG", mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(array)
    (image.convert(mode) if mode else image).save(buffer, fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def images(run_dir, tmp_path_factory) -> dict[str, dict]:
    """Test images of several sizes and modes, with the probabilities `podium predict` writes."""
    from podium.engine import session

    rng = np.random.default_rng(0)
    folder = tmp_path_factory.mktemp("images")
    cases = {"rgb_12.png": (rng.integers(0, 256, (12, 12, 3), dtype=np.uint8), "PNG", None),
             "grey_40x23.png": (rng.integers(0, 256, (40, 23), dtype=np.uint8), "PNG", None),
             "rgba_20.png": (rng.integers(0, 256, (20, 20, 4), dtype=np.uint8), "PNG", None),
             "photo_33.jpg": (rng.integers(0, 256, (33, 33, 3), dtype=np.uint8), "JPEG", None)}
    out = {}
    for name, (array, fmt, mode) in cases.items():
        (folder / name).write_bytes(encode(array, fmt, mode))
        out[name] = {"bytes": (folder / name).read_bytes(), "array": array}
    csv_path = session.predict(run_dir, [folder], folder / "pred.csv", Console(quiet=True))
    with open(csv_path) as f:
        for row in csv.DictReader(f):
            probs = {k[len("prob_"):]: float(v) for k, v in row.items() if k.startswith("prob_")}
            out[os.path.basename(row["id"])].update(label=row["label"], probabilities=probs)
    return out


@pytest.fixture(scope="module")
def servers(run_dir):
    """{"onnxruntime": url, "torch": url}; both start at once (the ONNX export takes longest)."""
    with contextlib.ExitStack() as stack:
        started = {backend: stack.enter_context(ServerProcess(
            run_dir, ServeConfig(backend=backend, port=free_port(), threads=1, log_level="warning", isolate_export=False), env=CHILD_ENV))
            for backend in ("onnxruntime", "torch")}
        yield {backend: server.wait_until_healthy() for backend, server in started.items()}


def assert_same_answer(answer: dict, expected: dict, tolerance: float):
    assert answer["label"] == expected["label"]
    assert answer["probabilities"].keys() == expected["probabilities"].keys()
    diff = max(abs(answer["probabilities"][k] - v) for k, v in expected["probabilities"].items())
    # `podium predict` writes 6 decimals: up to 5e-7 of the difference is its rounding
    assert diff <= tolerance, diff


# ---- the served answer ---------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_served_answer_equals_podium_predict(servers, images, backend):
    url = servers[backend] + "/predict"
    for name, case in images.items():
        sent = {"multipart": requests.post(url, files={"image": (name, case["bytes"])}),
                "raw": requests.post(url, data=case["bytes"], headers={"Content-Type": "image/png"}),
                "base64": requests.post(url, json={"image": base64.b64encode(case["bytes"]).decode()})}
        for how, response in sent.items():
            assert response.status_code == 200, (name, how, response.text)
            assert_same_answer(response.json(), case, TOLERANCE[backend])
    # an array answers what the PNG of the same pixels answers (RGB, and grey for an RGB model)
    for name in ("rgb_12.png", "grey_40x23.png"):
        response = requests.post(url, json={"array": images[name]["array"].tolist()})
        assert response.status_code == 200, response.text
        assert_same_answer(response.json(), images[name], TOLERANCE[backend])


@pytest.mark.slow
def test_health_info_and_json_errors(servers):
    url = servers["onnxruntime"]
    health = requests.get(url + "/health")
    assert health.status_code == 200 and health.text == "ok"
    info = requests.get(url + "/info").json()
    assert info["model"]["backend"] == "onnxruntime"
    assert info["model"]["serving_spec"]["input"]["channels"] == 3
    missing = requests.get(url + "/nowhere")
    assert missing.status_code == 404 and "error" in missing.json()


# ---- robustness: a few hundred requests, malformed ones mixed with valid ones, concurrently ----


def malformed_requests(images: dict) -> dict[str, dict]:
    """name -> requests.post keyword arguments, each a request the server must refuse with 4xx."""
    rng = random.Random(0)
    png = images["rgb_12.png"]["bytes"]
    return {
        "random_bytes": {"data": rng.randbytes(500), "headers": {"Content-Type": "image/png"}},
        "truncated_png": {"data": png[: len(png) // 2], "headers": {"Content-Type": "image/png"}},
        "truncated_png_multipart": {"files": {"image": ("t.png", png[: len(png) * 2 // 3])}},
        "wrong_channel_array": {"json": {"array": np.zeros((8, 8, 4), int).tolist()}},
        "ragged_array": {"json": {"array": [[1, 2], [3]]}},
        "float_array": {"json": {"array": [[0.5, 1.5], [2.5, 3.5]]}},
        "out_of_range_array": {"json": {"array": [[0, 256], [1, 2]]}},
        "empty_body": {"data": b"", "headers": {"Content-Type": "image/png"}},
        "huge_body": {"data": b"\0" * (10 * 1024 * 1024 + 1), "headers": {"Content-Type": "image/png"}},
        "bad_base64": {"json": {"image": "not base64 at all!"}},
        "base64_of_text": {"json": {"image": base64.b64encode(b"hello").decode()}},
        "malformed_json": {"data": b'{"image": ', "headers": {"Content-Type": "application/json"}},
        "json_list": {"json": [1, 2, 3]},
        "missing_field": {"json": {"picture": "abc"}},
        "both_fields": {"json": {"image": "abc", "array": [[1]]}},
        "image_not_string": {"json": {"image": 42}},
        "text_content_type": {"data": b"hello", "headers": {"Content-Type": "text/plain"}},
        "no_content_type": {"data": b"\x89PNG"},
        "multipart_without_image": {"files": {"file": ("a.png", png)}},
        "multipart_without_boundary": {"data": b"--x\r\n", "headers": {"Content-Type": "multipart/form-data"}},
        # a decompression bomb: 50 M pixels in a few kB (the server's default max_pixels is 50 M)
        "oversized_image": {"data": encode(np.zeros((7072, 7072), np.uint8)), "headers": {"Content-Type": "image/png"}},
    }


@pytest.mark.slow
def test_malformed_requests_get_4xx_and_valid_ones_their_answer(servers, images, run_dir):
    url = servers["onnxruntime"] + "/predict"
    bad = malformed_requests(images)
    valid = {f"valid_{how}_{name}": (name, kwargs)
             for name, case in images.items()
             for how, kwargs in (("multipart", {"files": {"image": (name, case["bytes"])}}),
                                 ("base64", {"json": {"image": base64.b64encode(case["bytes"]).decode()}}))}
    jobs = []
    for i in range(320):
        if i % 2:  # half valid, half malformed, interleaved so batches mix them
            key = list(valid)[i // 2 % len(valid)]
            jobs.append((key, True, valid[key][1]))
        else:
            key = list(bad)[i // 2 % len(bad)]
            if key == "huge_body" and i > 100:  # 11 MB each: a few are enough
                key = "random_bytes"
            jobs.append((key, False, bad[key]))
    random.Random(1).shuffle(jobs)

    def send(job):
        key, ok, kwargs = job
        return key, ok, requests.post(url, timeout=60, **kwargs)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(send, jobs))

    for key, ok, response in results:
        if ok:
            assert response.status_code == 200, (key, response.status_code, response.text)
            assert_same_answer(response.json(), images[valid[key][0]], TOLERANCE["onnxruntime"])
        else:
            assert 400 <= response.status_code < 500, (key, response.status_code, response.text)
            assert isinstance(response.json()["error"], str) and response.json()["error"], key
    assert sum(ok for _, ok, _ in results) == 160
    assert requests.get(servers["onnxruntime"] + "/health").text == "ok"
    # and it still answers correctly afterwards
    response = requests.post(url, files={"image": ("a.png", images["rgb_12.png"]["bytes"])})
    assert_same_answer(response.json(), images["rgb_12.png"], TOLERANCE["onnxruntime"])


# ---- the request reader in-process: which status each problem gets ------------------------


@pytest.fixture(scope="module")
def reader(run_dir):
    return RequestReader(task_for_run(run_dir), channels=3, max_request_bytes=1024, max_pixels=10_000)


@pytest.mark.parametrize("body, status", [
    (b'{"image": ', 400),
    (b'{"image": "@@@"}', 400),
    (b'{"x": 1}', 422),
    (b'[1]', 422),
    (b'{"array": [[1, 2, 3]]}', 200),
    (b'{"array": [[[1, 2, 3, 4]]]}', 422),
    (b'{"array": [[true, false]]}', 422),
    (b'{"array": []}', 422),
    (b'{"array": "abc"}', 422),
    (b'{"array": [[1, 2], [3]]}', 422),
    (b'{"array": [["a", "b"]]}', 422),
    (b'[' * 100_000 + b']' * 100_000, 400),
])
def test_reader_json_statuses(reader, body, status):
    if status == 200:
        prepared = reader.from_json(body)
        assert prepared.image.shape == (3, 16, 16) and prepared.image.dtype == np.float32
        return
    with pytest.raises(HTTPException) as err:
        reader.from_json(body)
    assert err.value.status_code == status


def test_reader_refuses_too_many_pixels(reader):
    with pytest.raises(HTTPException) as err:
        reader.from_bytes(encode(np.zeros((101, 100), np.uint8)))
    assert err.value.status_code == 413 and "exceeds" in err.value.detail and "--max-pixels" in err.value.detail
    with pytest.raises(HTTPException) as err:
        reader.from_bytes(b"definitely not an image")
    assert err.value.status_code == 422 and "BytesIO" not in err.value.detail


def test_an_oversized_png_is_refused_from_its_header_without_decoding(run_dir, monkeypatch):
    """A 7000 x 7000 PNG of a few dozen KB cost 560 MB per request on a 16 x 16 model."""
    from podium.common import images as image_module

    task = task_for_run(run_dir)
    reader = RequestReader(task, channels=3, max_pixels=default_max_pixels(task.serving_spec()))
    png = encode(np.zeros((7000, 7000), np.uint8))
    assert len(png) < 200_000

    def no_decoding(*args, **kwargs):
        raise AssertionError("the image was decoded")

    monkeypatch.setattr(image_module, "_decode", no_decoding)
    with pytest.raises(HTTPException) as err:
        reader.from_bytes(png)
    assert err.value.status_code == 413 and "7000 x 7000" in err.value.detail


def test_default_max_pixels_follows_the_model_input(run_dir):
    assert ServeConfig().max_pixels is None  # derived when the server is built
    assert default_max_pixels({"input": {"height": 16, "width": 16}}) == 4 * 1024 * 1024  # the floor
    assert default_max_pixels({"input": {"height": 512, "width": 1024}}) == 64 * 512 * 1024
    assert default_max_pixels({"input": {"kind": "kspace"}}) == 50_000_000  # no size to derive it from
    spec = task_for_run(run_dir).serving_spec()
    assert draft_size(spec) == 32  # classification resizes to 16 x 16: a JPEG may decode down to 32
    assert draft_size({"preprocess": [{"op": "decode"}, {"op": "letterbox", "size": [64, 64]}]}) is None


def test_a_large_jpeg_is_decoded_in_draft_mode(run_dir, monkeypatch):
    import podium.serve.server as server_module

    task = task_for_run(run_dir)
    reader = RequestReader(task, channels=3, draft=draft_size(task.serving_spec()))
    shapes = []

    def spy(*args, **kwargs):
        shapes.append(tuple(decode_image_bytes(*args, **kwargs).shape))
        return decode_image_bytes(*args, **kwargs)

    monkeypatch.setattr(server_module, "decode_image_bytes", spy)
    photo = np.random.default_rng(0).integers(0, 256, (1024, 1280, 3), dtype=np.uint8)
    prepared = reader.from_bytes(encode(photo, "JPEG"))
    assert shapes == [(3, 128, 160)]  # 1/8 scale: still >= 32 on each side
    assert prepared.image.shape == (3, 16, 16)
    reader.from_bytes(encode(photo, "PNG"))  # PNG has no reduced decode
    assert shapes[-1] == (3, 1024, 1280)


def test_a_checkpoint_the_server_cannot_load_is_a_user_error_naming_it(run_dir, tmp_path):
    """`podium serve RUN --checkpoint corrupt.pt` ended in a traceback (exit 1) from the worker."""
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint" * 20)
    with pytest.raises(UserError, match=f"checkpoint {corrupt}"):
        build_server(run_dir, ServeConfig(checkpoint=str(corrupt), isolate_export=False))
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": {"other.weight": torch.zeros(2, 2)}}, foreign)
    for backend in ("onnxruntime", "torch"):
        with pytest.raises(UserError, match=f"checkpoint {foreign} does not fit"):
            build_server(run_dir, ServeConfig(checkpoint=str(foreign), backend=backend, isolate_export=False))
    result = CliRunner().invoke(app, ["serve", str(run_dir), "--checkpoint", str(corrupt)])
    assert result.exit_code == 2 and "corrupt.pt" in result.output


def test_info_names_the_run_not_its_path(run_dir):
    server = build_server(run_dir, ServeConfig(checkpoint=str(run_dir / "checkpoints" / "best.pt"), isolate_export=False))
    assert server.app.state.podium_reader.max_pixels == 4 * 1024 * 1024
    metadata = json.dumps(server.model_metadata)
    assert str(run_dir.parent) not in metadata
    assert server.model_metadata["run"] == "run" and server.model_metadata["config"]["checkpoint"] == "best.pt"


def test_bad_config_and_bad_run_dir_are_user_errors(tmp_path, run_dir):
    with pytest.raises(UserError, match="backend"):
        build_server(run_dir, ServeConfig(backend="tensorflow"))
    with pytest.raises(UserError, match="host"):
        ServeConfig(host="192.168.1.5").validate()
    with pytest.raises(UserError, match="nonexistent.pt does not exist"):
        build_server(run_dir, ServeConfig(checkpoint="nonexistent", isolate_export=False))
    with pytest.raises(UserError, match="not a podium run folder"):
        build_server(tmp_path, ServeConfig())


@pytest.mark.slow
def test_cli_serve_answers_and_refuses_a_non_run(run_dir, images, tmp_path):
    """`podium serve` wires the server: health, one prediction, then exit 2 for a non-run folder."""
    import signal
    import subprocess
    import sys

    from podium.serve.server import free_port

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "podium", "serve", str(run_dir), "--backend", "torch",
                             "--port", str(port), "--threads", "1"], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "podium serve did not start"
            time.sleep(0.5)
        name, case = next(iter(images.items()))
        answer = requests.post(f"{url}/predict", files={"image": (name, case["bytes"])}, timeout=30)
        assert answer.status_code == 200 and answer.json()["label"] == case["label"]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    bad = subprocess.run([sys.executable, "-m", "podium", "serve", str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_the_server_process_gets_the_config_overrides_as_repeated_options(monkeypatch):
    from podium.serve import server

    seen = {}
    monkeypatch.setattr(server, "serve", lambda run_dir, config: seen.update(run=run_dir, config=config))
    server.main(["runs/x", "--overrides=tta=flips", "--overrides=tta_merge=geometric", "--port=8123"])
    assert seen["config"].overrides == ("tta=flips", "tta_merge=geometric") and seen["config"].port == 8123
    server.main(["runs/x"])
    assert seen["config"].overrides == ()
