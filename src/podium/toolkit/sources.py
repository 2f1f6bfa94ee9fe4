"""What `podium diff`, `podium audit` and `podium ensemble` read: a run folder's saved prediction
set or a classification CSV, the images behind sample ids, and a captioned image grid.

    from podium.toolkit.sources import load_answers, sample_images
    a = load_answers("runs/a", split="test")          # or "alice.csv" (id,label[,prob_*])
    images, why_not = sample_images(a, a.ids[:9])      # {id: uint8 array}, None | a reason

Images come, in order, from the run's task (`Task.sample_image(split, id)`, built from the run
folder with `podium.engine.runcard.task_for_run`; a `podium cv` folder uses its first fold run),
or from the ids themselves when they are image files (as `podium predict` writes them).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from podium.errors import UserError

# ---- classification CSVs -----------------------------------------------------------------------


def read_prediction_csv(path: Path) -> tuple[list[str], dict[str, dict]]:
    """(prob columns, {id: row}) of a predictions CSV with an `id` (or eval's `index`) column."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such CSV file.")
    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            fields = list(reader.fieldnames or [])
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"{path}: unreadable CSV ({e}).") from None
    key = "id" if "id" in fields else "index" if "index" in fields else None
    probs = [c for c in fields if c.startswith("prob_")]
    if key is None or (not probs and "label" not in fields):
        raise UserError(f"{path}: expected columns id,label[,prob_<class>...] (as podium predict writes), "
                        f"got {','.join(fields) or 'no header'}.")
    table: dict[str, dict] = {}
    for n, row in enumerate(rows, start=2):
        if row[key] in table:
            raise UserError(f"{path}, line {n}: id {row[key]!r} appears twice.")
        table[row[key]] = row
    return probs, table


# ---- one side of a diff / the input of an audit --------------------------------------------------


@dataclass
class Answers:
    """A source's predictions aligned on its ids: the prediction set (runs) or the class answers
    (CSVs and class_probs sets): `labels` (class names), `confidence` (NaN when unknown), `truth`
    (class names, or None) and `probs` (N, C) when known."""

    source: Path
    kind: str
    ids: list[str]
    split: str | None = None
    run_dir: Path | None = None
    task: str | None = None
    classes: list[str] | None = None
    labels: list[str] | None = None
    confidence: np.ndarray | None = None
    truth: list[str] | None = None
    probs: np.ndarray | None = None
    predictions: Any = None  # the PredictionSet of a run
    extra: dict = field(default_factory=dict)


def run_splits(run_dir: Path) -> list[str]:
    """The splits a run saved a prediction set for (folders with a manifest)."""
    root = Path(run_dir) / "predictions"
    return sorted(p.name for p in root.iterdir() if (p / "manifest.json").is_file()) if root.is_dir() else []


def default_split(runs: list[Path]) -> str:
    """The first test split every run saved (else the first common split); UserError naming
    the runs' splits when they share none."""
    available = [run_splits(r) for r in runs]
    common = [s for s in available[0] if all(s in have for have in available[1:])]
    if not common:
        raise UserError("no saved prediction split in common: " + "; ".join(
            f"{r}/predictions: {', '.join(h) or 'none'}" for r, h in zip(runs, available)))
    tests = [s for s in common if s.startswith("test")]
    return (tests or common)[0]


