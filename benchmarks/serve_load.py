"""Serving under load: LitServe (`podium serve`) and Triton (`podium serve --engine triton`), each
with dynamic batching and with batch size 1: throughput, latency, server CPU per request, and the
seed budget (10 images sent at once, all answered within 1 s).

    python benchmarks/serve_load.py --json bench-out/serve_load.json
    python benchmarks/serve_load.py --quick
    python benchmarks/serve_load.py --engines litserve            # without Triton
    python benchmarks/serve_load.py --run-dir runs/<run> --backend torch --clients 32   # torch: LitServe only
    python benchmarks/serve_load.py --override model=timm --override data.image_size=128  # resnet18
    python benchmarks/serve_load.py --quick --run-dir runs/<drive_unet run> --clients 4 --requests 16  # fundus U-Net

Requests are images of the exported graph's input size (`task.serving_example()`: the
classification image size, or the segmentation window, e.g. 608 x 576 for drive_unet).

Without --run-dir it trains a small digits run into a temporary folder first (a few optimizer
steps: the weights' quality does not change the speed). From that one run, up to four servers
start on loopback:

    litserve_batched   podium serve's defaults: max_batch_size 8, batch_timeout 10 ms
    litserve_batch1    max_batch_size 1
    triton_batched     `podium export --format triton` as exported: max_batch_size 8, dynamic
                       batching (preferred [4, 8], max_queue_delay 5 ms)
    triton_batch1      the same export with max_batch_size 1 (queue delay 0)

`--engines` picks them (default: both when the Triton server's environment exists, see
podium.serve.triton.ensure_environment; otherwise LitServe, and the reason is printed). Both
engines run ONNX Runtime with `--threads` intra-op threads (Triton: the `intra_op_thread_count`
parameter, added to the exported config.pbtxt) and one model instance.

What a request is differs on purpose, as it does in production: LitServe's clients upload a PNG
and the server decodes and preprocesses it; Triton's clients send the preprocessed tensor (the
task's `serving_preprocess` output, which the exported model takes) with the KServe v2 binary
tensor extension, prepared before the rounds. So "CPU per request" compares the server side of
each deployment, not the same work. The Triton here is nvidia-pytriton's tritonserver with
podium's Python-based `onnxruntime` backend (a Python stub process per instance, shared-memory
IPC per batch); a full Triton build's C++ backend would cost less in the model column.

Rounds alternate over the variants (A B C D A B C D ...); in each, N client threads (one
keep-alive HTTP session each) send a bounded number of requests as fast as answers come back,
after a short warm-up. The servers that are not measured are paused (SIGSTOP on their process
group): an idle LitServe worker with batching polls its queue every millisecond and would take
CPU from the other. Reported per variant: requests/s, p50/p95/p99 latency (client side: send to
answer), server CPU time per request (utime + stime of every process in the server's process
group, read from /proc before and after the round, split into the front end and the model
process), and the wall time of a burst of 10 simultaneous requests (median over bursts). Ratios
A / B are medians of the per-round ratios. Goals: LitServe's batching x2 throughput at p99 <=
batch 1's; Triton's CPU per request <= 0.25x LitServe's (issue 24).

The clients run in this process and share the CPUs with the server: on a 2-core machine they
take a real part of it, the same part for every variant, so compare the ratios, not the
absolute figures.
"""

from __future__ import annotations

import io
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, make_parser, median, print_table, write_json  # noqa: E402

TRAIN_QUICK = ["experiment=digits", "data.image_size=16", "model.width=8", "model.blocks=2"]
TRAIN_FULL = ["experiment=digits"]  # small_cnn, 32 x 32, the digits demo model
TRAIN_COMMON = ["trainer.max_steps=3", "trainer.num_workers=0", "tracking=none", "trainer.progress_bar=false",
                "data.augment=[]"]
SIZES = {"quick": {"clients": 8, "requests": 80, "rounds": 2, "warmup": 8, "bursts": 3},
         "full": {"clients": 32, "requests": 600, "rounds": 4, "warmup": 32, "bursts": 5}}
