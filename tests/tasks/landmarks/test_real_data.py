"""ISBI 2015 (Wang et al.) on the real CSV copy in ../shared/data/isbi2015_ceph (skipped without it)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from podium.engine import registry
from podium.tasks.landmarks.data import Isbi2015Config
from podium.tasks.landmarks.readers import ISBI2015_LANDMARKS, read_isbi_csv
from podium.tasks.landmarks.geometry import points_to_original

DATA = (Path(__file__).resolve().parents[3] / ".." / "shared" / "data").resolve()
ROOT = DATA / "isbi2015_ceph"

pytestmark = [
    pytest.mark.realdata,
    pytest.mark.skipif(not ROOT.is_dir(), reason=f"{ROOT} is not available"),
]


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    cache = tmp_path_factory.mktemp("isbi_cache")
    c = OmegaConf.merge(OmegaConf.structured(Isbi2015Config), {"root": str(ROOT), "cache_dir": str(cache)})
    return registry.build("dataset", "isbi2015", c, seed=0)


def test_split_sizes_and_ids(splits):
    ids = {k: [r.id for r in ds.records] for k, ds in splits.items()}
    assert {k: len(v) for k, v in ids.items()} == {"train": 135, "val": 15, "test1": 150}
    assert sorted(ids["train"] + ids["val"]) == [f"{i:03d}" for i in range(1, 151)]  # val never from Test1
    assert ids["test1"] == [f"{i:03d}" for i in range(151, 301)]
    assert splits["test1"].landmark_names == ISBI2015_LANDMARKS


def test_records_are_original_pixels(splits):
    for ds in splits.values():
        for r in ds.records:
            assert r.size == (1935, 2400) and r.spacing == (0.1, 0.1) and r.points.shape == (19, 2)
            sella, menton = r.points[0], r.points[7]
            assert sella[1] < menton[1]  # (x, y) not swapped: the sella is above the menton
    r = next(r for r in splits["train"].records if r.id == "017")
    table = read_isbi_csv(ROOT / "train_senior.csv", ROOT / "images")
    np.testing.assert_array_equal(r.points, next(t for t in table if t.id == "017").points)
    np.testing.assert_array_equal(r.points[:2], [[806, 1028], [1384, 972]])  # the CSV's first row


def test_item_maps_back_to_the_annotation(splits):
    ds = splits["test1"]
    item = ds[0]
    assert item["image"].shape == (1, 256, 208) and item["visible"].all()
    lb = item["letterbox"]
    np.testing.assert_allclose(lb.numpy(), [256 / 2400, 0, 0, 1935, 2400])
    back = points_to_original(item["points"][None], lb[None])[0]
    # float32 input-pixel storage costs < 1e-3 original px (1e-4 mm)
    np.testing.assert_allclose(back.numpy(), ds.records[0].points, atol=1e-3)
    img = item["image"][0]
    assert img[:, :206].std() > 0.1  # an X-ray, not a blank
    assert torch.all(img[:, 206:] == -1.0)  # 1935 * 256/2400 = 206.4 -> 206 content columns + zero padding
    ds[0]
    assert ds.cache.hits >= 1


def test_train_item_is_augmented(splits):
    torch.manual_seed(0)
    ds = splits["train"]
    a, b = ds[0], ds[0]
    assert not torch.equal(a["points"], b["points"])
    assert a["image"].shape == (1, 256, 208) and torch.isfinite(a["image"]).all()
