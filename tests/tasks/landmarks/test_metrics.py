"""Landmark metrics: radial errors in mm with per-image spacing, MRE/SDR by hand, and the plots."""

from __future__ import annotations

import math

import numpy as np
import pytest

from podium.engine import registry
from podium.tasks.landmarks import metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
    assert path.exists()
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC)
    assert len(data) > 1000


# 2 images x 3 landmarks at 0.1 mm/px. Pixel offsets (dx, dy) chosen so the errors are
# 1, 2, 2.5 | 3, 4.5, NaN mm. (18, 24) px is exactly 3 mm but computes as 3.0000000000000004:
# the SDR's ≤ must still count it within 3 mm.
OFFSETS_PX = np.array(
    [
        [[6.0, 8.0], [0.0, 20.0], [15.0, 20.0]],
        [[18.0, 24.0], [-27.0, 36.0], [0.0, 0.0]],
    ]
)
EXPECTED_MM = np.array([[1.0, 2.0, 2.5], [3.0, 4.5, math.nan]])


def hand_example():
    target = np.array(
        [
            [[100.0, 200.0], [300.0, 400.0], [500.0, 600.0]],
            [[110.0, 210.0], [310.0, 410.0], [math.nan, math.nan]],  # landmark 3 invisible
        ]
    )
    pred = target + OFFSETS_PX
    spacing = np.full((2, 2), 0.1)
    return pred, target, spacing


def test_metrics_registered():
    names = registry._REGISTRY["metric"]  # direct look-up: no import of the other families
    assert names["mre_mm"].factory is metrics.mre_mm
    assert names["sdr"].factory is metrics.sdr


def test_radial_errors_hand_example():
    errors = metrics.radial_errors_mm(*hand_example())
    assert errors.shape == (2, 3)
    np.testing.assert_allclose(errors, EXPECTED_MM, rtol=0, atol=1e-12, equal_nan=True)
    assert math.isnan(errors[1, 2])


def test_landmark_metrics_hand_example():
    errors = metrics.radial_errors_mm(*hand_example())
    out = metrics.landmark_metrics(errors, names=["sella", "nasion", "orbitale"])
    valid = [1.0, 2.0, 2.5, 3.0, 4.5]
    assert out["mre_mm"] == pytest.approx(13.0 / 5)
    assert out["mre_std_mm"] == pytest.approx(float(np.std(valid)))  # population SD
    assert out["mre_std_mm"] == pytest.approx(math.sqrt(sum((v - 2.6) ** 2 for v in valid) / 5))
    # "within r mm" is error <= r: the errors of exactly 2, 2.5 and 3 mm count at their radius.
    assert out["sdr_2mm"] == pytest.approx(2 / 5)
    assert out["sdr_2.5mm"] == pytest.approx(3 / 5)
    assert out["sdr_3mm"] == pytest.approx(4 / 5)
    assert out["sdr_4mm"] == pytest.approx(4 / 5)
    assert out["missing"] == 1
    # Per landmark: sella 1 and 3 mm, nasion 2 and 4.5 mm, orbitale 2.5 mm (one visible).
    assert out["mre_mm/sella"] == pytest.approx(2.0)
    assert out["mre_mm/nasion"] == pytest.approx(3.25)
    assert out["mre_mm/orbitale"] == pytest.approx(2.5)
    assert out["sdr_2mm/sella"] == pytest.approx(0.5)
    assert out["sdr_2mm/nasion"] == pytest.approx(0.5)
    assert out["sdr_2mm/orbitale"] == pytest.approx(0.0)
    assert all(isinstance(v, float) for v in out.values())


def test_per_landmark_keys_default_names():
    errors = np.array([[0.5, 1.0, 5.0], [1.5, math.nan, 1.0]])
    out = metrics.landmark_metrics(errors)
    for k in ("1", "2", "3"):
        assert f"mre_mm/{k}" in out and f"sdr_2mm/{k}" in out
    assert out["mre_mm/2"] == pytest.approx(1.0)  # the NaN is left out, not counted as 0
    assert out["sdr_2mm/3"] == pytest.approx(0.5)
    assert set(out) >= {"mre_mm", "mre_std_mm", "sdr_2mm", "sdr_2.5mm", "sdr_3mm", "sdr_4mm",
                        "missing"}


def test_all_missing_landmark_is_nan():
    errors = np.array([[1.0, math.nan], [2.0, math.nan]])
    out = metrics.landmark_metrics(errors)
    assert math.isnan(out["mre_mm/2"]) and math.isnan(out["sdr_2mm/2"])
    assert out["missing"] == 2
    assert out["mre_mm"] == pytest.approx(1.5)


