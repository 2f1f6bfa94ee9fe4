"""DRIVE (Staal et al. 2004) on the real training folder in ../shared/data/drive (skipped without it)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from podium.engine import registry
from podium.tasks.segmentation import data
from podium.tasks.segmentation.pipeline import DriveConfig, prepare_image
from podium.tasks.segmentation.preprocess import estimate_fov
from podium.tasks.segmentation.readers import (
    drive_records,
    read_fov,
    read_image,
    read_label,
)

REPO = Path(__file__).resolve().parents[3]
DATA = (REPO / ".." / "shared" / "data").resolve()
ROOT = DATA / "drive" / "training"
YAML = Path(data.__file__).resolve().parents[2] / "conf" / "data" / "drive.yaml"

pytestmark = [
    pytest.mark.realdata,
    pytest.mark.skipif(not ROOT.is_dir(), reason=f"{ROOT} is not available"),
]


@pytest.fixture(scope="module")
def records():
    return drive_records(ROOT)


@pytest.fixture(scope="module")
def splits():
    node = OmegaConf.load(YAML)
    assert (REPO / node.root).resolve() == ROOT  # the shipped config finds ../shared/data from the repo root
    c = OmegaConf.merge(OmegaConf.structured(DriveConfig), node, {"root": str(ROOT)})
    return registry.build("dataset", "drive", c, seed=0)


def test_records(records):
    assert [r.id for r in records] == [str(i) for i in range(21, 41)]
    r = records[0]
    assert (r.image_path.name, r.mask_path.name, r.fov_path.name) == ("21_training.tif", "21_manual1.gif", "21_training_mask.gif")


def test_files_decode(records):
    for r in records:
        with Image.open(r.mask_path) as m:
            assert m.format == "GIF" and m.size == (565, 584)
        image = read_image(r.image_path)
        assert image.shape == (584, 565, 3) and image.dtype == np.uint8
        label = read_label(r.mask_path, {0: 0, 255: 1}, expected_hw=image.shape[:2], image_path=r.image_path)
        fov = read_fov(r.fov_path, expected_hw=image.shape[:2], image_path=r.image_path)
        assert set(np.unique(label).tolist()) == {0, 1}
        assert 0.67 < fov.mean() < 0.70  # the aperture covers ~69 % of the frame
        assert 0.08 < label[fov].mean() < 0.18  # ~12 % of the FOV is vessel
        est = estimate_fov(image)  # DRIVE's masks are the red channel above ~20: nearly identical
        assert (est & fov).sum() / (est | fov).sum() > 0.985


def test_splits_from_the_shipped_config(splits):
    ids = {k: [r.id for r in v.records] for k, v in splits.items()}
    assert {k: len(v) for k, v in ids.items()} == {"train": 12, "val": 4, "test": 4}
    assert sorted((i for v in ids.values() for i in v), key=int) == [str(i) for i in range(21, 41)]
    assert len(splits["train"]) == 12 * 16


def test_eval_items(splits):
    val = splits["val"]
    item = val[0]
    assert item["image"].shape == (3, 584, 565) and item["mask"].shape == (584, 565)
    assert torch.equal(item["mask"] == 255, ~item["fov"])
    assert val.display_image(0).shape == (584, 565, 3)
    # One preprocessing path: the same photograph through prepare_image (FOV estimated, as in
    # `podium predict`) gives the same network input.
    image, fov = prepare_image(read_image(val.records[0].image_path), val.cfg)
    assert torch.equal(image, item["image"])
    assert (fov & item["fov"]).sum() / (fov | item["fov"]).sum() > 0.985


def test_train_patches_oversample_vessels(splits):
    train = splits["train"]
    share = np.mean([float((train[i]["mask"] == 1).float().mean()) for i in range(0, 192, 4)])
    assert 0.05 < share < 0.4
    item = train[7]
    assert item["image"].shape == (3, 64, 64) and torch.isfinite(item["image"]).all()
