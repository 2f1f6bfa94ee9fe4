"""`podium audit RUN_DIR`: the training samples most likely mislabelled, from out-of-fold class
probabilities, with confident learning (Northcutt, Jiang & Chuang, "Confident Learning:
Estimating Uncertainty in Dataset Labels", JAIR 2021; the `cleanlab` library by its authors).

    podium cv experiment=digits cv.folds=5 --out runs/cv      # writes runs/cv/predictions/oof
    podium audit runs/cv --top 30                             # -> runs/cv/audit/audit.{json,csv,png}

    from podium.toolkit.audit import audit
    report = audit("runs/cv", top=30)

Why out-of-fold: a model scores the images it trained on with high confidence in their given
label, right or wrong, so in-sample probabilities hide label errors. `podium cv` gives every
training image a probability from the fold model that never saw it. A plain run has no such set:
its val probabilities are used instead (out-of-sample, but only the val images are checked) and
the report says so.

`cleanlab.filter.find_label_issues` flags the samples whose given label disagrees with the
confident joint (prune by noise rate), ranked by self-confidence, the probability the model gives
to the given label (`cleanlab.rank.get_label_quality_scores`): the lower, the likelier an error.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from podium.errors import UserError
from podium.toolkit.sources import Answers, image_grid, load_answers, run_splits, sample_images

REPORT, TABLE, GRID = "audit.json", "audit.csv", "audit.png"


def source_split(run_dir: Path, split: str | None) -> tuple[str, list[str]]:
    """(the split to audit, warnings): the given split, else oof, else val with a warning."""
    have = run_splits(run_dir)
    if split is not None:
        return split, ([] if split == "oof" else [_weaker(run_dir, split)])
    if "oof" in have:
        return "oof", []
    if "val" in have:
        return "val", [_weaker(run_dir, "val") + f" ({run_dir}/predictions/oof is missing)"]
    raise UserError(f"{run_dir} has no out-of-fold or val predictions to audit ({run_dir}/predictions/oof and "
                    f"{run_dir}/predictions/val are missing; it has: {', '.join(have) or 'none'}). "
                    "Run `podium cv experiment=... --out DIR` and audit DIR.")


def _weaker(run_dir: Path, split: str) -> str:
    if split.startswith("train"):
        return (f"auditing in-sample probabilities ({split}): the model saw these labels in training, so "
                "it agrees with wrong labels; out-of-fold probabilities (`podium cv`) find far more")
    return (f"auditing the {split} split only: its images are checked, the training images are not; "
            "out-of-fold probabilities from `podium cv` cover every training image")


def find_issues(labels: np.ndarray, probs: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(indices of the likely label issues ranked worst first, quality score of every sample)."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    probs = np.asarray(probs, dtype=np.float64)
    probs = probs / np.clip(probs.sum(axis=1, keepdims=True), 1e-12, None)  # saved float32 rows: sum to 1
    try:
        ranked = find_label_issues(labels, probs, return_indices_ranked_by="self_confidence", n_jobs=1)
        quality = get_label_quality_scores(labels, probs, method="self_confidence")
    except (ValueError, AssertionError) as err:  # cleanlab's checks on labels / probabilities
        raise UserError(f"{where}: cleanlab cannot audit these probabilities ({err}).") from None
    return np.asarray(ranked, dtype=np.int64), np.asarray(quality, dtype=np.float64)


def audit(run_dir, out_dir=None, top: int = 20, split: str | None = None, max_images: int = 36) -> dict:
    """Rank the likely mislabelled samples of a run's (or a `podium cv` folder's) saved class
    probabilities; write OUT/audit.json, audit.csv (every flagged sample) and audit.png (the
    worst `max_images`); OUT defaults to RUN/audit. Return the report."""
    from podium.engine.runs import write_json

    run_dir = Path(run_dir)
    if not run_dir.is_dir():  # any folder with predictions/<split>/ will do: a run, a cv folder
        raise UserError(f"{run_dir}: no such run folder.")
    split, warnings = source_split(run_dir, split)
    answers = load_answers(run_dir, split)
    folder = run_dir / "predictions" / split
    if answers.kind != "class_probs" or answers.probs is None:
        raise UserError(f"{folder}: podium audit reads class probabilities (class_probs), got {answers.kind}.")
    if answers.truth is None:
        raise UserError(f"{folder}: the set carries no given labels (a truth array `labels`): nothing to audit.")
    classes = answers.classes
    pos = {c: i for i, c in enumerate(classes)}
    labels = np.array([pos[t] for t in answers.truth], dtype=np.int64)
    ranked, quality = find_issues(labels, answers.probs, str(folder))
    suggested = answers.probs.argmax(axis=1)
    rows = [{"rank": n + 1, "id": answers.ids[r], "given": classes[labels[r]], "suggested": classes[suggested[r]],
             "quality": float(quality[r]), "suggested_probability": float(answers.probs[r, suggested[r]])}
            for n, r in enumerate(ranked)]
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "audit"
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {"run": str(run_dir), "split": split, "source": str(folder), "count": len(answers.ids),
              "issues": len(rows), "issue_rate": len(rows) / len(answers.ids) if answers.ids else 0.0,
              "method": "cleanlab.filter.find_label_issues (prune_by_noise_rate), ranked by self_confidence",
              "warnings": warnings, "top": rows[:top], "csv": str(out_dir / TABLE), "grid": None, "grid_skipped": None}
    with (out_dir / TABLE).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["rank", "id", "given", "suggested", "quality", "suggested_probability"])
        writer.writeheader()
        writer.writerows(rows)
    panels = _panels(answers, rows[:max_images])
    if isinstance(panels, str):
        report["grid_skipped"] = panels
    elif panels:
        report["grid"] = str(image_grid(panels, out_dir / GRID, f"{run_dir.name}: likely label issues ({split})"))
    write_json(out_dir / REPORT, report)
    return report


def _panels(answers: Answers, rows: list[dict]):
    if not rows:
        return []
    images, why = sample_images(answers, [r["id"] for r in rows])
    if not images:
        return f"no images for the flagged samples: {why}"
    return [(images[r["id"]], f"{r['id'][-22:]}\ngiven {r['given']} -> {r['suggested']}\nq={r['quality']:.2f}")
            for r in rows]
