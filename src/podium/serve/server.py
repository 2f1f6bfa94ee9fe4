"""`podium serve RUN_DIR`: a trained run behind LitServe, with dynamic batching.

    podium serve runs/<run>                                   # http://127.0.0.1:8000
    curl -F image=@digit.png http://127.0.0.1:8000/predict   # multipart upload
    curl --data-binary @digit.png -H 'Content-Type: image/png' http://127.0.0.1:8000/predict
    curl -d '{"image": "'"$(base64 -w0 digit.png)"'"}' -H 'Content-Type: application/json' \\
         http://127.0.0.1:8000/predict
    curl http://127.0.0.1:8000/health                         # 200 "ok" once the model is loaded

From Python (the same server, blocking; `build_server` returns it unstarted):

    from podium.serve.server import ServeConfig, serve
    serve("runs/<run>", ServeConfig(backend="torch", port=8000))

Routes (LitServe 0.2's names): POST /predict; GET /health answers 200 "ok" once every
inference worker has loaded the model (503 "not ready" before); GET /info returns the server
settings and, under "model", the task's serving spec (the same JSON `podium export` writes).

What /predict accepts, one image per request:
- multipart/form-data with a file field named "image";
- a raw body with an image content type (image/png, image/jpeg, ...) or application/octet-stream;
- application/json: {"image": "<base64 of an encoded image>"} (a data: URL prefix is allowed) or
  {"array": nested lists of integers 0..255, shaped (H, W) (grey) or (H, W, C) with the model's C}.
It answers the task's `serving_postprocess` as JSON (classification: {"label", "probabilities"}).
A bad request gets {"error": "..."} with 400 (malformed JSON, base64 or multipart; empty body),
413 (body over `max_request_bytes`, or an image over `max_pixels`), 415 (another content type)
or 422 (well formed but not a usable image: not an image, truncated, wrong channel count, missing
field).

Memory. A 160 KB PNG can declare 7000 x 7000 pixels (150 MB decoded, several copies on the way);
`max_pixels` is checked on the header before anything is decoded, and by default it is what the
model can use: 64 times its input area (8x each side), at least 4 M pixels (`default_max_pixels`).
Where the preprocessing resizes to a fixed size anyway (the answer does not depend on the original
size), a JPEG is decoded in draft mode at 1/2..1/8 scale, never below twice the input size. After a
large image the HTTP process hands freed heap back to the OS (`release_memory`): glibc keeps it
otherwise, per decoding thread. The model is exported (or, for torch, test-loaded) once, in a
short-lived child process: a checkpoint that cannot be loaded is a UserError naming it before the
server starts, and the inference workers only open the ONNX model, without lightning, the
PyTorch model or the exporter in memory.

Where the work happens, and why:
- The HTTP process (uvicorn, forked by LitServe) reads the body under the size limit, decodes the
  image and runs the task's `serving_preprocess` -- the one preprocessing path `podium predict`
  also uses. It does so in a FastAPI dependency of /predict: LitServe uses the annotation of
  `decode_request`'s `request` parameter as the endpoint's parameter type, so `Depends` there runs
  before the request is queued. That placement is what keeps a bad request from failing its
  neighbours: LitServe 0.2.19 calls `decode_request` for a whole batch inside one `try`, so an
  error raised there is sent to every request of the batch. It also overlaps decoding with
  inference on a second core.
- The inference worker (spawned) stacks the batch, runs ONNX Runtime (the model exported to a
  temporary folder with `podium.serve.export.export_run`) or PyTorch, and postprocesses each row.
The body limit is checked in the same dependency: the Content-Length header first (answered
before the body is read), then the bytes as they stream in (chunked uploads).
"""

# No `from __future__ import annotations` here: LitServe reads the annotation of
# `decode_request(request)` as an object, and a string would not resolve inside LitServe.

import base64
import binascii
import contextlib
import ctypes
import multiprocessing
import platform
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from collections.abc import Callable
from typing import Annotated

import litserve as ls
import numpy as np
import torch
from fastapi import Depends, HTTPException, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartParser

from podium.common.images import decode_image_bytes
from podium.engine.runcard import checkpoint_path
from podium.engine.task import Task
from podium.errors import UserError
from podium.serve.export import portable_path