ENGINES = ("litserve", "triton")
BUDGET_IMAGES, BUDGET_S = 10, 1.0
GOAL_THROUGHPUT = 2.0  # batching at least doubles LitServe's throughput at equal or better p99
GOAL_TRITON_CPU = 0.25  # issue 24: Triton's server CPU per request <= 0.25x LitServe's
CHILD_ENV = {"OMP_NUM_THREADS": "1"}
# the model's process in each server's group, by its command line; the rest is the front end
MODEL_PROCESS = {"litserve": b"multiprocessing.spawn", "triton": b"triton_python_backend_stub"}
PAIRS = (("litserve_batched", "litserve_batch1"), ("triton_batched", "triton_batch1"),
         ("triton_batched", "litserve_batched"), ("triton_batch1", "litserve_batch1"))


def train_run(run_root: Path, overrides: list[str]) -> Path:
    run_dir = run_root / "run"
    proc = subprocess.run([sys.executable, "-m", "podium", "train", *overrides, f"run.dir={run_dir}"],
                          capture_output=True, text=True, env={**os.environ, **CHILD_ENV})
    if proc.returncode != 0:
        raise SystemExit(f"training the benchmark's run failed:\n{proc.stderr[-3000:]}")
    return run_dir


def describe_run(run_dir: Path) -> dict:
    """What the figures depend on: the model, its size and the network's input."""
    import torch
    from omegaconf import OmegaConf

    from podium.serve.server import task_for_run

    cfg = OmegaConf.load(run_dir / "config.yaml")
    weights = torch.load(run_dir / "checkpoints" / "best.pt", map_location="cpu", weights_only=True)["model"]
    model = str(cfg.model.name) + (f" {cfg.model.arch}" if "arch" in cfg.model else "")
    # the exported graph's input (classification: data.image_size; segmentation: task.window)
    shape = task_for_run(run_dir).serving_example().shape[1:]
    return {"run_dir": str(run_dir), "task": str(cfg.task.name), "model": model,
            "parameters": int(sum(v.numel() for v in weights.values() if v.is_floating_point())),
            "input": [int(v) for v in shape]}


