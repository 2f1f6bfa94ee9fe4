"""Rare-class sampling: class frequencies, DAFormer's tempered probabilities, and the patch
dataset that draws a class, an image holding it and a patch around one of its pixels."""

import numpy as np
import pytest
import torch
from PIL import Image

from podium.common.structured import as_config
from podium.errors import UserError
from podium.tasks.segmentation.data import SegPatchDataset
from podium.tasks.segmentation.pipeline import SegDataConfig
from podium.tasks.segmentation.rare_class import (
    RareClassPatches,
    class_frequencies,
    rare_class_probabilities,
)
from podium.tasks.segmentation.readers import SegRecord

NAMES = ["background", "common", "rare"]


def test_class_frequencies_and_images():
    a = np.array([[0, 0, 1, 255]])
    b = torch.tensor([[0, 1, 1, 1]])
    c = np.array([[0, 0, 0, 2]])
    freq, images = class_frequencies([a, b, c], 4)
    np.testing.assert_allclose(freq, [6 / 11, 4 / 11, 1 / 11, 0.0])
    assert [v.tolist() for v in images] == [[0, 1, 2], [0, 1], [2], []]
    _, strict = class_frequencies([a, b, c], 4, min_pixels=2)
    assert [v.tolist() for v in strict] == [[0, 2], [1], [], []]
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        class_frequencies([c], 2)


def test_rare_class_probabilities():
    freq = np.array([0.7, 0.25, 0.05, 0.0])
    p = rare_class_probabilities(freq, 0.1)
    assert p.sum() == pytest.approx(1.0) and p[3] == 0.0  # no image: never drawn
    assert p[2] > p[1] > p[0]  # rarer is likelier
    expected = np.exp((1 - freq[:3]) / 0.1)
    np.testing.assert_allclose(p[:3], expected / expected.sum())
    np.testing.assert_allclose(rare_class_probabilities(freq, 1e4)[:3], 1 / 3, atol=1e-4)  # T large: uniform
    tiny = rare_class_probabilities(freq, 1e-4)  # exp(1e4) would overflow without the shift
    assert np.isfinite(tiny).all() and tiny[2] == pytest.approx(1.0)
    allowed = rare_class_probabilities(freq, 0.01, available=np.array([True, True, False, False]))
    assert allowed[2] == 0.0 and allowed.sum() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="temperature"):
        rare_class_probabilities(freq, 0.0)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """Six 32 x 32 images: class 1 a 10 x 10 square in each, class 2 a 3 x 3 square in image 2."""
    root = tmp_path_factory.mktemp("rcs")
    rng = np.random.default_rng(0)
    recs = []
    for i in range(6):
        label = np.zeros((32, 32), np.uint8)
        label[4 + i : 14 + i, 10:20] = 1
        if i == 2:
            label[25:28, 2:5] = 2
        if i == 4:
            label[:, 30:] = 255  # ignore
        image = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(image).save(root / f"{i}.png")
        Image.fromarray(label).save(root / f"{i}_label.png")
        recs.append(SegRecord(str(i), root / f"{i}.png", root / f"{i}_label.png"))
    return recs


def config(**values):
    base = {"patch_size": [8, 8], "patches_per_image": 20, "clahe": "none", "fov": "none", "augment": False,
            "class_names": NAMES}
    base.update(values)
    return as_config(base, SegDataConfig)


def rare_share(ds, n):
    return float(np.mean([bool((ds[i]["mask"] == 2).any()) for i in range(n)]))


def test_rare_class_patches_draw_the_rare_class_far_more_often(records):
    rcs = RareClassPatches(records, config(), NAMES, temperature=0.01)
    plain = SegPatchDataset(records, config(), NAMES, prepared=rcs.prepared)
    assert len(rcs) == len(plain) == 6 * 20
    assert rcs.frequencies.sum() == pytest.approx(1.0) and rcs.frequencies[2] == pytest.approx(9 / (6 * 1024 - 64))
    assert [v.tolist() for v in rcs.class_images] == [list(range(6)), list(range(6)), [2]]
    assert rcs.class_probabilities[2] > 0.99
    assert rare_share(rcs, 60) > 0.95 and rare_share(plain, 60) < 0.2
    warm = RareClassPatches(records, config(), NAMES, temperature=100.0, prepared=rcs.prepared)  # ~uniform classes
    drawn = np.bincount([warm.draw(i)[0] for i in range(300)], minlength=3) / 300
    np.testing.assert_allclose(drawn, 1 / 3, atol=0.1)


def test_every_patch_holds_its_drawn_class_and_items_are_deterministic(records):
    rcs = RareClassPatches(records, config(), NAMES, temperature=1.0)
    seen = set()
    for i in range(60):
        c, r, top, left = rcs.draw(i)
        item = rcs[i]
        seen.add(c)
        assert (item["mask"] == c).any() and int(item["index"]) == r
        assert item["image"].shape == (3, 8, 8) and item["mask"].dtype == torch.int64
        assert 0 <= top <= 24 and 0 <= left <= 24
    assert seen == {0, 1, 2}
    # (seed, epoch, index) fix the item; augmentation included, and the global RNG is left alone
    aug = RareClassPatches(records, config(augment=True), NAMES, temperature=1.0, seed=3, prepared=rcs.prepared)
    twin = RareClassPatches(records, config(augment=True), NAMES, temperature=1.0, seed=3, prepared=rcs.prepared)
    state = torch.random.get_rng_state()
    for i in (0, 7):
        a, b = aug[i], twin[i]
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(torch.random.get_rng_state(), state)
    firsts = [aug.draw(i) for i in range(10)]
    aug.set_epoch(1)
    assert [aug.draw(i) for i in range(10)] != firsts


def test_rare_class_patches_bad_input(records, tmp_path):
    with pytest.raises(UserError, match="temperature"):
        RareClassPatches(records, config(), NAMES, temperature=0.0)
    Image.fromarray(np.full((32, 32), 255, np.uint8)).save(tmp_path / "empty.png")
    empty = [SegRecord("e", records[0].image_path, tmp_path / "empty.png")]
    with pytest.raises(UserError, match="no training image has a labelled pixel"):
        RareClassPatches(empty, config(), NAMES)
