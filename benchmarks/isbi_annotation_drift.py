"""ISBI 2015: is Test1 annotated with the training set's convention? Annotation drift per
landmark, and how much of a model's Test1 error it explains.

    python benchmarks/isbi_annotation_drift.py --json bench-out/isbi_annotation_drift.json
    python benchmarks/isbi_annotation_drift.py --run-dir runs/<isbi run> --json out.json

What it does (no training; a second):
1. Drift: for each landmark, both sets' senior annotations are Procrustes-aligned on the other
   18 landmarks and the mean aligned positions compared (`podium.tasks.landmarks.drift`):
   drift (Test1 - training) in mm of an average head, and the Hotelling T^2 p-value.
2. Control: the same test between two random halves of the training set (seeded), where no
   drift can exist: the smallest p-value there is the false-alarm level of 19 tests.
3. With --run-dir (a run with predictions/test1.csv): the run's mean Test1 offset per landmark
   next to minus the drift (a model trained on the training convention should sit there), and
   Test1 MRE / SDR@2mm as scored and with the significant drifts taken out of the truth. The
   second figure reads the Test1 annotations to undo the drift: a DIAGNOSTIC of how much error
   no model trained on these training annotations can remove, never a result.

Writes a PNG bar chart next to the JSON. Skips cleanly (JSON says why) when
../shared/data/isbi2015_ceph is absent.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import make_parser, print_table, write_json  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = (REPO / ".." / "shared" / "data" / "isbi2015_ceph").resolve()


def load_senior(root: Path, split: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(ids, points in original pixels (N, 19, 2), spacing (N, 2) mm/px) of one CSV split."""
    from podium.tasks.landmarks.readers import read_isbi_csv

    records = read_isbi_csv(root / f"{split}_senior.csv", root / "images")
    return ([r.id for r in records], np.stack([r.points for r in records]),
            np.array([r.spacing for r in records], dtype=np.float64))


def load_predictions(run_dir: Path, ids: list[str], names: list[str]) -> np.ndarray:
    """The run's Test1 predictions (original pixels), in the order of `ids`."""
    from podium.errors import UserError

    path = run_dir / "predictions" / "test1.csv"
    if not path.is_file():
        raise UserError(f"{path} does not exist: --run-dir needs a landmark run evaluated on test1.")
    with path.open() as f:
        rows = {Path(r["id"]).stem: r for r in csv.DictReader(f)}
    missing = [i for i in ids if i not in rows]
    if missing:
        raise UserError(f"{path} has no prediction for image(s) {', '.join(missing[:5])}.")
    return np.array([[[float(rows[i][f"{n}_x"]), float(rows[i][f"{n}_y"])] for n in names] for i in ids])


def score(pred: np.ndarray, truth: np.ndarray, spacing: np.ndarray) -> dict:
    from podium.tasks.landmarks import metrics

    errors = metrics.radial_errors_mm(pred, truth, spacing)
    return {"mre_mm": metrics.mre_mm(errors), "sdr_2mm": metrics.sdr(errors, 2.0)}


def main() -> None:
    parser = make_parser(__doc__)
    parser.add_argument("--run-dir", type=Path, action="append", default=[],
                        help="a landmark run with predictions/test1.csv (repeatable)")
    parser.add_argument("--alpha", type=float, default=0.01, help="significance level of a drift")
    parser.add_argument("--root", type=Path, default=DATA, help="the ISBI 2015 CSV copy")
    args = parser.parse_args()
    result: dict = {"data": str(args.root), "ground_truth": "senior", "alpha": args.alpha}
    if not args.root.is_dir():
        result["skipped"] = f"{args.root} is absent"
        print(result["skipped"])
        write_json(args.json, result)
        return

    from podium.tasks.landmarks.drift import annotation_drift, plot_drift, undo_drift
    from podium.tasks.landmarks.readers import ISBI2015_LANDMARKS as names

    _, train_px, train_spacing = load_senior(args.root, "train")
    test_ids, test_px, test_spacing = load_senior(args.root, "test1")
    train_mm, test_mm = train_px * train_spacing[:, None], test_px * test_spacing[:, None]
    rows = annotation_drift(train_mm, test_mm, names)
    halves = np.random.default_rng(0).permutation(len(train_mm))
    control = annotation_drift(train_mm[halves[::2]], train_mm[halves[1::2]], names)
    result["drift"] = rows
    result["control_min_p"] = min(r["p_value"] for r in control)
    result["control_max_drift_mm"] = max(r["drift"] for r in control)
    result["significant"] = [r["landmark"] for r in rows if r["p_value"] < args.alpha]

    table = [(r["landmark"], f"{r['drift_x']:+.2f}, {r['drift_y']:+.2f}", f"{r['drift']:.2f}",
              f"{r['p_value']:.1e}", f"{r['spread_a']:.1f} / {r['spread_b']:.1f}") for r in rows]
    print_table("ISBI 2015 senior annotation: Test1 - training, on the aligned anatomy",
                ["landmark", "drift x, y (mm)", "|drift|", "p", "spread train / test1 (mm)"], table,
                caption=f"control (two random halves of training): smallest p {result['control_min_p']:.2f}, "
                        f"largest drift {result['control_max_drift_mm']:.2f} mm")

    if args.run_dir:
        undone = undo_drift(train_mm, test_mm, rows, args.alpha) / test_spacing[:, None]
        result["runs"] = []
        for run_dir in args.run_dir:
            pred = load_predictions(run_dir, test_ids, names)
            offsets = ((pred - test_px) * test_spacing[:, None]).mean(0)
            run = {"run_dir": str(run_dir), "as_scored": score(pred, test_px, test_spacing),
                   "drift_undone": score(pred, undone, test_spacing),
                   "offsets_mm": {n: [float(x), float(y)] for n, (x, y) in zip(names, offsets)}}
            result["runs"].append(run)
            sig = [i for i, r in enumerate(rows) if r["p_value"] < args.alpha]
            print_table(f"{run_dir.name}: Test1 offset of the significant landmarks",
                        ["landmark", "model offset x, y (mm)", "minus drift x, y (mm)"],
                        [(names[i], f"{offsets[i][0]:+.2f}, {offsets[i][1]:+.2f}",
                          f"{-rows[i]['drift_x']:+.2f}, {-rows[i]['drift_y']:+.2f}") for i in sig],
                        caption=f"Test1 MRE {run['as_scored']['mre_mm']:.3f} mm, SDR@2mm "
                                f"{100 * run['as_scored']['sdr_2mm']:.1f} % as scored; "
                                f"{run['drift_undone']['mre_mm']:.3f} mm, "
                                f"{100 * run['drift_undone']['sdr_2mm']:.1f} % with the drift undone (diagnostic)")
    if args.json:
        plot = plot_drift(rows, args.json.with_suffix(".png"), alpha=args.alpha)
        result["plot"] = str(plot)
    write_json(args.json, result)


if __name__ == "__main__":
    from podium.errors import UserError

    try:
        main()
    except UserError as error:  # bad input: say what, exit 2 (the CLI's contract)
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