def payloads(count: int, height: int, width: int) -> list[bytes]:
    """Distinct smooth RGB PNGs of the model's own input size (no resize cost; a segmentation
    window is filled, not padded)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
        buffer = io.BytesIO()
        coarse.resize((width, height), Image.BILINEAR).save(buffer, "PNG")
        out.append(buffer.getvalue())
    return out


def percentile(values: list[float], q: float) -> float:
    return float(statistics.quantiles(values, n=100, method="inclusive")[q - 1])


class Target(NamedTuple):  # not a dataclass: the tests load this script without sys.modules
    """One server under load: where it listens, its process group, and how one request is sent."""

    engine: str
    url: str
    pgid: int
    health_path: str
    send: Callable  # (requests.Session, i) -> requests.Response


def litserve_target(server, images: list[bytes]) -> Target:
    def send(session, i):
        return session.post(server.url + "/predict", files={"image": ("x.png", images[i % len(images)])})

    return Target("litserve", server.url, server.proc.pid, "/health", send)


def triton_request(tensor, input_name: str, output_name: str) -> tuple[bytes, dict]:
    """A KServe v2 infer request with the binary tensor extension (what tritonclient sends): the
    JSON header, then the raw float32 bytes; the output is asked for as binary too."""
    header = json.dumps({"inputs": [{"name": input_name, "shape": list(tensor.shape), "datatype": "FP32",
                                     "parameters": {"binary_data_size": tensor.nbytes}}],
                         "outputs": [{"name": output_name, "parameters": {"binary_data": True}}]}).encode()
    return header + tensor.tobytes(), {"Inference-Header-Content-Length": str(len(header)),
                                       "Content-Type": "application/octet-stream"}


def triton_output(response):
    """The first output of a KServe v2 answer (binary or JSON) as a numpy array."""
    import numpy as np

    content = response.content
    length = int(response.headers.get("Inference-Header-Content-Length", len(content)))
    out = json.loads(content[:length])["outputs"][0]
    if "data" in out:
        return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])
    size = int(out["parameters"]["binary_data_size"])
    return np.frombuffer(content[length:length + size], dtype=np.float32).reshape(out["shape"])


def triton_target(server, model: str, bodies: list[tuple[bytes, dict]]) -> Target:
    infer = f"{server.url}/v2/models/{model}/infer"

    def send(session, i):
        data, headers = bodies[i % len(bodies)]
        return session.post(infer, data=data, headers=headers)

    return Target("triton", server.url, server.process.pid, "/v2/health/ready", send)


def preprocessed(run_dir: Path, images: list[bytes]) -> list:
    """What Triton's clients send: each PNG decoded and preprocessed by the run's task, as the
    LitServe server does it per request (a batch of one, float32)."""
    import numpy as np

    from podium.common.images import decode_image_bytes
    from podium.serve.server import task_for_run

    task = task_for_run(run_dir)
    channels = int(task.cfg.data.channels)
    return [np.ascontiguousarray(task.serving_preprocess(decode_image_bytes(png, channels))[0][None].numpy(),
                                 dtype=np.float32) for png in images]


def export_triton(run_dir: Path, folder: Path, max_batch_size: int, threads: int) -> tuple[Path, dict]:
    """`podium export --format triton` into `folder`, batched as exported (max_batch_size 8) or
    with max_batch_size 1 and no queue delay; ONNX Runtime's intra-op threads set as LitServe's."""
    from rich.console import Console

    from podium.serve.export import export_run, read_spec

    options = {} if max_batch_size > 1 else {"max_batch_size": 1, "max_queue_delay_us": 0}
    model = export_run(run_dir, "triton", folder, console=Console(quiet=True), **options)
    config = model / "config.pbtxt"
    # honoured by podium's backend and by Triton's C++ onnxruntime backend alike
    config.write_text(config.read_text() + f'parameters {{ key: "intra_op_thread_count" '
                                           f'value: {{ string_value: "{threads}" }} }}\n')
    return model, read_spec(model)


def check_triton_answers(target: Target, model_folder: Path, tensors: list, output_name: str) -> float:
    """The served answers equal ONNX Runtime's on the same tensors: the clients send what the
    model takes. The largest difference."""
    import numpy as np
    import requests

    from podium.serve.export import load_onnx_session

    session = load_onnx_session(model_folder, threads=1)
    input_name = session.get_inputs()[0].name
    worst = 0.0
    with requests.Session() as http:
        for i, tensor in enumerate(tensors[:4]):
            response = target.send(http, i)
            if response.status_code != 200:
                raise RuntimeError(f"Triton answered {response.status_code}: {response.text[:300]}")
            expected = session.run([output_name], {input_name: tensor})[0]
            worst = max(worst, float(np.abs(triton_output(response) - expected).max()))
    if worst > 1e-4:
        raise RuntimeError(f"Triton's answers differ from ONNX Runtime's by {worst:g}")
    return worst


def load_round(target: Target, clients: int, total: int) -> dict:
    """`clients` threads send `total` requests between them; each waits for its answer."""
    import requests

    latencies: list[float] = []
    failures: list[str] = []
    counter = iter(range(total))
    lock = threading.Lock()

    def client() -> None:
        with requests.Session() as session:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                start = time.perf_counter()
                response = target.send(session, i)
                elapsed = time.perf_counter() - start
                with lock:
                    (latencies if response.status_code == 200 else failures).append(
                        elapsed if response.status_code == 200 else response.text[:200])

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if failures:
        raise RuntimeError(f"{len(failures)} requests failed ({target.engine}), e.g. {failures[0]}")
    return {"requests_per_s": total / wall, "p50_ms": 1e3 * percentile(latencies, 50),
            "p95_ms": 1e3 * percentile(latencies, 95), "p99_ms": 1e3 * percentile(latencies, 99),
            "requests": total, "wall_s": wall}


def burst(target: Target) -> float:
    """Seconds from sending BUDGET_IMAGES requests at once to the last answer."""
    import requests

    barrier = threading.Barrier(BUDGET_IMAGES + 1)
    done: list[float] = []
    sessions = [requests.Session() for _ in range(BUDGET_IMAGES)]
    for session in sessions:  # connect first: the budget is about answering, not TCP set-up
        session.get(target.url + target.health_path)

    def one(k: int) -> None:
        barrier.wait()
        response = target.send(sessions[k], k)
        response.raise_for_status()
        done.append(time.perf_counter())

    threads = [threading.Thread(target=one, args=(k,)) for k in range(BUDGET_IMAGES)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    for session in sessions:
        session.close()
    if len(done) != BUDGET_IMAGES:
        raise RuntimeError(f"a request of the burst failed ({target.engine})")
    return max(done) - start


def server_cpu_s(target: Target) -> dict[str, float] | None:
    """CPU seconds used so far by the server's process group (Linux /proc, utime + stime): the
    model's process (LitServe's spawned inference worker, Triton's python backend stub) and the
    rest (HTTP front end, queue manager or scheduler, the main process)."""
    totals = {"model": 0.0, "front": 0.0}
    tick = os.sysconf("SC_CLK_TCK")
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return None
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[2]) == target.pgid:  # the process group: the server's whole tree
            key = "model" if MODEL_PROCESS[target.engine] in cmdline else "front"
            totals[key] += (int(fields[11]) + int(fields[12])) / tick
    return totals


def measured_round(target: Target, size: dict) -> tuple[dict, list[float]]:
    """One variant's round: the load, the server's CPU per request, then the 10-image bursts."""
    before = server_cpu_s(target)
    figures = load_round(target, size["clients"], size["requests"])
    after = server_cpu_s(target)
    if before and after:
        for key in before:
            figures[f"cpu_ms_per_request_{key}"] = 1e3 * (after[key] - before[key]) / figures["requests"]
        figures["cpu_ms_per_request_total"] = figures["cpu_ms_per_request_front"] + figures["cpu_ms_per_request_model"]
        # /proc counts clock ticks (10 ms): a short round of a cheap server reads coarsely
        figures["cpu_resolution_ms_per_request"] = 1e3 / os.sysconf("SC_CLK_TCK") / figures["requests"]
    return figures, [burst(target) for _ in range(size["bursts"])]


def start_servers(run_dir: Path, variants: dict, images: list[bytes], workdir: Path, threads: int,
                  triton_env, stack: list) -> tuple[dict, dict]:
    """Every variant's server (LitServe's start in the background while Triton's repositories are
    exported and its servers start); its Target and what it was started with. Each server is
    pushed on `stack` as soon as it exists, for the caller to stop."""
    from podium.serve.server import ServerProcess
    from podium.serve.triton import TritonServer, free_port

    litserve = {}
    for name, config in variants.items():
        if config["engine"] == "litserve":
            litserve[name] = ServerProcess(run_dir, config["serve"], env=CHILD_ENV)
            stack.append(litserve[name])
    targets, settings = {}, {}
    tensors = None
    for name, config in variants.items():
        if config["engine"] != "triton":
            continue
        tensors = tensors if tensors is not None else preprocessed(run_dir, images)
        model, spec = export_triton(run_dir, workdir / name, config["max_batch_size"], threads)
        bodies = [triton_request(t, spec["input_name"], spec["output_name"]) for t in tensors]
        server = TritonServer(workdir / name, port=free_port(), environment=triton_env,
                              workdir=workdir / f"{name}-server")
        stack.append(server)
        server.start()
        targets[name] = triton_target(server, model.name, bodies)
        settings[name] = {"engine": "triton", "max_batch_size": config["max_batch_size"],
                          "max_queue_delay_us": _queue_delay_us(model / "config.pbtxt"),
                          "max_abs_difference_to_onnxruntime": check_triton_answers(
                              targets[name], model, tensors, spec["output_name"])}
    for name, server in litserve.items():
        server.wait_until_healthy()
        serve = variants[name]["serve"]
        targets[name] = litserve_target(server, images)
        settings[name] = {"engine": "litserve", "max_batch_size": serve.max_batch_size,
                          "batch_timeout_s": serve.batch_timeout}
    return {name: targets[name] for name in variants}, settings


def _queue_delay_us(config: Path) -> int:
    for line in config.read_text().splitlines():
        if "max_queue_delay_microseconds" in line:
            return int(line.split(":")[1])
    return 0


def measure(targets: dict[str, Target], size: dict) -> tuple[dict, dict]:
    """Alternate the variants' rounds; the servers not measured are paused."""
    rounds: dict[str, list[dict]] = {name: [] for name in targets}
    bursts: dict[str, list[float]] = {name: [] for name in targets}
    for target in targets.values():  # warm-up: the first requests pay for lazy initialisation
        load_round(target, size["clients"], size["warmup"])
    for _ in range(size["rounds"]):
        for name, target in targets.items():
            others = [t for n, t in targets.items() if n != name]
            for other in others:
                os.killpg(other.pgid, signal.SIGSTOP)
            try:
                figures, times = measured_round(target, size)
            finally:
                for other in others:
                    os.killpg(other.pgid, signal.SIGCONT)
            rounds[name].append(figures)
            bursts[name] += times
    return rounds, bursts


