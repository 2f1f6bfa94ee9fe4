"""The fisheye lens simulator (geometry, photometry, the cached target folder) and random_warp."""

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from podium.engine import registry
from podium.errors import UserError
from podium.tasks.segmentation.lens import (
    PRESETS,
    Lens,
    WarpConfig,
    apply_lens,
    check_warp,
    default_lens_cache,
    lens_grid,
    random_warp,
    resolve_lens,
    write_fisheye_folder,
)
from podium.tasks.segmentation.readers import read_image, read_label

CAMVID = (Path(__file__).resolve().parents[3] / ".." / "shared" / "data" / "camvid").resolve()
PLAIN = dict(vignetting=0.0, colour=(1.0, 1.0, 1.0), noise=0.0)
# Odd sizes: the circle centre (0.5, 0.5) and the source centre fall on pixel centres.
SRC_HW = (121, 161)
LINE_LENS = Lens(fov=180.0, radius=0.5, **PLAIN)


def warped_line(points) -> np.ndarray:
    """Output (row, col) offsets from the centre of the label pixels of a 1-px source line."""
    label = np.zeros(SRC_HW, dtype=np.int64)
    for y, x in points:
        if 0 <= y < SRC_HW[0] and 0 <= x < SRC_HW[1]:
            label[y, x] = 1
    _, out, _ = apply_lens(np.zeros((*SRC_HW, 3), np.uint8), label, LINE_LENS)
    rows, cols = np.nonzero(out == 1)
    return np.stack([rows - SRC_HW[0] // 2, cols - SRC_HW[1] // 2], axis=1)


def test_lines_through_the_centre_stay_straight_others_bend():
    cy, cx = SRC_HW[0] // 2, SRC_HW[1] // 2
    horizontal = warped_line([(cy, x) for x in range(SRC_HW[1])])
    assert len(horizontal) > 40 and (horizontal[:, 0] == 0).all()
    diagonal = warped_line([(cy + k, cx + k) for k in range(-cy, cy + 1)])
    assert len(diagonal) > 30 and (diagonal[:, 0] == diagonal[:, 1]).all()
    # A horizontal line 30 px below the centre bows (barrel): its middle lies farther from the
    # chord through its two ends than a pixel's rounding could explain.
    off = warped_line([(cy + 30, x) for x in range(SRC_HW[1])])
    cols = np.unique(off[:, 1])
    mean_row = np.array([off[off[:, 1] == c, 0].mean() for c in cols])
    chord = mean_row[0] + (mean_row[-1] - mean_row[0]) * (cols - cols[0]) / (cols[-1] - cols[0])
    sagitta = float(np.max(np.abs(mean_row - chord)))
    assert sagitta >= 2.5, sagitta  # the continuous curve's is 3.7 px


def test_centre_samples_the_source_centre_and_radius_follows_tan():
    lens = Lens(fov=160.0, radius=0.45, source_hfov=100.0, **PLAIN)
    grid, valid = lens_grid(lens, SRC_HW, SRC_HW)
    h, w = SRC_HW
    assert grid[h // 2, w // 2].tolist() == [0.0, 0.0] and valid[h // 2, w // 2]
    image = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    out, _, _ = apply_lens(image, None, lens)
    assert (out[h // 2, w // 2] == image[h // 2, w // 2]).all()
    f = lens.radius * w / math.radians(lens.fov / 2)
    f_src = (w / 2) / math.tan(math.radians(lens.source_hfov / 2))
    for dx in (5, 17, 30, 44):  # output pixels to the right of the centre, on its row
        r = dx  # pixel centres: (w // 2 + dx + 0.5) - w / 2
        source_x = (grid[h // 2, w // 2 + dx, 0] + 1) * w / 2
        assert source_x - w / 2 == pytest.approx(f_src * math.tan(r / f), abs=1e-3)
    for dy in (7, 25):  # and below it, on its column
        source_y = (grid[h // 2 + dy, w // 2, 1] + 1) * h / 2
        assert source_y - h / 2 == pytest.approx(f_src * math.tan(dy / f), abs=1e-3)


def test_outside_circle_and_outside_frame_are_invalid():
    h, w = SRC_HW
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    image = np.full((h, w, 3), 200, np.uint8)
    label = np.ones((h, w), np.int64)
    # A small circle of a narrow lens: the circle bounds the valid area.
    small = Lens(fov=60.0, radius=0.2, **PLAIN)
    out, lab, valid = apply_lens(image, label, small, ignore_index=9)
    inside = np.hypot(xx - w / 2, yy - h / 2) <= 0.2 * w
    assert (valid == inside).all()
    # A wide circle: the source frame (45 deg off-axis horizontally) bounds it.
    wide = Lens(fov=200.0, radius=0.5, **PLAIN)
    out2, lab2, valid2 = apply_lens(image, label, wide, ignore_index=9)
    grid, _ = lens_grid(wide, SRC_HW, SRC_HW)
    assert valid2.sum() < (np.hypot(xx - w / 2, yy - h / 2) <= 0.5 * w).sum()
    assert not valid2[h // 2, :10].any() and valid2[h // 2, w // 2 - 20 : w // 2 + 20].all()
    for o, lb, v in ((out, lab, valid), (out2, lab2, valid2)):
        assert (o[~v] == 0).all() and (o[v] == 200).all()
        assert (lb[~v] == 9).all() and (lb[v] == 1).all()
    assert (grid[~valid2] == -2).all() and (np.abs(grid[valid2]) <= 1).all()


def test_presets_and_overrides_resolve():
    for name, lens in PRESETS.items():
        assert resolve_lens(name) == lens
    lens = resolve_lens({"preset": "fisheye160_warm", "noise": 0, "centre": [0.4, 0.6]})
    assert lens.noise == 0 and lens.centre == (0.4, 0.6) and lens.fov == PRESETS["fisheye160_warm"].fov
    assert resolve_lens({"fov": 120}) == Lens(fov=120.0)
    assert resolve_lens(Lens(radius=0.6)).radius == 0.6
    node = OmegaConf.create({"preset": "fisheye190", "colour": [1.1, 1, 0.9]})  # as Hydra passes it
    assert resolve_lens(node).colour == (1.1, 1.0, 0.9)
    assert lens_grid(Lens(centre=[0.5, 0.5]), (9, 9), (9, 9))[1][4, 4]  # lists are accepted (and cached)
    assert default_lens_cache().parts[-3:] == ("podium", "segmentation", "fisheye")


@pytest.mark.parametrize("field,value", [
    ("fov", 0), ("fov", 360), ("radius", 0), ("centre", [0.5, 1.2]), ("centre", [0.5]),
    ("source_hfov", 180), ("vignetting", 1.0), ("vignetting", -0.1), ("colour", [1, 1, 0]),
    ("colour", [1, 1]), ("noise", -1), ("fov", "wide"), ("radius", float("nan")),
])
def test_bad_lens_values_name_the_key(field, value):
    with pytest.raises(UserError, match=rf"task\.target\.lens\.{field}"):
        resolve_lens({field: value})


def test_unknown_preset_and_field_are_user_errors():
    with pytest.raises(UserError, match="fisheye160_warm"):
        resolve_lens("nope")
    with pytest.raises(UserError, match=r"data\.lens\.focal.*fields: preset, fov"):
        resolve_lens({"focal": 3}, key="data.lens")


def test_vignetting_colour_and_noise():
    h, w = 61, 81
    grey = np.full((h, w, 3), 200, np.uint8)
    # A wide source camera keeps pixels near the circle's edge valid.
    lens = Lens(fov=180.0, radius=0.5, source_hfov=170.0, vignetting=0.4, colour=(1, 1, 1), noise=0.0)
    out, _, valid = apply_lens(grey, None, lens)
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    rel = np.hypot(xx - w / 2, yy - h / 2) / (0.5 * w)
    expected = np.rint(200 * (1 - 0.4 * rel**2))
    assert out[h // 2, w // 2, 0] == 200
    edge = valid & (rel > 0.9)
    assert edge.any() and np.abs(out[..., 1][edge] - expected[edge]).max() <= 1
    assert out[..., 1][edge].mean() < 200 * (1 - 0.4 * 0.81) + 1  # >= 32 % darker at r > 0.9 R
    cast, _, v = apply_lens(grey, None, Lens(fov=120.0, colour=(1.5, 1.0, 0.5), **{"vignetting": 0.0}))
    assert (cast[v] == [255, 200, 100]).all()  # 300 clips to 255
    noisy = Lens(fov=120.0, noise=5.0)
    a, _, v = apply_lens(grey, None, noisy, seed=1)
    b, _, _ = apply_lens(grey, None, noisy, seed=1)
    c, _, _ = apply_lens(grey, None, noisy, seed=2)
    assert (a == b).all() and (a != c).any()
    assert 4.0 < a[v].astype(float).std() < 6.0 and (a[~v] == 0).all()


# ---- the cached target folder --------------------------------------------------------------


@pytest.fixture()
def source(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    (tmp_path / "ann").mkdir()
    for i, stem in enumerate(["b_02", "a_01", "c_03"]):
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(tmp_path / "img" / f"{stem}.jpg")
        label = rng.integers(0, 3, (48, 64)).astype(np.uint8)
        Image.fromarray(label, mode="L").save(tmp_path / "ann" / f"{stem}.png")
    return tmp_path


LENS = Lens(fov=160.0, radius=0.55, noise=2.0, vignetting=0.2)


def test_write_fisheye_folder_writes_once_and_reads_back(source, tmp_path):
    root = write_fisheye_folder(source / "img", source / "ann", tmp_path / "cache", LENS, seed=5, ignore_value=7)
    assert root.parent == tmp_path / "cache" and root.name.startswith("img-fov160-")
    stems = ["a_01", "b_02", "c_03"]
    for sub in ("images", "labels", "fov"):
        assert sorted(p.stem for p in (root / sub).iterdir()) == stems
    meta = json.loads((root / "lens.json").read_text())
    assert meta["count"] == 3 and meta["seed"] == 5 and meta["lens"]["fov"] == 160.0 and meta["ignore_value"] == 7
    for i, stem in enumerate(stems):
        image = read_image(source / "img" / f"{stem}.jpg")
        src_label = read_label(source / "ann" / f"{stem}.png")
        fish, label, valid = apply_lens(image, src_label, LENS, seed=5 + i, ignore_index=7)
        assert (read_image(root / "images" / f"{stem}.png") == fish).all()
        stored = read_label(root / "labels" / f"{stem}.png")
        assert (stored == label).all() and set(np.unique(stored)) <= {0, 1, 2, 7}
        fov = read_label(root / "fov" / f"{stem}.png")
        assert ((fov == 255) == valid).all() and ((stored == 7) == ~valid).all()
    assert meta["mean_valid_fraction"] == pytest.approx(float(valid.mean()), abs=0.01)
    mtimes = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    again = write_fisheye_folder(source / "img", source / "ann", tmp_path / "cache", LENS, seed=5, ignore_value=7)
    assert again == root and {p: p.stat().st_mtime_ns for p in root.rglob("*")} == mtimes
    other = write_fisheye_folder(source / "img", source / "ann", tmp_path / "cache", LENS, seed=6, ignore_value=7)
    assert other != root and (other / "lens.json").is_file()
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]  # no temporary left
    cfg = {"image_dir": str(root / "images"), "mask_dir": str(root / "labels"), "fov_dir": str(root / "fov"),
           "fov": "file", "class_names": ["a", "b", "c"], "class_values": {0: 0, 1: 1, 2: 2, 7: 255},
           "val_count": 1, "patch_size": [16, 16], "augment": False}
    splits = registry.build("dataset", "seg_folder", cfg, seed=0)
    item = splits["val"][0]
    assert set(item["mask"].unique().tolist()) <= {0, 1, 2, 255}
    assert ((item["mask"] == 255) == ~item["fov"]).all() and 0.2 < item["fov"].float().mean() < 0.9


def test_write_fisheye_folder_scale_and_no_labels(source, tmp_path):
    root = write_fisheye_folder(source / "img", None, tmp_path / "cache", LENS, scale=0.5)
    assert not (root / "labels").exists()
    assert read_image(root / "images" / "a_01.png").shape == (24, 32, 3)


def test_write_fisheye_folder_bad_inputs_name_the_file(source, tmp_path):
    out = tmp_path / "cache"
    with pytest.raises(UserError, match="no image"):
        (tmp_path / "empty").mkdir()
        write_fisheye_folder(tmp_path / "empty", None, out, LENS)
    with pytest.raises(UserError, match="does not exist"):
        write_fisheye_folder(tmp_path / "missing", None, out, LENS)
    Image.fromarray(np.zeros((10, 10), np.uint8), mode="L").save(source / "ann" / "b_02.png")
    with pytest.raises(UserError, match="b_02.png"):
        write_fisheye_folder(source / "img", source / "ann", out, LENS)
    (source / "img" / "a_01.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(UserError, match="a_01.jpg"):
        write_fisheye_folder(source / "img", None, out, LENS)
    (source / "img" / "d_04.png").write_bytes(b"")
    with pytest.raises(UserError, match="d_04"):
        write_fisheye_folder(source / "img", source / "ann", out, LENS)
    with pytest.raises(UserError, match=r"lens\.vignetting"):
        write_fisheye_folder(source / "img", None, out, Lens(vignetting=2.0))
    assert not out.exists() or not [p for p in out.iterdir()]  # nothing half-written left


# ---- random_warp ---------------------------------------------------------------------------


def batch(b=4, h=24, w=32):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(b, 3, h, w, generator=g) + 0.5  # never 0: the fill shows
    labels = torch.randint(0, 4, (b, h, w), generator=g)
    labels[:, :3] = 255
    return images, labels


def test_random_warp_identity_cases():
    images, labels = batch()
    out, lab, valid = random_warp(images, labels, None, WarpConfig(p=0.0), torch.Generator().manual_seed(1))
    assert torch.equal(out, images) and torch.equal(lab, labels) and valid.all()
    still = WarpConfig(p=1.0, fisheye_p=0.0, barrel=(0.0, 0.0), rotation=0.0, scale=(1.0, 1.0), shift=0.0)
    out, lab, valid = random_warp(images, labels, None, still, torch.Generator().manual_seed(1))
    assert torch.equal(lab, labels) and valid.all() and torch.allclose(out, images, atol=1e-5)


def test_random_warp_labels_valid_and_reproducible():
    images, labels = batch(b=6)
    cfg = WarpConfig(p=0.6, fisheye_p=0.5, rotation=20.0, elastic_alpha=30.0, elastic_sigma=4.0)
    out, lab, valid = random_warp(images, labels, None, cfg, torch.Generator().manual_seed(3))
    again = random_warp(images, labels, None, cfg, torch.Generator().manual_seed(3))
    assert torch.equal(out, again[0]) and torch.equal(lab, again[1]) and torch.equal(valid, again[2])
    other = random_warp(images, labels, None, cfg, torch.Generator().manual_seed(4))
    assert not torch.equal(out, other[0])
    assert set(lab.unique().tolist()) <= {0, 1, 2, 3, 255}
    changed = [not torch.equal(out[i], images[i]) for i in range(6)]
    assert any(changed) and not all(changed)  # a mixed batch: some warped, some untouched
    for i in range(6):
        if not changed[i]:
            assert torch.equal(lab[i], labels[i]) and valid[i].all()
    filled = (out == 0).all(dim=1)
    assert filled.any() and not valid[filled].any() and (lab[~valid] == 255).all()


def test_random_warp_lens_only_keeps_label_values_and_input_valid():
    images, labels = batch(b=3)
    cfg = WarpConfig(p=1.0, fisheye_p=1.0, rotation=0.0, scale=(1.0, 1.0), shift=0.0)
    out, lab, valid = random_warp(images, labels, None, cfg, torch.Generator().manual_seed(0))
    assert (~valid).any() and valid.any()
    assert (out.permute(1, 0, 2, 3)[:, ~valid] == 0).all() and (out.permute(1, 0, 2, 3)[:, valid] > 0).all()
    assert (lab[~valid] == 255).all() and set(lab[valid].unique().tolist()) <= {0, 1, 2, 3, 255}
    # An input field of view: what was outside it stays outside (valid False, label ignore).
    valid_in = torch.ones(3, 24, 32, dtype=torch.bool)
    valid_in[:, :, 16:] = False
    labels[:, :, 16:] = 255
    _, lab2, valid2 = random_warp(images, labels, valid_in, cfg, torch.Generator().manual_seed(0))
    assert valid2.sum() < valid.sum() and not (valid2 & ~valid).any()
    assert (lab2[~valid2] == 255).all() and set(lab2[valid2].unique().tolist()) <= {0, 1, 2, 3, 255}
    assert not valid2[:, :, 20:].any()  # the lens keeps the left/right halves apart


def test_elastic_displacement_has_the_stated_rms():
    h, w = 64, 64
    ramp = torch.arange(w, dtype=torch.float32).expand(1, 1, h, w).repeat(2, 1, 1, 1)  # value = x
    cfg = WarpConfig(p=1.0, fisheye_p=0.0, barrel=(0.0, 0.0), rotation=0.0, scale=(1.0, 1.0), shift=0.0,
                     elastic_alpha=2.0, elastic_sigma=4.0)
    out, _, valid = random_warp(ramp + 1, None, None, cfg, torch.Generator().manual_seed(0))
    inner = valid[:, 8:-8, 8:-8]
    dx = (out - 1 - ramp)[:, 0, 8:-8, 8:-8][inner]  # bilinear on a ramp: exactly the x displacement
    rms = float(dx.square().mean().sqrt())
    assert 2.0 / math.sqrt(2) * 0.7 < rms < 2.0 / math.sqrt(2) * 1.3, rms  # RMS alpha over both axes


@pytest.mark.parametrize("field,value", [
    ("p", 1.5), ("fisheye_p", -0.1), ("fov", (200.0, 120.0)), ("fov", (0.0, 90.0)), ("barrel", (-1.5, 0.0)),
    ("rotation", -1.0), ("scale", (0.0, 1.0)), ("shift", 1.0), ("elastic_alpha", -1.0), ("elastic_sigma", 0.0),
    ("source_hfov", 180.0), ("scale", (1.0,)),
])
def test_bad_warp_values_name_the_key(field, value):
    with pytest.raises(UserError, match=rf"task\.warp\.{field}"):
        check_warp(WarpConfig(**{field: value}))
    images, labels = batch(b=1)
    with pytest.raises(UserError):
        random_warp(images, labels, None, WarpConfig(**{field: value}), torch.Generator())


@pytest.mark.realdata
@pytest.mark.skipif(not (CAMVID / "val").is_dir(), reason=f"{CAMVID} is not available")
def test_presets_on_camvid(tmp_path):
    files = sorted((CAMVID / "val").iterdir())[:2]
    (tmp_path / "img").mkdir()
    (tmp_path / "ann").mkdir()
    for f in files:
        os.symlink(f, tmp_path / "img" / f.name)
        os.symlink(CAMVID / "valannot" / f"{f.stem}.png", tmp_path / "ann" / f"{f.stem}.png")
    for name in PRESETS:
        root = write_fisheye_folder(tmp_path / "img", tmp_path / "ann", tmp_path / "out", resolve_lens(name),
                                    ignore_value=11, scale=0.5)
        meta = json.loads((root / "lens.json").read_text())
        assert meta["size_hw"] == [180, 240] and 0.35 <= meta["mean_valid_fraction"] <= 0.70, meta
        for f in files:
            assert set(np.unique(read_label(root / "labels" / f"{f.stem}.png")).tolist()) <= set(range(12))
