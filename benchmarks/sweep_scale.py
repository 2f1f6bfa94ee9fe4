"""One digits study with 1 and with 2 `podium sweep` workers sharing PostgreSQL storage.

What it measures
----------------
The same study (TPE over optim.lr and model.width of the small CNN, median pruning, seed 0,
16 trials; --quick: 4 trials of 1 epoch) is run by one worker and then by two worker processes
started together on one PostgreSQL database each time (`sweep.storage=... sweep.study=bench`).
Reported: the wall time of each (from the workers' start to the last one's exit, imports
included), the ratio 1 worker / 2 workers (goal >= 1.6 on a machine with >= 2 free cores), the
best value of each study and the number of finished trials (it must equal the target: workers
never overshoot). Each worker is a separate process with OMP_NUM_THREADS=1, one core each.

PostgreSQL: `--storage postgresql://USER@HOST/DB` uses a server you run (each configuration gets
its own new database next to DB); without it a temporary PostgreSQL 15 server is started the way
the tests start it (tests/postgres.py: runuser -u postgres, a private folder, a loopback port).

How to run it
-------------
    python benchmarks/sweep_scale.py --quick --json bench-out/sweep_scale.json
    python benchmarks/sweep_scale.py --json bench-out/sweep_scale.json         # 16 trials

How to read it
--------------
The ratio only means something on a quiet machine: two workers on two cores that other jobs
also use cannot run twice as fast. The best values differ by TPE's luck: the two studies draw
different points (workers of a shared study seed their samplers differently).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests/postgres.py: the temporary server of the test suite
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_info, make_parser, print_table, write_json  # noqa: E402

FLAGS = ["experiment=digits", "data.image_size=16", "model.blocks=2", "trainer.num_workers=0", "tracking=none",
         "trainer.progress_bar=false", "data.augment=[]", "sweep.seed=0",
         "sweep.space={optim.lr: {type: float, low: 3e-4, high: 3e-2, log: true}, "
         "model.width: {type: int, low: 4, high: 16}}"]


def run_study(storage: str, workers: int, trials: int, epochs: int, folder: Path) -> dict:
    import optuna

    args = [*FLAGS, f"trainer.max_epochs={epochs}", f"sweep.trials={trials}", f"sweep.storage={storage}",
            "sweep.study=bench", f"sweep.startup_trials={max(2, trials // 4)}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-m", "podium", "sweep", *args, f"sweep.dir={folder / f'worker{i}'}"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for i in range(workers)]
    outputs = [p.communicate()[0] for p in procs]
    wall = time.perf_counter() - start
    for proc, output in zip(procs, outputs):
        if proc.returncode != 0:
            raise SystemExit(f"a worker failed (exit {proc.returncode}):\n{output[-3000:]}")
    study = optuna.load_study(study_name="bench", storage=storage)
    states = [t.state.name for t in study.trials]
    ran = [len(json.loads((folder / f"worker{i}" / "sweep.json").read_text())["trials_run_here"])
           for i in range(workers)]
    return {"workers": workers, "wall_s": wall, "best_value": study.best_value,
            "finished": states.count("COMPLETE") + states.count("PRUNED"), "pruned": states.count("PRUNED"),
            "trials_per_worker": ran}


def main() -> None:
    parser = make_parser(__doc__)
    parser.add_argument("--storage", default=None, help="a PostgreSQL URL (default: a temporary server)")
    opts = parser.parse_args()
    trials, epochs = (4, 1) if opts.quick else (16, 2)
    server = None
    if opts.storage:
        base = opts.storage
    else:
        from tests.postgres import PostgresServer, _skip_reason

        reason = _skip_reason()
        if reason:
            raise SystemExit(f"cannot start PostgreSQL: {reason}; pass --storage URL")
        server = PostgresServer()
        server.start()
        base = server.url
    from tests.postgres import create_database

    results = []
    try:
        with tempfile.TemporaryDirectory(prefix="sweep-scale-") as tmp:
            for workers in (1, 2):
                storage = create_database(base, f"sweep_scale_{workers}w_{int(time.time())}")
                results.append(run_study(storage, workers, trials, epochs, Path(tmp) / f"{workers}w"))
    finally:
        if server is not None:
            server.stop()
    one, two = results
    speedup = one["wall_s"] / two["wall_s"]
    print_table(f"sweep_scale: {trials} trials of {epochs} epoch(s), PostgreSQL storage",
                ["workers", "wall s", "best val/macro_f1", "finished", "pruned", "trials per worker"],
                [[str(r["workers"]), f"{r['wall_s']:.1f}", f"{r['best_value']:.4f}", str(r["finished"]),
                  str(r["pruned"]), str(r["trials_per_worker"])] for r in results])
    print(f"speed-up 1 worker / 2 workers: {speedup:.2f}x (goal >= 1.6 on >= 2 free cores)")
    write_json(opts.json, {"machine": machine_info(), "trials": trials, "epochs": epochs, "results": results,
                           "speedup": speedup, "goal": 1.6,
                           "load_average": os.getloadavg()})


if __name__ == "__main__":
    main()
