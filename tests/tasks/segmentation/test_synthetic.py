"""Synthetic fundus images: DRIVE layout, determinism, caching, plausible vessels and FOV."""

import json

import numpy as np
import pytest

from podium.errors import UserError
from podium.tasks.segmentation.preprocess import estimate_fov
from podium.tasks.segmentation.readers import (
    drive_records,
    read_fov,
    read_image,
    read_label,
)
from podium.tasks.segmentation.synthetic import render_fundus, write_synthetic_fundus

SIZE = (64, 72)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_synthetic_fundus(tmp_path_factory.mktemp("fundus") / "a", count=4, size=SIZE, seed=3)


def files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_drive_layout_readable(folder):
    recs = drive_records(folder)
    assert [r.id for r in recs] == ["01", "02", "03", "04"]
    for r in recs:
        image = read_image(r.image_path)
        label = read_label(r.mask_path, {0: 0, 255: 1}, expected_hw=image.shape[:2], image_path=r.image_path)
        fov = read_fov(r.fov_path, expected_hw=image.shape[:2])
        assert image.shape == (*SIZE, 3) and label.shape == SIZE
        assert not label[~fov].any()  # vessels only inside the aperture
        share = label[fov].mean()
        assert 0.03 < share < 0.35, share  # DRIVE: ~12 % of the FOV is vessel
        assert 0.5 < fov.mean() < 0.75  # a disc of radius 0.46 min(H, W)
    assert json.loads((folder / "spec.json").read_text())["count"] == 4


def test_image_looks_like_a_fundus(folder):
    for r in drive_records(folder):
        image = read_image(r.image_path).astype(float)
        vessels = read_label(r.mask_path, {0: 0, 255: 1}).astype(bool)
        fov = read_fov(r.fov_path)
        inside = image[fov & ~vessels].mean(0)
        assert inside[0] > inside[1] > inside[2]  # orange-red retina
        assert image[~fov].max() < 20  # dark aperture
        assert image[vessels, 1].mean() < 0.85 * inside[1]  # vessels darker in green
        est = estimate_fov(image.astype(np.uint8))
        assert (est & fov).sum() / (est | fov).sum() > 0.97


def test_deterministic_and_seeded_per_image(tmp_path, folder):
    again = write_synthetic_fundus(tmp_path / "b", count=4, size=SIZE, seed=3)
    assert files(again) == files(folder)  # byte-identical
    fewer = write_synthetic_fundus(tmp_path / "c", count=2, size=SIZE, seed=3)
    same = {k: v for k, v in files(folder).items() if k.split("/")[-1][:2] in ("01", "02")}
    assert {k: v for k, v in files(fewer).items() if k != "spec.json"} == same
    other = write_synthetic_fundus(tmp_path / "d", count=1, size=SIZE, seed=4)
    assert files(other)["images/01_training.tif"] != files(folder)["images/01_training.tif"]


def test_cached_generation_is_a_noop(folder):
    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*")}
    assert write_synthetic_fundus(folder, count=4, size=SIZE, seed=3) == folder
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*")} == before


def test_older_generation_is_replaced(tmp_path):
    root = write_synthetic_fundus(tmp_path / "g", count=2, size=SIZE, seed=0)
    write_synthetic_fundus(root, count=3, size=SIZE, seed=0)
    assert [r.id for r in drive_records(root)] == ["01", "02", "03"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


def test_refuses_a_foreign_folder_and_bad_arguments(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not empty"):
        write_synthetic_fundus(tmp_path / "mine", count=1, size=SIZE)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    with pytest.raises(UserError, match="at least 32 x 32"):
        write_synthetic_fundus(tmp_path / "x", count=1, size=(16, 64))
    with pytest.raises(UserError, match="count must be >= 1"):
        write_synthetic_fundus(tmp_path / "x", count=0)


def test_render_vessel_widths_are_1_to_4_px():
    from scipy import ndimage
    from skimage.morphology import skeletonize

    image, vessels, fov = render_fundus(160, 160, np.random.default_rng(0))
    assert image.dtype == np.uint8 and vessels.dtype == bool and fov.dtype == bool
    # Width along the centre line ~ 2 * (distance to the background) - 1.
    widths = 2 * ndimage.distance_transform_edt(vessels)[skeletonize(vessels)] - 1
    assert widths.min() >= 1 and np.percentile(widths, 90) <= 4.0
    assert np.percentile(widths, 10) <= 1.5  # thin branches exist
