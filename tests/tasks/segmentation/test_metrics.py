"""Segmentation metrics: pooled AUC-ROC / AUPR against scikit-learn, per-image and pooled
Dice / IoU / sensitivity / specificity inside the field of view, mIoU against torchmetrics."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    accuracy_score,
    auc,
    average_precision_score,
    f1_score,
    jaccard_score,
    precision_recall_curve,
    recall_score,
    roc_auc_score,
)
from torchmetrics.classification import MulticlassF1Score, MulticlassJaccardIndex

from podium.tasks.segmentation import metrics as M

IGNORE = 255


def _binary_records(count=4, h=40, w=36, seed=0, tied=False):
    """Records with a circular FOV (ignore outside), foreground ~20 %, scores correlated with it."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    fov = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (0.45 * min(h, w)) ** 2
    records = []
    for _ in range(count):
        truth = rng.random((h, w)) < 0.2
        prob = np.clip(0.35 * truth + rng.random((h, w)) * 0.7, 0, 1).astype(np.float32)
        if tied:
            prob = np.round(prob * 8) / 8  # 9 distinct scores: heavy ties
            prob = prob.astype(np.float32)
        target = np.where(fov, truth.astype(np.int64), IGNORE)
        records.append({"index": len(records), "prob": prob, "target": target})
    return records


def _pooled(records):
    probs = np.concatenate([r["prob"][r["target"] != IGNORE] for r in records])
    labels = np.concatenate([r["target"][r["target"] != IGNORE] for r in records])
    return probs, labels


def _sklearn_aupr(labels, scores):
    precision, recall, _ = precision_recall_curve(labels, scores)
    return auc(recall, precision)


# --------------------------------------------------------------------------------------------
# Pooled curves
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [False, True])
def test_pooled_curves_equal_sklearn(tied):
    records = _binary_records(tied=tied)
    curves = M.pooled_curves(records)
    probs, labels = _pooled(records)
    assert curves.positives == labels.sum() and curves.negatives == (labels == 0).sum()
    assert curves.auc_roc() == pytest.approx(roc_auc_score(labels, probs), abs=1e-9)
    assert curves.aupr() == pytest.approx(_sklearn_aupr(labels, probs), abs=1e-9)
    assert curves.average_precision() == pytest.approx(average_precision_score(labels, probs), abs=1e-9)


@pytest.mark.parametrize("seed", range(3))
def test_pooled_curves_equal_sklearn_on_random_float32_scores(seed):
    rng = np.random.default_rng(seed)
    n = 200_000
    labels = rng.random(n) < 0.1
    scores = (rng.random(n) ** np.where(labels, 0.5, 1.5)).astype(np.float32)
    scores[rng.random(n) < 0.05] = 0.0  # a block of ties at 0, as outside-vessel softmax gives
    curves = M.PooledCurves()
    # three "images" of different sizes, with invalid pixels that must not count
    valid = rng.random(n) > 0.1
    for part in np.array_split(np.arange(n), [50_000, 120_000]):
        curves.update(scores[part], labels[part], valid[part])
    s, y = scores[valid], labels[valid]
    assert curves.auc_roc() == pytest.approx(roc_auc_score(y, s), abs=1e-9)
    assert curves.aupr() == pytest.approx(_sklearn_aupr(y, s), abs=1e-9)
    assert curves.average_precision() == pytest.approx(average_precision_score(y, s), abs=1e-9)


def test_all_scores_tied_and_perfect_and_inverted():
    labels = np.array([0, 1, 1, 0, 1, 0, 0, 0])
    curves = M.PooledCurves()
    curves.update(np.full(8, 0.3), labels)
    assert curves.auc_roc() == pytest.approx(0.5)
    assert curves.aupr() == pytest.approx(_sklearn_aupr(labels, np.full(8, 0.3)))
    perfect = M.PooledCurves()
    perfect.update(labels * 0.9 + 0.05, labels)
    assert perfect.auc_roc() == pytest.approx(1.0) and perfect.aupr() == pytest.approx(1.0)
    inverted = M.PooledCurves()
    inverted.update(1 - labels * 0.9, labels)
    assert inverted.auc_roc() == pytest.approx(0.0)