def _ratio(a: dict, b: dict, key: str) -> float | None:
    return a[key] / b[key] if key in a and key in b and b[key] > 0 else None


def summarize(settings: dict, rounds: dict, bursts: dict) -> tuple[dict, dict, dict, dict]:
    keys = ("requests_per_s", "p50_ms", "p95_ms", "p99_ms", "cpu_ms_per_request_front",
            "cpu_ms_per_request_model", "cpu_ms_per_request_total", "cpu_resolution_ms_per_request")
    figures = {}
    for name in rounds:
        figures[name] = {key: median(r[key] for r in rounds[name]) for key in keys if key in rounds[name][0]}
        figures[name].update(burst_10_s=median(bursts[name]), **settings[name])
    ratios = {}
    for a, b in PAIRS:
        if a in rounds and b in rounds:
            pairs = list(zip(rounds[a], rounds[b]))
            ratios[f"{a}/{b}"] = {
                name: median(r for r in (_ratio(x, y, key) for x, y in pairs) if r is not None)
                for name, key in (("throughput", "requests_per_s"), ("p50", "p50_ms"), ("p99", "p99_ms"),
                                  ("cpu_per_request", "cpu_ms_per_request_total"))
                if all(_ratio(x, y, key) is not None for x, y in pairs)}
    goal = {}
    batching = ratios.get("litserve_batched/litserve_batch1")
    if batching:
        goal["litserve_batching"] = {"throughput_ratio_at_least": GOAL_THROUGHPUT, "p99_ratio_at_most": 1.0,
                                     "met": batching["throughput"] >= GOAL_THROUGHPUT and batching["p99"] <= 1.0}
    cpu = {k: v["cpu_per_request"] for k, v in ratios.items() if k.startswith("triton_batch") and "litserve" in k
           and "cpu_per_request" in v}
    if cpu:
        goal["triton_cpu"] = {"cpu_ratio_at_most": GOAL_TRITON_CPU, "ratios": cpu,
                              "met": all(v <= GOAL_TRITON_CPU for v in cpu.values())}
    goal["met"] = all(g["met"] for g in goal.values())
    per_engine = {name.split("_")[0]: {"burst_s": f["burst_10_s"], "holds": f["burst_10_s"] < BUDGET_S}
                  for name, f in figures.items() if name.endswith("_batched")}
    budget = {"images": BUDGET_IMAGES, "limit_s": BUDGET_S, "per_engine": per_engine,
              "holds": bool(per_engine) and all(e["holds"] for e in per_engine.values())}
    return figures, ratios, goal, budget


