"""ISBI 2015 cephalometric landmarks: Test1 MRE / SDR for a CPU budget, and the preprocessing
cache's effect on data loading.

    python benchmarks/landmarks_isbi.py --json bench-out/landmarks_isbi.json
    python benchmarks/landmarks_isbi.py --quick --json out.json          # a smoke run
    python benchmarks/landmarks_isbi.py --override model=... --override trainer.max_epochs=60

What it does, in one process:
1. Loading: the first N training images through the dataset with the cache off (decode the
   1935 x 2400 JPEG and letterbox every time) and on (warm), interleaved A B A B; the ratio of
   median per-image times is the cache's speed-up (goal >= 5x).
2. Training: `experiment=isbi2015_quick` (plus overrides) on the 150 training images, with the
   validation images carved from them; ground truth: the senior doctor's annotation (the
   challenge's). Test1 (151-300) is evaluated once, on the best-on-validation checkpoint.
3. Figures: Test1 MRE (mm) and SDR at 2 / 2.5 / 3 / 4 mm, overall and per landmark, the
   trainer's data-wait share (goal <= 5 %), the wall time.

Errors are in original-image millimetres (0.1 mm pixels), after undoing the letterbox. Skips
cleanly (JSON says why) when ../shared/data/isbi2015_ceph is absent.
"""

from __future__ import annotations

import csv
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, make_parser, median, print_table, write_json  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = (REPO / ".." / "shared" / "data" / "isbi2015_ceph").resolve()


def time_loading(root: Path, image_size: list[int], n_images: int, rounds: int) -> dict:
    from podium.config import compose
    from podium.engine import registry

    with tempfile.TemporaryDirectory() as cache_dir:
        def dataset(cache: str):
            cfg = compose(["experiment=isbi2015_quick", f"data.root={root}", f"data.cache_dir={cache}",
                           f"data.image_size=[{image_size[0]},{image_size[1]}]", "tracking=none"])
            return registry.build("dataset", "isbi2015", cfg.data, seed=0)["train"]

        uncached, cached = dataset("none"), dataset(cache_dir)
        n = min(n_images, len(cached))
        for i in range(n):  # warm the cache
            cached[i]
        times = {"uncached": [], "cached": []}
        for _ in range(rounds):
            for name, ds in (("uncached", uncached), ("cached", cached)):
                for i in range(n):
                    t = time.perf_counter()
                    ds[i]
                    times[name].append(time.perf_counter() - t)
    uncached_ms, cached_ms = median(times["uncached"]) * 1e3, median(times["cached"]) * 1e3
    return {"images": n, "rounds": rounds, "uncached_ms_per_image": uncached_ms,
            "cached_ms_per_image": cached_ms, "speedup": uncached_ms / cached_ms, "goal": 5.0}


def per_landmark(run_dir: Path, split: str) -> list[dict]:
    """The run's per-landmark table: MRE, SDRs and the mean signed offset (systematic error)."""
    with (run_dir / "predictions" / f"per_landmark_{split}.csv").open() as f:
        return [{k: (v if k == "landmark" else float(v)) for k, v in row.items()} for row in csv.DictReader(f)]


def train_and_test(root: Path, overrides: list[str], run_dir: Path, experiment: str) -> dict:
    from rich.console import Console

    from podium.config import compose
    from podium.engine import registry, session

    cfg = compose([f"experiment={experiment}", f"data.root={root}", "tracking=none",
                   f"run.dir={run_dir}", *overrides])
    sizes = {name: len(ds) for name, ds in registry.build("dataset", "isbi2015", cfg.data, seed=0).items()}
    start = time.perf_counter()
    _, metrics = session.train(cfg, Console(stderr=True))
    wall = time.perf_counter() - start
    history = (run_dir / "history.csv").read_text().splitlines()
    header = history[0].split(",")
    waits = [float(line.split(",")[header.index("train/data_wait")]) for line in history[1:]]
    split = " / ".join(f"{name} {n}" + (" (carved from train)" if name == "val" else "") for name, n in sizes.items())
    return {"overrides": overrides, "split": split, "wall_minutes": wall / 60, "epochs": len(waits),
            "data_wait_share": statistics.fmean(waits), "metrics": metrics,
            "per_landmark_test1": per_landmark(run_dir, "test1"), "run_dir": str(run_dir)}


def main() -> None:
    parser = make_parser(__doc__)
    parser.add_argument("--experiment", default="isbi2015_quick",
                        help="isbi2015_quick (one stage, 256 x 208) or isbi2015_c2f (coarse-to-fine)")
    parser.add_argument("--override", action="append", default=[], help="extra config override")
    parser.add_argument("--run-dir", type=Path, default=None, help="keep the run here")
    args = parser.parse_args()
    result: dict = {"machine": machine_info(), "data": str(DATA), "ground_truth": "senior"}
    if not DATA.is_dir():
        result["skipped"] = f"{DATA} is absent"
        print(result["skipped"])
        if args.json:
            write_json(args.json, result)
        return
    quick = ["data.max_images=12", "data.val_count=4", "trainer.max_epochs=2"] if args.quick else []
    if args.quick and args.experiment == "isbi2015_quick":
        quick += ["data.image_size=[128,104]", "model.encoder=resnet10t"]
    size = [128, 104] if args.quick else [256, 208]
    result["loading"] = time_loading(DATA, size, 6 if args.quick else 20, 2 if args.quick else 3)
    run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix="landmarks-isbi-"))
    result["experiment"] = args.experiment
    result["training"] = train_and_test(DATA, quick + args.override, run_dir, args.experiment)
    result["split"] = result["training"]["split"]  # the images each split really had

    m, t, load = result["training"]["metrics"], result["training"], result["loading"]
    rows = [("Test1 MRE (mm)", f"{m['test1/mre_mm']:.3f} ± {m['test1/mre_std_mm']:.3f}", "goal <= 1.4 on CPU"),
            *[(f"Test1 SDR@{r}mm", f"{100 * m[f'test1/sdr_{r}mm']:.1f} %", "goal >= 80 %" if r == "2" else "")
              for r in ("2", "2.5", "3", "4")],
            ("val MRE (mm)", f"{m['val/mre_mm']:.3f}", "carved from the training images"),
            ("training wall time", f"{t['wall_minutes']:.1f} min", f"{t['epochs']} epochs"),
            ("data-wait share", f"{100 * t['data_wait_share']:.1f} %", "goal <= 5 %"),
            None,
            ("load, no cache", f"{load['uncached_ms_per_image']:.1f} ms/image", "decode + letterbox"),
            ("load, cached", f"{load['cached_ms_per_image']:.1f} ms/image", "incl. augmentation"),
            ("cache speed-up", f"{load['speedup']:.1f}x", "goal >= 5x")]
    print_table("ISBI 2015 landmarks (senior ground truth)", ["measure", "value", "note"], rows,
                caption=" ".join([f"experiment={args.experiment}", *t["overrides"]]))
    print_table("Test1 per landmark", ["landmark", "MRE (mm)", "SDR@2mm", "mean offset x, y (mm)"],
                [(r["landmark"], f"{r['mre_mm']:.2f}", f"{100 * r['sdr_2mm']:.0f} %",
                  f"{r['offset_x_mm']:+.2f}, {r['offset_y_mm']:+.2f}") for r in t["per_landmark_test1"]],
                caption="offset: mean of prediction - truth; large = systematic, not scatter")
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    main()
