"""`podium diff A B`: where two models (run folders or classification CSVs) disagree, sample by id.

    podium diff runs/a runs/b --split test_corrupted --out runs/diff_ab
    podium diff alice.csv bob.csv --out diffs/alice_bob        # id,label[,prob_*] as predict writes

    from podium.toolkit.diff import diff
    report = diff("runs/a", "runs/b", "runs/diff_ab")          # -> diff.json (+ diff.png)

class_probs (and CSVs): the disagreeing samples (both answers and confidences, the truth when
known), the confusion between the two (A's labels in rows, B's in columns), the agreement rate
and, with the truth, who is right where they disagree. mask_probs: per-sample fraction of pixels
whose label (argmax, or the threshold of a binary map) differs. points: per-sample mean distance
between A's and B's points (pixels, and mm when the set carries the spacing). image / volume:
per-sample mean absolute difference. The PNG grid shows the samples that disagree most.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from podium.errors import UserError
from podium.toolkit.sources import Answers, default_split, image_grid, load_answers, sample_images

REPORT, GRID = "diff.json", "diff.png"


def diff(a, b, out_dir, split: str | None = None, top: int = 20, max_images: int = 36) -> dict:
    """Compare two sources on their common split; write OUT/diff.json (+ diff.png); return it."""
    a, b = Path(a), Path(b)
    runs = [p for p in (a, b) if p.suffix.lower() != ".csv"]
    if split is None and len(runs) == 2:
        split = default_split(runs)
    A, B = load_answers(a, split), load_answers(b, split)
    _check(A, B)
    rows_b = {id_: r for r, id_ in enumerate(B.ids)}
    order = np.array([rows_b[i] for i in A.ids], dtype=np.int64)
    report = {"a": str(a), "b": str(b), "split": A.split or B.split, "kind": A.kind, "count": len(A.ids)}
    if A.kind == "class_probs":
        panels = _class_diff(A, B, order, report, max_images)
    elif A.kind == "mask_probs":
        panels = _per_sample(A, B, report, top, _mask_disagreement, "disagreement", max_images)
    elif A.kind == "points":
        panels = _per_sample(A, B, report, top, _point_distance, "mean_distance_px", max_images)
    else:
        panels = _per_sample(A, B, report, top, _mean_abs_difference, "mean_abs_difference", max_images)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report["grid"], report["grid_skipped"] = None, None
    if isinstance(panels, str):
        report["grid_skipped"] = panels
    elif panels:
        report["grid"] = str(image_grid(panels, out_dir / GRID, f"{a.name} (A) vs {b.name} (B): where they differ"))
    from podium.engine.runs import write_json

    write_json(out_dir / REPORT, report)
    return report


def _check(A: Answers, B: Answers) -> None:
    """Refuse what cannot be compared, naming both sources and what differs."""
    where = f"{A.source} and {B.source}"
    if A.kind != B.kind:
        raise UserError(f"cannot diff {where}: different kinds of prediction ({A.kind} vs {B.kind}).")
    if A.task and B.task and A.task != B.task:
        raise UserError(f"cannot diff {where}: different tasks ({A.task} vs {B.task}).")
    if set(A.ids) != set(B.ids):
        only_a, only_b = sorted(set(A.ids) - set(B.ids)), sorted(set(B.ids) - set(A.ids))
        raise UserError(f"cannot diff {where}: different ids (only in {A.source}: {only_a[:5]} ({len(only_a)}); "
                        f"only in {B.source}: {only_b[:5]} ({len(only_b)})).")
    if A.kind == "class_probs" and A.probs is not None and B.probs is not None and A.classes != B.classes:
        raise UserError(f"cannot diff {where}: different classes ({A.classes} vs {B.classes}).")
    if A.predictions is not None and B.predictions is not None:
        for key in ("classes", "landmarks"):
            if A.predictions.manifest.get(key) != B.predictions.manifest.get(key):
                raise UserError(f"cannot diff {where}: different {key} ({A.predictions.manifest.get(key)} vs "
                                f"{B.predictions.manifest.get(key)}).")


# ---- classes -------------------------------------------------------------------------------------


def _class_diff(A: Answers, B: Answers, order: np.ndarray, report: dict, max_images: int):
    b_labels = [B.labels[r] for r in order]
    b_conf = B.confidence[order]
    truth = A.truth if A.truth is not None else ([B.truth[r] for r in order] if B.truth is not None else None)
    if A.truth is not None and B.truth is not None and A.truth != [B.truth[r] for r in order]:
        raise UserError(f"cannot diff {A.source} and {B.source}: their ground truth differs.")
    classes = list(A.classes or [])
    classes += [c for c in sorted(set(A.labels) | set(b_labels) | set(B.classes or [])) if c not in classes]
    pos = {c: i for i, c in enumerate(classes)}
    confusion = np.zeros((len(classes), len(classes)), dtype=np.int64)
    for x, y in zip(A.labels, b_labels):
        confusion[pos[x], pos[y]] += 1
    differ = [r for r, (x, y) in enumerate(zip(A.labels, b_labels)) if x != y]
    # the most confident disagreements first: where one model is surest, a look pays most
    differ.sort(key=lambda r: -np.nan_to_num(max(A.confidence[r], b_conf[r]), nan=0.0))
    rows = [{"id": A.ids[r], "a": A.labels[r], "b": b_labels[r], "truth": None if truth is None else truth[r],
             "a_confidence": _num(A.confidence[r]), "b_confidence": _num(b_conf[r])} for r in differ]
    n = len(A.ids)
    report.update({"classes": classes, "agreement": 1.0 - len(differ) / n if n else 1.0,
                   "disagreements": len(differ), "rows": rows,
                   "confusion": {"rows": "a", "columns": "b", "labels": classes, "matrix": confusion.tolist()}})
    if truth is not None:
        right_a = sum(A.labels[r] == truth[r] for r in differ)
        right_b = sum(b_labels[r] == truth[r] for r in differ)
        report["accuracy"] = {"a": float(np.mean([x == t for x, t in zip(A.labels, truth)])) if n else None,
                              "b": float(np.mean([y == t for y, t in zip(b_labels, truth)])) if n else None}
        report["right_on_disagreements"] = {"a": int(right_a), "b": int(right_b),
                                            "neither": int(len(differ) - right_a - right_b)}
    shown = rows[:max_images]
    if not shown:
        return []
    images, why = sample_images(A if A.run_dir is not None else B, [r["id"] for r in shown])
    if not images and B.run_dir is not None and A.run_dir is not None:
        images, why = sample_images(B, [r["id"] for r in shown])
    if not images:
        return f"no images for the disagreeing samples: {why}"
    return [(images[r["id"]], f"{_short(r['id'])}\nA {r['a']} {_pct(r['a_confidence'])} | B {r['b']} "
             f"{_pct(r['b_confidence'])}" + (f"\ntruth {r['truth']}" if r["truth"] is not None else ""))
            for r in shown]


def _num(x) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def _pct(x) -> str:
    return "" if x is None else f"{100 * x:.0f}%"


def _short(id_: str, n: int = 22) -> str:
    return id_ if len(id_) <= n else "…" + id_[-n + 1:]


# ---- masks, points, images: one score per sample ---------------------------------------------------------


def _prediction_array(x: Answers) -> str:
    s = x.predictions
    name = next((n for n in s.manifest["arrays"] if s.role(n) == "prediction"), None)
    if name is None:
        raise UserError(f"{s.folder}: the prediction set holds no prediction array.")
    return name


def _labels(p: np.ndarray, threshold: float) -> np.ndarray:
    return p >= threshold if p.ndim == 2 else p.argmax(axis=0)


def _mask_disagreement(A: Answers, B: Answers, id_: str, name: str) -> tuple[float, np.ndarray]:
    t = float(A.predictions.manifest.get("threshold", 0.5))
    a = _labels(np.asarray(A.predictions.sample(name, id_), dtype=np.float32), t)
    b = _labels(np.asarray(B.predictions.sample(name, id_), dtype=np.float32), t)
    if a.shape != b.shape:
        raise UserError(f"cannot diff {A.source} and {B.source}: sample {id_!r} has masks of shape "
                        f"{list(a.shape)} vs {list(b.shape)}.")
    differ = a != b
    return float(differ.mean()) if differ.size else 0.0, (differ * 255).astype(np.uint8)


def _point_distance(A: Answers, B: Answers, id_: str, name: str) -> tuple[float, None]:
    a = np.asarray(A.predictions.sample(name, id_), dtype=np.float64)
    b = np.asarray(B.predictions.sample(name, id_), dtype=np.float64)
    if a.shape != b.shape:
        raise UserError(f"cannot diff {A.source} and {B.source}: sample {id_!r} has points of shape "
                        f"{list(a.shape)} vs {list(b.shape)}.")
    return float(np.nanmean(np.linalg.norm(a - b, axis=-1))), None


def _mean_abs_difference(A: Answers, B: Answers, id_: str, name: str) -> tuple[float, None]:
    a = np.asarray(A.predictions.sample(name, id_), dtype=np.float64)
    b = np.asarray(B.predictions.sample(name, id_), dtype=np.float64)
    if a.shape != b.shape:
        raise UserError(f"cannot diff {A.source} and {B.source}: sample {id_!r} has shape "
                        f"{list(a.shape)} vs {list(b.shape)}.")
    return float(np.abs(a - b).mean()), None


def _per_sample(A: Answers, B: Answers, report: dict, top: int, score, metric: str, max_images: int):
    name = _prediction_array(A)
    if name not in B.predictions.manifest["arrays"]:
        raise UserError(f"cannot diff {A.source} and {B.source}: {B.source} has no {name!r} array.")
    values, maps = {}, {}
    for id_ in A.ids:
        values[id_], maps[id_] = score(A, B, id_, name)
    ranked = sorted(values, key=lambda i: -values[i])
    rows = [{"id": i, metric: values[i]} for i in ranked]
    spacing = _spacing(A)
    if metric == "mean_distance_px" and spacing is not None:  # also in mm, per sample
        for row in rows:
            row["mean_distance_mm"] = _distance_mm(A, B, row["id"], name, spacing[A.predictions.row(row["id"])])
    report.update({"metric": metric, "array": name, "mean": float(np.mean(list(values.values()))) if values else None,
                   "top": rows[:top], "per_sample": rows})
    if A.kind == "mask_probs":
        report["agreement"] = 1.0 - report["mean"] if values else 1.0
    if A.kind in ("mask_probs", "points") and ranked:  # on the samples' pictures where a run shows them
        pictures = _pictures(A, B, ranked[:max_images], maps, name)
        if pictures is not None:
            return [(pictures[i], f"{_short(i)}\n{metric} {values[i]:.3f}") for i in ranked[:max_images]]
    shown = [i for i in ranked[:max_images] if maps[i] is not None]
    if not shown:
        return "no per-sample map for this kind of prediction" if A.kind != "mask_probs" else []
    return [(maps[i], f"{_short(i)}\n{metric} {values[i]:.3f}") for i in shown]


def _pictures(A: Answers, B: Answers, ids: list[str], maps: dict, name: str) -> dict[str, np.ndarray] | None:
    """{id: RGB picture (Task.sample_image)} with the pixels where the masks differ in red, or
    A's points in cyan and B's in orange (saved points are in the picture's pixels); None when
    neither run shows its samples (the grid then shows the bare disagreement maps)."""
    from PIL import Image

    images, _ = sample_images(A if A.run_dir is not None else B, ids)
    if not images and A.run_dir is not None and B.run_dir is not None:
        images, _ = sample_images(B, ids)
    if not images:
        return None
    out = {}
    for i in ids:
        rgb = np.array(Image.fromarray(images[i]).convert("RGB"))
        h, w = rgb.shape[:2]
        if maps[i] is not None:
            differ = np.asarray(Image.fromarray(maps[i]).resize((w, h), Image.NEAREST)) > 0
            rgb[differ] = (0.3 * rgb[differ] + 0.7 * np.array([255, 0, 0])).astype(np.uint8)
        else:
            r = max(1, min(h, w) // 80)
            for points, colour in ((A.predictions.sample(name, i), (0, 255, 255)),
                                   (B.predictions.sample(name, i), (255, 128, 0))):
                for x, y in np.asarray(points, dtype=np.float64).reshape(-1, 2):
                    if np.isfinite(x) and np.isfinite(y):
                        x, y = int(round(x)), int(round(y))
                        rgb[max(0, y - r):y + r + 1, max(0, x - r):x + r + 1] = colour
        out[i] = rgb
    return out


def _spacing(x: Answers):
    s = x.predictions
    return np.asarray(s.arrays["spacing"], dtype=np.float64) if "spacing" in s.arrays else None


def _distance_mm(A, B, id_, name, spacing) -> float:
    a = np.asarray(A.predictions.sample(name, id_), dtype=np.float64)
    b = np.asarray(B.predictions.sample(name, id_), dtype=np.float64)
    return float(np.nanmean(np.linalg.norm((a - b) * spacing, axis=-1)))