MiB = 1024 * 1024
BACKENDS = ("onnxruntime", "torch")
# LitServe's run() accepts only these: all interfaces, IPv4 loopback, all IPv6 interfaces.
HOSTS = ("127.0.0.1", "0.0.0.0", "::")
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")  # uvicorn's
REQUEST_TIMEOUT_S = 30  # LitServe answers 504 to a request queued longer than this
# default_max_pixels: 8x the input's sides, but at least 2048 x 2048 (a photo the model shrinks)
PIXELS_PER_INPUT_PIXEL = 64
MIN_DEFAULT_PIXELS = 4 * 1024 * 1024
UNSIZED_DEFAULT_PIXELS = 50_000_000  # a task whose spec gives no input size
RELEASE_AFTER_PIXELS = 1_000_000  # decoded images this large are followed by malloc_trim (a few ms)
JSON_HELP = ('a JSON body must be an object with one of "image" (base64 of an encoded image) or '
             '"array" (nested lists of integers 0..255 shaped (H, W) or (H, W, C))')


@dataclass
class ServeConfig:
    """How to serve a run. Defaults: ONNX Runtime, batches of up to 8 gathered for 10 ms,
    loopback only, 10 MiB request bodies, images up to `default_max_pixels` of the model."""

    backend: str = "onnxruntime"  # or "torch"
    max_batch_size: int = 8  # 1 turns dynamic batching off
    batch_timeout: float = 0.01  # seconds a batch waits to fill
    host: str = "127.0.0.1"  # loopback: other machines cannot reach it unless asked ("0.0.0.0")
    port: int = 8000
    max_request_bytes: int = 10 * MiB
    max_pixels: int | None = None  # None: default_max_pixels(model input); a tiny PNG can declare a huge image
    workers_per_device: int = 1  # inference processes
    checkpoint: str = "best"  # "best", "last" or a path to a .pt file
    threads: int | None = None  # intra-op threads of the backend (None: its default)
    log_level: str = "info"  # uvicorn's; "warning" drops the per-request access log
    # load and export the checkpoint in a short-lived child, so the server never holds lightning
    # or the PyTorch model (less memory); False starts faster (no second interpreter to import
    # torch into: about 15 s less on a 2-core machine) and suits tests and development
    isolate_export: bool = True
    overrides: tuple[str, ...] = ()  # of the run's config, e.g. ("tta=flips",): served = eval's answer

    def validate(self) -> "ServeConfig":
        problems = []
        if self.backend not in BACKENDS:
            problems.append(f"backend {self.backend!r} is not one of {', '.join(BACKENDS)}")
        if self.host not in HOSTS:
            problems.append(f"host {self.host!r} is not one of {', '.join(HOSTS)} (what LitServe binds)")
        if not 1024 <= int(self.port) <= 65535:
            problems.append(f"port {self.port} is outside 1024..65535")
        if self.max_batch_size < 1 or self.workers_per_device < 1:
            problems.append("max_batch_size and workers_per_device must be at least 1")
        if not 0 <= self.batch_timeout < REQUEST_TIMEOUT_S:
            problems.append(f"batch_timeout must lie in [0, {REQUEST_TIMEOUT_S}) seconds")
        if self.max_request_bytes < 1 or (self.max_pixels is not None and self.max_pixels < 1):
            problems.append("max_request_bytes and max_pixels must be positive")
        if self.log_level not in LOG_LEVELS:
            problems.append(f"log_level {self.log_level!r} is not one of {', '.join(LOG_LEVELS)}")
        if self.threads is not None and self.threads < 1:
            problems.append("threads must be at least 1 (or None for the backend's default)")
        if problems:
            raise UserError("serve: " + "; ".join(problems) + ".")
        return self


def default_max_pixels(spec: dict) -> int:
    """The pixel bound of an upload when none is given: 64x the model's input area (8x each side),
    at least MIN_DEFAULT_PIXELS; 50 M when the spec names no input size."""
    height, width = spec.get("input", {}).get("height"), spec.get("input", {}).get("width")
    if not isinstance(height, int) or not isinstance(width, int):
        return UNSIZED_DEFAULT_PIXELS
    return max(MIN_DEFAULT_PIXELS, PIXELS_PER_INPUT_PIXEL * height * width)


def draft_size(spec: dict) -> int | None:
    """The smallest side a JPEG may be draft-decoded to, or None (full decode): only when the first
    step resizes to a fixed size, i.e. the original size is not part of the answer (landmark points
    and segmentation masks are given in original pixels). Twice the input keeps the final
    antialiased resize doing the work."""
    steps = [step for step in spec.get("preprocess", []) if step.get("op") != "decode"]
    if not steps or steps[0].get("op") != "resize" or "size" not in steps[0]:
        return None
    return 2 * max(int(v) for v in steps[0]["size"])