def report(result: dict) -> None:
    figures, ratios, run, m = result["figures"], result["ratios"], result["run"], result["machine"]

    def cpu(f: dict, key: str) -> str:
        return f"{f[key]:.2f}" if key in f else "n/a"

    def times(r: dict, key: str) -> str:
        return f"x{r[key]:.2f}" if key in r else ""

    rows = [(name, f"{f['requests_per_s']:.1f}", f"{f['p50_ms']:.1f}", f"{f['p95_ms']:.1f}", f"{f['p99_ms']:.1f}",
             f"{f['burst_10_s'] * 1e3:.0f}", f"{cpu(f, 'cpu_ms_per_request_front')} / "
             f"{cpu(f, 'cpu_ms_per_request_model')}", cpu(f, "cpu_ms_per_request_total"))
            for name, f in figures.items()]
    rows.append(None)
    rows += [(pair, times(r, "throughput"), times(r, "p50"), "", times(r, "p99"), "", "", times(r, "cpu_per_request"))
             for pair, r in ratios.items()]
    budget, goal = result["seed_budget"], result["goal"]
    bursts = ", ".join(f"{engine} {'holds' if e['holds'] else 'MISSED'} ({e['burst_s'] * 1e3:.0f} ms)"
                       for engine, e in budget["per_engine"].items())
    goals = []
    if "litserve_batching" in goal:
        goals.append(f"LitServe batching x{GOAL_THROUGHPUT:g} throughput at p99 <= batch 1: "
                     f"{'met' if goal['litserve_batching']['met'] else 'not met'}")
    if "triton_cpu" in goal:
        goals.append(f"Triton CPU/request <= {GOAL_TRITON_CPU:g}x LitServe's: "
                     f"{'met' if goal['triton_cpu']['met'] else 'not met'}")
    skipped = f" Triton not run: {result['triton_skipped']}." if result.get("triton_skipped") else ""
    caption = (f"{run['task']} {run['model']} ({run['parameters']:,} parameters), input "
               f"{'x'.join(map(str, run['input']))}, {result['backend']} ({result['threads']} thread), "
               f"{result['clients']} clients, {result['rounds']} rounds x {result['requests_per_round']} requests, "
               f"{m['cpus_usable'] or m['cpu_count']} CPUs, {result['mode']} mode, {result['wall_s']:.0f} s. "
               f"LitServe's clients upload PNGs, Triton's send preprocessed tensors. "
               f"Seed budget ({BUDGET_IMAGES} images < {BUDGET_S:g} s): {bursts}. Goals: {'; '.join(goals)}.{skipped}")
    from rich.console import Console

    console = Console()
    if not console.is_terminal:  # a log or a pipe: rich's 80 columns would cut the variants' names
        console = Console(width=150)
    print_table("Serving under load: LitServe and Triton, dynamic batching and batch size 1",
                ["variant", "req/s", "p50 ms", "p95 ms", "p99 ms", "burst of 10 ms", "CPU ms/req front/model",
                 "CPU ms/req"], rows, caption, console=console)


