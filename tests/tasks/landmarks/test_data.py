"""Landmark readers, datasets, augmentation and the registered dataset factories (no real data)."""

import csv
import json
import math
import pickle

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf
from PIL import Image

from podium.engine import registry
from podium.errors import UserError
from podium.tasks.landmarks import data, synthetic
from podium.tasks.landmarks.cache import PreprocessCache
from podium.tasks.landmarks.augment import LandmarkAugment, LandmarkAugmentConfig, affine_matrix, apply_affine
from podium.tasks.landmarks.data import Isbi2015Config, LandmarkDataset, LandmarkTableConfig
from podium.tasks.landmarks.readers import (
    ISBI2015_LANDMARKS,
    LandmarkRecord,
    read_isbi_csv,
    read_isbi_original,
    read_landmark_table,
)
from podium.tasks.landmarks.geometry import Letterbox
from podium.tasks.landmarks.synthetic import (
    SyntheticLandmarksConfig,
    write_synthetic_landmarks,
)


def cfg(schema, **values):
    """A data group as the config layer hands it over: a DictConfig merged onto the schema."""
    return OmegaConf.merge(OmegaConf.structured(schema), values)


def write_gray(path, w, h, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)
    Image.fromarray(arr, mode="L").save(path)
    return path


def dots_image(path, w, h, points, sigma=1.5):
    """Bright Gaussian dots at (x, y) `points` (pixel centres at integers)."""
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.zeros((h, w))
    for x0, y0 in points:
        img += 250 * np.exp(-((xs - x0) ** 2 + (ys - y0) ** 2) / (2 * sigma**2))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(np.round(img), 0, 255).astype(np.uint8), mode="L").save(path)
    return path


def local_centroid(img, x, y, radius):
    """Intensity centroid of `img` (H, W) in a window around (x, y)."""
    h, w = img.shape
    x0, x1 = max(0, int(x - radius)), min(w, int(x + radius) + 2)
    y0, y1 = max(0, int(y - radius)), min(h, int(y + radius) + 2)
    a = img[y0:y1, x0:x1].astype(np.float64)
    ys, xs = np.mgrid[y0:y1, x0:x1]
    return np.array([(a * xs).sum() / a.sum(), (a * ys).sum() / a.sum()])