def test_curves_pool_pixels_rather_than_average_images():
    """Each image alone is ranked perfectly, but image 2's scores are all higher: pooled < 1."""
    a = {"prob": np.array([[0.1, 0.2, 0.3, 0.4]], np.float32), "target": np.array([[0, 0, 1, 1]])}
    b = {"prob": np.array([[0.6, 0.7, 0.8, 0.9]], np.float32), "target": np.array([[0, 0, 1, 1]])}
    rows = M.per_image_table([a, b], num_classes=2)
    assert [r["auc_roc"] for r in rows] == [1.0, 1.0]
    probs = np.concatenate([a["prob"].ravel(), b["prob"].ravel()])
    labels = np.concatenate([a["target"].ravel(), b["target"].ravel()])
    pooled = M.segmentation_metrics([a, b], num_classes=2)["auc_roc"]
    assert pooled == pytest.approx(roc_auc_score(labels, probs)) and pooled < 1.0


def test_curves_without_positives_or_negatives():
    curves = M.PooledCurves()
    curves.update(np.array([0.2, 0.4]), np.array([0, 0]))
    assert math.isnan(curves.auc_roc()) and math.isnan(curves.aupr())
    curves = M.PooledCurves()
    curves.update(np.array([0.2, 0.4]), np.array([1, 1]))
    assert math.isnan(curves.auc_roc()) and curves.aupr() == pytest.approx(1.0)
    assert math.isnan(M.PooledCurves().auc_roc())


def test_curves_reject_nan_scores():
    with pytest.raises(ValueError, match="NaN"):
        M.PooledCurves().update(np.array([0.2, np.nan]), np.array([0, 1]))


def test_drive_sized_split_is_fast():
    """20 images of 584 x 565 (DRIVE): the pooled curves take well under a few seconds."""
    rng = np.random.default_rng(0)
    records = []
    for i in range(20):
        target = (rng.random((584, 565)) < 0.12).astype(np.int64)
        target[:40] = IGNORE
        prob = np.clip(target * 0.3 + rng.random((584, 565), dtype=np.float32) * 0.7, 0, 1).astype(np.float32)
        records.append({"index": i, "prob": prob, "target": target})
    start = time.perf_counter()
    out = M.segmentation_metrics(records, num_classes=2)
    elapsed = time.perf_counter() - start
    assert elapsed < 20.0, elapsed
    assert 0.8 < out["auc_roc"] < 1.0 and 0.0 < out["aupr"] < 1.0


# --------------------------------------------------------------------------------------------
# Binary metrics at the threshold
# --------------------------------------------------------------------------------------------


def test_per_image_metrics_equal_sklearn_and_f1_is_dice():
    records = _binary_records(count=1)
    r = records[0]
    valid = r["target"] != IGNORE
    y, p = r["target"][valid], (r["prob"][valid] >= 0.5).astype(int)
    m = M.per_image_metrics(r["prob"], r["target"], valid)
    assert m["dice"] == pytest.approx(f1_score(y, p))
    assert m["iou"] == pytest.approx(jaccard_score(y, p))
    assert m["sensitivity"] == pytest.approx(recall_score(y, p))
    assert m["specificity"] == pytest.approx(recall_score(y, p, pos_label=0))
    assert m["accuracy"] == pytest.approx(accuracy_score(y, p))


