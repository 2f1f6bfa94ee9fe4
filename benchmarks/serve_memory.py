"""`podium serve` memory: the idle server's resident memory summed over its processes, and what a
large upload costs (a small PNG that declares a 7000 x 7000 image) and leaves behind.

    python benchmarks/serve_memory.py --json bench-out/serve_memory.json
    python benchmarks/serve_memory.py --quick
    python benchmarks/serve_memory.py --run-dir runs/<run> --backend torch

Without --run-dir it trains a small digits run (32 x 32 input; --quick: 16 x 16) into a temporary
folder first. The server starts through `ServerProcess` (its own session), so its process tree
is the process group of the child: every process with that group id is counted. Per process:
RSS (what `ps` shows; pages shared between forked processes count once per process) and PSS
(shared pages divided among their sharers: the sum is what the machine really holds), both from
/proc (Linux only). Phases: idle after /health answers, then while / after `--large` uploads of
the big PNG (four at once; `--side 2000` for one under the default bound, which is decoded), each
answer's status recorded.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, make_parser, print_table, write_json  # noqa: E402

TRAIN = ["experiment=digits", "trainer.max_steps=3", "trainer.num_workers=0", "tracking=none",
         "trainer.progress_bar=false", "data.augment=[]"]
QUICK = ["data.image_size=16", "model.width=8", "model.blocks=2"]
BIG_SIDE = 7000
MiB = 1024 * 1024


def train_run(root: Path, quick: bool) -> Path:
    run_dir = root / "run"
    proc = subprocess.run([sys.executable, "-m", "podium", "train", *TRAIN, *(QUICK if quick else []),
                           f"run.dir={run_dir}"], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"training the benchmark's run failed:\n{proc.stderr[-3000:]}")
    return run_dir


def group_memory(pgid: int) -> dict:
    """{"processes", "rss_mib", "pss_mib", "per_process": [{pid, name, rss_mib, pss_mib}]}."""
    rows = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.getpgid(int(entry)) != pgid:
                continue
            fields = {}
            for line in Path(f"/proc/{entry}/smaps_rollup").read_text().splitlines()[1:]:
                key, value = line.split(":", 1)
                fields[key] = int(value.split()[0])  # kB
            name = Path(f"/proc/{entry}/comm").read_text().strip()
        except (OSError, ValueError):  # gone meanwhile, or not ours to read
            continue
        rows.append({"pid": int(entry), "name": name, "rss_mib": round(fields.get("Rss", 0) / 1024, 1),
                     "pss_mib": round(fields.get("Pss", 0) / 1024, 1)})
    return {"processes": len(rows), "rss_mib": round(sum(r["rss_mib"] for r in rows), 1),
            "pss_mib": round(sum(r["pss_mib"] for r in rows), 1), "per_process": rows}


def big_png(side: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (side, side), 0).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def post(url: str, data: bytes) -> int:
    request = urllib.request.Request(url + "/predict", data=data, headers={"Content-Type": "image/png"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def measure(run_dir: Path, backend: str, large: int, side: int) -> dict:
    from podium.serve.server import ServeConfig, ServerProcess, free_port

    config = ServeConfig(backend=backend, port=free_port(), log_level="warning")
    with ServerProcess(run_dir, config, env={"OMP_NUM_THREADS": "1"}) as server:
        url = server.wait_until_healthy()
        time.sleep(2)  # let start-up garbage settle
        idle = group_memory(server.proc.pid)
        data, statuses, peak = big_png(side), [], {"rss_mib": 0.0, "pss_mib": 0.0}
        threads = [threading.Thread(target=lambda: statuses.append(post(url, data))) for _ in range(large)]
        for thread in threads:
            thread.start()
        while any(t.is_alive() for t in threads):
            now = group_memory(server.proc.pid)
            peak = {k: max(peak[k], now[k]) for k in peak}
            time.sleep(0.05)
        time.sleep(2)
        after = group_memory(server.proc.pid)
    return {"idle": idle, "large_peak": peak, "after_large": after, "large_png_bytes": len(data),
            "large_statuses": sorted(statuses)}


def main() -> None:
    parser = make_parser(__doc__)
    parser.add_argument("--run-dir", type=Path, default=None, help="serve this run (default: train one)")
    parser.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "torch"))
    parser.add_argument("--large", type=int, default=4, help="simultaneous large uploads")
    parser.add_argument("--side", type=int, default=BIG_SIDE,
                        help="side of the large PNG (2000: under the default bound of a 32 x 32 model, decoded)")
    args = parser.parse_args()
    if not Path("/proc/self/smaps_rollup").exists():
        raise SystemExit("serve_memory reads /proc/<pid>/smaps_rollup: Linux only.")
    with tempfile.TemporaryDirectory(prefix="podium-bench-") as tmp:
        run_dir = args.run_dir or train_run(Path(tmp), args.quick)
        figures = measure(run_dir, args.backend, args.large, args.side)
    rows = [(phase, figures[phase].get("processes", ""), figures[phase]["rss_mib"], figures[phase]["pss_mib"])
            for phase in ("idle", "large_peak", "after_large")]
    print_table(f"podium serve memory ({args.backend})", ["phase", "processes", "RSS MiB", "PSS MiB"], rows,
                caption=f"{args.large} x a {figures['large_png_bytes'] // 1024} KB PNG of {args.side} x {args.side}: "
                        f"HTTP {figures['large_statuses']}")
    for proc in figures["idle"]["per_process"]:
        print(f"  idle pid {proc['pid']:>7} {proc['name']:<16} RSS {proc['rss_mib']:>7} MiB  PSS {proc['pss_mib']:>7} MiB")
    write_json(args.json, {"benchmark": "serve_memory", "mode": "quick" if args.quick else "full",
                           "backend": args.backend, "side": args.side, "figures": figures, "machine": machine_info()})


if __name__ == "__main__":
    main()
