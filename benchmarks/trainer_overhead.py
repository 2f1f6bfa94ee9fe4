"""What podium's Trainer costs per optimizer step, and what the data-loader defaults buy.

What it measures
----------------
1. Step-time overhead. The same model (`small_cnn` of `experiment=digits`, built by the task's
   `build_model` after the same seeding), the same data (the digits train split through the
   same `make_loader`, `num_workers=0`, no augmentation), the same loss (the task's) and the
   same number of optimizer steps, run

   A. through podium's Trainer (Lightning Fabric, progress bar on, tracking off, the time-based
      checkpoint off, on the CPU like B even where a GPU is visible):
      `Trainer(cfg, task, run_dir, fabric)`, `setup()`, `fit()` with `trainer.max_steps=N`;
   B. through a plain PyTorch loop: forward, `loss.backward(); opt.step(); opt.zero_grad()`
      and `loss.item()` per step, with AdamW of the same settings.

   A step's time is the difference between the timestamps (`time.perf_counter()`) taken right
   after consecutive optimizer steps: in A by a ClassificationTask subclass in
   `on_optimizer_step`, in B after `opt.step()`. So it holds everything between two steps:
   fetching the next batch, forward, backward, the optimizer, and in A also the trainer's own
   book-keeping (Fabric's wrappers, NaN guard, LR schedule, RNG capture, progress bar).
   Dropped from both: the first few steps of each segment (warm-up) and any step that crosses
   an epoch boundary (in A that one also holds the per-epoch validation and `last.pt`, which
   are not per-step costs; fit's final validation is after the last timed step anyway).
   A and B alternate (A B A B ...) for R rounds in one process, with the same
   `torch.set_num_threads`. Reported: the median of all kept steps of each side, and the ratio
   A/B (goal <= 1.02) as the median over rounds of each round's paired ratio
   median(A_r) / median(B_r). Pairing A with the B that ran right after it keeps a burst of
   load that slows a whole segment (on a busy machine one can make a segment 10x slower) from
   deciding the result unless it hits most rounds; the ratio of the two overall medians is in
   the JSON too (`ratio_of_medians`). The trainer's data-wait share is `train/data_wait` of its
   last history row (median over rounds).

2. Data loading. A folder of 64x64 PNGs in the `image_folder` layout (root/train/<class>/,
   root/val/<class>/) is read through `make_loader(ds, train=True, batch_size=32, seed=0)`
   with the factory's defaults (num_workers=-1: from the CPU count, persistent workers) and
   with `num_workers=0`, in alternating full passes after one untimed pass each (which starts
   the persistent workers; its time is reported as the first pass). Median samples/s of each
   and the ratio defaults / workers0. A pure loading pass shows the loader's throughput, not
   the overlap with the training step that workers exist for; with 2 CPUs the default is a
   single worker, so a ratio near (or a little below) 1 is expected there.

How to run it
-------------
    python benchmarks/trainer_overhead.py --quick --json bench-out/trainer_overhead.json
    python benchmarks/trainer_overhead.py --json bench-out/trainer_overhead.json   # full

--quick: N=30 steps, R=3 rounds, 10 classes x 40 images; full: N=100, R=5, 10 x 100.
`--threads K` sets torch's intra-op threads for both loops (`torch.set_num_threads`); the
default is 1, `--threads 0` keeps torch's own default (one per core, what `podium train` gets).
Why 1: on a machine that other work keeps busy, two or more threads wait for each other at
every parallel op, and whole segments run up to 10x slower in bursts (seen on the 2-CPU
machines this was written on: per-round medians of 100 ms and 1,200 ms in one run), which
no statistic over 3-5 rounds survives. One thread is steady to 1-2% there. The price: a
slower step (1.75x here) dilutes a fixed per-step overhead by as much, so check a ratio near
the goal again with `--threads 0` on a quiet machine. (Trainer.setup() lowers the threads
where they would compete with loader workers; the plain loop then uses the same number.)

How to read it
--------------
Read the ratios, not the absolute times. Timings on shared CPU machines move by 10-20%
between runs (other tenants, frequency scaling); A and B run interleaved in one process, so
slow drift hits both and largely cancels in the ratio. The per-round ratios show how much a
single round moves, and "rounds moved" how far one side's per-round medians lie apart: above
10% the run is flagged NOISY (the load on the machine changed during the run) and its ratio
deserves little trust; rerun it. A ratio above 1.02 in several steady runs means the Trainer
does too much per step; a high data-wait share means the step waits for the loader, not the
model.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_info, make_parser, median, print_table, write_json  # noqa: E402

GOAL = 1.02
# Per-round medians of one side further apart than this: the machine was busy, rerun.
NOISY_DRIFT = 0.10

SIZES = {
    #        optimizer steps per segment, A/B rounds, images per class (train)
    "full": {"steps": 100, "rounds": 5, "per_class": 100},
    "quick": {"steps": 30, "rounds": 3, "per_class": 40},
    "tiny": {"steps": 12, "rounds": 2, "per_class": 8},  # for the test suite only
}
WARMUP_STEPS = 5  # step times dropped at the start of each segment (tiny: 2)
CLASSES = 10
VAL_PER_CLASS = 2
IMAGE_SIZE = 64
LOADER_BATCH = 32


def step_overrides(run_dir: Path, steps: int) -> list[str]:
    return ["experiment=digits", "tracking=none", "trainer.progress_bar=true",
            "trainer.num_workers=0", "data.augment=[]", "trainer.checkpoint_every_minutes=0",
            f"run.dir={run_dir}", f"trainer.max_steps={steps}", "trainer.accelerator=cpu"]


def step_times(stamps: list[tuple[float, int]], warmup: int) -> list[float]:
    """Seconds between consecutive optimizer steps, without the first `warmup` ones and
    without those that cross an epoch boundary. `stamps`: (perf_counter, epoch) per step."""
    times = []
    for k in range(1, len(stamps)):
        (t0, e0), (t1, e1) = stamps[k - 1], stamps[k]
        if k > warmup and e0 == e1:
            times.append(t1 - t0)
    return times


def bench_step_time(steps: int, rounds: int, warmup: int, threads: int, workdir: Path) -> dict:
    import torch
    from rich.console import Console

    from podium.config import compose
    from podium.engine import reproducibility as repro
    from podium.engine.loading import make_loader
    from podium.engine.session import make_fabric
    from podium.engine.trainer import Trainer
    from podium.tasks.classification.task import ClassificationTask

    class TimedClassificationTask(ClassificationTask):
        """The classification task, stamping the time of every optimizer step."""

        def __init__(self, cfg):
            super().__init__(cfg)
            self.stamps: list[tuple[float, int]] = []

        def on_optimizer_step(self, model, ctx):
            self.stamps.append((time.perf_counter(), ctx.epoch))
            super().on_optimizer_step(model, ctx)

    console = Console(stderr=True)  # what `podium train` uses: progress bar and logs on stderr
    fabric = None
    # Trainer.setup() may lower torch's threads (it leaves the loader workers' cores free);
    # the plain loop then runs with the same number.
    used_threads = threads

    def run_trainer(r: int) -> tuple[list[float], float]:
        nonlocal fabric, used_threads
        run_dir = workdir / f"trainer-{r}"
        run_dir.mkdir(parents=True)
        cfg = compose(step_overrides(run_dir, steps))
        if fabric is None:
            fabric = make_fabric(cfg.trainer, console)
            fabric.launch()
        torch.set_num_threads(threads)
        task = TimedClassificationTask(cfg)
        trainer = Trainer(cfg, task, run_dir, fabric, console=console)
        trainer.setup()
        used_threads = torch.get_num_threads()
        trainer.fit()
        if trainer.state.step != steps or len(task.stamps) != steps:
            raise RuntimeError(f"the Trainer ran {trainer.state.step} steps, expected {steps}")
        return step_times(task.stamps, warmup), float(trainer.state.history[-1]["train/data_wait"])

    def run_plain(r: int) -> list[float]:
        run_dir = workdir / f"plain-{r}"
        cfg = compose(step_overrides(run_dir, steps))
        torch.set_num_threads(used_threads)
        tc, oc = cfg.trainer, cfg.optim
        repro.seed_everything(cfg.seed, tc.deterministic)  # as Trainer.setup, before the model
        task = ClassificationTask(cfg)
        model = task.build_model()
        datasets = task.build_datasets()
        task.build_loss(datasets)
        loss_fn = task.loss_fn
        loader = make_loader(datasets["train"], train=True, batch_size=tc.batch_size, seed=cfg.seed,
                             num_workers=tc.num_workers, collate_fn=task.collate_fn(),
                             persistent_workers=tc.persistent_workers, prefetch_factor=tc.prefetch_factor)
        opt = torch.optim.AdamW(model.parameters(), lr=oc.lr, betas=tuple(oc.betas), eps=oc.eps,
                                weight_decay=oc.weight_decay)
        model.train()
        stamps: list[tuple[float, int]] = []
        losses: list[float] = []
        step, epoch = 0, 0
        while step < steps:
            loader.sampler.set_epoch(epoch)
            for images, labels in loader:
                loss = loss_fn(model(images), labels)
                loss.backward()
                opt.step()
                stamps.append((time.perf_counter(), epoch))
                opt.zero_grad(set_to_none=True)
                losses.append(loss.item())
                step += 1
                if step >= steps:
                    break
            epoch += 1
        return step_times(stamps, warmup)

    trainer_times: list[float] = []
    plain_times: list[float] = []
    per_round: list[dict] = []
    waits: list[float] = []
    threads_seen: set[int] = set()
    for r in range(rounds):
        gc.collect()
        a, wait = run_trainer(r)
        threads_seen.add(torch.get_num_threads())
        gc.collect()
        b = run_plain(r)
        threads_seen.add(torch.get_num_threads())
        trainer_times += a
        plain_times += b
        waits.append(wait)
        per_round.append({"trainer_ms": 1e3 * median(a), "plain_ms": 1e3 * median(b),
                          "ratio": median(a) / median(b)})
    trainer_ms, plain_ms = 1e3 * median(trainer_times), 1e3 * median(plain_times)
    ratio = median(r["ratio"] for r in per_round)
    # How far the machine moved during the run: the spread of one side's per-round medians.
    drift = max(max(r[k] for r in per_round) / min(r[k] for r in per_round)
                for k in ("trainer_ms", "plain_ms")) - 1
    return {
        "trainer_median_ms": trainer_ms,
        "plain_median_ms": plain_ms,
        "ratio": ratio,
        "ratio_of_medians": trainer_ms / plain_ms,
        "goal": GOAL,
        "data_wait_share": median(waits),
        "steps": steps,
        "rounds": rounds,
        "ratio_per_round": [r["ratio"] for r in per_round],
        "per_round": per_round,
        "round_drift": drift,
        "noisy": drift > NOISY_DRIFT,
        "measured_steps": {"trainer": len(trainer_times), "plain": len(plain_times)},
        "warmup_steps": warmup,
        "torch_threads": sorted(threads_seen),
    }


def write_image_folder(root: Path, per_class: int, val_per_class: int, seed: int = 0) -> int:
    """CLASSES x per_class train (and x val_per_class val) RGB PNGs of IMAGE_SIZE pixels:
    smooth colour blobs plus noise, so they compress and decode like small photos."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in (("train", per_class), ("val", val_per_class)):
        for c in range(CLASSES):
            folder = root / split / f"class_{c:02d}"
            folder.mkdir(parents=True)
            for i in range(count):
                coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
                smooth = np.asarray(coarse.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR), np.int16)
                noisy = smooth + rng.integers(-12, 13, smooth.shape, dtype=np.int16)
                Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(folder / f"{i:04d}.png")
    return CLASSES * per_class