def write_csv(path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


ISBI_HEADER = ["image_path"] + [f"{k}_{a}" for k in range(1, 20) for a in ("x", "y")]


def isbi_points(seed, w=60, h=50):
    rng = np.random.default_rng(seed)
    return np.round(rng.uniform(2, [w - 3, h - 3], size=(19, 2)))


def make_isbi_csv_tree(root, n_train=10, n_test=4, w=60, h=50):
    """A miniature copy of ../shared/data/isbi2015_ceph (shuffled CSV rows, like the real one)."""
    rows = {"train": [], "test1": []}
    for i in range(1, n_train + n_test + 1):
        name = f"{i:03d}.jpg"
        write_gray(root / "images" / name, w, h, seed=i)
        split = "train" if i <= n_train else "test1"
        rows[split].append([name] + [f"{v:g}" for v in isbi_points(i, w, h).reshape(-1)])
    for split, r in rows.items():
        write_csv(root / f"{split}_senior.csv", ISBI_HEADER, list(reversed(r)))
    return root


def make_isbi_original_tree(root, counts=(("TrainingData", 1, 8), ("Test1Data", 9, 3), ("Test2Data", 12, 2)), w=60, h=50):
    """The original challenge layout: RawImage/<split>/NNN.bmp + AnnotationsByMD/400_<doctor>/NNN.txt."""
    for folder, start, n in counts:
        for i in range(start, start + n):
            write_gray(root / "RawImage" / folder / f"{i:03d}.bmp", w, h, seed=i)
            for d, doctor in enumerate(("senior", "junior")):
                pts = isbi_points(i, w, h) + d  # the junior doctor is one pixel off
                txt = root / "AnnotationsByMD" / f"400_{doctor}" / f"{i:03d}.txt"
                txt.parent.mkdir(parents=True, exist_ok=True)
                extra = "\n1\n2\n3\n1\n2\n3\n1\n2\n"  # the real files have more lines after the 19
                txt.write_text("\n".join(f"{x:g},{y:g}" for x, y in pts) + extra)
    return root


# ---- read_landmark_table --------------------------------------------------------------------


def test_read_csv_table(tmp_path):
    write_gray(tmp_path / "imgs" / "a.png", 40, 30)
    write_gray(tmp_path / "imgs" / "b.png", 40, 30, seed=1)
    table = write_csv(
        tmp_path / "t.csv",
        ["image_path", "tip_x", "tip_y", "base_x", "base_y", "spacing_x", "spacing_y"],
        [["imgs/a.png", 1, 2, 39.5, 29.5, 0.2, 0.3], ["imgs/b.png", "3.25", "4", "-0.5", "0", "0.1", "0.1"], []],
    )
    records, names = read_landmark_table(table)
    assert names == ["tip", "base"]  # column order
    assert [r.id for r in records] == ["imgs/a.png", "imgs/b.png"]
    a, b = records
    assert a.image_path == tmp_path / "imgs" / "a.png" and a.size == (40, 30)
    np.testing.assert_array_equal(a.points, [[1, 2], [39.5, 29.5]])  # (x, y); edges allowed
    assert a.points.dtype == np.float64 and a.spacing == (0.2, 0.3)
    np.testing.assert_array_equal(b.points, [[3.25, 4], [-0.5, 0]])


def test_read_csv_table_default_spacing_and_images_dir(tmp_path):
    write_gray(tmp_path / "pics" / "a.png", 20, 10)
    table = write_csv(tmp_path / "tables" / "t.csv", ["image_path", "p_x", "p_y"], [["a.png", 1, 1]])
    [r], names = read_landmark_table(table, spacing=0.5, images_dir=tmp_path / "pics")
    assert names == ["p"] and r.spacing == (0.5, 0.5)


def test_read_json_table(tmp_path):
    write_gray(tmp_path / "a.png", 40, 30)
    doc = {
        "landmarks": ["l1", "l2"],
        "images": [
            {"path": "a.png", "points": [[1, 2], [3.5, 4]], "spacing": [0.1, 0.2]},
            {"path": str(tmp_path / "a.png"), "points": [[5, 6], [7, 8]]},
        ],
    }
    (tmp_path / "t.json").write_text(json.dumps(doc))
    records, names = read_landmark_table(tmp_path / "t.json", spacing=2.0)
    assert names == ["l1", "l2"]
    np.testing.assert_array_equal(records[0].points, [[1, 2], [3.5, 4]])
    assert records[0].spacing == (0.1, 0.2) and records[1].spacing == (2.0, 2.0)


CSV_ERRORS = {
    "non-numeric": (["a.png", "1", "oops"], r"line 2: column 'p_y' is 'oops'"),
    "nan": (["a.png", "nan", "2"], r"line 2.*not a finite number"),
    "too few values": (["a.png", "1"], r"line 2: 2 values, the header has 3"),
    "missing image": (["nope.png", "1", "2"], r"line 2.*nope\.png does not exist"),
    "outside (x)": (["a.png", "40", "2"], r"line 2.*landmark 1 \('p'\) at \(x, y\) = \(40, 2\) is outside.*40 x 30"),
    "outside (y)": (["a.png", "2", "-0.6"], r"line 2.*outside"),
    "empty path": (["", "1", "2"], r"line 2: empty image_path"),
}


@pytest.mark.parametrize("case", sorted(CSV_ERRORS))
def test_csv_table_errors_name_file_and_line(tmp_path, case):
    row, pattern = CSV_ERRORS[case]
    write_gray(tmp_path / "a.png", 40, 30)
    table = write_csv(tmp_path / "t.csv", ["image_path", "p_x", "p_y"], [row])
    with pytest.raises(UserError, match=pattern) as err:
        read_landmark_table(table)
    assert str(table) in str(err.value)


@pytest.mark.parametrize(
    "header, pattern",
    [
        (["path", "p_x", "p_y"], "no 'image_path' column"),
        (["image_path", "p_y", "p_x"], "not a <name>_x, <name>_y pair"),
        (["image_path", "p_x", "p_y", "q_x"], "pairs"),
        (["image_path", "p_x", "p_y", "spacing_x"], "both spacing_x and spacing_y"),
        (["image_path"], "no landmark columns"),
        (["image_path", "p_x", "p_y", "p_x", "p_y"], "repeat"),
    ],
)
def test_csv_table_header_errors(tmp_path, header, pattern):
    write_gray(tmp_path / "a.png", 40, 30)
    table = write_csv(tmp_path / "t.csv", header, [["a.png"] + ["1"] * (len(header) - 1)])
    with pytest.raises(UserError, match=pattern):
        read_landmark_table(table)


def test_missing_table_and_bad_json(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_landmark_table(tmp_path / "absent.csv")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="bad.json: not valid JSON"):
        read_landmark_table(tmp_path / "bad.json")
    write_gray(tmp_path / "a.png", 40, 30)
    doc = {"landmarks": ["a", "b"], "images": [{"path": "a.png", "points": [[1, 2]]}]}
    (tmp_path / "t.json").write_text(json.dumps(doc))
    with pytest.raises(UserError, match=r"images\[0\] \(a.png\): 1 points, expected 2"):
        read_landmark_table(tmp_path / "t.json")
    doc["images"][0]["points"] = [[1, 2], [3, "x"]]
    (tmp_path / "t.json").write_text(json.dumps(doc))
    with pytest.raises(UserError, match=r"y of 'b' is 'x'"):
        read_landmark_table(tmp_path / "t.json")


def test_corrupt_image_is_a_user_error(tmp_path):
    (tmp_path / "a.png").write_bytes(b"not a png")
    table = write_csv(tmp_path / "t.csv", ["image_path", "p_x", "p_y"], [["a.png", 1, 2]])
    with pytest.raises(UserError, match=r"line 2.*cannot read image"):
        read_landmark_table(table)


# ---- ISBI 2015 readers ------------------------------------------------------------------------


def test_read_isbi_csv(tmp_path):
    root = make_isbi_csv_tree(tmp_path / "isbi", n_train=3, n_test=1)
    records = read_isbi_csv(root / "train_senior.csv", root / "images")
    assert sorted(r.id for r in records) == ["001", "002", "003"]
    r = next(r for r in records if r.id == "002")
    np.testing.assert_array_equal(r.points, isbi_points(2))
    assert r.spacing == (0.1, 0.1) and r.points.shape == (19, 2) and len(ISBI2015_LANDMARKS) == 19


def test_read_isbi_csv_wrong_landmark_count(tmp_path):
    write_gray(tmp_path / "images" / "001.jpg", 60, 50)
    table = write_csv(tmp_path / "t.csv", ISBI_HEADER[:-2], [["001.jpg"] + ["5"] * 36])
    with pytest.raises(UserError, match="found 18 landmark"):
        read_isbi_csv(table, tmp_path / "images")


@pytest.mark.parametrize("gt, offset", [("senior", 0), ("junior", 1), ("mean", 0.5)])
def test_read_isbi_original(tmp_path, gt, offset):
    root = make_isbi_original_tree(tmp_path)
    train = read_isbi_original(root, "train", gt)
    assert [r.id for r in train] == [f"{i:03d}" for i in range(1, 9)]
    np.testing.assert_allclose(train[0].points, isbi_points(1) + offset)
    assert train[0].image_path.suffix == ".bmp" and train[0].size == (60, 50)
    assert [r.id for r in read_isbi_original(root, "test2", gt)] == ["012", "013"]


def test_read_isbi_original_errors(tmp_path):
    root = make_isbi_original_tree(tmp_path)
    txt = root / "AnnotationsByMD" / "400_junior" / "003.txt"
    txt.unlink()
    read_isbi_original(root, "train", "senior")  # the junior files are not needed
    with pytest.raises(UserError, match=r"003\.bmp: annotation file .*400_junior/003\.txt does not exist"):
        read_isbi_original(root, "train", "mean")
    senior = root / "AnnotationsByMD" / "400_senior" / "004.txt"
    senior.write_text("\n".join(["10,10"] * 12))
    with pytest.raises(UserError, match=r"004\.txt: 12 landmark line\(s\), expected 19"):
        read_isbi_original(root, "train", "senior")
    senior.write_text("\n".join(["10,10"] * 5 + ["10;abc"] + ["10,10"] * 13))
    with pytest.raises(UserError, match=r"004\.txt, line 6: y is 'abc'"):
        read_isbi_original(root, "train", "senior")
    senior.write_text("\n".join(["10,10"] * 5 + ["10"] + ["10,10"] * 13))
    with pytest.raises(UserError, match=r"004\.txt, line 6: '10' is not 'x,y'"):
        read_isbi_original(root, "train", "senior")
    senior.write_text("\n".join(["10,10"] * 18 + ["61,10"]))
    with pytest.raises(UserError, match=r"landmark 19 \('articulare'\) at \(x, y\) = \(61, 10\) is outside"):
        read_isbi_original(root, "train", "senior")
    with pytest.raises(UserError, match="split 'val'"):
        read_isbi_original(root, "val")
    with pytest.raises(UserError, match="RawImage"):
        read_isbi_original(tmp_path / "empty")


# ---- dataset items --------------------------------------------------------------------------


@pytest.fixture
def dot_records(tmp_path):
    """Three images (two aspect ratios) with 3 dots each at the landmark positions."""
    recs = []
    for i, (w, h) in enumerate([(90, 120), (120, 80), (100, 100)]):
        pts = np.array([[w * 0.3, h * 0.35], [w * 0.65 + 0.3, h * 0.4 + 0.6], [w * 0.5 - 0.2, h * 0.7]])
        path = dots_image(tmp_path / f"d{i}.png", w, h, pts, sigma=3.0)
        recs.append(LandmarkRecord(path, pts, (0.1, 0.2), f"d{i}", (w, h)))
    return recs


def test_eval_item_contract(tmp_path, dot_records):
    cache = PreprocessCache(tmp_path / "cache")
    ds = LandmarkDataset(dot_records, ["a", "b", "c"], (48, 40), channels=1, cache=cache)
    assert (ds.num_landmarks, ds.in_chans, ds.landmark_names) == (3, 1, ["a", "b", "c"])
    item = ds[1]
    assert set(item) == {"image", "points", "visible", "index", "letterbox", "spacing"}
    assert item["image"].dtype == torch.float32 and item["image"].shape == (1, 48, 40)
    assert item["points"].dtype == torch.float32 and item["points"].shape == (3, 2)
    assert item["visible"].dtype == torch.bool and item["visible"].all()
    assert item["index"].dtype == torch.int64 and item["index"].ndim == 0 and int(item["index"]) == 1
    assert item["letterbox"].dtype == torch.float64 and item["letterbox"].shape == (5,)
    assert item["spacing"].dtype == torch.float64 and item["spacing"].tolist() == [0.1, 0.2]
    lb = Letterbox.from_tensor(item["letterbox"], 40, 48)
    assert lb == ds.letterbox(1) and (lb.orig_w, lb.orig_h) == (120, 80)
    np.testing.assert_allclose(item["points"].numpy(), lb.forward(dot_records[1].points), atol=1e-5)
    # normalised with mean = std = 0.5: zero padding -> -1
    assert item["image"].min() == pytest.approx(-1.0) and item["image"].max() <= 1.0
    # the dots are where the points say
    img = (item["image"][0].numpy() + 1) / 2
    for x, y in item["points"].numpy():
        assert np.abs(local_centroid(img, x, y, 5) - [x, y]).max() < 0.25
    # second epoch: every image from the cache
    for _ in range(2):
        for i in range(len(ds)):
            ds[i]
    assert cache.misses == 3 and cache.hits == 4
    batch = torch.utils.data.default_collate([ds[0], ds[2]])
    assert batch["image"].shape == (2, 1, 48, 40) and batch["letterbox"].shape == (2, 5)
    assert isinstance(pickle.loads(pickle.dumps(ds)), LandmarkDataset)  # DataLoader workers


def test_rgb_channels(dot_records):
    ds = LandmarkDataset(dot_records, ["a", "b", "c"], (32, 32), channels=3, mean=[0.4, 0.5, 0.6], std=[0.2])
    assert ds[0]["image"].shape == (3, 32, 32) and ds.in_chans == 3


def test_record_landmark_count_mismatch(dot_records):
    with pytest.raises(UserError, match="3 landmarks, the dataset has 2"):
        LandmarkDataset(dot_records, ["a", "b"], (32, 32))


NO_PHOTOMETRIC = dict(brightness=0.0, contrast=0.0, noise_std=0.0)


def test_train_augmentation_moves_points_with_the_image(dot_records):
    aug = LandmarkAugmentConfig(rotation_deg=25, scale=[0.85, 1.2], translate=0.08, **NO_PHOTOMETRIC)
    ds = LandmarkDataset(dot_records, ["a", "b", "c"], (96, 80), augment=aug, train=True)
    torch.manual_seed(0)
    moved = 0
    for _ in range(4):
        for i in range(len(ds)):
            item = ds[i]
            img = (item["image"][0].numpy() + 1) / 2
            eval_pts = ds.letterbox(i).forward(dot_records[i].points)
            moved += np.abs(item["points"].numpy() - eval_pts).max() > 1
            assert item["visible"].all()
            for x, y in item["points"].numpy():
                assert np.abs(local_centroid(img, x, y, 7) - [x, y]).max() < 0.5
    assert moved >= 10  # the augmentation did move things


def test_eval_splits_are_not_augmented(dot_records):
    ds = LandmarkDataset(dot_records, ["a", "b", "c"], (48, 40), augment=LandmarkAugmentConfig(), train=False)
    assert ds.augment is None
    torch.testing.assert_close(ds[0]["image"], ds[0]["image"])
    off = LandmarkDataset(dot_records, ["a", "b", "c"], (48, 40), augment=LandmarkAugmentConfig(enabled=False), train=True)
    assert off.augment is None


def test_points_pushed_outside_are_not_visible(dot_records):
    zoom = LandmarkAugmentConfig(rotation_deg=0, scale=[2.2, 2.2], translate=0, **NO_PHOTOMETRIC)
    ds = LandmarkDataset(dot_records, ["a", "b", "c"], (64, 64), augment=zoom, train=True)
    item = ds[1]  # 120 x 80 image in the top 42 rows: a 2.2x zoom about the centre pushes the top points out
    pts = item["points"].numpy()
    inside = (pts >= -0.5).all(1) & (pts[:, 0] <= 63.5) & (pts[:, 1] <= 63.5)
    assert item["visible"].tolist() == inside.tolist()
    assert not inside.all() and inside.any()


def test_photometric_augmentation_keeps_points(dot_records):
    aug = LandmarkAugmentConfig(rotation_deg=0, scale=[1, 1], translate=0, brightness=0.5, contrast=0.5, noise_std=0.05)
    ds = LandmarkDataset(dot_records, ["a", "b", "c"], (48, 40), augment=aug, train=True)
    plain = LandmarkDataset(dot_records, ["a", "b", "c"], (48, 40))
    torch.manual_seed(1)
    a, b = ds[0], plain[0]
    torch.testing.assert_close(a["points"], b["points"])
    assert not torch.equal(a["image"], b["image"]) and torch.isfinite(a["image"]).all()


@pytest.mark.parametrize(
    "values, pattern",
    [
        ({"scale": [1.2, 0.9]}, r"augment\.scale"),
        ({"scale": [1.0]}, r"augment\.scale"),
        ({"rotation_deg": -1}, r"augment\.rotation_deg"),
        ({"translate": 1.5}, r"augment\.translate"),
        ({"noise_std": -0.1}, r"augment\.noise_std"),
    ],
)
def test_bad_augment_config(values, pattern):
    with pytest.raises(UserError, match=pattern):
        LandmarkAugment(LandmarkAugmentConfig(**values))


# ---- the affine itself: property test ---------------------------------------------------------


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    angle=st.floats(-40, 40),
    tx=st.floats(-6, 6),
    ty=st.floats(-6, 6),
    scale=st.floats(0.75, 1.3),
    shear=st.floats(-10, 10),
    px=st.floats(18, 37),
    py=st.floats(20, 43),
)
def test_affine_points_follow_the_image_and_invert(angle, tx, ty, scale, shear, px, py):
    """One random affine on a dot image and its point: the point lands on the dot's centroid
    (< 0.5 px), equals `affine_matrix` applied to it, and the inverse matrix brings it back."""
    h, w, sigma = 64, 56, 2.0
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    dot = 200 * np.exp(-((xs - px) ** 2 + (ys - py) ** 2) / (2 * sigma**2))
    image = torch.from_numpy(dot).float()[None]
    pts = torch.tensor([[px, py]], dtype=torch.float64)
    out_img, out_pts = apply_affine(image, pts, angle, [tx, ty], scale, [shear, 0.0])
    x, y = out_pts[0].tolist()
    assume(4 * sigma * scale < x < w - 1 - 4 * sigma * scale and 4 * sigma * scale < y < h - 1 - 4 * sigma * scale)

    m = affine_matrix(angle, [tx, ty], scale, [shear, 0.0], (h, w))
    np.testing.assert_allclose(m @ [px, py, 1.0], [x, y, 1.0], atol=1e-6)
    back = np.linalg.inv(m) @ [x, y, 1.0]
    assert np.abs(back[:2] - [px, py]).max() < 1e-6  # well inside the required 0.5 px

    c = local_centroid(out_img[0].numpy(), x, y, 5 * sigma * scale)
    assert np.abs(c - [x, y]).max() < 0.5


