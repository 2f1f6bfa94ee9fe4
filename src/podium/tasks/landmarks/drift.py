"""Annotation drift between two annotated sets: does annotator A place landmark k elsewhere on
the anatomy than annotator B (or the same annotator at another time)?

A model learns the convention of its training annotations. When a test set was annotated with a
different convention for some landmark, the model's test error on it has a systematic part that
no model trained on the first set can remove — the ISBI 2015 senior annotation of Test1 is such a
case for gonion and soft-tissue pogonion (`benchmarks/isbi_annotation_drift.py`).

The test, per landmark k (without any model):
1. every shape of both sets is similarity-aligned (Procrustes: translation, rotation, isotropic
   scale, no reflection; Gower 1975) onto a common reference using the OTHER landmarks only, so
   head pose, size and position drop out and landmark k cannot pull the alignment (a second
   pass also leaves out the landmarks found drifted in the first, which would pull it a little);
2. the mean aligned position of k is compared between the sets: the difference is the drift
   (in the unit of the input, e.g. mm), and a two-sample Hotelling T^2 test (Hotelling 1931)
   gives the probability of a difference at least that large when both sets share one mean.

If both sets are random draws from one population, anatomy cannot explain a significant
difference; the annotation can. The reference is the generalised Procrustes mean of both sets
(three alternations of align-all / re-average).

    from podium.tasks.landmarks.drift import annotation_drift
    rows = annotation_drift(train_shapes_mm, test_shapes_mm, names)  # (N, K, 2) each
    # rows[k] = {"landmark", "drift_x", "drift_y", "drift", "p_value", "spread_a", "spread_b", ...}
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from podium.errors import UserError

# A landmark whose first-pass drift has p below this is left out of the others' alignment.
ALIGN_ALPHA = 0.01


def fit_similarity(shape: np.ndarray, reference: np.ndarray, use: Sequence[int]) -> tuple:
    """(centre, rotation, scale, ref_centre) of the least-squares similarity transform taking
    `shape`'s landmarks `use` onto `reference`'s: aligned = (p - centre) @ rotation * scale +
    ref_centre. A proper rotation, never a reflection (hence not scipy's `procrustes` /
    `orthogonal_procrustes`, which allow reflections and rescale both shapes to unit size)."""
    use = list(use)
    part, ref = shape[use], reference[use]
    centre, ref_centre = part.mean(0), ref.mean(0)
    part0, ref0 = part - centre, ref - ref_centre
    u, s, vt = np.linalg.svd(part0.T @ ref0)
    d = np.sign(np.linalg.det(u @ vt)) or 1.0
    rotation = u @ np.diag([1.0, d]) @ vt
    scale = (s[0] + d * s[1]) / max((part0 ** 2).sum(), 1e-12)
    return centre, rotation, scale, ref_centre


def similarity_align(shapes: np.ndarray, reference: np.ndarray, use: Sequence[int]) -> np.ndarray:
    """Map every shape (N, K, 2) onto `reference` (K, 2) by the similarity fitted on `use`."""
    out = np.empty_like(shapes, dtype=np.float64)
    for i, shape in enumerate(shapes):
        centre, rotation, scale, ref_centre = fit_similarity(shape, reference, use)
        out[i] = (shape - centre) @ rotation * scale + ref_centre
    return out


def drift_in_image(shape: np.ndarray, reference: np.ndarray, use: Sequence[int], drift: np.ndarray) -> np.ndarray:
    """A displacement (2,) on the aligned anatomy, expressed in `shape`'s own image frame (the
    inverse of the shape's alignment, without its translation)."""
    _, rotation, scale, _ = fit_similarity(shape, reference, use)
    return (np.asarray(drift, dtype=np.float64) / scale) @ rotation.T


def _centroid_size(points: np.ndarray) -> np.ndarray:
    """Root of the summed squared distances to the centroid, over the last two axes."""
    return np.sqrt(((points - points.mean(-2, keepdims=True)) ** 2).sum((-1, -2)))


def procrustes_mean(shapes: np.ndarray, use: Sequence[int], iterations: int = 3) -> np.ndarray:
    """Generalised Procrustes reference (K, 2): align all to the current mean, re-average.
    Its size is the shapes' mean centroid size, so aligned distances stay in the input's unit
    (mm of an average-size head), and its orientation that of the shapes' plain mean, so the
    drift's x and y read as the images' average axes."""
    use = list(use)
    size = _centroid_size(shapes[:, use]).mean()
    reference = shapes[0].astype(np.float64)
    for _ in range(iterations):
        reference = similarity_align(shapes, reference, use).mean(0)
        centre = reference[use].mean(0)
        reference = (reference - centre) * (size / _centroid_size(reference[use])) + centre
    _, rotation, _, _ = fit_similarity(reference, shapes.mean(0), use)
    centre = reference[use].mean(0)
    return (reference - centre) @ rotation + centre


