"""Domain adaptation CamVid -> fisheye: source-only against lens warps, DACS, DACS + MIC and the
best combination, target and undistorted mIoU, mean ± std over seeds, on two lens presets.

What it measures
----------------
`experiment=uda_camvid_fisheye` (tasks/segmentation/uda.py): a resnet18 U-Net from random init
trained on the 367 labelled CamVid train frames at half resolution (240 x 180), adapted to CamVid
val (101 frames) seen through a simulated fisheye camera (tasks/segmentation/lens.py) whose
labels are read only to score. Methods (each a set of `task.*` switches):

- source_only: nothing but the source (horizontal flips, colour jitter);
- geometric:   + random lens / barrel / affine warps of the source, seen both warped and plain;
- dacs:        EMA teacher pseudo-labels of the target, ClassMix, colour jitter + blur;
- dacs_mic:    + MIC masked-image consistency (blocks of 32 px at this resolution, ratio 0.7);
- best:        dacs_mic + geometric + rare-class sampling (T 0.01) + target colour statistics.

Methods that never look at target images (source_only, geometric) train once per seed and are
scored through both lenses; the others train once per (lens, seed). Per run the JSON records
the target mIoU (the lens it adapted to), the other lens's, the undistorted val mIoU and the
wall time.

CPU budget (the issue's: each method-seed <= 20 minutes of 2 cores): `--steps` 800 iterations
of 4 source crops of 192 x 128 (+ 4 target crops) — about 5 minutes source-only and 18 with
every switch on (1.35 s per iteration, measured on this 2-core machine).

How to run it (in pieces: every finished run is appended to the JSON and skipped next time)
---------------------------------------------------------------------------------------------
    python benchmarks/uda_camvid_fisheye.py --json bench-out/uda_camvid_fisheye.json
    python benchmarks/uda_camvid_fisheye.py --methods source_only,dacs --seeds 0 --lenses fisheye190 \
        --json bench-out/uda_camvid_fisheye.json
    python benchmarks/uda_camvid_fisheye.py --quick --json /tmp/uda.json        # smoke: minutes

How to read it
--------------
One row per (method, lens): target mIoU mean ± std over the seeds done, the gain over
source-only on the same lens (mean of the differences), undistorted mIoU. Seeds swing results by
several mIoU (the reference methods report 2-6): read a gain only against the std.
Goal (issue 22): the best combination beats source-only by >= 5 mIoU on both lenses (3 seeds).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, make_parser, print_table, write_json  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CAMVID = (REPO / ".." / "shared" / "data" / "camvid").resolve()
LENSES = ("fisheye190", "fisheye160_warm")
METHODS = {
    "source_only": [],
    "geometric": ["task.geometric=true", "task.dual_branch=true"],
    "dacs": ["task.mix=classmix"],
    "dacs_mic": ["task.mix=classmix", "task.mic_ratio=0.7"],
    "best": ["task.mix=classmix", "task.mic_ratio=0.7", "task.geometric=true", "task.dual_branch=true",
             "task.rare_class_temperature=0.01", "task.photometric_p=0.5"],
}
SOURCE_ONLY_METHODS = ("source_only", "geometric")  # never see a target image: one run serves both lenses


def data_overrides(root: Path) -> list[str]:
    return [f"data.image_dir={root / 'train'}", f"data.mask_dir={root / 'trainannot'}",
            f"task.target.image_dir={root / 'val'}", f"task.target.mask_dir={root / 'valannot'}",
            f"task.source_test.image_dir={root / 'val'}", f"task.source_test.mask_dir={root / 'valannot'}"]


def run_key(method: str, lens: str, seed: int) -> str:
    return f"{method}/{'any' if method in SOURCE_ONLY_METHODS else lens}/seed{seed}"


def train(method: str, lens: str, seed: int, args, out: Path) -> dict:
    other = [name for name in LENSES if name != lens]
    run_dir = out / run_key(method, lens, seed).replace("/", "-")
    cmd = [sys.executable, "-m", "podium", "train", "experiment=uda_camvid_fisheye", *data_overrides(args.camvid),
           f"task.target.lens={lens}", f"task.target.extra_lenses=[{','.join(other)}]", f"seed={seed}",
           f"trainer.max_steps={args.steps}", f"trainer.val_every_n_steps={max(1, args.steps // 3)}",
           f"sched.warmup_steps={max(1, args.steps // 10)}", "tracking=none", "trainer.progress_bar=false",
           f"run.dir={run_dir}", *METHODS[method], *args.extra]
    if args.quick:
        cmd += ["data.fraction=0.1", "task.target.max_images=8", "task.source_test.max_images=8",
                "model.encoder=resnet10t", "model.decoder_channels=[64,32,16,16,16]"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{method} {lens} seed {seed} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    scores = {"method": method, "seed": seed, "adapted_to": None if method in SOURCE_ONLY_METHODS else lens,
              "miou": {lens: metrics["val/miou"], **{name: metrics[f"test_{name}/miou"] for name in other}},
              "undistorted_miou": metrics["test_source/miou"], "seconds": round(time.perf_counter() - start, 1),
              "steps": args.steps, "run_dir": str(run_dir)}
    return scores


def summarise(results: dict, methods: list[str], lenses: list[str]) -> list[dict]:
    """One row per (method, lens) over the seeds done: mean ± std target mIoU, gain over source-only."""
    rows = []
    for lens in lenses:
        base = {r["seed"]: r["miou"][lens] for r in results.values() if r["method"] == "source_only"}
        for method in methods:
            runs = [r for r in results.values() if r["method"] == method
                    and (r["adapted_to"] in (None, lens)) and lens in r["miou"]]
            if not runs:
                continue
            target = [r["miou"][lens] for r in runs]
            gains = [r["miou"][lens] - base[r["seed"]] for r in runs if r["seed"] in base]
            rows.append({"method": method, "lens": lens, "seeds": sorted(r["seed"] for r in runs),
                         "target_miou_mean": statistics.mean(target),
                         "target_miou_std": statistics.stdev(target) if len(target) > 1 else 0.0,
                         "gain_over_source_only": statistics.mean(gains) if gains else None,
                         "undistorted_miou_mean": statistics.mean(r["undistorted_miou"] for r in runs),
                         "minutes_per_run": statistics.mean(r["seconds"] for r in runs) / 60})
    return rows


def main(argv=None) -> dict:
    parser = make_parser(__doc__)
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    parser.add_argument("--lenses", default=",".join(LENSES))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=800, help="training iterations per run")
    parser.add_argument("--camvid", type=Path, default=CAMVID)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-uda", help="run folders")
    parser.add_argument("--extra", nargs="*", default=[], help="more overrides for every run")
    args = parser.parse_args(argv)
    if not (args.camvid / "train").is_dir():
        print(f"skipped: CamVid not found at {args.camvid}")
        return {"skipped": f"no CamVid at {args.camvid}"}
    methods, lenses = args.methods.split(","), args.lenses.split(",")
    unknown = [m for m in methods if m not in METHODS] + [name for name in lenses if name not in LENSES]
    if unknown:
        raise SystemExit(f"unknown methods/lenses {unknown}; valid: {list(METHODS)} / {list(LENSES)}")
    if args.quick:
        args.steps = min(args.steps, 30)
    seeds = [int(s) for s in args.seeds.split(",")]
    previous = json.loads(args.json.read_text()) if args.json and args.json.exists() else {}
    results = dict(previous.get("runs", {}))
    os.environ.setdefault("OMP_NUM_THREADS", str(len(os.sched_getaffinity(0))))
    for seed in seeds:
        for method in methods:
            for lens in lenses:
                key = run_key(method, lens, seed)
                if key in results and results[key]["steps"] == args.steps:
                    continue  # done in an earlier piece
                print(f"training {key} ({args.steps} steps)", flush=True)
                results[key] = train(method, lens, seed, args, args.out)
                report = {"benchmark": "uda_camvid_fisheye", "machine": machine_info(), "runs": results,
                          "summary": summarise(results, list(METHODS), list(LENSES))}
                write_json(args.json, report)  # after every run: a killed piece loses one run at most
    summary = summarise(results, list(METHODS), list(LENSES))
    print_table("CamVid -> fisheye, target mIoU (mean ± std over seeds)",
                ["method", "lens", "seeds", "target mIoU", "gain vs source-only", "undistorted mIoU", "min/run"],
                [(r["method"], r["lens"], len(r["seeds"]), f"{r['target_miou_mean']:.4f} ± {r['target_miou_std']:.4f}",
                  "-" if r["gain_over_source_only"] is None else f"{r['gain_over_source_only']:+.4f}",
                  f"{r['undistorted_miou_mean']:.4f}", f"{r['minutes_per_run']:.1f}") for r in summary])
    report = {"benchmark": "uda_camvid_fisheye", "machine": machine_info(), "runs": results, "summary": summary}
    write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
