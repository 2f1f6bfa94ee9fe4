"""Competition toolkit on digits -> digits-corrupted: k-fold CV of two architectures, D4 TTA,
their ensemble (equal and OOF-searched weights), and training on an offline-augmented set.

What it measures
----------------
The demo task of the document competition (README "The demo"): scikit-learn's digits, scored by
macro-F1 on the clean test split and on `test_corrupted` (quarter turns, small rotations,
flips, noise, blur, photometric shifts, fixed per seed). Everything runs through the public
toolkit API, the same code as the CLI commands named below.

1. `podium cv experiment=digits cv.folds=K` for two architectures (the small CNN of the demo and
   a timm ResNet-10t), sharing one splits.json: the pool is the digits train + val samples, the
   test splits are never in a fold. Per architecture:
   - single model: mean ± std over the K fold runs of their test macro-F1 (each fold's best
     checkpoint);
   - fold ensemble: the K fold models' test probabilities averaged (what `podium cv` writes);
   - + D4 TTA: every fold re-evaluated with `podium eval FOLD tta=d4` (8 dihedral views,
     probabilities averaged), then averaged over folds; and the single-model TTA mean ± std.
2. Ensemble of the two architectures' fold ensembles (`podium ensemble CV_A CV_B --search oof`):
   equal weights, and weights fitted on the out-of-fold probabilities only (log-loss), applied
   to the test splits, with and without TTA.
3. Offline augmentation (`podium augment experiment=digits +Corrupt --n N`): the small CNN trained
   on N materialised images (corruption ops added to the demo's augmentation) for the same
   number of optimizer steps as one fold run (and the digits' own input size and normalisation),
   evaluated on the same test splits.

Goal (issue 21): TTA and the ensemble each raise corrupted-test macro-F1, and the best
combination reaches >= 0.97 corrupted while keeping >= 0.97 clean (single demo model: 0.955
corrupted / 0.964 clean).

How to run it
-------------
    python benchmarks/corruption_cv.py --json bench-out/corruption_cv.json            # full: 5 folds, 25 epochs
    python benchmarks/corruption_cv.py --quick --json bench-out/corruption_cv.json    # smoke: 2 folds, 1 epoch

Options: --folds, --epochs, --n-augmented, --out (kept run folders; default a temporary one),
--archs (subset of small_cnn,resnet10t), --seed. The fold runs take most of the time (full:
about 2.5 CPU-minutes per small-CNN fold on 2 cores).

How to read it
--------------
Rows are (model, variant); columns clean and corrupted macro-F1. "± std" is over folds: a gain
smaller than it is noise. The JSON also holds every fold's scores and the searched weights.
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, make_parser, print_table, write_json  # noqa: E402

ARCHS = {
    "small_cnn": ["model=small_cnn"],
    "resnet10t": ["model=timm", "model.arch=resnet10t"],
}
SPLITS = ("test", "test_corrupted")
METRIC = "macro_f1"


def _console():
    from rich.console import Console

    return Console(stderr=True, quiet=True)


def _compose(overrides: list[str]):
    from podium.config import compose

    return compose(overrides)


def _score(task, folder: Path, split: str) -> float:
    from podium.engine.predictions import read_predictions

    return float(task.score_predictions(read_predictions(folder), split)[METRIC])


def _average(folders: list[Path], out: Path, weights=None) -> Path:
    from podium.engine.predictions import combine, read_predictions

    combine([read_predictions(f) for f in folders], weights).write(out)
    return out


def run_arch(name: str, common: list[str], out: Path, folds: int, splits_file: Path | None) -> dict:
    """CV of one architecture, then D4 TTA on every fold; the figures of section 1."""
    from podium.engine import session
    from podium.toolkit.cv import run_cv
    from podium.toolkit.ensemble import _scoring_task

    overrides = [*common, *ARCHS[name], f"cv.folds={folds}"]
    if splits_file is not None:
        overrides.append(f"cv.splits={splits_file}")
    cv_dir = out / name
    start = time.perf_counter()
    report = run_cv(_compose(overrides), cv_dir, _console())
    cv_seconds = time.perf_counter() - start
    task = _scoring_task(cv_dir / "fold_0")
    fold_dirs = [Path(r) for r in report["fold_runs"]]

    result: dict = {"cv_dir": str(cv_dir), "cv_seconds": cv_seconds, "oof": report["oof"]["scores"],
                    "folds": {}, "fold_ensemble": {}, "tta_fold_ensemble": {}}
    tta_sets: dict[str, list[Path]] = {s: [] for s in SPLITS}
    start = time.perf_counter()
    for k, fold_dir in enumerate(fold_dirs):
        plain = {s: _score(task, fold_dir / "predictions" / s, s) for s in SPLITS}
        metrics, metrics_file = session.evaluate(fold_dir, ["tta=d4"], _console(), splits=list(SPLITS))
        tta_dir = metrics_file.parent / "predictions"
        tta = {s: _score(task, tta_dir / s, s) for s in SPLITS}
        for s in SPLITS:
            tta_sets[s].append(tta_dir / s)
        result["folds"][k] = {"plain": plain, "tta_d4": tta}
    result["tta_seconds"] = time.perf_counter() - start
    for s in SPLITS:
        result["fold_ensemble"][s] = _score(task, cv_dir / "predictions" / s, s)
        tta_avg = _average(tta_sets[s], cv_dir / "predictions_tta_d4" / s)
        result["tta_fold_ensemble"][s] = _score(task, tta_avg, s)
    for variant in ("plain", "tta_d4"):
        values = {s: [f[variant][s] for f in result["folds"].values()] for s in SPLITS}
        result[f"single_{variant}"] = {s: {"mean": float(np.mean(v)), "std": float(np.std(v))}
                                       for s, v in values.items()}
    return result


def run_ensemble(archs: list[str], out: Path, results: dict) -> dict:
    """Section 2: the architectures' fold ensembles combined, equal and OOF-searched weights."""
    from podium.toolkit.ensemble import _scoring_task, ensemble_runs

    cv_dirs = [out / a for a in archs]
    task = _scoring_task(cv_dirs[0] / "fold_0")
    searched = ensemble_runs(cv_dirs, out / "ensemble", search="oof", splits=list(SPLITS))
    weights = searched["weights"]
    figures: dict = {"weights_oof_search": weights, "search": searched.get("search")}
    for label, w in (("equal", None), ("searched", weights)):
        for variant, sub in (("plain", "predictions"), ("tta_d4", "predictions_tta_d4")):
            figures[f"{label}_{variant}"] = {
                s: _score(task, _average([d / sub / s for d in cv_dirs], out / f"ensemble_{label}_{variant}" / s, w), s)
                for s in SPLITS}
    return figures


