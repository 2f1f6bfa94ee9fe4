"""Classification metrics: parity with scikit-learn, a hand example, and the plots."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

from podium.engine import registry
from podium.tasks.classification import metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CLASSES = ["cat", "dog", "bird"]


def assert_png(path):
    assert path.exists()
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC)
    assert len(data) > 1000


def test_metrics_registered():
    names = registry._REGISTRY["metric"]  # direct look-up: no import of the other families
    assert {"accuracy", "macro_f1", "per_class_f1"} <= set(names)
    assert names["macro_f1"].factory is metrics.macro_f1


def test_hand_example():
    # 6 samples, 3 classes.
    y_true = np.array([0, 0, 1, 1, 2, 2])
    y_pred = np.array([0, 1, 1, 1, 2, 0])
    # 4 of 6 right.
    assert metrics.accuracy(y_true, y_pred, CLASSES) == pytest.approx(4 / 6)
    # class 0: TP 1, FP 1 (sample 5), FN 1 (sample 1) -> P 1/2, R 1/2, F1 1/2
    # class 1: TP 2, FP 1 (sample 1), FN 0            -> P 2/3, R 1,   F1 2*(2/3)/(5/3) = 4/5
    # class 2: TP 1, FP 0, FN 1 (sample 5)             -> P 1,   R 1/2, F1 2*(1/2)/(3/2) = 2/3
    f1 = {"cat": 1 / 2, "dog": 4 / 5, "bird": 2 / 3}
    assert metrics.per_class_f1(y_true, y_pred, CLASSES) == pytest.approx(f1)
    assert metrics.macro_f1(y_true, y_pred, CLASSES) == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)


def test_classification_metrics_hand_example():
    y_true = np.array([0, 1, 2])
    probs = np.array(
        [
            [0.7, 0.2, 0.1],  # right, p_true 0.7
            [0.1, 0.6, 0.3],  # right, p_true 0.6
            [0.5, 0.5, 0.0],  # wrong (pred 0: ties go to the lowest index), p_true 0 -> clipped
        ]
    )
    out = metrics.classification_metrics(y_true, probs, CLASSES)
    assert out["accuracy"] == pytest.approx(2 / 3)
    # cat: TP 1, FP 1 -> F1 2/3; dog: F1 1; bird: TP 0 -> F1 0.
    assert out["f1/cat"] == pytest.approx(2 / 3)
    assert out["f1/dog"] == pytest.approx(1.0)
    assert out["f1/bird"] == 0.0
    assert out["macro_f1"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    expected_nll = (-math.log(0.7) - math.log(0.6) - math.log(1e-12)) / 3
    assert out["loss_nll"] == pytest.approx(expected_nll)
    assert set(out) == {"accuracy", "macro_f1", "loss_nll", "f1/cat", "f1/dog", "f1/bird"}
    assert all(isinstance(v, float) for v in out.values())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_parity_with_sklearn_including_an_absent_class(seed):
    rng = np.random.default_rng(seed)
    num_classes, n = 6, 200
    classes = [f"c{i}" for i in range(num_classes)]
    # Class 4 never occurs in y_true (it can still be predicted).
    y_true = rng.choice([0, 1, 2, 3, 5], size=n)
    logits = rng.normal(size=(n, num_classes)) + 2.0 * np.eye(num_classes)[y_true]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    y_pred = probs.argmax(axis=1)

    out = metrics.classification_metrics(y_true, probs, classes)
    labels = list(range(num_classes))
    assert out["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert out["macro_f1"] == pytest.approx(
        f1_score(y_true, y_pred, average="macro", labels=labels, zero_division=0)
    )
    per_class = f1_score(y_true, y_pred, average=None, labels=labels, zero_division=0)
    for i, name in enumerate(classes):
        assert out[f"f1/{name}"] == pytest.approx(per_class[i])
    assert out["f1/c4"] == 0.0  # absent from y_true: counts as 0 in the macro average
    assert out["loss_nll"] == pytest.approx(-np.log(probs[np.arange(n), y_true]).mean())

    assert metrics.macro_f1(y_true, y_pred, classes) == pytest.approx(out["macro_f1"])
    np.testing.assert_array_equal(
        metrics.confusion(y_true, y_pred, num_classes),
        confusion_matrix(y_true, y_pred, labels=labels),
    )


def test_macro_f1_counts_classes_absent_from_both_sides():
    # Perfect predictions on classes 0 and 1, class 2 never seen: macro-F1 is 2/3, not 1.
    y = np.array([0, 1, 0, 1])
    assert metrics.macro_f1(y, y, CLASSES) == pytest.approx(2 / 3)


def test_confusion_shape_and_orientation():
    cm = metrics.confusion(np.array([0, 0, 1]), np.array([1, 1, 1]), 3)
    assert cm.shape == (3, 3)
    assert cm[0, 1] == 2 and cm[1, 1] == 1  # rows true, columns predicted
    assert cm.sum() == 3


def test_invalid_inputs():
    with pytest.raises(ValueError, match="shape"):
        metrics.classification_metrics(np.array([0, 1]), np.ones((2, 4)) / 4, CLASSES)
    with pytest.raises(ValueError, match="rows"):
        metrics.classification_metrics(np.array([0, 1, 2]), np.ones((2, 3)) / 3, CLASSES)
    with pytest.raises(ValueError, match="outside"):
        metrics.classification_metrics(np.array([0, 3]), np.ones((2, 3)) / 3, CLASSES)
    with pytest.raises(ValueError, match="y_pred"):
        metrics.accuracy(np.array([0, 1]), np.array([0]), CLASSES)


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", [True, False])
def test_plot_confusion_matrix_writes_png(tmp_path, normalize):
    y_true = np.array([0, 0, 1, 2, 2, 2])
    y_pred = np.array([0, 1, 1, 2, 0, 2])
    path = tmp_path / "nested" / "dir" / "cm.png"  # parent folders are created
    out = metrics.plot_confusion_matrix(y_true, y_pred, CLASSES, path, normalize=normalize)
    assert out == path
    assert_png(path)


def test_plot_confusion_matrix_with_absent_class(tmp_path):
    # Class 2 has no true sample: its normalised row is 0, not NaN, and the plot still works.
    path = metrics.plot_confusion_matrix(
        np.array([0, 1, 1]), np.array([0, 1, 2]), CLASSES, str(tmp_path / "cm.png")
    )
    assert_png(path)


@pytest.mark.parametrize("channels", [1, 3])
def test_plot_misclassified_writes_png(tmp_path, channels):
    rng = np.random.default_rng(0)
    # Values in an arbitrary range: each image is rescaled on its own.
    images = rng.normal(size=(10, channels, 8, 8)) * 50 + 10
    images[3] = 7.0  # a constant image must not divide by zero
    y_true = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    y_pred = np.array([0, 2, 2, 1, 1, 0, 0, 1, 1, 0])
    path = tmp_path / "plots" / "wrong.png"
    out = metrics.plot_misclassified(images, y_true, y_pred, CLASSES, path, max_images=3)
    assert out == path
    assert_png(path)


def test_plot_misclassified_none_wrong(tmp_path):
    images = np.zeros((4, 3, 8, 8))
    y = np.array([0, 1, 2, 0])
    path = metrics.plot_misclassified(images, y, y, CLASSES, tmp_path / "none.png")
    assert_png(path)


def test_plot_misclassified_length_mismatch(tmp_path):
    with pytest.raises(ValueError, match="images"):
        metrics.plot_misclassified(
            np.zeros((2, 3, 4, 4)),
            np.array([0, 1, 2]),
            np.array([1, 1, 2]),
            CLASSES,
            tmp_path / "x.png",
        )
