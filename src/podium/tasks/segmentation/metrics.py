"""Segmentation metrics inside the field of view, over the exact class set, ignore label excluded.

A pixel counts when its target is not `ignore_index` (the data layer writes ignore_index outside
the field of view) and, if the record carries one, its "fov" is True.

Binary tasks (num_classes = 2: 0 background, 1 foreground such as vessel or lesion), at
`threshold` (prediction = foreground probability >= threshold, as the task's masks):
- dice (= F1), iou (Jaccard), sensitivity (recall), specificity, accuracy from TP/FP/FN/TN
  summed over every pixel of the split ("pooled", as the DRIVE and IDRiD papers report);
  dice_per_image_mean and iou_per_image_mean average the per-image values instead.
- auc_roc and aupr over the pixels of the whole split pooled: TP/FP/FN summed per threshold over
  every image, one threshold per distinct score, trapezoid rule (reference: sklearn
  `roc_auc_score` and `auc(recall, precision)` from `precision_recall_curve`, which starts the PR
  curve at recall 0, precision 1). average_precision is the step-wise sum
  sum_n (R_n - R_{n-1}) P_n (sklearn `average_precision_score`). Exact, not binned: the float32
  scores are kept (4 bytes per counted pixel: DRIVE's 20 images x 565 x 584 hold ~4.6 M pixels
  inside the FOV, 18 MB) and sorted once per split (~20 bytes per pixel at the peak of that
  step, about a second for DRIVE); the parity tests pin them to sklearn within 1e-9 on random
  and tied scores.
A ratio whose denominator is 0 (e.g. Dice of an image with no foreground in either target or
prediction, AUC of a split without positives) is NaN and left out of every mean.

Multi-class tasks: a (C, C) confusion matrix [target, prediction] over the counted pixels of the
split; per class IoU_c = TP / (TP + FP + FN) and Dice_c = 2 TP / (2 TP + FP + FN), NaN for a
class absent from both target and prediction; miou = the mean of IoU over the classes present,
background included (torchmetrics' MulticlassJaccardIndex(average="macro", ignore_index=...));
dice = the mean Dice over the foreground classes present (nnU-Net's summary), pixel_accuracy.
Per class keys: iou_<name>, dice_<name>, with the class name lower-cased and every run of other
characters than [a-z0-9] replaced by "_" ("hard exudates" -> iou_hard_exudates).

Records (one per image, numpy arrays, as produced by the task's evaluation step):
    {"target": int64 (H, W) class ids, ignore_index where nothing counts,
     "prob": float32 (H, W) foreground probability (binary) or (C, H, W) class probabilities,
     "pred": (H, W) class ids (optional; multi-class records may carry only this),
     "fov": bool (H, W) (optional)}
    metrics = segmentation_metrics(records, num_classes=2)   # {"dice": 0.81, "auc_roc": 0.97, ...}
    rows = per_image_table(records, num_classes=2)           # one dict per image, for a CSV
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np

DEFAULT_IGNORE_INDEX = 255


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


def valid_mask(record: dict, ignore_index: int = DEFAULT_IGNORE_INDEX) -> np.ndarray:
    """(H, W) bool: the pixels that count (target != ignore_index, and inside "fov" if given)."""
    target = np.asarray(record["target"])
    valid = target != ignore_index
    if record.get("fov") is not None:
        fov = np.asarray(record["fov"], dtype=bool)
        if fov.shape != target.shape:
            raise ValueError(f"fov has shape {fov.shape} but target has {target.shape}")
        valid &= fov
    return valid


def foreground_prob(record: dict) -> np.ndarray | None:
    """(H, W) float32 foreground probability of a binary record; None when it has only "pred"."""
    prob = record.get("prob")
    if prob is None:
        return None
    prob = np.asarray(prob, dtype=np.float32)
    if prob.ndim == 3:
        if prob.shape[0] != 2:
            raise ValueError(f"a binary record's prob must be (H, W) or (2, H, W), got {prob.shape}")
        prob = prob[1]
    if prob.shape != np.shape(record["target"]):
        raise ValueError(f"prob has shape {prob.shape} but target has {np.shape(record['target'])}")
    if np.isnan(prob).any():
        raise ValueError("prob holds NaN values")
    return prob


def class_prediction(record: dict) -> np.ndarray:
    """(H, W) class ids: the record's "pred", else the argmax of its (C, H, W) "prob"."""
    if record.get("pred") is not None:
        pred = np.asarray(record["pred"])
    else:
        prob = np.asarray(record["prob"])
        if prob.ndim != 3:
            raise ValueError(f"a multi-class record needs 'pred' (H, W) or 'prob' (C, H, W), got prob {prob.shape}")
        pred = prob.argmax(0)
    if pred.shape != np.shape(record["target"]):
        raise ValueError(f"pred has shape {pred.shape} but target has {np.shape(record['target'])}")
    return pred


