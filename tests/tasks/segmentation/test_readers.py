"""Segmentation layouts and file readers: pattern pairing, DRIVE, nnU-Net v2, label decoding."""

import json

import numpy as np
import pytest
from PIL import Image

from podium.errors import UserError
from podium.tasks.segmentation.readers import (
    SegRecord,
    drive_records,
    natural_key,
    nnunet_records,
    pair_folders,
    pattern_regex,
    read_fov,
    read_image,
    read_label,
)


def save(path, arr, mode=None, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode=mode).save(path, **kw) if mode else Image.fromarray(arr).save(path, **kw)
    return path


def rgb(h=6, w=5, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def binary(h=6, w=5, seed=0, high=255):
    return (np.random.default_rng(seed).random((h, w)) > 0.5).astype(np.uint8) * high


# ---- patterns and pairing ------------------------------------------------------------------


@pytest.mark.parametrize("pattern,name,ident", [
    ("{id}_training.tif", "21_training.tif", "21"),
    ("{stem}.*", "a.b.png", "a.b"),
    ("{id}_manual1.gif", "3_manual1.gif", "3"),
    ("img_{id}.p?g", "img_7.png", "7"),
    ("{stem}.*", "x.y.z.tif", "x.y.z"),
])
def test_pattern_regex_captures_the_id(pattern, name, ident):
    m = pattern_regex(pattern).match(name)
    assert m and m.group("id") == ident


@pytest.mark.parametrize("pattern,name", [("{id}_training.tif", "21_training.gif"), ("{id}.png", "a.png.bak")])
def test_pattern_regex_rejects_other_names(pattern, name):
    assert pattern_regex(pattern).match(name) is None


@pytest.mark.parametrize("pattern", ["*.png", "{id}_{stem}.png", "sub/{id}.png"])
def test_pattern_needs_one_placeholder(pattern):
    with pytest.raises(UserError, match="placeholder"):
        pattern_regex(pattern, "data.mask_pattern")


def test_natural_key_orders_numbers():
    assert sorted(["10", "2", "1", "b2", "b10"], key=natural_key) == ["1", "2", "10", "b2", "b10"]


def test_pair_folders_matches_by_id_in_natural_order(tmp_path):
    for i in (10, 2, 1):
        save(tmp_path / "img" / f"{i}_training.tif", rgb())
        save(tmp_path / "lab" / f"{i}_manual1.gif", binary(), "L")
        save(tmp_path / "fov" / f"{i}_training_mask.gif", binary(), "L")
    save(tmp_path / "lab" / "99_manual1.gif", binary(), "L")  # an orphan mask: ignored
    (tmp_path / "img" / ".hidden_training.tif").write_bytes(b"")
    recs = pair_folders(tmp_path / "img", tmp_path / "lab", "{id}_training.tif", "{id}_manual1.gif",
                        tmp_path / "fov", "{id}_training_mask.gif")
    assert [r.id for r in recs] == ["1", "2", "10"]
    assert recs[2] == SegRecord("10", tmp_path / "img" / "10_training.tif", tmp_path / "lab" / "10_manual1.gif",
                                tmp_path / "fov" / "10_training_mask.gif")


def test_pair_folders_default_stem_patterns(tmp_path):
    save(tmp_path / "images" / "case.a.png", rgb())
    save(tmp_path / "masks" / "case.a.png", binary(high=1), "L")
    recs = pair_folders(tmp_path / "images", tmp_path / "masks")
    assert [(r.id, r.fov_path) for r in recs] == [("case.a", None)]


def test_pair_folders_missing_mask_names_file_and_pattern(tmp_path):
    save(tmp_path / "img" / "1_training.tif", rgb())
    save(tmp_path / "img" / "2_training.tif", rgb())
    save(tmp_path / "lab" / "1_manual1.gif", binary(), "L")
    with pytest.raises(UserError) as e:
        pair_folders(tmp_path / "img", tmp_path / "lab", "{id}_training.tif", "{id}_manual1.gif")
    msg = str(e.value)
    assert "2_training.tif" in msg and "{id}_manual1.gif" in msg and "2_manual1.gif" in msg


def test_pair_folders_missing_fov(tmp_path):
    save(tmp_path / "img" / "1.png", rgb())
    save(tmp_path / "lab" / "1.png", binary(), "L")
    (tmp_path / "fov").mkdir()
    with pytest.raises(UserError, match=r"1\.png: no FOV mask .*fov_pattern"):
        pair_folders(tmp_path / "img", tmp_path / "lab", fov_dir=tmp_path / "fov")


def test_pair_folders_ambiguous_and_empty(tmp_path):
    save(tmp_path / "img" / "1.png", rgb())
    save(tmp_path / "img" / "1.jpg", rgb())
    save(tmp_path / "lab" / "1.png", binary(), "L")
    with pytest.raises(UserError, match="several files for id '1'"):
        pair_folders(tmp_path / "img", tmp_path / "lab")
    with pytest.raises(UserError, match=r"no file in .* matches data.image_pattern"):
        pair_folders(tmp_path / "img", tmp_path / "lab", image_pattern="{id}.tif")
    with pytest.raises(UserError, match="does not exist"):
        pair_folders(tmp_path / "nope", tmp_path / "lab")


def write_drive(root, ids=(21, 22), split="training"):
    for i in ids:
        save(root / "images" / f"{i}_{split}.tif", rgb(seed=i))
        save(root / "1st_manual" / f"{i}_manual1.gif", binary(seed=i), "L")
        save(root / "mask" / f"{i}_{split}_mask.gif", np.full((6, 5), 255, np.uint8), "L")
    return root


@pytest.mark.parametrize("split", ["training", "test"])
def test_drive_records(tmp_path, split):
    recs = drive_records(write_drive(tmp_path, split=split))
    assert [r.id for r in recs] == ["21", "22"]
    assert recs[0].fov_path.name == f"21_{split}_mask.gif" and recs[0].mask_path.name == "21_manual1.gif"


def test_drive_records_missing_folder(tmp_path):
    write_drive(tmp_path)
    for f in (tmp_path / "mask").iterdir():
        f.unlink()
    (tmp_path / "mask").rmdir()
    with pytest.raises(UserError, match=r"not a DRIVE folder: missing mask/"):
        drive_records(tmp_path)


def write_nnunet(root, labels=None, ending=".png", cases=("road_1", "road_2"), meta_ending=None):
    meta = {"channel_names": {"0": "R", "1": "G", "2": "B"}, "labels": labels or {"background": 0, "road": 1},
            "numTraining": len(cases), "file_ending": meta_ending or ending}
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps(meta))
    for i, case in enumerate(cases):
        save(root / "imagesTr" / f"{case}_0000{ending}", rgb(seed=i))
        save(root / "labelsTr" / f"{case}{ending}", binary(seed=i, high=1), "L")
    return root