def test_torchvision_keypoints_need_the_half_pixel_shift():
    """Guards the +0.5 shift in apply_affine: torchvision's KeyPoints kernel alone puts a 90
    degree rotation of pixel (5, 7) one pixel off the rotated image content."""
    from torchvision import tv_tensors
    from torchvision.transforms.v2 import functional as TF

    img = torch.zeros(1, 40, 30)
    img[0, 7, 5] = 1.0
    kw = dict(angle=90.0, translate=[0.0, 0.0], scale=1.0, shear=[0.0, 0.0])
    rotated = TF.affine(tv_tensors.Image(img), **kw)
    yx = (rotated[0] == rotated[0].max()).nonzero()[0].tolist()
    raw = TF.affine(tv_tensors.KeyPoints(torch.tensor([[5.0, 7.0]]), canvas_size=(40, 30)), **kw)
    _, ours = apply_affine(img, torch.tensor([[5.0, 7.0]]), **kw)
    assert ours[0].tolist() == pytest.approx([yx[1], yx[0]])
    assert raw[0].tolist() != pytest.approx([yx[1], yx[0]])


# ---- registered factories -------------------------------------------------------------------


def test_registrations():
    assert registry.get("dataset", "isbi2015").schema is Isbi2015Config
    assert registry.get("dataset", "landmark_table").schema is LandmarkTableConfig
    assert registry.get("dataset", "synthetic_landmarks").schema is SyntheticLandmarksConfig


