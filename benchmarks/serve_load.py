"""`podium serve` under load: throughput and latency with dynamic batching against batch size 1,
and the seed budget (10 images sent at once, all answered within 1 s).

    python benchmarks/serve_load.py --json bench-out/serve_load.json
    python benchmarks/serve_load.py --quick
    python benchmarks/serve_load.py --run-dir runs/<run> --backend torch --clients 32
    python benchmarks/serve_load.py --override model=timm --override data.image_size=128  # resnet18

Without --run-dir it trains a small digits run into a temporary folder first (a few optimizer
steps: the weights' quality does not change the speed). Two servers start on loopback, both
from the same run: A with dynamic batching (max_batch_size 8, batch_timeout 10 ms, the
`podium serve` defaults) and B with batch size 1. Rounds alternate A B A B; in each, N client
threads (one keep-alive HTTP session each) send a bounded number of PNG uploads as fast as
answers come back, after a short warm-up. The server that is not measured is paused (SIGSTOP on
its process group): an idle LitServe worker with batching polls its queue every millisecond
and would take CPU from the other. Reported per variant: requests/s, p50/p95/p99 latency
(client side: send to answer), and the wall time of a burst of 10 simultaneous requests
(median over bursts); ratios A / B are medians of the per-round ratios.

The clients run in this process and share the CPUs with the server: on a 2-core machine they
take a real part of it, the same part for A and B, so compare the ratios, not the absolute
figures.
"""

from __future__ import annotations

import io
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, make_parser, median, print_table, write_json  # noqa: E402

TRAIN_QUICK = ["experiment=digits", "data.image_size=16", "model.width=8", "model.blocks=2"]
TRAIN_FULL = ["experiment=digits"]  # small_cnn, 32 x 32, the digits demo model
TRAIN_COMMON = ["trainer.max_steps=3", "trainer.num_workers=0", "tracking=none", "trainer.progress_bar=false",
                "data.augment=[]"]
SIZES = {"quick": {"clients": 8, "requests": 80, "rounds": 2, "warmup": 8, "bursts": 3},
         "full": {"clients": 32, "requests": 600, "rounds": 4, "warmup": 32, "bursts": 5}}
BUDGET_IMAGES, BUDGET_S = 10, 1.0
GOAL_THROUGHPUT = 2.0  # the issue's: batching at least doubles throughput at equal or better p99
CHILD_ENV = {"OMP_NUM_THREADS": "1"}


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

    cfg = OmegaConf.load(run_dir / "config.yaml")
    weights = torch.load(run_dir / "checkpoints" / "best.pt", map_location="cpu", weights_only=True)["model"]
    size = int(cfg.data.get("image_size", 0))
    model = str(cfg.model.name) + (f" {cfg.model.arch}" if "arch" in cfg.model else "")
    return {"run_dir": str(run_dir), "task": str(cfg.task.name), "model": model,
            "parameters": int(sum(v.numel() for v in weights.values() if v.is_floating_point())),
            "input": [int(cfg.data.get("channels", 0)), size, size]}