def test_registered_functions():
    errors = metrics.radial_errors_mm(*hand_example())
    assert metrics.mre_mm(errors) == pytest.approx(2.6)
    assert metrics.sdr(errors) == pytest.approx(0.4)
    assert metrics.sdr(errors, radius=3.0) == pytest.approx(0.8)
    assert registry.build("metric", "sdr", errors, radius=2.5) == pytest.approx(0.6)
    assert math.isnan(metrics.mre_mm(np.full((1, 2), math.nan)))


def test_sdr_boundary_is_inclusive_but_not_beyond():
    errors = np.array([[2.0, 2.0 + 1e-6, np.nextafter(2.0, 0.0), math.inf]])
    out = metrics.landmark_metrics(errors, radii=(2.0,))
    assert out["sdr_2mm"] == pytest.approx(2 / 4)  # 2.0 and just below in; 2.000001 and inf out
    assert out["mre_mm"] == math.inf and out["mre_std_mm"] == math.inf


def test_anisotropic_spacing():
    target = np.zeros((1, 3, 2))
    pred = np.array([[[10.0, 0.0], [0.0, 10.0], [3.0, 4.0]]])
    spacing = np.array([[0.1, 0.2]])  # (x, y): y pixels are twice as tall
    errors = metrics.radial_errors_mm(pred, target, spacing)
    np.testing.assert_allclose(errors[0], [1.0, 2.0, math.sqrt(0.3**2 + 0.8**2)], atol=1e-12)


def test_spacing_is_taken_per_image_0078_vs_01_pitfall():
    # The same 20-pixel error in two images of different pitch. One public ISBI 2015 evaluator
    # used 0.078 mm/px for 0.1 mm/px images and so understated every error by 22 %
    # (and inflated SDR@2mm: 1.56 mm "passes", 2.0 mm is on the boundary).
    target = np.zeros((2, 1, 2))
    pred = np.array([[[12.0, 16.0]], [[12.0, 16.0]]])  # 20 px from the target
    spacing = np.array([[0.1, 0.1], [0.078, 0.078]])
    errors = metrics.radial_errors_mm(pred, target, spacing)
    assert errors[0, 0] == pytest.approx(2.0)
    assert errors[1, 0] == pytest.approx(1.56)
    assert errors[0, 0] / errors[1, 0] == pytest.approx(0.1 / 0.078)
    assert 1 - errors[1, 0] / errors[0, 0] == pytest.approx(0.22)
    # One spacing for all images is refused: spacing must be (N, 2).
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        metrics.radial_errors_mm(pred, target, np.array([0.1, 0.1]))


def test_invalid_inputs():
    pred, target, spacing = hand_example()
    with pytest.raises(ValueError):
        metrics.radial_errors_mm(pred[0], target[0], spacing)
    with pytest.raises(ValueError):
        metrics.radial_errors_mm(pred, target[:, :2], spacing)
    with pytest.raises(ValueError, match="positive"):
        metrics.radial_errors_mm(pred, target, np.zeros((2, 2)))
    with pytest.raises(ValueError, match="names"):
        metrics.landmark_metrics(np.ones((2, 3)), names=["a", "b"])
    with pytest.raises(ValueError, match="non-negative"):
        metrics.landmark_metrics(np.array([[-1.0]]))
    with pytest.raises(ValueError):
        metrics.landmark_metrics(np.ones(3))


def test_per_landmark_table_and_format():
    errors = metrics.radial_errors_mm(*hand_example())
    rows = metrics.per_landmark_table(errors, ["S", "N", "Or"])
    assert [r["landmark"] for r in rows] == ["S", "N", "Or"]
    assert list(rows[0]) == ["landmark", "mre_mm", "std_mm", "sdr_2mm", "sdr_2.5mm", "sdr_3mm",
                             "sdr_4mm"]
    assert rows[1]["mre_mm"] == pytest.approx(3.25)
    assert rows[1]["std_mm"] == pytest.approx(1.25)
    assert rows[0]["sdr_3mm"] == pytest.approx(1.0)
    assert rows[2]["sdr_2.5mm"] == pytest.approx(1.0)
    text = metrics.format_table(rows)
    lines = text.splitlines()
    assert len(lines) == 2 + 3  # header, rule, one line per landmark
    assert "MRE mm" in lines[0] and "SDR@2.5mm %" in lines[0]
    assert "3.25" in lines[3] and "50.0" in lines[3]
    assert metrics.format_table([]) == ""
    # Default names and a landmark with nothing visible.
    rows = metrics.per_landmark_table(np.array([[1.0, math.nan]]))
    assert rows[1]["landmark"] == "2" and math.isnan(rows[1]["mre_mm"])
    assert "-" in metrics.format_table(rows).splitlines()[-1]