def isbi_cfg(root, tmp_path, **values):
    values = {"cache_dir": str(tmp_path / "cache"), "image_size": [32, 40], **values}
    return cfg(Isbi2015Config, root=str(root), **values)


def test_isbi2015_csv_layout_splits(tmp_path):
    root = make_isbi_csv_tree(tmp_path / "isbi")
    splits = registry.build("dataset", "isbi2015", isbi_cfg(root, tmp_path, val_count=3), seed=123)
    assert list(splits) == ["train", "val", "test1"]
    ids = {k: [r.id for r in ds.records] for k, ds in splits.items()}
    assert len(ids["train"]) == 7 and len(ids["val"]) == 3 and len(ids["test1"]) == 4
    assert sorted(ids["train"] + ids["val"]) == [f"{i:03d}" for i in range(1, 11)]  # val from train only
    assert ids["test1"] == ["011", "012", "013", "014"]
    assert splits["train"].augment is not None and splits["val"].augment is None
    assert splits["val"].landmark_names == ISBI2015_LANDMARKS
    item = splits["test1"][0]
    assert item["image"].shape == (1, 32, 40) and item["spacing"].tolist() == [0.1, 0.1]
    # the carve depends on split_seed only (not the run seed)
    again = registry.build("dataset", "isbi2015", isbi_cfg(root, tmp_path, val_count=3), seed=7)
    assert [r.id for r in again["val"].records] == ids["val"]
    other = registry.build("dataset", "isbi2015", isbi_cfg(root, tmp_path, val_count=3, split_seed=5), seed=7)
    assert [r.id for r in other["val"].records] != ids["val"]
    small = registry.build("dataset", "isbi2015", isbi_cfg(root, tmp_path, val_count=3, max_images=2), seed=0)
    assert {k: len(v) for k, v in small.items()} == {"train": 2, "val": 2, "test1": 2}
    assert [r.id for r in small["val"].records] == ids["val"][:2]


