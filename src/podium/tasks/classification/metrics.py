"""Classification metrics and diagnostic plots.

Scores are computed with scikit-learn so they match the competition metric exactly: macro-F1 is
the unweighted mean of the per-class F1 over ALL declared classes (`labels=range(C)`), so a class
absent from both the labels and the predictions counts as F1 = 0 (`zero_division=0`) and drags
the macro average down, as it does on the leaderboard.

Registered under kind "metric" (`y_true`, `y_pred` are integer class indices):
  accuracy, macro_f1  -> float
  per_class_f1        -> {class name: F1}

Plots use matplotlib's object-oriented API with the Agg canvas, imported inside the functions:
importing this module stays light, and no global pyplot state or backend is touched.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

from podium.common.plots import new_figure, save_figure
from podium.engine.registry import register

# Probability floor for the negative log-likelihood: a confident wrong prediction with p = 0
# would otherwise give an infinite loss.
NLL_CLIP = 1e-12


def _as_labels(y: np.ndarray, name: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"{name} must be 1-D class indices, got shape {y.shape}")
    return y.astype(np.int64, copy=False)


def _check_pair(y_true, y_pred, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    y_true = _as_labels(y_true, "y_true")
    y_pred = _as_labels(y_pred, "y_pred")
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} labels but y_pred has {len(y_pred)}")
    for name, y in (("y_true", y_true), ("y_pred", y_pred)):
        if len(y) and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(
                f"{name} holds class indices outside [0, {num_classes}): "
                f"min {y.min()}, max {y.max()}"
            )
    return y_true, y_pred


def _per_class_f1(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    return f1_score(
        y_true, y_pred, labels=list(range(num_classes)), average=None, zero_division=0
    )


# --------------------------------------------------------------------------------------------
# Registered metrics
# --------------------------------------------------------------------------------------------


@register("metric", "accuracy")
def accuracy(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> float:
    """Fraction of samples whose predicted class is the true class."""
    y_true, y_pred = _check_pair(y_true, y_pred, len(classes))
    if len(y_true) == 0:
        return math.nan
    return float(accuracy_score(y_true, y_pred))


@register("metric", "macro_f1")
def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> float:
    """Unweighted mean F1 over every declared class (absent classes count as 0)."""
    y_true, y_pred = _check_pair(y_true, y_pred, len(classes))
    if len(y_true) == 0:
        return math.nan
    return float(
        f1_score(
            y_true, y_pred, labels=list(range(len(classes))), average="macro", zero_division=0
        )
    )


@register("metric", "per_class_f1")
def per_class_f1(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> dict[str, float]:
    """F1 of each class, keyed by class name."""
    y_true, y_pred = _check_pair(y_true, y_pred, len(classes))
    if len(y_true) == 0:
        return {name: math.nan for name in classes}
    scores = _per_class_f1(y_true, y_pred, len(classes))
    return {name: float(s) for name, s in zip(classes, scores)}


# --------------------------------------------------------------------------------------------
# Everything the evaluation loop logs, in one flat dict
# --------------------------------------------------------------------------------------------


def classification_metrics(
    y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str]
) -> dict[str, float]:
    """Flat metrics from true labels and predicted class probabilities (N, C).

    Keys: "accuracy", "macro_f1", "f1/<class>" for each class, and "loss_nll", the mean of
    -log(prob of the true class) with the probability clipped at 1e-12. The prediction is the
    arg-max of `probs` (ties go to the lowest class index, as in numpy).
    """
    classes = list(classes)
    num_classes = len(classes)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] != num_classes:
        raise ValueError(
            f"probs must have shape (N, {num_classes}) for {num_classes} classes, "
            f"got {probs.shape}"
        )
    y_true = _as_labels(y_true, "y_true")
    if len(y_true) != len(probs):
        raise ValueError(f"y_true has {len(y_true)} labels but probs has {len(probs)} rows")
    if len(y_true) == 0:
        raise ValueError("classification_metrics needs at least one sample")
    y_pred = probs.argmax(axis=1)
    y_true, y_pred = _check_pair(y_true, y_pred, num_classes)

    per_class = _per_class_f1(y_true, y_pred, num_classes)
    p_true = probs[np.arange(len(y_true)), y_true]
    out = {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": macro_f1(y_true, y_pred, classes),
        "loss_nll": float(np.mean(-np.log(np.clip(p_true, NLL_CLIP, None)))),
    }
    for name, score in zip(classes, per_class):
        out[f"f1/{name}"] = float(score)
    return out


def confusion(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) counts: rows are true classes, columns predicted classes."""
    y_true, y_pred = _check_pair(y_true, y_pred, num_classes)
    return confusion_matrix(y_true, y_pred, labels=list(range(num_classes)))


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------