def release_memory() -> None:
    """Give freed heap back to the OS (glibc's malloc_trim; a no-op elsewhere). Without it a
    large decode leaves hundreds of MB resident in each decoding thread's arena."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@dataclass
class Prepared:
    """One request after `serving_preprocess`, as it travels to the inference worker. A numpy
    array, not a tensor: torch would pass tensors through shared-memory handles, one per request."""

    image: np.ndarray  # float32 (C, H, W) network input
    meta: dict


# ---- the HTTP side: body -> Prepared, or a 4xx ---------------------------------------------


class RequestReader:
    """Reads one /predict request into a `Prepared` input; raises HTTPException for bad input.

    >>> reader = RequestReader(task_for_run("runs/<digits run>"), channels=3)
    >>> reader.from_json(b'{"array": [[0, 255], [255, 0]]}').image.shape   # resized to 32 x 32
    (3, 32, 32)
    """

    def __init__(self, task: Task, channels: int, max_request_bytes: int = 10 * MiB,
                 max_pixels: int = UNSIZED_DEFAULT_PIXELS, draft: int | None = None):
        self.task = task
        self.channels = channels
        self.max_request_bytes = max_request_bytes
        self.max_pixels = max_pixels
        self.draft = draft  # see draft_size

    async def read(self, request: Request) -> Prepared:
        body = await self.read_body(request)
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if not body:
            raise HTTPException(400, "empty request body: send an image (see GET /info for the input)")
        if media_type == "multipart/form-data":
            data = await self.form_image(request, body)
            return await run_in_threadpool(self.from_bytes, data)
        if media_type == "application/json":
            return await run_in_threadpool(self.from_json, body)
        if media_type.startswith("image/") or media_type == "application/octet-stream":
            return await run_in_threadpool(self.from_bytes, body)
        raise HTTPException(415, f"content type {media_type or '(none)'!r} is not accepted: send "
                                 "multipart/form-data (file field 'image'), image/* bytes or application/json")

    async def read_body(self, request: Request) -> bytes:
        limit = self.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            # answered before reading: uvicorn discards the rest of the upload
            raise HTTPException(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():  # a chunked upload has no Content-Length: count
            size += len(chunk)
            if size > limit:
                raise HTTPException(413, f"request body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    @staticmethod
    async def form_image(request: Request, body: bytes) -> bytes:
        async def stream():
            yield body

        try:
            form = await MultiPartParser(request.headers, stream(), max_files=4, max_fields=16).parse()
        except Exception as e:  # noqa: BLE001 - a missing boundary is a KeyError, the rest MultiPartException
            raise HTTPException(400, f"malformed multipart body: {getattr(e, 'message', None) or e!r}") from None
        try:
            upload = form.get("image")
            if upload is None or isinstance(upload, str):
                raise HTTPException(422, "a multipart body needs a file field named 'image'")
            return await upload.read()
        finally:
            await form.close()

    def from_json(self, body: bytes) -> Prepared:
        try:
            payload = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise HTTPException(400, f"malformed JSON: {e}") from None
        except RecursionError:  # "[[[[...": nested deeper than Python's stack
            raise HTTPException(400, "malformed JSON: nested too deeply") from None
        if not isinstance(payload, dict) or ("image" in payload) == ("array" in payload):
            raise HTTPException(422, JSON_HELP)
        if "array" in payload:
            if type(self.task).serving_decode is not Task.serving_decode:
                raise HTTPException(422, '"array" is for images; this model takes a file (see GET /info)')
            return self.prepare(self.array_image(payload["array"]))
        text = payload["image"]
        if not isinstance(text, str):
            raise HTTPException(422, '"image" must be a base64 string')
        if text.startswith("data:") and "," in text:  # a data URL: data:image/png;base64,....
            text = text.split(",", 1)[1]
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as e:
            raise HTTPException(400, f'"image" is not valid base64: {e}') from None
        return self.from_bytes(data)

    def from_bytes(self, data: bytes) -> Prepared:
        try:
            decoded = self.task.serving_decode(data)  # non-image inputs (k-space), else None
            if decoded is not None:
                return self.prepare(decoded)
            image = decode_image_bytes(data, self.channels, name="image", max_pixels=self.max_pixels,
                                       draft=self.draft)
        except UserError as e:  # PIL names the buffer: "cannot identify image file <_io.BytesIO ...>"
            message = re.sub(r" <_io\.BytesIO object at \w+>", "", str(e))
            if "exceeds the limit" in message:
                raise HTTPException(413, f"{message} Send a smaller image (the server's max_pixels, "
                                         f"`podium serve --max-pixels`).") from None
            raise HTTPException(422, message) from None
        large = image.shape[-1] * image.shape[-2] >= RELEASE_AFTER_PIXELS
        try:
            return self.prepare(image)
        finally:
            del image
            if large:
                release_memory()

    def array_image(self, value) -> torch.Tensor:
        """Nested lists (H, W) or (H, W, C) of 0..255 -> uint8 (C, H, W). A grey (H, W) array
        becomes the model's channels as a grey PNG would (PIL's L -> RGB copies the plane)."""
        try:
            array = np.asarray(value) if isinstance(value, list) else None
        except ValueError:  # ragged lists
            array = None
        if array is None or array.dtype.kind not in "iu":
            raise HTTPException(422, '"array" must be nested lists of integers 0..255, (H, W) or (H, W, C)')
        if array.size and (array.min() < 0 or array.max() > 255):
            raise HTTPException(422, '"array" values must lie in 0..255')
        if array.ndim == 3 and array.shape[2] == 1:
            array = array[..., 0]
        if array.ndim in (2, 3) and not 0 < array.shape[0] * array.shape[1] <= self.max_pixels:
            raise HTTPException(422, f'"array" of {array.shape[0]} x {array.shape[1]} pixels: need '
                                     f'1..{self.max_pixels}')
        if array.ndim == 2 and self.channels in (1, 3):
            array = np.repeat(array[..., None], self.channels, axis=2)
        if array.ndim != 3 or array.shape[2] != self.channels:
            raise HTTPException(422, f'"array" has shape {array.shape}; the model takes (H, W) or '
                                     f'(H, W, {self.channels})')
        return torch.from_numpy(array.astype(np.uint8)).permute(2, 0, 1).contiguous()

    def prepare(self, image: torch.Tensor) -> Prepared:
        try:
            tensor, meta = self.task.serving_preprocess(image)
        except UserError as e:
            raise HTTPException(422, str(e)) from None
        return Prepared(tensor.float().numpy(), meta)


async def read_predict_request(request: Request) -> Prepared:
    """The /predict dependency: the server's `RequestReader` lives on the app's state."""
    return await request.app.state.podium_reader.read(request)


async def json_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Every HTTP error as {"error": message} (FastAPI's default says {"detail": ...})."""
    return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)