def run_offline(out: Path, common: list[str], n: int, epochs: int, fold_steps: int) -> dict:
    """Section 3: the small CNN trained on a materialised augmented set, same step budget."""
    from omegaconf import OmegaConf

    from podium.engine import session
    from podium.toolkit.augment import materialise

    aug_dir = out / "augmented"
    cfg = _compose(common)
    augment = OmegaConf.to_container(cfg.data.augment, resolve=True) + [{"name": "Corrupt", "p": 0.5}]
    cfg.data.augment = augment
    start = time.perf_counter()
    if not (aug_dir / "manifest.json").is_file():
        materialise(cfg, n, aug_dir, workers=0)
    seconds_augment = time.perf_counter() - start
    batch = int(cfg.trainer.batch_size)
    offline_epochs = max(1, math.ceil(fold_steps * batch / n))  # the step budget, not the epochs, is matched
    train_overrides = [o for o in common if not o.startswith(("trainer.max_epochs", "trainer.max_steps", "experiment="))]
    # the folder dataset's defaults are ImageNet's (224 px, its mean/std): take the digits' own
    same_input = [f"data.image_size={cfg.data.image_size}", f"data.channels={cfg.data.channels}",
                  f"data.mean={list(cfg.data.mean)}", f"data.std={list(cfg.data.std)}"]
    run_cfg = _compose(["experiment=digits", *train_overrides, *ARCHS["small_cnn"], "data=image_folder",
                        f"data.root={aug_dir}", "data.augment=[]", *same_input,
                        f"trainer.max_epochs={offline_epochs}", f"trainer.max_steps={fold_steps}",
                        f"run.dir={out / 'offline_run'}"])
    start = time.perf_counter()
    run_dir = out / "offline_run"
    if not (run_dir / "metrics.json").is_file():
        session.train(run_cfg, _console())
    from podium.toolkit.ensemble import _scoring_task

    task = _scoring_task(run_dir)
    return {"n": n, "epochs": offline_epochs, "steps": fold_steps, "augment_seconds": seconds_augment,
            "train_seconds": time.perf_counter() - start,
            "scores": {s: _score(task, run_dir / "predictions" / s, s) for s in SPLITS}}