def plot_confusion_matrix(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    classes: Sequence[str],
    path: str | Path,
    normalize: bool = True,
) -> Path:
    """Save the confusion matrix as an image; `normalize` divides each row by its true count.

    Rows of classes absent from `y_true` stay 0 rather than 0/0. Cell values are written only
    while the matrix is small enough to read them.
    """
    classes = list(classes)
    num_classes = len(classes)
    cm = confusion(y_true, y_pred, num_classes).astype(np.float64)
    if normalize:
        row_sums = cm.sum(axis=1, keepdims=True)
        cm = np.divide(cm, row_sums, out=np.zeros_like(cm), where=row_sums > 0)

    side = min(max(4.0, 0.45 * num_classes + 2.0), 30.0)
    fig = new_figure((side + 1.0, side))
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(cm, cmap="Blues", vmin=0.0, vmax=1.0 if normalize else None)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ticks = np.arange(num_classes)
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)
    ax.set_xticklabels(classes, rotation=90, fontsize=8)
    ax.set_yticklabels(classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix" + (" (row-normalised)" if normalize else ""))

    if num_classes <= 30:
        threshold = cm.max() / 2.0 if cm.max() > 0 else 0.5
        for i in range(num_classes):
            for j in range(num_classes):
                text = f"{cm[i, j]:.2f}" if normalize else f"{int(cm[i, j])}"
                color = "white" if cm[i, j] > threshold else "black"
                ax.text(j, i, text, ha="center", va="center", fontsize=7, color=color)
    return save_figure(fig, path)


def _to_display(image: np.ndarray) -> tuple[np.ndarray, str | None]:
    """(C, H, W) or (H, W) array -> something imshow takes, rescaled to [0, 1] per image.

    One channel (or two) is shown in grey (the first channel); three or more as RGB from the
    first three channels.
    """
    image = np.asarray(image, dtype=np.float64)
    if image.ndim == 3:
        image = image[0] if image.shape[0] < 3 else np.transpose(image[:3], (1, 2, 0))
    elif image.ndim != 2:
        raise ValueError(f"expected a (C, H, W) image, got shape {image.shape}")
    image = np.nan_to_num(image)
    low, high = image.min(), image.max()
    # Per-image rescaling: the caller may pass denormalised [0, 1] images or raw tensors in any
    # range; a constant image becomes mid-grey instead of 0/0.
    image = (image - low) / (high - low) if high > low else np.full_like(image, 0.5)
    return image, ("gray" if image.ndim == 2 else None)


def plot_misclassified(
    images: np.ndarray,
    y_true: np.ndarray,
    y_pred: np.ndarray,
    classes: Sequence[str],
    path: str | Path,
    max_images: int = 36,
) -> Path:
    """Save a grid of (up to `max_images`) misclassified images titled "true → pred".

    `images` is (N, C, H, W) (or (N, H, W)), in any value range: each image is rescaled on its
    own. The first misclassified samples in order are shown. With none misclassified, the figure
    says so (the file is still written so reports can link to it unconditionally).
    """
    classes = list(classes)
    images = np.asarray(images)
    y_true, y_pred = _check_pair(y_true, y_pred, len(classes))
    if len(images) != len(y_true):
        raise ValueError(f"got {len(images)} images for {len(y_true)} labels")

    wrong = np.flatnonzero(y_true != y_pred)[: max(0, int(max_images))]
    if len(wrong) == 0:
        fig = new_figure((4.0, 2.0))
        ax = fig.add_subplot(1, 1, 1)
        ax.axis("off")
        ax.text(
            0.5,
            0.5,
            f"No misclassified images\n({len(y_true)} checked)",
            ha="center",
            va="center",
            fontsize=12,
        )
        return save_figure(fig, path)

    # One mosaic image with text labels: one axes instead of one per image is ~10x faster to draw.
    tiles = [_to_display(images[index]) for index in wrong]
    rgb = [np.repeat(t[..., None], 3, axis=2) if t.ndim == 2 else t for t, _ in tiles]
    h, w = max(t.shape[0] for t in rgb), max(t.shape[1] for t in rgb)
    ncols = math.ceil(math.sqrt(len(wrong)))
    nrows = math.ceil(len(wrong) / ncols)
    gap = max(1, h // 8)
    mosaic = np.ones((nrows * (h + gap), ncols * (w + gap), 3), np.float32)
    for k, tile in enumerate(rgb):
        r, c = divmod(k, ncols)
        mosaic[r * (h + gap): r * (h + gap) + tile.shape[0], c * (w + gap): c * (w + gap) + tile.shape[1]] = tile
    fig = new_figure((2.0 * ncols, 2.2 * nrows))
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(mosaic, vmin=0.0, vmax=1.0, interpolation="nearest")
    for k, index in enumerate(wrong):
        r, c = divmod(k, ncols)
        ax.text(c * (w + gap) + w / 2, r * (h + gap) - gap / 4, f"{classes[y_true[index]]} → {classes[y_pred[index]]}",
                ha="center", va="bottom", fontsize=8)
    ax.axis("off")
    fig.suptitle(f"misclassified: {int((y_true != y_pred).sum())} of {len(y_true)} (true → pred)")
    return save_figure(fig, path)