def test_split_metrics_pool_counts_inside_the_fov():
    records = _binary_records(count=3)
    # a record-level FOV as well: its outside must not count either
    records[1]["fov"] = np.ones_like(records[1]["target"], dtype=bool)
    records[1]["fov"][:, :5] = False
    out = M.segmentation_metrics(records, num_classes=2, threshold=0.5)
    valid = [M.valid_mask(r, IGNORE) for r in records]
    y = np.concatenate([r["target"][v] for r, v in zip(records, valid)])
    s = np.concatenate([r["prob"][v] for r, v in zip(records, valid)])
    p = (s >= 0.5).astype(int)
    assert out["dice"] == pytest.approx(f1_score(y, p))
    assert out["iou"] == pytest.approx(jaccard_score(y, p))
    assert out["sensitivity"] == pytest.approx(recall_score(y, p))
    assert out["specificity"] == pytest.approx(recall_score(y, p, pos_label=0))
    assert out["accuracy"] == pytest.approx(accuracy_score(y, p))
    assert out["auc_roc"] == pytest.approx(roc_auc_score(y, s), abs=1e-9)
    assert out["aupr"] == pytest.approx(_sklearn_aupr(y, s), abs=1e-9)
    per_image = [f1_score(r["target"][v], (r["prob"][v] >= 0.5).astype(int)) for r, v in zip(records, valid)]
    assert out["dice_per_image_mean"] == pytest.approx(np.mean(per_image))
    assert set(out) == {"dice", "iou", "sensitivity", "specificity", "accuracy", "auc_roc", "aupr",
                        "average_precision", "dice_per_image_mean", "iou_per_image_mean"}
    assert all(isinstance(v, float) for v in out.values())


def test_per_image_table_rows():
    records = _binary_records(count=2)
    rows = M.per_image_table(records, num_classes=2)
    assert len(rows) == 2
    for r, row in zip(records, rows):
        valid = r["target"] != IGNORE
        y, s = r["target"][valid], r["prob"][valid]
        assert row["dice"] == pytest.approx(f1_score(y, (s >= 0.5).astype(int)))
        assert row["auc_roc"] == pytest.approx(roc_auc_score(y, s), abs=1e-9)
        assert row["tp"] + row["fp"] + row["fn"] + row["tn"] == valid.sum()
        assert isinstance(row["tp"], int)


def test_two_channel_prob_and_threshold_edge():
    records = _binary_records(count=2)
    two = [{**r, "prob": np.stack([1 - r["prob"], r["prob"]])} for r in records]
    assert M.segmentation_metrics(two, 2) == pytest.approx(M.segmentation_metrics(records, 2), nan_ok=True)
    # a probability equal to the threshold is foreground, as the task's masks
    assert M.binary_counts(np.array([0.5, 0.49]), np.array([1, 1]), threshold=0.5) == (1, 0, 1, 0)


def test_empty_image_gives_nan_dice_left_out_of_the_mean():
    empty = {"prob": np.zeros((4, 4), np.float32), "target": np.zeros((4, 4), np.int64)}
    full = {"prob": np.ones((4, 4), np.float32), "target": np.ones((4, 4), np.int64)}
    rows = M.per_image_table([empty, full], 2)
    assert math.isnan(rows[0]["dice"]) and rows[1]["dice"] == 1.0
    out = M.segmentation_metrics([empty, full], 2)
    assert out["dice_per_image_mean"] == 1.0 and out["dice"] == 1.0


def test_records_with_pred_only_skip_the_curves():
    records = [{"pred": (r["prob"] >= 0.5).astype(np.uint8), "target": r["target"]} for r in _binary_records(2)]
    out = M.segmentation_metrics(records, 2)
    assert "auc_roc" not in out and out["dice"] == pytest.approx(M.segmentation_metrics(_binary_records(2), 2)["dice"])


def test_bad_binary_target_is_an_error():
    record = {"prob": np.zeros((2, 2), np.float32), "target": np.array([[0, 1], [2, IGNORE]])}
    with pytest.raises(ValueError, match="other than 0 and 1"):
        M.segmentation_metrics([record], 2)
    with pytest.raises(ValueError, match="no records"):
        M.segmentation_metrics([], 2)