def hotelling_p_value(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Hotelling T^2 test of equal means, a (Na, D) and b (Nb, D), pooled covariance."""
    from scipy import stats

    na, nb, dims = len(a), len(b), a.shape[1]
    diff = a.mean(0) - b.mean(0)
    pooled = ((na - 1) * np.cov(a.T) + (nb - 1) * np.cov(b.T)) / (na + nb - 2)
    t2 = na * nb / (na + nb) * float(diff @ np.linalg.solve(np.atleast_2d(pooled), diff))
    f = (na + nb - dims - 1) / (dims * (na + nb - 2)) * t2
    return float(stats.f.sf(f, dims, na + nb - dims - 1))


def _complete(shapes: np.ndarray, label: str) -> np.ndarray:
    shapes = np.asarray(shapes, dtype=np.float64)
    if shapes.ndim != 3 or shapes.shape[2] != 2:
        raise UserError(f"{label}: expected shapes of shape (N, K, 2), got {shapes.shape}.")
    keep = np.isfinite(shapes).all(axis=(1, 2))  # a shape with a missing landmark is left out
    if keep.sum() < 4:
        raise UserError(f"{label}: {int(keep.sum())} complete shapes; the drift test needs at least 4.")
    return shapes[keep]


def annotation_drift(shapes_a: np.ndarray, shapes_b: np.ndarray,
                     names: Sequence[str] | None = None) -> list[dict]:
    """Per landmark: the mean displacement of set B's annotation relative to set A's on the
    aligned anatomy (B - A), its size, the Hotelling p-value, and each set's scatter (root of the
    trace of the aligned positions' covariance: how far single annotations spread)."""
    a, b = _complete(shapes_a, "set A"), _complete(shapes_b, "set B")
    if a.shape[1] != b.shape[1]:
        raise UserError(f"set A has {a.shape[1]} landmarks per shape, set B {b.shape[1]}.")
    k = a.shape[1]
    if k < 4:
        raise UserError(f"the drift test aligns on the other landmarks and needs at least 4, got {k}.")
    names = list(names) if names is not None else [str(i) for i in range(k)]
    rows = _drift_rows(a, b, names, exclude=set())
    # a drifted landmark pulls the alignment of the others a little (~drift / K): test again,
    # aligning on the landmarks that did not drift
    drifted = {j for j, row in enumerate(rows) if row["p_value"] < ALIGN_ALPHA}
    return _drift_rows(a, b, names, exclude=drifted) if drifted else rows


def alignment_landmarks(k: int, landmark: int, exclude: set[int]) -> list[int]:
    """The landmarks that align the shapes when testing `landmark` (never itself)."""
    use = [i for i in range(k) if i != landmark and i not in exclude]
    return use if len(use) >= 3 else [i for i in range(k) if i != landmark]


def _drift_rows(a: np.ndarray, b: np.ndarray, names: list[str], exclude: set[int]) -> list[dict]:
    k = a.shape[1]
    both = np.concatenate([a, b])
    rows = []
    for j in range(k):
        use = alignment_landmarks(k, j, exclude)
        reference = procrustes_mean(both, use)
        pa = similarity_align(a, reference, use)[:, j]
        pb = similarity_align(b, reference, use)[:, j]
        drift = pb.mean(0) - pa.mean(0)
        rows.append({"landmark": names[j], "drift_x": float(drift[0]), "drift_y": float(drift[1]),
                     "drift": float(np.hypot(*drift)), "p_value": hotelling_p_value(pa, pb),
                     "spread_a": float(np.sqrt(np.trace(np.cov(pa.T)))),
                     "spread_b": float(np.sqrt(np.trace(np.cov(pb.T)))), "n_a": len(a), "n_b": len(b),
                     "aligned_on": len(use)})
    return rows


def undo_drift(shapes_a: np.ndarray, shapes_b: np.ndarray, rows: Sequence[dict],
               alpha: float = 0.01) -> np.ndarray:
    """Set B's annotations with every significant drift (p < alpha) taken back out, each
    mapped into its own image's frame: what B would read under A's convention. A diagnostic of
    how much of a model's error on B the drift explains; it reads B's annotations, so it is
    never a result."""
    a, b = _complete(shapes_a, "set A"), np.asarray(shapes_b, dtype=np.float64)
    both = np.concatenate([a, _complete(b, "set B")])
    out = b.copy()
    k = b.shape[1]
    drifted = {j for j, row in enumerate(rows) if row["p_value"] < ALIGN_ALPHA}
    for j, row in enumerate(rows):
        if row["p_value"] >= alpha:
            continue
        use = alignment_landmarks(k, j, drifted)
        reference = procrustes_mean(both, use)
        drift = np.array([row["drift_x"], row["drift_y"]])
        for n, shape in enumerate(b):
            if np.isfinite(shape).all():
                out[n, j] = shape[j] - drift_in_image(shape, reference, use, drift)
    return out


def plot_drift(rows: Sequence[dict], path: str | Path, *, alpha: float = 0.01, unit: str = "mm") -> Path:
    """Bar chart of the drift per landmark; bars with p < alpha are highlighted."""
    from podium.common.plots import new_figure, save_figure

    fig = new_figure(figsize=(8, 0.3 * len(rows) + 1.2))
    ax = fig.add_subplot()
    y = np.arange(len(rows))[::-1]
    significant = [r["p_value"] < alpha for r in rows]
    ax.barh(y, [r["drift"] for r in rows], color=["tab:red" if s else "tab:gray" for s in significant])
    ax.set_yticks(y, [r["landmark"] for r in rows], fontsize=8)
    ax.set_xlabel(f"annotation drift, set B - set A on the aligned anatomy ({unit})")
    ax.set_title(f"red: p < {alpha} (Hotelling T$^2$)")
    return save_figure(fig, path)