def _binary_truth(record: dict, valid: np.ndarray) -> np.ndarray:
    target = np.asarray(record["target"])
    truth = target == 1
    bad = valid & ~truth & (target != 0)
    if bad.any():
        raise ValueError(f"a binary target holds values other than 0 and 1 inside the counted pixels: "
                         f"{np.unique(target[bad])[:10].tolist()}")
    return truth


def _binary_pred(record: dict, threshold: float) -> np.ndarray:
    prob = foreground_prob(record)
    if prob is not None:
        return prob >= threshold
    return class_prediction(record) == 1


# --------------------------------------------------------------------------------------------
# Binary counts and ratios
# --------------------------------------------------------------------------------------------


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else math.nan


def binary_counts(prob: np.ndarray, target: np.ndarray, valid: np.ndarray | None = None,
                  threshold: float = 0.5) -> tuple[int, int, int, int]:
    """(tp, fp, fn, tn) over the valid pixels; prediction = prob >= threshold, truth = target == 1.

    `prob` may already be a bool mask (then `threshold` is unused).
    """
    prob, target = np.asarray(prob), np.asarray(target)
    pred = prob if prob.dtype == bool else prob >= threshold
    truth = target == 1 if target.dtype != bool else target
    if valid is None:
        valid = np.ones(truth.shape, dtype=bool)
    tp = int(np.count_nonzero(pred & truth & valid))
    fp = int(np.count_nonzero(pred & ~truth & valid))
    fn = int(np.count_nonzero(~pred & truth & valid))
    tn = int(np.count_nonzero(valid)) - tp - fp - fn
    return tp, fp, fn, tn


def ratios(tp: int, fp: int, fn: int, tn: int) -> dict[str, float]:
    """dice (= F1), iou, sensitivity, specificity, accuracy from counts; NaN where 0 / 0."""
    return {"dice": _ratio(2 * tp, 2 * tp + fp + fn), "iou": _ratio(tp, tp + fp + fn),
            "sensitivity": _ratio(tp, tp + fn), "specificity": _ratio(tn, tn + fp),
            "accuracy": _ratio(tp + tn, tp + fp + fn + tn)}


def per_image_metrics(prob: np.ndarray, target: np.ndarray, valid: np.ndarray | None = None,
                      threshold: float = 0.5) -> dict[str, float]:
    """One image's dice (F1), iou, sensitivity, specificity, accuracy at `threshold`."""
    return ratios(*binary_counts(prob, target, valid, threshold))


# --------------------------------------------------------------------------------------------
# Pooled ROC and PR curves
# --------------------------------------------------------------------------------------------


def _trapezoid(y: np.ndarray, x: np.ndarray) -> float:
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2.0))