def test_mean_offsets_separate_systematic_error_from_scatter():
    rng = np.random.default_rng(1)
    target = rng.uniform(100, 900, size=(200, 2, 2))
    scatter = rng.normal(0, 5, size=(200, 2, 2))
    pred = target + scatter
    pred[:, 1] += [20.0, -10.0]  # landmark 1: 20 px right, 10 px up, on every image
    spacing = np.full((200, 2), 0.1)
    spacing[::2, 1] = 0.2  # anisotropic images count in mm, not pixels
    offsets = metrics.mean_offsets_mm(pred, target, spacing)
    assert offsets.shape == (2, 2)
    assert np.abs(offsets[0]).max() < 0.15  # pure scatter: no offset
    assert offsets[1][0] == pytest.approx(2.0, abs=0.1)
    assert offsets[1][1] == pytest.approx(-10 * 0.15, abs=0.15)
    pred[:, 0] = np.nan  # never visible
    assert np.isnan(metrics.mean_offsets_mm(pred, target, spacing)[0]).all()
    rows = metrics.per_landmark_table(metrics.radial_errors_mm(pred, target, spacing), ["a", "b"],
                                      offsets=metrics.mean_offsets_mm(pred, target, spacing))
    assert rows[1]["offset_x_mm"] == pytest.approx(2.0, abs=0.1)
    assert "offset x mm" in metrics.format_table(rows)
    with pytest.raises(ValueError, match="offsets"):
        metrics.per_landmark_table(np.ones((3, 2)), offsets=np.zeros((3, 2)))


def test_plot_cumulative_error(tmp_path):
    rng = np.random.default_rng(0)
    errors = rng.gamma(2.0, 0.7, size=(20, 19))
    errors[0, 0] = math.nan
    errors[1, 1] = 80.0  # a far outlier does not squash the axis
    path = metrics.plot_cumulative_error(errors, tmp_path / "nested" / "cdf.png", label="test1")
    assert_png(path)
    assert_png(metrics.plot_cumulative_error(np.full((2, 2), math.nan), tmp_path / "none.png"))


def test_plot_per_landmark(tmp_path):
    rng = np.random.default_rng(1)
    errors = rng.gamma(2.0, 0.7, size=(10, 5))
    errors[:, 4] = math.nan  # a landmark never visible leaves an empty slot
    errors[2, 1] = 60.0  # off the scale, counted in the title
    path = metrics.plot_per_landmark(errors, None, tmp_path / "a" / "box.png")
    assert_png(path)
    assert_png(metrics.plot_per_landmark(errors, ["S", "N", "Or", "Po", "A"], tmp_path / "b.png"))


@pytest.mark.parametrize("shape", [(2400, 1935), (120, 90, 3)])
def test_plot_overlay(tmp_path, shape):
    rng = np.random.default_rng(2)
    h, w = shape[:2]  # an ISBI-sized grey image (drawn downsampled) and a small RGB one
    image = np.add.outer(np.arange(h), np.arange(w)).astype(np.float32)
    if len(shape) == 3:
        image = np.stack([image, image[::-1], -image], axis=-1)
    target = rng.uniform(0, [w - 1, h - 1], size=(19, 2))
    pred = target + rng.normal(0, 10, size=(19, 2))
    pred[3] = math.nan  # a missing prediction is skipped
    names = [f"L{k + 1}" for k in range(19)]
    path = metrics.plot_overlay(image, pred, target, tmp_path / "o" / "overlay.png", names=names,
                                spacing=(0.1, 0.1))
    assert_png(path)
    assert_png(metrics.plot_overlay(image, pred, None, tmp_path / "pred_only.png"))


def test_overlay_downsample_keeps_original_pixel_coordinates():
    # A bright pixel at (x=37, y=53) in a 103 x 90 image, averaged by 4 x 4 blocks: it lands in
    # block (col 9, row 13), drawn over original pixels [36, 40) x [52, 56), which contain it.
    image = np.zeros((90, 103))
    image[53, 37] = 1.0
    small, factor = metrics._downsample(image, max_side=30)
    assert factor == 4
    assert small.shape == (23, 26)  # padded up to a multiple of 4
    row, col = np.unravel_index(np.argmax(small), small.shape)
    assert (col, row) == (37 // factor, 53 // factor)
    assert small[row, col] == pytest.approx(1 / 16)
    assert metrics._downsample(image, max_side=200)[1] == 1