def test_isbi2015_original_layout(tmp_path):
    root = make_isbi_original_tree(tmp_path / "orig")
    c = isbi_cfg(root, tmp_path, layout="original", ground_truth="mean", val_count=2, test_splits=["test1", "test2"])
    splits = registry.build("dataset", "isbi2015", c, seed=0)
    assert {k: len(v) for k, v in splits.items()} == {"train": 6, "val": 2, "test1": 3, "test2": 2}
    rec = splits["test2"].records[0]
    np.testing.assert_allclose(rec.points, isbi_points(12) + 0.5)


@pytest.mark.parametrize(
    "values, pattern",
    [
        ({"ground_truth": "junior"}, "not available with layout 'csv'.*senior"),
        ({"ground_truth": "mean"}, "not available with layout 'csv'"),
        ({"test_splits": ["test1", "test2"]}, "test2 .* is not in the CSV copy"),
        ({"test_splits": ["val"]}, "test_splits entries must be test1 or test2"),
        ({"layout": "zip"}, "layout must be one of csv, original"),
        ({"val_count": 0}, "val_count must be between 1 and 9"),
        ({"val_count": 10}, "val_count must be between 1 and 9"),
        ({"image_size": [32]}, r"image_size must be \[H, W\]"),
        ({"channels": 2}, "channels must be 1"),
        ({"augment": {"scale": [2, 1]}}, r"augment\.scale"),
    ],
)
def test_isbi2015_config_errors(tmp_path, values, pattern):
    root = make_isbi_csv_tree(tmp_path / "isbi")
    with pytest.raises(UserError, match=pattern):
        registry.build("dataset", "isbi2015", isbi_cfg(root, tmp_path, **values), seed=0)