def choose_engines(requested: str | None, backend: str, parser) -> tuple[list[str], object, str | None]:
    """The engines to run, the Triton environment (or None) and why Triton is left out (or None).
    Named explicitly, Triton's environment is created if missing (as `podium serve --engine
    triton` does); by default it is used only where it already exists."""
    from podium.errors import UserError
    from podium.serve import triton

    engines = [e.strip() for e in requested.split(",") if e.strip()] if requested else list(ENGINES)
    unknown = sorted(set(engines) - set(ENGINES))
    if unknown or not engines:
        parser.error(f"--engines: unknown {', '.join(unknown) or '(none)'}; choose from {', '.join(ENGINES)}")
    if "triton" not in engines:
        return engines, None, None
    reason = None
    if backend != "onnxruntime":
        reason = f"Triton serves the ONNX export; --backend {backend} is LitServe's only"
    elif not sys.platform.startswith("linux"):
        reason = "the bundled tritonserver is a Linux binary"
    elif not requested and triton._read_marker(triton.environment_root()) is None:
        reason = (f"no Triton environment at {triton.environment_root()} (`podium serve --engine triton` "
                  f"creates it once; or pass --engines litserve,triton)")
    if reason is None:
        try:
            return engines, triton.ensure_environment(), None
        except UserError as err:
            reason = str(err)
    if requested:
        parser.error(f"--engines triton: {reason}")
    print(f"Triton left out: {reason}", file=sys.stderr)
    return [e for e in engines if e != "triton"], None, reason