class PooledCurves:
    """ROC and PR curves over the pixels of many images pooled, exact.

    `update` keeps the float32 scores of the positive and of the negative counted pixels; the
    curves use one threshold per distinct score: TP(t) = #positives >= t, FP(t) = #negatives >= t.
    """

    def __init__(self):
        self._pos: list[np.ndarray] = []
        self._neg: list[np.ndarray] = []
        self._cache: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def update(self, prob: np.ndarray, target: np.ndarray, valid: np.ndarray | None = None) -> None:
        """Add one image: prob (H, W) scores, target (H, W) with 1 (or True) = positive."""
        prob = np.asarray(prob, dtype=np.float32)
        target = np.asarray(target)
        truth = target if target.dtype == bool else target == 1
        if prob.shape != truth.shape or (valid is not None and np.shape(valid) != truth.shape):
            raise ValueError(f"prob {prob.shape}, target {truth.shape} and valid must have one shape")
        if valid is None:
            valid = np.ones(truth.shape, dtype=bool)
        pos, neg = prob[valid & truth], prob[valid & ~truth]
        if np.isnan(pos).any() or np.isnan(neg).any():
            raise ValueError("scores hold NaN values")
        self._pos.append(pos)
        self._neg.append(neg)
        self._cache = None

    @property
    def positives(self) -> int:
        return sum(a.size for a in self._pos)

    @property
    def negatives(self) -> int:
        return sum(a.size for a in self._neg)

    def counts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(thresholds descending float32, tp int64, fp int64): TP(t) and FP(t) of `score >= t`.

        One threshold per distinct score, then the points inside a run of equal TP are dropped
        but its first and last (scikit-learn's `drop_intermediate`): on such a run the ROC curve
        is a straight horizontal line and the PR curve does not move in recall, so the
        trapezoid areas and the step-wise average precision are unchanged while the arrays
        shrink to about twice the number of positives.
        """
        if self._cache is None:
            # Sort once and keep the sorted copies: later updates append, a recount re-sorts.
            pos = np.sort(np.concatenate(self._pos)) if self._pos else np.zeros(0, np.float32)
            neg = np.sort(np.concatenate(self._neg)) if self._neg else np.zeros(0, np.float32)
            self._pos, self._neg = [pos], [neg]
            merged = np.concatenate([pos, neg])
            merged.sort(kind="stable")  # two sorted runs: timsort merges them in linear time
            distinct = np.ones(merged.size, dtype=bool)
            np.not_equal(merged[1:], merged[:-1], out=distinct[1:])
            thresholds = merged[distinct][::-1]
            del merged, distinct
            tp = pos.size - np.searchsorted(pos, thresholds, side="left")
            if tp.size > 2:
                changes = tp[1:] != tp[:-1]
                keep = np.ones(tp.size, dtype=bool)
                np.logical_or(changes[:-1], changes[1:], out=keep[1:-1])
                del changes
                thresholds, tp = thresholds[keep], tp[keep]
            # FP only at the kept thresholds: ~20 bytes per counted pixel at the peak.
            fp = neg.size - np.searchsorted(neg, thresholds, side="left")
            self._cache = thresholds, tp.astype(np.int64, copy=False), fp.astype(np.int64, copy=False)
        return self._cache

    def roc_curve(self) -> tuple[np.ndarray, np.ndarray]:
        """(fpr, tpr) from (0, 0) through every threshold to (1, 1); NaN without both classes."""
        _, tp, fp = self.counts()
        p, n = self.positives, self.negatives
        if p == 0 or n == 0:
            return np.array([math.nan]), np.array([math.nan])
        return np.concatenate([[0.0], fp / n]), np.concatenate([[0.0], tp / p])

    def pr_curve(self) -> tuple[np.ndarray, np.ndarray]:
        """(recall, precision) from (0, 1) through every threshold; NaN without positives."""
        _, tp, fp = self.counts()
        if self.positives == 0:
            return np.array([math.nan]), np.array([math.nan])
        # tp + fp >= 1 at every threshold: each threshold is the score of some pixel.
        return np.concatenate([[0.0], tp / self.positives]), np.concatenate([[1.0], tp / (tp + fp)])

    def auc_roc(self) -> float:
        fpr, tpr = self.roc_curve()
        return _trapezoid(tpr, fpr) if fpr.size > 1 else math.nan

    def aupr(self) -> float:
        recall, precision = self.pr_curve()
        return _trapezoid(precision, recall) if recall.size > 1 else math.nan

    def average_precision(self) -> float:
        recall, precision = self.pr_curve()
        return float(np.sum(np.diff(recall) * precision[1:])) if recall.size > 1 else math.nan

    def point(self, threshold: float) -> dict[str, float]:
        """fpr, tpr (= recall), precision of the prediction score >= threshold."""
        pos, neg = np.concatenate(self._pos or [np.zeros(0)]), np.concatenate(self._neg or [np.zeros(0)])
        tp, fp = int(np.count_nonzero(pos >= threshold)), int(np.count_nonzero(neg >= threshold))
        return {"fpr": _ratio(fp, neg.size), "tpr": _ratio(tp, pos.size), "precision": _ratio(tp, tp + fp)}


def pooled_curves(records: Sequence[dict], ignore_index: int = DEFAULT_IGNORE_INDEX) -> PooledCurves:
    """A `PooledCurves` over the binary records that carry a "prob"."""
    curves = PooledCurves()
    for record in records:
        prob = foreground_prob(record)
        if prob is not None:
            valid = valid_mask(record, ignore_index)
            curves.update(prob, _binary_truth(record, valid), valid)
    return curves


# --------------------------------------------------------------------------------------------
# Multi-class
# --------------------------------------------------------------------------------------------


def confusion_matrix(pred: np.ndarray, target: np.ndarray, num_classes: int,
                     valid: np.ndarray | None = None) -> np.ndarray:
    """(C, C) int64 counts [target class, predicted class] over the valid pixels.

    A counted target or prediction outside [0, C) is an error, not silently dropped.
    """
    pred, target = np.asarray(pred), np.asarray(target)
    if valid is not None:
        pred, target = pred[valid], target[valid]
    pred, target = pred.ravel().astype(np.int64), target.ravel().astype(np.int64)
    for name, values in (("target", target), ("prediction", pred)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"{name} holds class ids outside [0, {num_classes}): "
                             f"{np.unique(values[(values < 0) | (values >= num_classes)])[:10].tolist()}")
    return np.bincount(target * num_classes + pred, minlength=num_classes**2).reshape(num_classes, num_classes)


def class_scores(confmat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per class (IoU, Dice) from a confusion matrix; NaN for a class with no pixel in either."""
    confmat = np.asarray(confmat, dtype=np.float64)
    tp = np.diag(confmat)
    union = confmat.sum(0) + confmat.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, math.nan)
        dice = np.where(union > 0, 2 * tp / (union + tp), math.nan)
    return iou, dice