def test_isbi2015_root_errors(tmp_path):
    with pytest.raises(UserError, match="data.root is required"):
        registry.build("dataset", "isbi2015", cfg(Isbi2015Config), seed=0)
    with pytest.raises(UserError, match="does not exist"):
        registry.build("dataset", "isbi2015", cfg(Isbi2015Config, root=str(tmp_path / "nope")), seed=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="train_senior.csv does not exist"):
        registry.build("dataset", "isbi2015", cfg(Isbi2015Config, root=str(tmp_path / "empty")), seed=0)


def test_schema_rejects_wrong_types():
    from podium.config import _check_node

    node = OmegaConf.create({"name": "isbi2015", "augment": {"rotation_deg": "lots"}})
    with pytest.raises(UserError, match=r"data\.augment\.rotation_deg"):
        _check_node("data", node, Isbi2015Config)
    with pytest.raises(UserError, match="unknown config key 'data.augment.flip'"):
        _check_node("data", OmegaConf.create({"name": "isbi2015", "augment": {"flip": True}}), Isbi2015Config)
    with pytest.raises(UserError):
        data.as_config({"val_count": "many"}, Isbi2015Config)


def test_landmark_table_factory(tmp_path):
    folder = tmp_path / "syn"
    train = write_synthetic_landmarks(folder / "train", 4, size=(40, 36), num_landmarks=3, seed=1)
    val = write_synthetic_landmarks(folder / "val", 2, size=(40, 36), num_landmarks=3, seed=2)
    c = cfg(LandmarkTableConfig, train=str(train), val=str(val), image_size=[32, 32], cache_dir="none")
    splits = registry.build("dataset", "landmark_table", c, seed=0)
    assert list(splits) == ["train", "val"] and splits["val"].landmark_names == ["L0", "L1", "L2"]
    assert splits["val"][0]["spacing"].tolist() == [1.0, 1.0]  # default: errors in pixels
    assert not splits["train"].cache.enabled
    other = write_csv(tmp_path / "other.csv", ["image_path", "z_x", "z_y"], [[str(folder / "val" / "0000.png"), 1, 1]])
    c.test = str(other)
    with pytest.raises(UserError, match="same landmarks in the same order"):
        registry.build("dataset", "landmark_table", c, seed=0)
    with pytest.raises(UserError, match="data.val is required"):
        registry.build("dataset", "landmark_table", cfg(LandmarkTableConfig, train=str(train)), seed=0)