async def json_internal_error(request: Request, exc: Exception) -> JSONResponse:
    """A bug, not the client's fault: 500 in the same JSON shape (the traceback goes to the log)."""
    return JSONResponse({"error": "internal server error"}, status_code=500)


# ---- the inference side --------------------------------------------------------------------


class PodiumAPI(ls.LitAPI):
    """LitServe's view of a run. Pickled into spawned inference workers, so it holds only the
    run folder and the config until `setup` loads the model there."""

    def __init__(self, run_dir: str | os.PathLike, config: ServeConfig, onnx_model: bytes | None = None):
        with warnings.catch_warnings():  # "batch and unbatch implemented but max_batch_size is 1"
            warnings.simplefilter("ignore", UserWarning)
            super().__init__(max_batch_size=config.max_batch_size, batch_timeout=config.batch_timeout)
        self.run_dir = str(run_dir)
        self.config = config
        self.onnx_model = onnx_model  # the exported graph (backend onnxruntime), see prepare_model

    def setup(self, device):
        # The worker's own torch ops (stacking, postprocessing) are tiny: one thread unless asked.
        torch.set_num_threads(self.config.threads or 1)
        self.task, self.run_model = load_backend(Path(self.run_dir), self.config, self.onnx_model)
        self.onnx_model = None  # the session holds its own copy

    def decode_request(self, request: Annotated[Prepared, Depends(read_predict_request)]) -> Prepared:
        return request  # decoded and preprocessed in the HTTP process (see the module docstring)

    def batch(self, inputs: list[Prepared]):
        return np.stack([p.image for p in inputs]), [p.meta for p in inputs]

    def predict(self, x):
        single = isinstance(x, Prepared)  # max_batch_size 1: LitServe skips batch/unbatch
        images, metas = self.batch([x]) if single else x
        outputs = list(zip(self.run_model(images), metas))
        return outputs[0] if single else outputs

    def unbatch(self, output):
        return output

    def encode_response(self, output) -> dict:
        row, meta = output
        return self.task.serving_postprocess(torch.from_numpy(np.asarray(row)), meta)


