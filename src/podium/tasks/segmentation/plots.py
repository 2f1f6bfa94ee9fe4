"""Segmentation figures: image / ground truth / prediction / error overlays and pooled ROC + PR
curves, drawn with podium.common.plots (an Agg canvas, no pyplot state).

Error colours (`error_map`), the convention of vessel-segmentation papers:
  true positive white, false positive red, false negative blue, true negative black,
  a foreground pixel given another foreground class (multi-class only) yellow,
  a pixel that does not count (outside the field of view, ignore label) grey.
Multi-class label maps are drawn with one colour per class (tab10 / tab20, background black).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from podium.common.plots import new_figure, save_figure
from podium.tasks.segmentation.metrics import (
    DEFAULT_IGNORE_INDEX,
    PooledCurves,
    binary_counts,
    pooled_curves,
    ratios,
)

ERROR_COLOURS: dict[str, tuple[int, int, int]] = {
    "true positive": (255, 255, 255),
    "false positive": (255, 0, 0),
    "false negative": (0, 0, 255),
    "true negative": (0, 0, 0),
    "wrong class": (255, 215, 0),
    "not counted": (128, 128, 128),
}

# Width of one panel in inches at 100 dpi: an image is drawn at most at its own size.
_MAX_PANEL_INCHES = 6.0
# Points kept on a drawn curve: millions of thresholds add nothing a screen can show.
_CURVE_POINTS = 4000


def error_map(target: np.ndarray, pred: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """(H, W, 3) uint8 error colours (ERROR_COLOURS) of class ids `pred` against `target`.

    Foreground is every class but 0; a bool prediction is read as 0 / 1.
    """
    target, pred = np.asarray(target), np.asarray(pred).astype(np.int64)
    if target.shape != pred.shape:
        raise ValueError(f"target has shape {target.shape} but pred has {pred.shape}")
    valid = np.ones(target.shape, bool) if valid is None else np.asarray(valid, dtype=bool)
    true_fg, pred_fg = target != 0, pred != 0
    out = np.empty((*target.shape, 3), dtype=np.uint8)
    out[:] = ERROR_COLOURS["true negative"]
    out[true_fg & pred_fg & (target == pred)] = ERROR_COLOURS["true positive"]
    out[true_fg & pred_fg & (target != pred)] = ERROR_COLOURS["wrong class"]
    out[~true_fg & pred_fg] = ERROR_COLOURS["false positive"]
    out[true_fg & ~pred_fg] = ERROR_COLOURS["false negative"]
    out[~valid] = ERROR_COLOURS["not counted"]
    return out


def label_colours(labels: np.ndarray, num_classes: int, valid: np.ndarray | None = None) -> np.ndarray:
    """(H, W, 3) uint8: binary maps white on black, more classes in tab10 / tab20 colours;
    pixels that do not count grey."""
    from matplotlib import colormaps

    labels = np.asarray(labels).astype(np.int64)
    if num_classes <= 2:
        palette = np.array([[0, 0, 0], [255, 255, 255]], dtype=np.uint8)
    else:
        cmap = colormaps["tab10" if num_classes <= 11 else "tab20"]
        palette = np.array([[0, 0, 0]] + [[round(255 * v) for v in cmap(c % cmap.N)[:3]]
                                          for c in range(num_classes - 1)], dtype=np.uint8)
    out = palette[np.clip(labels, 0, num_classes - 1)]
    if valid is not None:
        out[~np.asarray(valid, dtype=bool)] = ERROR_COLOURS["not counted"]
    return out


def _as_rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[0] in (1, 3) and image.shape[2] not in (1, 3):
        image = np.transpose(image, (1, 2, 0))  # (C, H, W)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    if image.dtype != np.uint8:
        image = image.astype(np.float64)
        low, high = np.nanmin(image), np.nanmax(image)
        image = np.nan_to_num((image - low) / (high - low) if high > low else image * 0) * 255
        image = image.round().astype(np.uint8)
    return image[..., :3]


def _legend(ax, names: Sequence[str]) -> None:
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=np.array(ERROR_COLOURS[n]) / 255, edgecolor="0.3", label=n) for n in names]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.02), ncol=3, fontsize=7,
              frameon=False)


def plot_overlay(image: np.ndarray, target: np.ndarray | None, pred: np.ndarray, valid: np.ndarray | None,
                 path: str | Path, num_classes: int | None = None, title: str | None = None) -> Path:
    """Panels image | ground truth | prediction | errors (ERROR_COLOURS); without a target
    (`podium predict`): image | prediction outlined on the image.

    image (H, W, 3) uint8 (or any array, rescaled); target (H, W) class ids (values outside
    `valid` are not drawn); pred (H, W) bool or class ids; valid (H, W) bool or None (all).
    Binary predictions get the image's Dice in the title of the error panel.
    """
    rgb = _as_rgb(image)
    pred = np.asarray(pred).astype(np.int64)
    h, w = pred.shape
    if rgb.shape[:2] != (h, w) or (target is not None and np.shape(target) != (h, w)):
        raise ValueError(f"image {rgb.shape[:2]}, target {None if target is None else np.shape(target)} and "
                         f"prediction {pred.shape} must have one size")
    valid = np.ones((h, w), bool) if valid is None else np.asarray(valid, dtype=bool)
    if num_classes is None:
        seen = pred[valid].max(initial=0)
        if target is not None:
            seen = max(seen, np.asarray(target)[valid].max(initial=0))
        num_classes = max(2, int(seen) + 1)

    if target is None:
        shaded = rgb.astype(np.float64)
        shaded[pred != 0] = 0.4 * shaded[pred != 0] + 0.6 * label_colours(pred, max(num_classes, 3))[pred != 0]
        shaded[~valid] *= 0.5
        panels = [("image", rgb), ("prediction", shaded.round().astype(np.uint8))]
    else:
        target = np.asarray(target)
        panels = [("image", rgb), ("ground truth", label_colours(np.where(valid, target, 0), num_classes, valid)),
                  ("prediction", label_colours(pred, num_classes, valid)),
                  ("errors", error_map(np.where(valid, target, 0), pred, valid))]

    panel_w = min(_MAX_PANEL_INCHES, max(2.0, w / 100))
    fig = new_figure((panel_w * len(panels), panel_w * h / w + 0.9))
    for i, (name, picture) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        ax.imshow(picture, interpolation="antialiased")
        ax.set_axis_off()
        if name == "errors":
            text = "errors"
            if num_classes == 2:
                dice = ratios(*binary_counts(pred == 1, np.asarray(target) == 1, valid))["dice"]
                text = f"errors (Dice {dice:.3f})"
            ax.set_title(text, fontsize=10)
            names = ["true positive", "false positive", "false negative", "not counted"]
            _legend(ax, names[:3] + (["wrong class"] if num_classes > 2 else []) + names[3:])
        else:
            ax.set_title(name, fontsize=10)
    if title:
        fig.suptitle(title, fontsize=11)
    return save_figure(fig, path)


def _thin(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if x.size <= _CURVE_POINTS:
        return x, y
    keep = np.unique(np.linspace(0, x.size - 1, _CURVE_POINTS).round().astype(np.int64))
    return x[keep], y[keep]


def plot_curves(records: Sequence[dict] | PooledCurves, path: str | Path,
                ignore_index: int = DEFAULT_IGNORE_INDEX, threshold: float | None = 0.5,
                title: str | None = None) -> Path:
    """ROC (left) and precision-recall (right) curves of the pixels of a split pooled.

    `records`: binary records as for `metrics.segmentation_metrics`, or a `PooledCurves`.
    AUC-ROC / AUPR in the legends; the operating point at `threshold` is marked (None: not).
    """
    curves = records if isinstance(records, PooledCurves) else pooled_curves(records, ignore_index)
    fig = new_figure((10.0, 4.6))
    roc_ax, pr_ax = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    fpr, tpr = curves.roc_curve()
    recall, precision = curves.pr_curve()
    if fpr.size > 1:
        roc_ax.plot(*_thin(fpr, tpr), color="tab:blue", label=f"AUC-ROC {curves.auc_roc():.4f}")
    roc_ax.plot([0, 1], [0, 1], "--", color="0.6", linewidth=0.8, label="chance")
    if recall.size > 1:
        pr_ax.plot(*_thin(recall, precision), color="tab:orange", label=f"AUPR {curves.aupr():.4f}")
        prevalence = curves.positives / max(1, curves.positives + curves.negatives)
        pr_ax.axhline(prevalence, linestyle="--", color="0.6", linewidth=0.8, label=f"prevalence {prevalence:.3f}")
    if threshold is not None and curves.positives:
        point = curves.point(threshold)
        roc_ax.plot([point["fpr"]], [point["tpr"]], "o", color="tab:red", label=f"p >= {threshold:g}")
        pr_ax.plot([point["tpr"]], [point["precision"]], "o", color="tab:red", label=f"p >= {threshold:g}")
    for ax, (xlabel, ylabel) in ((roc_ax, ("false positive rate (1 - specificity)", "sensitivity")),
                                 (pr_ax, ("recall (sensitivity)", "precision"))):
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="lower right" if ax is roc_ax else "lower left", fontsize=8)
    if curves.positives == 0:
        pr_ax.text(0.5, 0.5, "no positive pixels", ha="center", va="center", transform=pr_ax.transAxes)
    roc_ax.set_title("ROC", fontsize=10)
    pr_ax.set_title("precision-recall", fontsize=10)
    fig.suptitle(title or f"pixels pooled over the split: {curves.positives:,} positive, "
                          f"{curves.negatives:,} negative", fontsize=10)
    return save_figure(fig, path)


def _denormalise(image, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """A normalised (C, H, W) tensor or array -> (H, W, 3) uint8 for display."""
    x = np.asarray(image.detach().float().cpu() if hasattr(image, "detach") else image, dtype=np.float32)
    x = x * np.asarray(std, np.float32).reshape(-1, 1, 1) + np.asarray(mean, np.float32).reshape(-1, 1, 1)
    return _as_rgb((np.clip(x, 0, 1) * 255).round().astype(np.uint8))


def plot_uda_debug(path: str | Path, *, source, source_label, target, mixed, mixed_label, weight: float,
                   prediction, mean: Sequence[float], std: Sequence[float], num_classes: int,
                   ignore_index: int = 255) -> Path:
    """One row of a domain-adaptation step (task=uda, task.debug_every): the source frame and its
    label, the target frame, the mixed frame, its label (pseudo-label outside the pasted classes;
    grey = does not count) with the frame's pseudo-label weight, the student's source prediction."""

    def labels(x):
        x = np.asarray(x.detach().cpu() if hasattr(x, "detach") else x).astype(np.int64)
        return label_colours(x, num_classes, x != ignore_index)

    panels = [("source", _denormalise(source, mean, std)), ("source label", labels(source_label)),
              ("target", _denormalise(target, mean, std)), ("mixed", _denormalise(mixed, mean, std)),
              (f"mixed label (weight {weight:.2f})", labels(mixed_label)), ("prediction (source)", labels(prediction))]
    fig = new_figure((3 * len(panels), 3))
    for i, (title, image) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        ax.imshow(image)
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    return save_figure(fig, path)