def _nanmean(values) -> float:
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else math.nan


def class_keys(num_classes: int, class_names: Sequence[str] | None = None) -> list[str]:
    """Key suffixes of the classes: their names made safe for column names, else their ids."""
    if class_names is None:
        return [str(c) for c in range(num_classes)]
    if len(class_names) != num_classes:
        raise ValueError(f"got {len(class_names)} class names for {num_classes} classes")
    keys = [re.sub(r"[^a-z0-9]+", "_", str(n).lower()).strip("_") or str(c) for c, n in enumerate(class_names)]
    if len(set(keys)) != len(keys):
        keys = [f"{c}_{k}" for c, k in enumerate(keys)]
    return keys


def _multiclass_summary(confmat: np.ndarray, keys: Sequence[str]) -> dict[str, float]:
    iou, dice = class_scores(confmat)
    total = confmat.sum()
    out = {"miou": _nanmean(iou), "dice": _nanmean(dice[1:]),
           "pixel_accuracy": _ratio(np.trace(confmat), total)}
    out.update({f"iou_{k}": float(v) for k, v in zip(keys, iou)})
    out.update({f"dice_{k}": float(v) for k, v in zip(keys, dice)})
    return out


# --------------------------------------------------------------------------------------------
# Split summaries
# --------------------------------------------------------------------------------------------


def _check(records: Sequence[dict], num_classes: int) -> None:
    if not records:
        raise ValueError("no records to score")
    if int(num_classes) < 2:
        raise ValueError(f"num_classes must be >= 2 (background included), got {num_classes}")


def segmentation_metrics(records: Sequence[dict], num_classes: int, threshold: float = 0.5,
                         ignore_index: int = DEFAULT_IGNORE_INDEX,
                         class_names: Sequence[str] | None = None) -> dict[str, float]:
    """Flat {name: float} over a split (see the module docstring for the names).

    Binary: dice iou sensitivity specificity accuracy auc_roc aupr average_precision
    dice_per_image_mean iou_per_image_mean (no curve metrics when no record has a "prob").
    Multi-class: miou dice pixel_accuracy iou_<class> dice_<class>.
    """
    _check(records, num_classes)
    if num_classes > 2:
        keys = class_keys(num_classes, class_names)
        confmat = np.zeros((num_classes, num_classes), dtype=np.int64)
        for record in records:
            confmat += confusion_matrix(class_prediction(record), record["target"], num_classes,
                                        valid_mask(record, ignore_index))
        return _multiclass_summary(confmat, keys)

    totals = np.zeros(4, dtype=np.int64)
    per_image = []
    curves = PooledCurves()
    has_prob = False
    for record in records:
        valid = valid_mask(record, ignore_index)
        truth = _binary_truth(record, valid)
        counts = binary_counts(_binary_pred(record, threshold), truth, valid)
        totals += counts
        per_image.append(ratios(*counts))
        prob = foreground_prob(record)
        if prob is not None:
            has_prob = True
            curves.update(prob, truth, valid)
    out = ratios(*(int(c) for c in totals))
    if has_prob:
        out.update(auc_roc=curves.auc_roc(), aupr=curves.aupr(), average_precision=curves.average_precision())
    out["dice_per_image_mean"] = _nanmean([m["dice"] for m in per_image])
    out["iou_per_image_mean"] = _nanmean([m["iou"] for m in per_image])
    return out


def per_image_table(records: Sequence[dict], num_classes: int, threshold: float = 0.5,
                    ignore_index: int = DEFAULT_IGNORE_INDEX,
                    class_names: Sequence[str] | None = None) -> list[dict]:
    """One row per record, in order, for the per-image CSV.

    Binary: dice iou sensitivity specificity accuracy auc_roc aupr (this image's pixels; the
    curve metrics only when the record has a "prob") and the counts tp fp fn tn.
    Multi-class: miou dice pixel_accuracy iou_<class> dice_<class> of this image alone.
    """
    _check(records, num_classes)
    rows = []
    keys = class_keys(num_classes, class_names)
    for record in records:
        valid = valid_mask(record, ignore_index)
        if num_classes > 2:
            confmat = confusion_matrix(class_prediction(record), record["target"], num_classes, valid)
            rows.append(_multiclass_summary(confmat, keys))
            continue
        truth = _binary_truth(record, valid)
        tp, fp, fn, tn = binary_counts(_binary_pred(record, threshold), truth, valid)
        row: dict = ratios(tp, fp, fn, tn)
        prob = foreground_prob(record)
        if prob is not None:
            curves = PooledCurves()
            curves.update(prob, truth, valid)
            row.update(auc_roc=curves.auc_roc(), aupr=curves.aupr())
        row.update(tp=tp, fp=fp, fn=fn, tn=tn)
        rows.append(row)
    return rows