def payloads(count: int, size: int) -> list[bytes]:
    """Distinct smooth RGB PNGs of `size` pixels (the model's own input size: no resize cost)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
        buffer = io.BytesIO()
        coarse.resize((size, size), Image.BILINEAR).save(buffer, "PNG")
        out.append(buffer.getvalue())
    return out


def percentile(values: list[float], q: float) -> float:
    return float(statistics.quantiles(values, n=100, method="inclusive")[q - 1])


def load_round(url: str, images: list[bytes], clients: int, total: int) -> dict:
    """`clients` threads send `total` uploads between them; each waits for its answer."""
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
                response = session.post(url + "/predict", files={"image": ("x.png", images[i % len(images)])})
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
        raise RuntimeError(f"{len(failures)} requests failed, e.g. {failures[0]}")
    return {"requests_per_s": total / wall, "p50_ms": 1e3 * percentile(latencies, 50),
            "p95_ms": 1e3 * percentile(latencies, 95), "p99_ms": 1e3 * percentile(latencies, 99),
            "requests": total, "wall_s": wall}


def burst(url: str, images: list[bytes]) -> float:
    """Seconds from sending BUDGET_IMAGES requests at once to the last answer."""
    import requests

    barrier = threading.Barrier(BUDGET_IMAGES + 1)
    done: list[float] = []
    sessions = [requests.Session() for _ in range(BUDGET_IMAGES)]
    for session in sessions:  # connect first: the budget is about answering, not TCP set-up
        session.get(url + "/health")

    def one(k: int) -> None:
        barrier.wait()
        response = sessions[k].post(url + "/predict", files={"image": ("x.png", images[k % len(images)])})
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
        raise RuntimeError("a request of the burst failed")
    return max(done) - start


def server_cpu_s(server) -> dict[str, float] | None:
    """CPU seconds used so far by the server's processes (Linux /proc): the spawned inference
    workers, and the rest (the HTTP processes, LitServe's queue manager, the idle main process)."""
    totals = {"inference": 0.0, "http": 0.0}
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
        if int(fields[2]) == server.proc.pid:  # the process group: the server's whole tree
            key = "inference" if b"multiprocessing.spawn" in cmdline else "http"
            totals[key] += (int(fields[11]) + int(fields[12])) / tick
    return totals


def measured_round(server, url: str, images: list[bytes], size: dict) -> tuple[dict, list[float]]:
    """One variant's round: the load, the server's CPU per request, then the 10-image bursts."""
    before = server_cpu_s(server)
    figures = load_round(url, images, size["clients"], size["requests"])
    after = server_cpu_s(server)
    if before and after:
        for key in before:
            figures[f"cpu_ms_per_request_{key}"] = 1e3 * (after[key] - before[key]) / figures["requests"]
    return figures, [burst(url, images) for _ in range(size["bursts"])]


def measure(run_dir: Path, variants: dict, images: list[bytes], size: dict) -> tuple[dict, dict]:
    """Start every variant's server, then alternate their rounds; the idle one is paused."""
    from podium.serve.server import ServerProcess

    servers = {name: ServerProcess(run_dir, config, env=CHILD_ENV) for name, config in variants.items()}
    rounds: dict[str, list[dict]] = {name: [] for name in variants}
    bursts: dict[str, list[float]] = {name: [] for name in variants}
    try:
        urls = {name: server.wait_until_healthy() for name, server in servers.items()}
        for name in variants:  # warm-up: the first requests pay for lazy initialisation
            load_round(urls[name], images, size["clients"], size["warmup"])
        for _ in range(size["rounds"]):
            for name in variants:
                others = [s for n, s in servers.items() if n != name]
                for other in others:
                    os.killpg(other.proc.pid, signal.SIGSTOP)
                try:
                    figures, times = measured_round(servers[name], urls[name], images, size)
                finally:
                    for other in others:
                        os.killpg(other.proc.pid, signal.SIGCONT)
                rounds[name].append(figures)
                bursts[name] += times
    finally:
        for server in servers.values():
            server.stop()
    return rounds, bursts


def summarize(variants: dict, rounds: dict, bursts: dict) -> tuple[dict, dict, dict, dict]:
    keys = ("requests_per_s", "p50_ms", "p95_ms", "p99_ms", "cpu_ms_per_request_http", "cpu_ms_per_request_inference")
    figures = {}
    for name, config in variants.items():
        figures[name] = {key: median(r[key] for r in rounds[name]) for key in keys if key in rounds[name][0]}
        figures[name].update(burst_10_s=median(bursts[name]), max_batch_size=config.max_batch_size,
                             batch_timeout_s=config.batch_timeout)
    pairs = list(zip(rounds["batched"], rounds["batch1"]))
    ratios = {"throughput": median(a["requests_per_s"] / b["requests_per_s"] for a, b in pairs),
              "p50": median(a["p50_ms"] / b["p50_ms"] for a, b in pairs),
              "p99": median(a["p99_ms"] / b["p99_ms"] for a, b in pairs)}
    goal = {"throughput_ratio_at_least": GOAL_THROUGHPUT, "p99_ratio_at_most": 1.0,
            "met": ratios["throughput"] >= GOAL_THROUGHPUT and ratios["p99"] <= 1.0}
    burst_s = figures["batched"]["burst_10_s"]
    budget = {"images": BUDGET_IMAGES, "limit_s": BUDGET_S, "burst_s": burst_s, "holds": burst_s < BUDGET_S}
    return figures, ratios, goal, budget


def report(result: dict) -> None:
    figures, ratios, run, m = result["figures"], result["ratios"], result["run"], result["machine"]

    def cpu(f: dict) -> str:
        if "cpu_ms_per_request_http" not in f:
            return "n/a"
        return f"{f['cpu_ms_per_request_http']:.1f} / {f['cpu_ms_per_request_inference']:.1f}"

    rows = [(name, f"{f['requests_per_s']:.1f}", f"{f['p50_ms']:.1f}", f"{f['p95_ms']:.1f}", f"{f['p99_ms']:.1f}",
             f"{f['burst_10_s'] * 1e3:.0f}", cpu(f)) for name, f in figures.items()]
    rows += [None, ("batched / batch1", f"x{ratios['throughput']:.2f}", f"x{ratios['p50']:.2f}", "",
                    f"x{ratios['p99']:.2f}", "", "")]
    budget, goal = result["seed_budget"], result["goal"]
    caption = (f"{run['task']} {run['model']} ({run['parameters']:,} parameters), input "
               f"{'x'.join(map(str, run['input']))}, {result['backend']} ({result['threads']} thread), "
               f"{result['clients']} clients, {result['rounds']} rounds x {result['requests_per_round']} requests, "
               f"{m['cpus_usable'] or m['cpu_count']} CPUs, {result['mode']} mode, {result['wall_s']:.0f} s. "
               f"Seed budget ({BUDGET_IMAGES} images < {BUDGET_S:g} s): "
               f"{'holds' if budget['holds'] else 'MISSED'} ({budget['burst_s'] * 1e3:.0f} ms). Goal: batching "
               f"x{GOAL_THROUGHPUT:g} throughput at p99 <= batch 1: {'met' if goal['met'] else 'not met'}.")
    print_table("podium serve: dynamic batching against batch size 1",
                ["variant", "req/s", "p50 ms", "p95 ms", "p99 ms", "burst of 10 ms", "CPU ms/req http/model"],
                rows, caption)


def main(argv: list[str] | None = None) -> dict:
    parser = make_parser(__doc__)
    parser.add_argument("--run-dir", type=Path, default=None, help="a trained run (default: train a digits run)")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="a training override when no --run-dir is given (repeatable), e.g. "
                             "--override model=timm --override data.image_size=128")
    parser.add_argument("--backend", choices=("onnxruntime", "torch"), default="onnxruntime")
    parser.add_argument("--threads", type=int, default=1, help="the backend's intra-op threads (default 1)")
    parser.add_argument("--clients", type=int, default=None, help="concurrent client threads")
    parser.add_argument("--requests", type=int, default=None, help="requests per round and variant")
    parser.add_argument("--rounds", type=int, default=None, help="A B rounds")
    args = parser.parse_args(argv)

    from podium.serve.server import ServeConfig, free_port

    mode = "quick" if args.quick else "full"
    size = {**SIZES[mode], **{k: getattr(args, k) for k in ("clients", "requests", "rounds")
                              if getattr(args, k) is not None}}
    # start-up is not measured: export in the server process (isolate_export=False) to start sooner
    common = {"backend": args.backend, "threads": args.threads, "log_level": "warning", "isolate_export": False}
    variants = {"batched": ServeConfig(**common, port=free_port()),  # podium serve's defaults
                "batch1": ServeConfig(**common, port=free_port(), max_batch_size=1, batch_timeout=0.0)}

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="podium-bench-serve-") as tmp:
        run_dir = args.run_dir or train_run(
            Path(tmp), (TRAIN_QUICK if args.quick else TRAIN_FULL) + TRAIN_COMMON + args.override)
        run = describe_run(run_dir)
        images = payloads(16, run["input"][1] or 32)
        rounds, bursts = measure(run_dir, variants, images, size)
    figures, ratios, goal, budget = summarize(variants, rounds, bursts)
    result = {"benchmark": "serve_load", "mode": mode, "machine": machine_info(), "run": run,
              "backend": args.backend, "threads": args.threads, "clients": size["clients"],
              "requests_per_round": size["requests"], "rounds": size["rounds"], "figures": figures,
              "ratios": ratios, "goal": goal, "seed_budget": budget, "per_round": rounds, "bursts_s": bursts,
              "wall_s": time.perf_counter() - started}
    report(result)
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