# ---- synthetic ------------------------------------------------------------------------------


def test_write_synthetic_landmarks_is_deterministic(tmp_path):
    a = write_synthetic_landmarks(tmp_path / "a", 3, size=(48, 40), num_landmarks=4, seed=3)
    b = write_synthetic_landmarks(tmp_path / "b", 3, size=(48, 40), num_landmarks=4, seed=3)
    assert a.read_text() == b.read_text()
    assert (tmp_path / "a" / "0001.png").read_bytes() == (tmp_path / "b" / "0001.png").read_bytes()
    records, names = read_landmark_table(a)
    assert names == ["L0", "L1", "L2", "L3"] and records[0].size == (40, 48)
    c = write_synthetic_landmarks(tmp_path / "c", 3, size=(48, 40), num_landmarks=4, seed=4)
    assert c.read_text() != a.read_text()


def test_synthetic_landmarks_mark_bright_blobs(tmp_path):
    csv_path = write_synthetic_landmarks(tmp_path, 4, size=(96, 80), num_landmarks=5, seed=0)
    records, _ = read_landmark_table(csv_path)
    for r in records:
        img = np.asarray(Image.open(r.image_path), dtype=np.float64)
        for x, y in r.points:
            assert img[int(round(y)), int(round(x))] > 150  # a bright structure at each landmark
            assert img[int(round(y)), int(round(x))] >= img.mean() + 2 * img.std()


