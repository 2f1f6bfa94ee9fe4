"""Segmentation figures: error colours on a tiny example, overlay and curve PNGs written."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from podium.tasks.segmentation import metrics as M
from podium.tasks.segmentation import plots as P

WHITE, RED, BLUE, BLACK = (255, 255, 255), (255, 0, 0), (0, 0, 255), (0, 0, 0)
GREY, YELLOW = P.ERROR_COLOURS["not counted"], P.ERROR_COLOURS["wrong class"]


def test_error_map_binary():
    target = np.array([[1, 1, 0, 0, 1]])
    pred = np.array([[1, 0, 1, 0, 1]], dtype=bool)
    valid = np.array([[True, True, True, True, False]])
    colours = P.error_map(target, pred, valid)
    assert colours.dtype == np.uint8 and colours.shape == (1, 5, 3)
    assert [tuple(c) for c in colours[0]] == [WHITE, BLUE, RED, BLACK, GREY]


def test_error_map_multiclass():
    target = np.array([[2, 2, 0, 1, 3]])
    pred = np.array([[2, 1, 3, 0, 3]])
    colours = P.error_map(target, pred)
    assert [tuple(c) for c in colours[0]] == [WHITE, YELLOW, RED, BLUE, WHITE]
    assert P.ERROR_COLOURS["true positive"] == WHITE and P.ERROR_COLOURS["false positive"] == RED
    assert P.ERROR_COLOURS["false negative"] == BLUE


def test_label_colours():
    labels = np.array([[0, 1, 1]])
    binary = P.label_colours(labels, 2, valid=np.array([[True, True, False]]))
    assert [tuple(c) for c in binary[0]] == [BLACK, WHITE, GREY]
    many = P.label_colours(np.array([[0, 1, 2, 3]]), 4)
    assert tuple(many[0, 0]) == BLACK and len({tuple(c) for c in many[0]}) == 4


def _fundus(h=48, w=56, seed=0):
    rng = np.random.default_rng(seed)
    image = (rng.random((h, w, 3)) * 255).astype(np.uint8)
    yy, xx = np.mgrid[:h, :w]
    fov = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (0.45 * min(h, w)) ** 2
    truth = (np.abs(yy - xx) < 3).astype(np.int64)
    prob = np.clip(truth * 0.6 + rng.random((h, w)) * 0.5, 0, 1).astype(np.float32)
    return image, fov, truth, prob


def _png(path):
    assert path.exists() and path.stat().st_size > 0
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 100 and im.height > 50
        return im.size


def test_plot_overlay_binary_and_without_target(tmp_path):
    image, fov, truth, prob = _fundus()
    target = np.where(fov, truth, 255)
    path = P.plot_overlay(image, target, prob >= 0.5, target != 255, tmp_path / "sub" / "overlay.png")
    four = _png(path)
    path = P.plot_overlay(image, None, prob >= 0.5, fov, tmp_path / "predicted.png")
    two = _png(path)
    assert four[0] > two[0]  # four panels are wider than two


def test_plot_overlay_multiclass_and_chw_float_image(tmp_path):
    image, fov, truth, _ = _fundus()
    target = truth * 2
    pred = np.roll(target, 1, axis=1)
    chw = np.transpose(image, (2, 0, 1)).astype(np.float32) / 255 - 0.5
    _png(P.plot_overlay(chw, target, pred, fov, tmp_path / "multi.png", num_classes=3, title="case 1"))


def test_plot_overlay_rejects_mismatched_sizes(tmp_path):
    image, fov, truth, _ = _fundus()
    with pytest.raises(ValueError, match="one size"):
        P.plot_overlay(image, truth[:-1], truth, fov, tmp_path / "x.png")


def test_plot_curves_from_records_and_pooled_curves(tmp_path):
    records = []
    for seed in range(3):
        _, fov, truth, prob = _fundus(seed=seed)
        records.append({"prob": prob, "target": np.where(fov, truth, 255)})
    _png(P.plot_curves(records, tmp_path / "curves.png"))
    curves = M.pooled_curves(records)
    _png(P.plot_curves(curves, tmp_path / "curves2.png", threshold=None, title="val"))
    # a split without positives: the figure is still written, without curves
    empty = [{"prob": records[0]["prob"], "target": np.zeros_like(records[0]["target"])}]
    _png(P.plot_curves(empty, tmp_path / "empty.png"))


def test_plot_curves_thins_long_curves(tmp_path):
    rng = np.random.default_rng(0)
    curves = M.PooledCurves()
    labels = rng.random(100_000) < 0.3
    curves.update(rng.random(100_000).astype(np.float32) + 0.2 * labels, labels)
    x, _ = P._thin(*curves.roc_curve())
    assert x.size <= P._CURVE_POINTS and x[0] == 0.0 and x[-1] == 1.0
    _png(P.plot_curves(curves, tmp_path / "long.png"))