# --------------------------------------------------------------------------------------------
# Multi-class
# --------------------------------------------------------------------------------------------


def _multiclass_records(num_classes=5, count=3, seed=0):
    """Class 4 never appears (in target or prediction); class 3 only in the prediction."""
    rng = np.random.default_rng(seed)
    records = []
    for _ in range(count):
        target = rng.integers(0, 3, (30, 26))
        pred = np.where(rng.random(target.shape) < 0.7, target, rng.integers(0, 4, target.shape))
        target[rng.random(target.shape) < 0.15] = IGNORE
        pred[target == IGNORE] = 4  # predictions on ignored pixels never count
        records.append({"pred": pred.astype(np.uint8), "target": target.astype(np.int64)})
    return records


def test_miou_equals_torchmetrics_with_ignore_index():
    num_classes = 5
    records = _multiclass_records(num_classes)
    out = M.segmentation_metrics(records, num_classes, class_names=["background", "A", "B", "C", "D"])
    preds = torch.from_numpy(np.stack([r["pred"] for r in records]).astype(np.int64))
    target = torch.from_numpy(np.stack([r["target"] for r in records]))
    macro = MulticlassJaccardIndex(num_classes, ignore_index=IGNORE, average="macro")(preds, target)
    per_class = MulticlassJaccardIndex(num_classes, ignore_index=IGNORE, average="none")(preds, target)
    f1 = MulticlassF1Score(num_classes, ignore_index=IGNORE, average="none", multidim_average="global")(preds, target)
    assert out["miou"] == pytest.approx(macro.item(), abs=1e-6)
    keys = ["background", "a", "b", "c", "d"]
    for c, key in enumerate(keys[:4]):
        assert out[f"iou_{key}"] == pytest.approx(per_class[c].item(), abs=1e-6)
        assert out[f"dice_{key}"] == pytest.approx(f1[c].item(), abs=1e-6)
    assert math.isnan(out["iou_d"]) and math.isnan(out["dice_d"])  # absent: undefined, not 0
    assert out["iou_c"] == 0.0  # predicted, never true
    assert out["dice"] == pytest.approx(np.mean([out["dice_a"], out["dice_b"], out["dice_c"]]))
    valid = target != IGNORE
    assert out["pixel_accuracy"] == pytest.approx((preds[valid] == target[valid]).float().mean().item())


def test_multiclass_prob_records_and_per_image_table():
    records = _multiclass_records(4)
    rng = np.random.default_rng(1)
    with_prob = []
    for r in records:
        prob = rng.random((4, *r["target"].shape)).astype(np.float32)
        rows, cols = np.indices(r["target"].shape)
        prob[np.minimum(r["pred"], 3), rows, cols] += 2.0  # argmax = pred (4 -> 3)
        with_prob.append({"prob": prob, "target": r["target"]})
    clipped = [{"pred": np.minimum(r["pred"], 3), "target": r["target"]} for r in records]
    assert M.segmentation_metrics(with_prob, 4) == pytest.approx(M.segmentation_metrics(clipped, 4), nan_ok=True)
    rows = M.per_image_table(clipped, 4)
    assert len(rows) == 3 and {"miou", "dice", "pixel_accuracy", "iou_0", "dice_3"} <= set(rows[0])


def test_confusion_matrix_rejects_unknown_classes():
    with pytest.raises(ValueError, match="outside"):
        M.confusion_matrix(np.array([0, 5]), np.array([0, 1]), 3)
    assert M.confusion_matrix(np.array([0, 5]), np.array([0, IGNORE]), 3, np.array([True, False])).sum() == 1


def test_class_keys():
    assert M.class_keys(3, ["Background", "hard exudates", "Micro-aneurysms"]) == [
        "background", "hard_exudates", "micro_aneurysms"]
    assert M.class_keys(2) == ["0", "1"]
    assert M.class_keys(2, ["a b", "a-b"]) == ["0_a_b", "1_a_b"]