def test_synthetic_factory(tmp_path):
    c = cfg(SyntheticLandmarksConfig, root=str(tmp_path / "syn"), cache_dir=str(tmp_path / "cache"), n_train=5, n_val=2, n_test=3)
    splits = registry.build("dataset", "synthetic_landmarks", c, seed=0)
    assert {k: len(v) for k, v in splits.items()} == {"train": 5, "val": 2, "test": 3}
    item = splits["train"][0]
    assert item["image"].shape == (1, 64, 48) and item["points"].shape == (5, 2)
    assert item["spacing"].tolist() == [0.1, 0.1]
    generated = sorted((tmp_path / "syn").rglob("*.png"))
    mtimes = [p.stat().st_mtime_ns for p in generated]
    again = registry.build("dataset", "synthetic_landmarks", c, seed=1)  # reuses the files
    assert [p.stat().st_mtime_ns for p in sorted((tmp_path / "syn").rglob("*.png"))] == mtimes
    assert [r.id for r in again["val"].records] == [r.id for r in splits["val"].records]
    c.num_landmarks = 3  # another generation beside the first
    assert registry.build("dataset", "synthetic_landmarks", c, seed=0)["val"].num_landmarks == 3
    with pytest.raises(UserError, match="n_val must be >= 1"):
        registry.build("dataset", "synthetic_landmarks", cfg(SyntheticLandmarksConfig, root=str(tmp_path), n_val=0), seed=0)


def test_prepare_image_matches_the_eval_items(tmp_path):
    c = cfg(SyntheticLandmarksConfig, root=str(tmp_path / "syn"), cache_dir=str(tmp_path / "cache"),
            n_train=2, n_val=2, n_test=1, channels=3, mean=[0.2, 0.3, 0.4], std=[0.5])
    val = registry.build("dataset", "synthetic_landmarks", c, seed=0)["val"]
    image, lb = data.prepare_image(val.records[1].image_path, OmegaConf.create(OmegaConf.to_container(c)))
    item = val[1]
    torch.testing.assert_close(image, item["image"], rtol=0, atol=0)
    torch.testing.assert_close(lb.as_tensor(), item["letterbox"])
    with pytest.raises(UserError, match="cannot read image"):
        (tmp_path / "bad.png").write_bytes(b"nope")
        data.prepare_image(tmp_path / "bad.png", c)


def test_synthetic_module_is_exported():
    assert callable(synthetic.synthetic_landmarks) and math.isclose(SyntheticLandmarksConfig().spacing, 0.1)


def test_prepare_decoded_equals_prepare_image(tmp_path):
    """A served upload (decoded bytes) goes through the same pipeline as a predicted file."""
    from podium.common.images import decode_image_bytes

    rng = np.random.default_rng(0)
    path = tmp_path / "x.png"
    Image.fromarray(rng.integers(0, 255, (50, 37), dtype=np.uint8)).save(path)
    cfg = {"image_size": [32, 24], "channels": 1, "mean": [0.5], "std": [0.25]}
    from_file, lb_file = data.prepare_image(path, cfg)
    from_bytes, lb_bytes = data.prepare_decoded(decode_image_bytes(path.read_bytes(), 1), cfg)
    assert torch.equal(from_file, from_bytes)
    assert lb_file == lb_bytes
    with pytest.raises(UserError, match="expects uint8"):
        data.prepare_decoded(torch.zeros(3, 10, 10, dtype=torch.uint8), cfg)


def test_generated_landmark_ids_are_unique_across_splits_so_folds_can_pool_them(tmp_path):
    from podium.config import compose
    from podium.engine import registry
    from podium.engine.folds import make_folds, pool_keys

    cfg = compose(["experiment=landmarks_synthetic", f"data.root={tmp_path / 'gen'}", f"data.cache_dir={tmp_path / 'c'}"])
    task = registry.build("task", cfg.task.name, cfg)
    datasets = task.build_datasets()
    ids = [ds.sample_id(i) for ds in datasets.values() for i in range(len(ds))]
    assert len(set(ids)) == len(ids) and datasets["val"].sample_id(0) == "val/0000.png"
    keys, _ = pool_keys(task, datasets)  # refused before: 0000.png in train and in val
    folds = make_folds(keys, n_folds=2, seed=0)
    assert sorted(folds["ids"]["0"] + folds["ids"]["1"]) == sorted(k["id"] for k in keys)