def test_nnunet_records(tmp_path):
    recs, labels, channels = nnunet_records(write_nnunet(tmp_path))
    assert [r.id for r in recs] == ["road_1", "road_2"]
    assert recs[0].image_path.name == "road_1_0000.png" and recs[0].mask_path.name == "road_1.png"
    assert labels == {"background": 0, "road": 1} and channels == ["R", "G", "B"]


@pytest.mark.parametrize("change,match", [
    ({"labels": {"background": 0, "a": [1, 2]}}, "region lists"),
    ({"labels": {"background": 0, "a": 2}}, "consecutive"),
    ({"meta_ending": ".nii.gz"}, "not a 2-D image type"),
])
def test_nnunet_bad_dataset_json(tmp_path, change, match):
    with pytest.raises(UserError, match=match):
        nnunet_records(write_nnunet(tmp_path, **change))


def test_nnunet_missing_json_and_multi_file_cases(tmp_path):
    with pytest.raises(UserError, match="no dataset.json"):
        nnunet_records(tmp_path)
    root = write_nnunet(tmp_path / "d")
    save(root / "imagesTr" / "road_1_0001.png", rgb())
    with pytest.raises(UserError, match="several image files"):
        nnunet_records(root)


# ---- file readers --------------------------------------------------------------------------


def test_read_image_rgb_and_grey(tmp_path):
    arr = rgb(7, 9)
    out = read_image(save(tmp_path / "a.tif", arr))
    assert out.shape == (7, 9, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, arr)
    grey = read_image(save(tmp_path / "g.png", arr[:, :, 0], "L"))
    np.testing.assert_array_equal(grey, np.repeat(arr[:, :, :1], 3, 2))