def load_answers(path, split: str | None = None) -> Answers:
    """A run folder's saved set for `split` (default: its first test split) or a CSV."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        return _csv_answers(path)
    if not path.is_dir():
        raise UserError(f"{path}: neither a run folder nor a .csv file.")
    from podium.engine.predictions import read_predictions

    split = split or default_split([path])
    folder = path / "predictions" / split
    if not (folder / "manifest.json").is_file():
        have = run_splits(path)
        raise UserError(f"{path} has no saved predictions for split {split!r} ({folder} is missing; "
                        f"it has: {', '.join(have) or 'none'}).")
    s = read_predictions(folder)
    answers = Answers(source=path, kind=s.kind, ids=list(s.ids), split=split, run_dir=path,
                      task=s.manifest.get("task"), predictions=s)
    if s.kind == "class_probs":
        classes = [str(c) for c in s.manifest.get("classes") or []]
        name = next((n for n in s.arrays if s.role(n) == "prediction"), None)
        if name is None or not classes:
            raise UserError(f"{folder}: a class_probs set needs a prediction array and its classes.")
        probs = np.asarray(s.arrays[name], dtype=np.float64)
        if probs.ndim != 2 or probs.shape[1] != len(classes):
            raise UserError(f"{folder}: {name} has shape {list(probs.shape)}, expected (N, {len(classes)}).")
        answers.classes, answers.probs = classes, probs
        answers.labels = [classes[i] for i in probs.argmax(axis=1)]
        answers.confidence = probs.max(axis=1)
        truth = next((n for n in s.arrays if s.role(n) == "truth" and n in ("labels", "label", "target")), None)
        if truth is not None:
            answers.truth = [classes[int(i)] for i in np.asarray(s.arrays[truth])]
    return answers


def _csv_answers(path: Path) -> Answers:
    """A predictions CSV: `podium predict`'s id,label,prob_* (label = the answer) or eval's
    index,label,pred,prob_* (pred = the answer, label = the truth)."""
    cols, table = read_prediction_csv(path)
    ids = list(table)
    first = next(iter(table.values()), {})
    answer_col = "pred" if "pred" in first else "label"
    classes = [c.removeprefix("prob_") for c in cols]
    answers = Answers(source=path, kind="class_probs", ids=ids, task="classification")
    if cols:
        try:
            probs = np.array([[float(table[i][c]) for c in cols] for i in ids], dtype=np.float64).reshape(len(ids), len(cols))
        except (TypeError, ValueError):
            raise UserError(f"{path}: a probability column holds something that is not a number.") from None
        answers.probs, answers.confidence = probs, probs.max(axis=1) if ids else np.zeros(0)
    else:
        answers.confidence = np.full(len(ids), np.nan)
    if answer_col in first:
        answers.labels = [table[i][answer_col] for i in ids]
    else:  # probabilities only
        answers.labels = [classes[k] for k in answers.probs.argmax(axis=1)]
    answers.classes = classes or sorted(set(answers.labels))
    if answer_col == "pred":
        answers.truth = [table[i]["label"] for i in ids]
    return answers


# ---- images ------------------------------------------------------------------------------------


def model_run(run_dir: Path) -> Path | None:
    """The run folder whose config and card describe `run_dir`'s task: the run itself, or the
    first fold run of a `podium cv` folder when it holds no config of its own; None if neither."""
    run_dir = Path(run_dir)
    if (run_dir / "config.yaml").is_file():
        return run_dir
    folds = sorted(p for p in run_dir.glob("fold*") if (p / "config.yaml").is_file())
    return folds[0] if folds else None


def member_dir(path) -> Path:
    """A run folder or a `podium cv` output folder (fold runs + predictions/); UserError else."""
    path = Path(path)
    if model_run(path) is None:
        raise UserError(f"{path} is not a podium run folder (no config.yaml inside) nor a `podium cv` "
                        "folder (no fold*/config.yaml inside).")
    return path


def sample_images(answers: Answers, ids: list[str]) -> tuple[dict[str, np.ndarray], str | None]:
    """{id: (H, W) or (H, W, 3) uint8 image} for the ids, and None, or ({}, why there are none)."""
    if not ids:
        return {}, None
    reasons = []
    run = model_run(answers.run_dir) if answers.run_dir is not None else None
    if run is not None:
        try:
            from podium.engine.runcard import task_for_run

            task = task_for_run(run)
            images = {i: task.sample_image(answers.split or "", i) for i in ids}
            if all(v is not None for v in images.values()):
                return {i: _as_uint8(v) for i, v in images.items()}, None
            reasons.append(f"the {type(task).__name__} of {run} does not show its samples")
        except UserError as err:  # the data is not on this machine: no grid, not a failure
            reasons.append(f"{run}'s data could not be read ({err})")
    files = [Path(i) for i in ids]
    if all(p.is_file() for p in files):
        from PIL import Image

        try:
            return {i: np.asarray(Image.open(p).convert("RGB")) for i, p in zip(ids, files)}, None
        except OSError as err:
            reasons.append(f"an image file could not be read ({err})")
    else:
        reasons.append("the sample ids are not image files")
    return {}, "; ".join(reasons)


def _as_uint8(image) -> np.ndarray:
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):  # C, H, W -> H, W, C
        a = np.moveaxis(a, 0, -1)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.dtype != np.uint8:
        a = np.clip(a.astype(np.float64), 0, 255 if a.max(initial=0) > 1.0 else 1.0)
        a = (a * (1 if a.max(initial=0) > 1.0 else 255)).round().astype(np.uint8)
    return a


def image_grid(panels: list[tuple[np.ndarray, str]], out_png: Path, title: str, cols: int = 6) -> Path:
    """A grid of (image, caption) panels -> PNG (grey images in grey, maps in viridis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(panels))
    cols = min(cols, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.9 * rows + 0.4), squeeze=False)  # 3-line captions
    for ax in axes.flat:
        ax.axis("off")
    for ax, (image, caption) in zip(axes.flat, panels):
        grey = image.ndim == 2 and image.dtype == np.uint8
        ax.imshow(image, cmap="gray" if grey else "viridis" if image.ndim == 2 else None)
        ax.set_title(caption, fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))  # room for the title
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