def main(argv: list[str] | None = None) -> dict:
    parser = make_parser(__doc__)
    parser.add_argument("--run-dir", type=Path, default=None, help="a trained run (default: train a digits run)")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="a training override when no --run-dir is given (repeatable), e.g. "
                             "--override model=timm --override data.image_size=128")
    parser.add_argument("--engines", default=None, metavar="LIST",
                        help="comma-separated: litserve, triton (default: both when Triton's environment exists)")
    parser.add_argument("--backend", choices=("onnxruntime", "torch"), default="onnxruntime",
                        help="LitServe's backend (Triton always runs the ONNX export)")
    parser.add_argument("--threads", type=int, default=1, help="the backends' intra-op threads (default 1)")
    parser.add_argument("--clients", type=int, default=None, help="concurrent client threads")
    parser.add_argument("--requests", type=int, default=None, help="requests per round and variant")
    parser.add_argument("--rounds", type=int, default=None, help="rounds over the variants")
    args = parser.parse_args(argv)
    engines, triton_env, triton_skipped = choose_engines(args.engines, args.backend, parser)

    from podium.serve.server import ServeConfig, free_port

    mode = "quick" if args.quick else "full"
    size = {**SIZES[mode], **{k: getattr(args, k) for k in ("clients", "requests", "rounds")
                              if getattr(args, k) is not None}}
    # start-up is not measured: export in the server process (isolate_export=False) to start sooner
    common = {"backend": args.backend, "threads": args.threads, "log_level": "warning", "isolate_export": False}
    variants = {}
    if "litserve" in engines:
        variants["litserve_batched"] = {"engine": "litserve", "serve": ServeConfig(**common, port=free_port())}
        variants["litserve_batch1"] = {"engine": "litserve", "serve": ServeConfig(
            **common, port=free_port(), max_batch_size=1, batch_timeout=0.0)}
    if "triton" in engines:
        variants["triton_batched"] = {"engine": "triton", "max_batch_size": 8}
        variants["triton_batch1"] = {"engine": "triton", "max_batch_size": 1}

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="podium-bench-serve-") as tmp:
        run_dir = args.run_dir or train_run(
            Path(tmp), (TRAIN_QUICK if args.quick else TRAIN_FULL) + TRAIN_COMMON + args.override)
        run = describe_run(run_dir)
        images = payloads(16, *run["input"][-2:])
        servers: list = []
        try:
            targets, settings = start_servers(run_dir, variants, images, Path(tmp), args.threads, triton_env, servers)
            rounds, bursts = measure(targets, size)
        finally:
            for server in reversed(servers):
                server.stop()
    figures, ratios, goal, budget = summarize(settings, rounds, bursts)
    result = {"benchmark": "serve_load", "mode": mode, "machine": machine_info(), "run": run, "engines": engines,
              "triton_skipped": triton_skipped, "backend": args.backend, "threads": args.threads,
              "clients": size["clients"], "requests_per_round": size["requests"], "rounds": size["rounds"],
              "figures": figures, "ratios": ratios, "goal": goal, "seed_budget": budget, "per_round": rounds,
              "bursts_s": bursts, "wall_s": time.perf_counter() - started}
    report(result)
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