def bench_data_loading(per_class: int, rounds: int, threads: int, workdir: Path) -> dict:
    import torch

    from podium.config import compose
    from podium.engine.loading import default_num_workers, make_loader
    from podium.engine.registry import build

    root = workdir / "image_folder"
    write_image_folder(root, per_class, VAL_PER_CLASS)
    cfg = compose(["data=image_folder", f"data.root={root}", f"data.image_size={IMAGE_SIZE}",
                   "tracking=none"])
    dataset = build("dataset", "image_folder", cfg.data, seed=0)["train"]
    torch.set_num_threads(threads)
    loaders = {
        "defaults": make_loader(dataset, train=True, batch_size=LOADER_BATCH, seed=0),
        "workers0": make_loader(dataset, train=True, batch_size=LOADER_BATCH, seed=0, num_workers=0),
    }

    def one_pass(loader, epoch: int) -> tuple[int, float]:
        loader.sampler.set_epoch(epoch)
        n, t0 = 0, time.perf_counter()
        for images, _ in loader:
            n += images.shape[0]
        return n, time.perf_counter() - t0

    first = {name: one_pass(loader, 0) for name, loader in loaders.items()}  # starts the workers
    rates: dict[str, list[float]] = {name: [] for name in loaders}
    samples = 0
    for r in range(rounds):
        for name, loader in loaders.items():
            samples, seconds = one_pass(loader, r + 1)
            rates[name].append(samples / seconds)
    num_workers = loaders["defaults"].num_workers
    del loaders
    gc.collect()  # shuts the persistent workers down
    defaults, workers0 = median(rates["defaults"]), median(rates["workers0"])
    return {
        "defaults_samples_per_s": defaults,
        "workers0_samples_per_s": workers0,
        "ratio": defaults / workers0,
        "num_workers_default": num_workers,
        "default_num_workers_fn": default_num_workers(),
        "first_pass_samples_per_s": {name: n / s for name, (n, s) in first.items()},
        "samples_per_pass": samples,
        "passes": rounds,
        "batch_size": LOADER_BATCH,
        "image_size": IMAGE_SIZE,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = make_parser(__doc__)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads for both loops (default 1; 0: torch's default)")
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    import torch
    from rich.console import Console

    size = SIZES["tiny" if args.tiny else "quick" if args.quick else "full"]
    warmup = 2 if args.tiny else WARMUP_STEPS
    threads = args.threads if args.threads > 0 else torch.get_num_threads()
    torch.set_num_threads(threads)

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="podium-bench-") as tmp:
        workdir = Path(tmp)
        step = bench_step_time(size["steps"], size["rounds"], warmup, threads, workdir)
        data = bench_data_loading(size["per_class"], size["rounds"], threads, workdir)
    wall = time.perf_counter() - start

    result = {"machine": machine_info(), "step_time": step, "data_loading": data,
              "mode": "tiny" if args.tiny else "quick" if args.quick else "full", "wall_s": wall}
    m = result["machine"]
    verdict = "ok" if step["ratio"] <= GOAL else "above goal"
    kept = f"{step['rounds']} x {step['steps']} steps"
    rows = [
        ("Trainer step, median", f"{step['trainer_median_ms']:.2f} ms",
         f"{step['measured_steps']['trainer']} kept of {kept}"),
        ("plain loop step, median", f"{step['plain_median_ms']:.2f} ms",
         f"{step['measured_steps']['plain']} kept of {kept}"),
        ("ratio Trainer / plain", f"{step['ratio']:.3f}", f"goal <= {GOAL}: {verdict}"),
        ("  per round (ratio: median)", ", ".join(f"{x:.3f}" for x in step["ratio_per_round"]),
         f"rounds moved {step['round_drift']:.0%}" + (": NOISY" if step["noisy"] else "")),
        ("Trainer data-wait share", f"{step['data_wait_share']:.1%}", "num_workers=0"),
        None,
        (f"defaults (num_workers={data['num_workers_default']})",
         f"{data['defaults_samples_per_s']:.0f} samples/s",
         f"1st pass {data['first_pass_samples_per_s']['defaults']:.0f}/s"),
        ("num_workers=0", f"{data['workers0_samples_per_s']:.0f} samples/s",
         f"1st pass {data['first_pass_samples_per_s']['workers0']:.0f}/s"),
        ("ratio defaults / workers0", f"{data['ratio']:.3f}",
         f"{data['passes']} passes x {data['samples_per_pass']}"),
    ]
    caption = (f"{m['cpus_usable'] or m['cpu_count']} CPUs, torch {m['torch']}, "
               f"{threads} threads, {result['mode']} mode, {wall:.0f} s. "
               "Compare ratios: both sides ran interleaved in this process.")
    print_table("podium: Trainer overhead and data loading", ["measure", "value", "note"], rows, caption)
    if step["noisy"]:
        Console().print(f"[yellow]one side's per-round medians moved {step['round_drift']:.0%}: the "
                        "machine's load changed during the run; trust the ratio little. Rerun"
                        + (", or use --threads 1." if threads > 1 else "."))
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