def main(argv=None) -> dict:
    parser = make_parser(__doc__)
    parser.add_argument("--folds", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--n-augmented", type=int, default=None)
    parser.add_argument("--archs", default="small_cnn,resnet10t")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--tiny", action="store_true", help="16 px images, 3 steps: for the test suite")
    args = parser.parse_args(argv)
    folds = args.folds or (2 if args.quick else 5)
    epochs = args.epochs or (1 if args.quick else 25)
    n_aug = args.n_augmented or (200 if args.quick else 20000)
    archs = [a for a in args.archs.split(",") if a]
    unknown = [a for a in archs if a not in ARCHS]
    if unknown:
        parser.error(f"unknown --archs {unknown}; choose from {', '.join(ARCHS)}")
    common = ["experiment=digits", f"seed={args.seed}", f"trainer.max_epochs={epochs}", "tracking=none"]
    if args.tiny:
        common += ["data.image_size=16", "trainer.max_steps=3"]
        ARCHS["small_cnn"] = ["model=small_cnn", "model.width=8"]

    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        results: dict = {"goal": {"corrupted": 0.97, "clean": 0.97, "single_model_before": [0.955, 0.964]},
                         "folds": folds, "epochs": epochs, "archs": archs, "models": {}}
        splits_file = None
        for arch in archs:
            results["models"][arch] = run_arch(arch, common, out, folds, splits_file)
            splits_file = out / archs[0] / "splits.json"  # every architecture on the same folds
        if len(archs) >= 2:
            results["ensemble"] = run_ensemble(archs, out, results)
        fold_cfg = _compose([*common, *ARCHS[archs[0]]])
        pool = 1797 - round(1797 * float(fold_cfg.data.test_fraction))
        fold_steps = epochs * int(np.ceil(pool * (folds - 1) / folds / int(fold_cfg.trainer.batch_size)))
        if args.tiny:
            fold_steps = 3
        results["offline"] = run_offline(out, [*common, *ARCHS["small_cnn"]], n_aug, epochs, fold_steps)
        results["machine"] = machine_info()
        rows = []
        for arch, r in results["models"].items():
            for label, key in (("single model (mean ± std over folds)", "single_plain"),
                               ("single model + D4 TTA", "single_tta_d4")):
                rows.append([f"{arch}: {label}", *[f"{r[key][s]['mean']:.4f} ± {r[key][s]['std']:.4f}" for s in SPLITS]])
            rows.append([f"{arch}: {folds}-fold ensemble", *[f"{r['fold_ensemble'][s]:.4f}" for s in SPLITS]])
            rows.append([f"{arch}: {folds}-fold ensemble + D4 TTA", *[f"{r['tta_fold_ensemble'][s]:.4f}" for s in SPLITS]])
            rows.append(None)
        for key, value in (results.get("ensemble") or {}).items():
            if key.startswith(("equal_", "searched_")):
                rows.append([f"{' + '.join(archs)}: {key.replace('_', ' ')}", *[f"{value[s]:.4f}" for s in SPLITS]])
        rows.append(None)
        off = results["offline"]
        rows.append([f"small_cnn on {off['n']} offline-augmented images", *[f"{off['scores'][s]:.4f}" for s in SPLITS]])
        print_table("digits: macro-F1 (clean test, corrupted test)", ["model", *SPLITS], rows,
                    caption="± std over folds; ensembles average probabilities; searched weights fitted on OOF only")
        write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