def test_read_image_corrupt_names_file(tmp_path):
    bad = tmp_path / "broken.tif"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(UserError, match=r"broken\.tif: cannot read image"):
        read_image(bad)


def test_read_label_gif_maps_values(tmp_path):
    arr = binary()
    path = save(tmp_path / "m.gif", arr, "L")
    out = read_label(path, {0: 0, 255: 1})
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out, arr // 255)
    np.testing.assert_array_equal(read_label(path), arr)  # no table: the stored values


def test_read_label_palettes(tmp_path):
    idx = np.array([[0, 1], [2, 1]], np.uint8)
    voc = Image.fromarray(idx, mode="P")
    voc.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * 759)  # colour palette: indices are classes
    voc.save(tmp_path / "voc.png")
    np.testing.assert_array_equal(read_label(tmp_path / "voc.png", {0: 0, 1: 1, 2: 2}), idx)
    grey = Image.fromarray(np.array([[0, 1]], np.uint8), mode="P")
    grey.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)  # grey palette (like DRIVE's GIFs): grey levels
    grey.save(tmp_path / "grey.png")
    np.testing.assert_array_equal(read_label(tmp_path / "grey.png"), [[0, 255]])


def test_read_label_bilevel_16bit_and_equal_rgb(tmp_path):
    bits = Image.fromarray(np.array([[0, 255], [255, 0]], np.uint8)).convert("1")
    bits.save(tmp_path / "b.png")
    np.testing.assert_array_equal(read_label(tmp_path / "b.png", {0: 0, 255: 1}), [[0, 1], [1, 0]])
    wide = np.array([[0, 300], [1000, 2]], np.uint16)
    Image.fromarray(wide).save(tmp_path / "w.png")
    np.testing.assert_array_equal(read_label(tmp_path / "w.png"), wide.astype(np.int64))
    same = np.repeat(np.array([[0, 1]], np.uint8)[:, :, None], 3, 2)
    np.testing.assert_array_equal(read_label(save(tmp_path / "s.png", same)), [[0, 1]])


def test_read_label_colour_coded_is_refused(tmp_path):
    with pytest.raises(UserError, match="colour-coded"):
        read_label(save(tmp_path / "c.png", rgb()))


def test_read_label_unknown_values_name_file_and_values(tmp_path):
    arr = np.array([[0, 255, 128], [7, 0, 0]], np.uint8)
    path = save(tmp_path / "m.gif", arr, "L")
    with pytest.raises(UserError) as e:
        read_label(path, {0: 0, 255: 1})
    msg = str(e.value)
    assert "m.gif" in msg and "7, 128" in msg and "class_values" in msg


def test_read_label_size_mismatch_names_both_files(tmp_path):
    path = save(tmp_path / "m.gif", binary(6, 5), "L")
    with pytest.raises(UserError) as e:
        read_label(path, {0: 0, 255: 1}, expected_hw=(7, 5), image_path=tmp_path / "img.tif")
    msg = str(e.value)
    assert "m.gif is 5 x 6 px" in msg and "img.tif is 5 x 7 px" in msg


def test_read_label_corrupt(tmp_path):
    bad = tmp_path / "m.gif"
    bad.write_bytes(b"GIF89a garbage")
    with pytest.raises(UserError, match=r"m\.gif: cannot read label file"):
        read_label(bad)


def test_read_fov(tmp_path):
    fov = read_fov(save(tmp_path / "f.gif", np.array([[0, 255], [255, 255]], np.uint8), "L"))
    np.testing.assert_array_equal(fov, [[False, True], [True, True]])
    ones = read_fov(save(tmp_path / "f1.png", np.array([[0, 1]], np.uint8), "L"))
    np.testing.assert_array_equal(ones, [[False, True]])
    with pytest.raises(UserError, match="field-of-view mask is empty"):
        read_fov(save(tmp_path / "f0.png", np.zeros((3, 3), np.uint8), "L"))
    with pytest.raises(UserError, match="must match its image"):
        read_fov(tmp_path / "f.gif", expected_hw=(3, 3), image_path="x.tif")