def task_for_run(run_dir: Path) -> Task:
    """The run's task, built from its own config (no weights), with its run card: class names
    and input shape come from run.json, so the serving hooks need no training data (a run from
    before run cards still reads them from the data)."""
    from podium.engine import runcard

    return runcard.task_for_run(run_dir)


def prepare_model(run_dir: str, backend: str, checkpoint: str, overrides: tuple[str, ...] = ()) -> bytes | None:
    """Load the checkpoint once: onnxruntime -> the exported ONNX model's bytes; torch -> None
    (loaded only to check it). Raises UserError naming a checkpoint that cannot be loaded."""
    from rich.console import Console

    from podium.serve.export import export_run, load_serving_module

    console = Console(stderr=True)
    if backend == "torch":
        load_serving_module(run_dir, checkpoint, console, list(overrides))
        return None
    with tempfile.TemporaryDirectory(prefix="podium-serve-") as tmp:
        exported = export_run(run_dir, fmt="onnx", out_dir=Path(tmp) / "onnx", checkpoint=checkpoint,
                              console=console, overrides=list(overrides))
        return (exported / "model.onnx").read_bytes()


def prepare_model_in_child(run_dir: Path, config: ServeConfig) -> bytes | None:
    """`prepare_model` in a spawned process that then exits: lightning, the exporter and the
    PyTorch model never stay in the server's memory (its HTTP processes are forks of this one)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(prepare_model, str(run_dir), config.backend, config.checkpoint,
                           tuple(config.overrides)).result()


def load_backend(run_dir: Path, config: ServeConfig, onnx_model: bytes | None = None
                 ) -> tuple[Task, Callable[[np.ndarray], np.ndarray]]:
    """The run's task and a function: float32 batch (B, C, H, W) -> the graph's output rows.
    `onnx_model`: the exported graph from `prepare_model` (None: export it here)."""
    from rich.console import Console

    console = Console(stderr=True)
    if config.backend == "torch":
        from podium.engine.session import trainer_for_run

        trainer, _ = trainer_for_run(run_dir, list(config.overrides), console, config.checkpoint, with_data=False)
        module = trainer.task.serving_module(trainer.eval_model()).eval()
        device = trainer.fabric.device
        if config.threads:  # the trainer's setup may have lowered them
            torch.set_num_threads(config.threads)

        def run_torch(images: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return module(torch.from_numpy(images).to(device)).float().cpu().numpy()

        return trainer.task, run_torch

    from podium.serve.export import load_onnx_session

    if onnx_model is None:
        onnx_model = prepare_model(str(run_dir), config.backend, config.checkpoint, config.overrides)
    session = load_onnx_session(onnx_model, threads=config.threads)
    input_name = session.get_inputs()[0].name

    def run_onnx(images: np.ndarray) -> np.ndarray:
        return session.run(None, {input_name: np.ascontiguousarray(images, dtype=np.float32)})[0]

    return task_for_run(run_dir), run_onnx


# ---- the server ----------------------------------------------------------------------------


def build_server(run_dir: str | os.PathLike, config: ServeConfig | None = None) -> ls.LitServer:
    """A LitServer for the run, not started: `build_server(run, cfg).run(host=..., port=...)`."""
    config = (config or ServeConfig()).validate()
    run_dir = Path(run_dir)
    task = task_for_run(run_dir)  # UserError when run_dir is not a run folder
    if type(task).serving_preprocess is Task.serving_preprocess:
        raise UserError(f"the {type(task).__name__} does not support serving yet.")
    # Checked here, where it is a clean UserError: in a worker it would only stop the server.
    checkpoint_path(run_dir, config.checkpoint)
    spec = task.serving_spec()
    if spec.get("onnx", True) is False and config.backend == "onnxruntime":
        config = replace(config, backend="torch")  # e.g. FFTs: ONNX opset 17 has no export for them
    if spec.get("batchable", True) is False:  # inputs of different shapes cannot be stacked
        config = replace(config, max_batch_size=1)
    if config.max_pixels is None:
        config = replace(config, max_pixels=default_max_pixels(spec))
    # a corrupt or foreign checkpoint: UserError, before any server process starts
    onnx_model = (prepare_model_in_child(run_dir, config) if config.isolate_export
                  else prepare_model(str(run_dir), config.backend, config.checkpoint, config.overrides))
    # /info shows names, not the server's folder layout (paths relative to the cwd at most).
    public = {**asdict(config), "checkpoint": portable_path(config.checkpoint)}
    server = ls.LitServer(PodiumAPI(run_dir, config, onnx_model), accelerator="cpu", timeout=REQUEST_TIMEOUT_S,
                          workers_per_device=config.workers_per_device,
                          model_metadata={"run": run_dir.resolve().name, "backend": config.backend,
                                          "serving_spec": spec, "config": public})
    decode_channels = int(spec.get("decode", {}).get("channels", spec["input"]["channels"]))
    server.app.state.podium_reader = RequestReader(task, decode_channels, config.max_request_bytes,
                                                   config.max_pixels, draft_size(spec))
    server.app.add_exception_handler(StarletteHTTPException, json_error)
    server.app.add_exception_handler(Exception, json_internal_error)
    return server


def serve(run_dir: str | os.PathLike, config: ServeConfig | None = None) -> None:
    """Build the server and run it until Ctrl-C (blocking); prints the URL first."""
    from rich.console import Console

    config = (config or ServeConfig()).validate()
    server = build_server(run_dir, config)
    host = "[::1]" if config.host == "::" else config.host
    batching = (f"batches of up to {config.max_batch_size} within {config.batch_timeout * 1e3:g} ms"
                if config.max_batch_size > 1 else "no batching")
    Console(stderr=True).print(
        f"serving {run_dir} with {config.backend}, {batching}\n"
        f"  POST http://{host}:{config.port}/predict   GET http://{host}:{config.port}/health", highlight=False)
    # The HTTP processes are forked from this one and decode many requests at once, each in a
    # thread: one torch thread each, which also keeps OpenMP's pool (not fork-safe) unused.
    torch.set_num_threads(1)
    server.run(host=config.host, port=config.port, generate_client_file=False, log_level=config.log_level)


class ServerProcess:
    """`serve` in a child process, for tests and benchmarks. The child gets its own session, so
    `stop` ends LitServe's whole process tree (HTTP servers, inference workers, queue manager).
    Start several, then wait for each: their start-ups overlap.

        with ServerProcess("runs/<run>", ServeConfig(port=free_port())) as server:
            url = server.wait_until_healthy()
            requests.post(url + "/predict", files={"image": open("digit.png", "rb")}).json()
    """

    def __init__(self, run_dir: str | os.PathLike, config: ServeConfig | None = None, env: dict | None = None):
        config = (config or ServeConfig()).validate()
        args = [f"--{k.replace('_', '-')}={item}" for k, v in asdict(config).items() if v is not None
                for item in (v if isinstance(v, tuple) else [v])]  # a tuple: the option repeated
        code = "import sys; from podium.serve.server import main; main(sys.argv[1:])"
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, "-c", code, str(run_dir), *args], stdout=self.log,
                                     stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                     start_new_session=True)
        self.url = f"http://{'[::1]' if config.host == '::' else '127.0.0.1'}:{config.port}"

    def wait_until_healthy(self, timeout: float = 180) -> str:
        """The base URL, once GET /health answers 200; RuntimeError with the log's tail if not."""
        deadline = time.monotonic() + timeout
        while not _healthy(self.url):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not become healthy (exit code {self.proc.poll()}):\n"
                                   + self.output()[-3000:])
            time.sleep(0.25)
        return self.url

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def stop(self, grace: float = 10) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
        with contextlib.suppress(ProcessLookupError):  # a worker that outlived the main process
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as response:
            return response.status == 200
    except OSError:  # refused while starting, 503 until the workers are ready
        return False


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv: list[str] | None = None) -> None:
    """`python -m podium.serve.server RUN_DIR [--backend torch] [--port N] ...` (tests, benchmarks;
    users call `podium serve`)."""
    import argparse

    defaults = ServeConfig()
    parser = argparse.ArgumentParser(description="Serve a podium run over HTTP.")
    parser.add_argument("run_dir", type=Path)
    for name, value in asdict(defaults).items():
        if isinstance(value, tuple):  # repeatable: --overrides=tta=flips --overrides=...
            parser.add_argument("--" + name.replace("_", "-"), action="append", default=[])
            continue
        kind = int if name in ("threads", "max_pixels") else type(value)
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=value)
    args = vars(parser.parse_args(argv))
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in args.items()}
    run_dir = args.pop("run_dir")
    try:
        serve(run_dir, ServeConfig(**args))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
