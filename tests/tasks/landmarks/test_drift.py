"""Annotation-drift test: a planted displacement of one landmark in set B is found (size,
direction, significance) whatever each image's pose and scale; undrifted landmarks are not."""

import numpy as np
import pytest

from podium.errors import UserError
from podium.tasks.landmarks.drift import (
    annotation_drift,
    drift_in_image,
    fit_similarity,
    plot_drift,
    procrustes_mean,
    similarity_align,
    undo_drift,
)

K = 8


def _template() -> np.ndarray:
    """A fixed 8-point 'skull' in mm, about 100 mm across."""
    angles = np.linspace(0, 2 * np.pi, K, endpoint=False)
    return np.stack([50 * np.cos(angles) + 5 * np.sin(3 * angles), 40 * np.sin(angles)], 1)


def _posed(rng, shapes: np.ndarray) -> tuple[np.ndarray, list]:
    """Each shape rotated (+-20 deg), scaled (0.9-1.1) and moved (+-200 mm): its image pose."""
    out, poses = [], []
    for shape in shapes:
        theta, scale, shift = rng.uniform(-0.35, 0.35), rng.uniform(0.9, 1.1), rng.uniform(-200, 200, 2)
        rotation = np.array([[np.cos(theta), np.sin(theta)], [-np.sin(theta), np.cos(theta)]])
        out.append(shape @ rotation * scale + shift)
        poses.append((rotation, scale))
    return np.array(out), poses


def _sets(rng, n=150, drift=(2.0, -1.0), landmark=3, noise=0.5):
    """Two sets of the same population (anatomy jitter + annotation noise); in set B landmark
    `landmark` is annotated `drift` mm away (in each head's own anatomical frame)."""
    base = _template()
    anatomy = lambda: base + rng.normal(0, 1.5, (n, K, 2)) + rng.normal(0, noise, (n, K, 2))
    a, b = anatomy(), anatomy()
    b[:, landmark] += drift
    return _posed(rng, a)[0], _posed(rng, b)


def test_similarity_align_undoes_a_pose_and_never_reflects():
    rng = np.random.default_rng(0)
    template = _template()
    posed, _ = _posed(rng, template[None].repeat(5, 0))
    aligned = similarity_align(posed, template, range(K))
    np.testing.assert_allclose(aligned, template[None].repeat(5, 0), atol=1e-9)
    mirrored = template * [-1, 1]  # a reflection is not a similarity: it must not be fitted
    _, rotation, _, _ = fit_similarity(mirrored, template, range(K))
    assert np.linalg.det(rotation) == pytest.approx(1.0)


def test_procrustes_mean_keeps_the_average_size():
    rng = np.random.default_rng(1)
    posed, _ = _posed(rng, _template()[None].repeat(20, 0))
    reference = procrustes_mean(posed, range(K))
    size = lambda s: np.sqrt(((s - s.mean(0)) ** 2).sum())
    assert size(reference) == pytest.approx(np.mean([size(s) for s in posed]), rel=1e-9)


def test_a_planted_drift_is_found_in_size_direction_and_significance():
    rng = np.random.default_rng(2)
    a, (b, _) = _sets(rng)
    rows = annotation_drift(a, b, names=[f"p{i}" for i in range(K)])
    assert [r["landmark"] for r in rows] == [f"p{i}" for i in range(K)]
    planted = rows[3]
    assert planted["drift_x"] == pytest.approx(2.0, abs=0.6) and planted["drift_y"] == pytest.approx(-1.0, abs=0.6)
    assert planted["p_value"] < 1e-6
    others = [r for i, r in enumerate(rows) if i != 3]
    assert max(r["drift"] for r in others) < 1.0  # alignment without landmark 3 is not pulled by it
    assert min(r["p_value"] for r in others) > 1e-3
    assert all(r["n_a"] == 150 and r["n_b"] == 150 and r["spread_a"] > 0 for r in rows)


def test_no_drift_gives_no_significance():
    rng = np.random.default_rng(3)
    a, (b, _) = _sets(rng, drift=(0.0, 0.0))
    assert min(r["p_value"] for r in annotation_drift(a, b)) > 1e-3


def test_undo_drift_moves_each_annotation_back_in_its_own_frame():
    rng = np.random.default_rng(4)
    a, (b, poses) = _sets(rng, drift=(3.0, 0.0))
    rows = annotation_drift(a, b)
    undone = undo_drift(a, b, rows, alpha=0.01)
    changed = np.abs(undone - b).max(axis=(0, 2)) > 0
    assert changed.tolist() == [i == 3 for i in range(K)]  # only the significant landmark moves
    # each image's correction is the drift seen through that image's own rotation and scale
    (rotation, scale), moved = poses[0], b[0, 3] - undone[0, 3]
    expected = np.array([rows[3]["drift_x"], rows[3]["drift_y"]]) @ rotation * scale
    np.testing.assert_allclose(moved, expected, rtol=0.05, atol=0.05)
    assert annotation_drift(a, undone)[3]["drift"] < 0.3
    # the image-frame helper inverts the alignment's rotation and scale
    reference = procrustes_mean(np.concatenate([a, b]), [i for i in range(K) if i != 3])
    back = drift_in_image(b[0], reference, [i for i in range(K) if i != 3], np.array([1.0, 0.0]))
    assert np.linalg.norm(back) == pytest.approx(scale * 1.0, rel=0.05)


def test_incomplete_shapes_are_left_out_and_bad_input_is_named():
    rng = np.random.default_rng(5)
    a, (b, _) = _sets(rng, n=30)
    a[0, 2] = np.nan
    assert annotation_drift(a, b)[0]["n_a"] == 29
    with pytest.raises(UserError, match=r"set B: expected shapes of shape \(N, K, 2\)"):
        annotation_drift(a, b[..., 0])
    with pytest.raises(UserError, match="set A: 2 complete shapes"):
        annotation_drift(a[1:3], b)
    with pytest.raises(UserError, match="set A has 8 landmarks per shape, set B 7"):
        annotation_drift(a, b[:, :7])
    with pytest.raises(UserError, match="at least 4, got 3"):
        annotation_drift(a[:, :3], b[:, :3])


def test_plot_drift_writes_a_png(tmp_path):
    rng = np.random.default_rng(6)
    a, (b, _) = _sets(rng, n=40)
    path = plot_drift(annotation_drift(a, b), tmp_path / "drift.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
