"""Segmentation datasets: registered factories, splits, items, patch sampling (determinism,
foreground oversampling), augmentation alignment, the shared preprocessing path, bad input."""

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from podium.common.structured import as_config
from podium.engine import registry
from podium.engine.loading import make_loader
from podium.errors import UserError
from podium.tasks.segmentation import data
from podium.tasks.segmentation.data import (
    SegImageDataset,
    SegPatchDataset,
    carve_splits,
)
from podium.tasks.segmentation.pipeline import (
    DriveConfig,
    SegDataConfig,
    SegFolderConfig,
    SegNnunetConfig,
    SyntheticFundusConfig,
    prepare_image,
)
from podium.tasks.segmentation.readers import (
    SegRecord,
    drive_records,
    read_fov,
    read_image,
)
from podium.tasks.segmentation.synthetic import write_synthetic_fundus

CONF = Path(data.__file__).resolve().parents[2] / "conf" / "data"
SCHEMAS = {"drive": DriveConfig, "seg_folder": SegFolderConfig, "seg_nnunet": SegNnunetConfig,
           "synthetic_fundus": SyntheticFundusConfig}


def cfg(schema, **values):
    """A data group as the config layer hands it over: a DictConfig merged onto the schema."""
    return OmegaConf.merge(OmegaConf.structured(schema), values)


def plain_cfg(**values):
    """A SegDataConfig for direct dataset construction (tiny patches, no CLAHE surprises)."""
    base = {"patch_size": [16, 16], "patches_per_image": 4, "clahe": "none", "fov": "file"}
    base.update(values)
    return as_config(base, SegDataConfig)


@pytest.fixture(scope="module")
def fundus(tmp_path_factory):
    return write_synthetic_fundus(tmp_path_factory.mktemp("seg") / "fundus", count=6, size=(64, 64), seed=1)


@pytest.fixture(scope="module")
def splits(fundus):
    c = cfg(SyntheticFundusConfig, root=str(fundus.parent / "reg"), count=6, size=[64, 64], seed=1,
            val_count=2, test_count=1, patch_size=[32, 32], patches_per_image=3)
    return registry.build("dataset", "synthetic_fundus", c, seed=0)


def save(path, arr, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    (Image.fromarray(arr, mode=mode) if mode else Image.fromarray(arr)).save(path)
    return path


# ---- registration and configs --------------------------------------------------------------


def test_registered_and_yaml_configs_match_their_schema():
    names = registry.list_names("dataset")
    for name, schema in SCHEMAS.items():
        assert name in names and registry.get("dataset", name).schema is schema
        node = OmegaConf.load(CONF / f"{name}.yaml")
        assert node.name == name
        OmegaConf.merge(OmegaConf.structured(schema), node)  # every key known, every type right


def test_drive_yaml_points_at_shared_data():
    node = OmegaConf.load(CONF / "drive.yaml")
    assert node.root == "../shared/data/drive/training" and node.class_values is None


# ---- splits, items, attributes -------------------------------------------------------------


def test_synthetic_splits_are_disjoint_and_complete(splits, fundus):
    ids = {k: [r.id for r in v.records] for k, v in splits.items()}
    assert {k: len(v) for k, v in ids.items()} == {"train": 3, "val": 2, "test": 1}
    assert sorted(i for v in ids.values() for i in v) == ["01", "02", "03", "04", "05", "06"]
    assert isinstance(splits["train"], SegPatchDataset) and isinstance(splits["val"], SegImageDataset)
    assert len(splits["train"]) == 3 * 3


def test_items_and_attributes(splits):
    train, val = splits["train"], splits["val"]
    for ds in (train, val):
        assert ds.num_classes == 2 and ds.class_names == ["background", "vessel"]
        assert ds.in_chans == 3 and ds.ignore_index == 255
    item = train[4]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert item["mask"].shape == (32, 32) and item["mask"].dtype == torch.int64
    assert item["fov"].dtype == torch.bool and item["index"].dtype == torch.int64
    assert int(item["index"]) == 4 % 3
    assert torch.equal(item["mask"] == 255, ~item["fov"])  # FOV moved with the label
    ev = val[1]
    assert ev["image"].shape == (3, 64, 64) and int(ev["index"]) == 1
    assert set(ev["mask"].unique().tolist()) == {0, 1, 255}
    np.testing.assert_array_equal(val.full_label(1), ev["mask"].numpy())
    np.testing.assert_array_equal(val.full_fov(1), ev["fov"].numpy())
    assert (val.full_label(1)[~val.full_fov(1)] == 255).all()
    disp = val.display_image(1)
    assert disp.shape == (64, 64, 3) and disp.dtype == np.uint8
    np.testing.assert_array_equal(disp, read_image(val.records[1].image_path))  # before CLAHE
    assert val.sample_id(1) == val.records[1].id
    whole = train.as_image_dataset()  # the training split as whole images, nothing decoded again
    assert isinstance(whole, SegImageDataset) and len(whole) == 3
    assert whole.prepared[0] is train.prepared[0] and whole[0]["image"].shape == (3, 64, 64)


def test_eval_item_is_prepare_image_of_the_file(splits):
    """One preprocessing path: the dataset's item equals prepare_image on the decoded file."""
    val = splits["val"]
    r = val.records[0]
    image, fov = prepare_image(read_image(r.image_path), val.cfg, fov=read_fov(r.fov_path))
    item = val[0]
    assert torch.equal(image, item["image"]) and torch.equal(fov, item["fov"])
    # Without a FOV file the aperture is estimated (a prediction on a new photograph).
    _, est = prepare_image(read_image(r.image_path), val.cfg)
    assert (est & fov).sum() / (est | fov).sum() > 0.95
    # A decoded (C, H, W) tensor (load_image, served uploads) goes through the same path.
    chw = torch.from_numpy(read_image(r.image_path)).permute(2, 0, 1).contiguous()
    assert torch.equal(prepare_image(chw, val.cfg, fov=read_fov(r.fov_path))[0], image)
    with pytest.raises(UserError, match="expected"):
        prepare_image(np.zeros((8, 8), np.uint8), val.cfg)


def test_normalisation_uses_mean_and_std(fundus):
    recs = drive_records(fundus)[:1]
    c = plain_cfg(mean=[0.0], std=[1.0])
    ds = SegImageDataset(recs, c, ["background", "vessel"], {0: 0, 255: 1})
    np.testing.assert_allclose(ds[0]["image"].permute(1, 2, 0).numpy() * 255, ds.display_image(0), atol=1e-3)


def test_carve_splits_depends_on_split_seed_only():
    recs = [SegRecord(str(i), Path(f"{i}.png"), Path(f"{i}.gif")) for i in range(20)]
    a, b = carve_splits(recs, 4, 4, 0), carve_splits(recs, 4, 4, 0)
    assert a == b and {k: len(v) for k, v in a.items()} == {"train": 12, "val": 4, "test": 4}
    assert a != carve_splits(recs, 4, 4, 1)
    assert carve_splits(recs, 6, 4, 0)["test"] == a["test"]  # the test set does not move with val_count
    assert [r.id for r in a["train"]] == sorted((r.id for r in a["train"]), key=int)  # id order kept
    assert "test" not in carve_splits(recs, 4, 0, 0)
    with pytest.raises(UserError, match="at least one"):
        carve_splits(recs, 10, 10, 0)
    assert set(carve_splits(recs, 0, 0, 0)) == {"train"}  # task=uda brings its own validation frames


def test_fraction_keeps_a_seeded_subset_of_the_training_images_only():
    from podium.tasks.segmentation.data import fraction_subset

    recs = [SegRecord(str(i), Path(f"{i}.png"), Path(f"{i}.gif")) for i in range(20)]
    a = fraction_subset(recs, 0.25, 0)
    assert len(a) == 5 and a == fraction_subset(recs, 0.25, 0) and a != fraction_subset(recs, 0.25, 1)
    assert [r.id for r in a] == sorted((r.id for r in a), key=int)
    assert len(fraction_subset(recs, 0.01, 0)) == 1


def test_segmentation_without_a_validation_split_is_a_user_error(tmp_path):
    from typer.testing import CliRunner

    from podium.cli import app

    result = CliRunner().invoke(app, ["train", "experiment=seg_synthetic", f"data.root={tmp_path / 'gen'}",
                                      "data.count=6", "data.size=[32,32]", "data.patch_size=[16,16]", "data.val_count=0", "tracking=none",
                                      f"run.dir={tmp_path / 'run'}"])
    assert result.exit_code == 2 and "data.val_count=0" in result.output, result.output


def test_max_images_channels_and_scale(fundus):
    c = cfg(DriveConfig, root=str(fundus), val_count=2, max_images=1, channels=1, clahe="green",
            mean=[0.5], std=[0.25], scale=0.5, patch_size=[16, 16])
    sp = registry.build("dataset", "drive", c, seed=0)
    assert {k: len(v.records) for k, v in sp.items()} == {"train": 1, "val": 1}
    item = sp["val"][0]
    assert item["image"].shape == (1, 32, 32) and item["mask"].shape == (32, 32)
    assert set(item["mask"].unique().tolist()) <= {0, 1, 255}  # nearest: no interpolated labels
    assert sp["val"].display_image(0).shape == (32, 32, 3)
    assert sp["train"][0]["image"].shape == (1, 16, 16)


# ---- training patches ----------------------------------------------------------------------


def test_patches_are_deterministic_per_seed_epoch_item(splits, fundus):
    train = splits["train"]
    recs, c = train.records, train.cfg
    twin = SegPatchDataset(recs, c, train.class_names, {0: 0, 255: 1}, seed=0)
    state = torch.random.get_rng_state()
    for i in (0, 5):
        a, b = train[i], twin[i]
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left alone
    first = train[2]["image"]
    train.set_epoch(1)
    assert not torch.equal(train[2]["image"], first)
    train.set_epoch(0)
    assert torch.equal(train[2]["image"], first)
    other = SegPatchDataset(recs, c, train.class_names, {0: 0, 255: 1}, seed=1, prepared=train.prepared)
    assert not torch.equal(other[2]["image"], first)
    negative = SegPatchDataset(recs, c, train.class_names, {0: 0, 255: 1}, seed=-1, prepared=train.prepared)
    assert negative[0]["image"].shape == first.shape


def test_loader_batches_do_not_depend_on_workers(splits):
    """The engine's SeededDataset calls set_epoch in each worker: same batches with 0 or 2 workers."""
    def batches(workers):
        loader = make_loader(splits["train"], train=True, batch_size=3, seed=5, num_workers=workers,
                             persistent_workers=False)
        loader.sampler.set_epoch(2)
        return [b["image"] for b in loader]

    serial, parallel = batches(0), batches(2)
    assert len(serial) == 3 and all(torch.equal(a, b) for a, b in zip(serial, parallel))


def foreground_share(ds, n):
    shares, hits = [], 0
    for i in range(n):
        m = ds[i]["mask"]
        shares.append(float((m == 1).float().mean()))
        hits += bool((m == 1).any())
    return float(np.mean(shares)), hits / n


def test_foreground_oversampling_raises_the_foreground_share(fundus):
    recs = drive_records(fundus)
    common = {"patch_size": [12, 12], "patches_per_image": 40, "augment": False}
    never = SegPatchDataset(recs, plain_cfg(foreground_oversample=0.0, **common), ["bg", "vessel"], {0: 0, 255: 1})
    always = SegPatchDataset(recs, plain_cfg(foreground_oversample=1.0, **common), ["bg", "vessel"], {0: 0, 255: 1},
                             prepared=never.prepared)
    share0, hit0 = foreground_share(never, 240)
    share1, hit1 = foreground_share(always, 240)
    assert hit1 == 1.0  # every oversampled patch holds foreground (its centre)
    assert share1 > 2 * share0 and hit1 > hit0 + 0.2
    for i in range(20):  # p = 1: every patch is drawn around a foreground pixel
        _, _, over = always.patch_origin(i, np.random.default_rng([0, 0, i]))
        assert over


def test_patch_larger_than_image_is_a_user_error(fundus):
    recs = drive_records(fundus)[:1]
    with pytest.raises(UserError, match=r"01_training\.tif.*64 x 64.*patch_size \[96, 32\]"):
        SegPatchDataset(recs, plain_cfg(patch_size=[96, 32]), ["bg", "vessel"], {0: 0, 255: 1})


# ---- augmentation alignment ----------------------------------------------------------------


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    """Images whose grey level encodes the label: 8 x 8 blocks, class 0 -> 100, class 1 -> 220."""
    root = tmp_path_factory.mktemp("encoded")
    rng = np.random.default_rng(0)
    for i in range(3):
        label = np.kron(rng.integers(0, 2, (6, 6)), np.ones((8, 8), dtype=np.int64)).astype(np.uint8)
        grey = np.where(label == 1, 220, 100).astype(np.uint8)
        save(root / "img" / f"{i}.png", np.repeat(grey[:, :, None], 3, 2))
        save(root / "lab" / f"{i}.png", label, "L")
    return root


def encoded_dataset(root, **values):
    c = cfg(SegFolderConfig, image_dir=str(root / "img"), mask_dir=str(root / "lab"), val_count=1,
            patch_size=[32, 32], patches_per_image=30, mean=[0.0], std=[1.0], augment_jitter=0.0, **values)
    return registry.build("dataset", "seg_folder", c, seed=0)["train"]


def decode(item):
    grey = (item["image"][0] * 255).round()
    return grey, item["mask"], item["fov"]


def test_flips_and_rot90_keep_mask_exactly_aligned(encoded):
    ds = encoded_dataset(encoded, augment_affine_p=0.0)
    for i in range(len(ds)):
        grey, mask, fov = decode(ds[i])
        assert fov.all()
        assert torch.equal(grey, torch.where(mask == 1, 220.0, 100.0))


def test_affine_keeps_mask_aligned_and_fills_with_ignore(encoded):
    ds = encoded_dataset(encoded, augment_affine_p=1.0, augment_rotation=40.0, augment_scale=[0.7, 1.0])
    pure = agree = total = filled_dark = filled = 0
    for i in range(len(ds)):
        grey, mask, fov = decode(ds[i])
        assert set(mask.unique().tolist()) <= {0, 1, 255}  # nearest: no new values
        assert torch.equal(mask == 255, ~fov)
        valid = mask != 255
        # A bilinear sample of pure 220 (100) has four 220 (100) neighbours; the mask's nearest
        # sample at the same point is one of them: any shift between the two would show here.
        # (Next to the filled area or the canvas edge a blend of 220 and the fill 0 can look
        # like 100: those pixels are skipped.)
        padded = torch.nn.functional.pad(valid[None].float(), (1, 1, 1, 1))  # outside = invalid
        inner = -torch.nn.functional.max_pool2d(-padded, 3, 1)[0] > 0
        for value, cls in ((220.0, 1), (100.0, 0)):
            sel = inner & ((grey - value).abs() < 3)
            pure += int(sel.sum())
            agree += int((mask[sel] == cls).sum())
        total += int(valid.sum())
        filled += int((~valid).sum())
        filled_dark += int((grey[~valid] < 60).sum())
    assert filled > 0  # rotations and zoom-outs brought in outside area
    assert agree == pure and pure > 0.6 * total
    assert filled_dark / filled > 0.9  # the image's fill (0) is where the mask says ignore


# ---- bad input -----------------------------------------------------------------------------


def folder_dataset(root, **values):
    values = {"patch_size": [8, 8], **values}
    c = cfg(SegFolderConfig, image_dir=str(root / "img"), mask_dir=str(root / "lab"), val_count=1, **values)
    return registry.build("dataset", "seg_folder", c, seed=0)


def write_pairs(root, n=3, h=16, w=16, values=(0, 1)):
    rng = np.random.default_rng(0)
    for i in range(n):
        save(root / "img" / f"{i}.png", rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        save(root / "lab" / f"{i}.png", rng.choice(np.array(values, np.uint8), (h, w)), "L")
    return root


def test_seg_folder_with_class_values_and_ignore(tmp_path):
    root = write_pairs(tmp_path, values=(0, 1, 2, 11))
    sp = folder_dataset(root, class_names=["a", "b", "c"], class_values={0: 0, 1: 1, 2: 2, 11: 255})
    ds = sp["val"]
    assert ds.num_classes == 3 and set(ds[0]["mask"].unique().tolist()) == {0, 1, 2, 255}
    assert ds[0]["fov"].all()  # fov: none


def test_corrupt_image(tmp_path):
    root = write_pairs(tmp_path)
    (root / "img" / "1.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(UserError, match=r"1\.png: cannot read image"):
        folder_dataset(root)


def test_unknown_label_value(tmp_path):
    root = write_pairs(tmp_path, values=(0, 1, 7))
    with pytest.raises(UserError, match=r"0\.png: unexpected label values 7"):
        folder_dataset(root)


def test_mask_of_the_wrong_size(tmp_path):
    root = write_pairs(tmp_path)
    save(root / "lab" / "2.png", np.zeros((15, 16), np.uint8), "L")
    with pytest.raises(UserError, match=r"2\.png is 16 x 15 px but its image .*2\.png is 16 x 16 px"):
        folder_dataset(root)


def test_missing_mask(tmp_path):
    root = write_pairs(tmp_path)
    (root / "lab" / "1.png").unlink()
    with pytest.raises(UserError, match=r"1\.png: no mask in"):
        folder_dataset(root)


def test_fov_file_without_fov_dir(tmp_path):
    with pytest.raises(UserError, match="data.fov is 'file'"):
        folder_dataset(write_pairs(tmp_path), fov="file")


@pytest.mark.parametrize("values,match", [
    ({"clahe": "CLAHE"}, r"data\.clahe must be one of lab, green, none"),
    ({"fov": "auto"}, r"data\.fov must be one of"),
    ({"foreground_oversample": 1.5}, "foreground_oversample"),
    ({"patch_size": [8]}, "patch_size"),
    ({"channels": 2}, "channels"),
    ({"mean": [0.1, 0.2]}, r"data\.mean has 2 values"),
    ({"ignore_index": 1}, "is a class id"),
    ({"class_values": {0: 0, 1: 5}}, "neither class ids"),
    ({"class_names": ["only"]}, "at least 2"),
    ({"scale": 0.0}, "scale"),
    ({"augment_scale": [1.2, 0.8]}, "augment_scale"),
])
def test_bad_config_values(tmp_path, values, match):
    with pytest.raises(UserError, match=match):
        folder_dataset(write_pairs(tmp_path), **values)


def test_patch_larger_than_image_from_the_factory(tmp_path):
    with pytest.raises(UserError, match="patch_size"):
        folder_dataset(write_pairs(tmp_path), patch_size=[32, 32])


def test_required_keys(tmp_path):
    with pytest.raises(UserError, match="data.root is required"):
        registry.build("dataset", "drive", cfg(DriveConfig), seed=0)
    with pytest.raises(UserError, match="image_dir is required"):
        registry.build("dataset", "seg_folder", cfg(SegFolderConfig, mask_dir="x"), seed=0)
    with pytest.raises(UserError, match="not a DRIVE folder"):
        registry.build("dataset", "drive", cfg(DriveConfig, root=str(tmp_path)), seed=0)


def write_nnunet(root, labels):
    import json

    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "R", "1": "G", "2": "B"},
                                                   "labels": labels, "file_ending": ".png"}))
    rng = np.random.default_rng(0)
    for i in range(4):
        save(root / "imagesTr" / f"c{i}_0000.png", rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
        save(root / "labelsTr" / f"c{i}.png", rng.integers(0, len(labels), (16, 16)).astype(np.uint8), "L")
    return root


def test_seg_nnunet_classes_and_ignore_label(tmp_path):
    root = write_nnunet(tmp_path / "Dataset001_Toy", {"background": 0, "road": 1, "ignore": 2})
    sp = registry.build("dataset", "seg_nnunet", cfg(SegNnunetConfig, root=str(root), val_count=1, patch_size=[8, 8]), seed=0)
    val = sp["val"]
    assert val.class_names == ["background", "road"] and val.num_classes == 2
    assert set(val[0]["mask"].unique().tolist()) == {0, 1, 255}  # nnU-Net's ignore -> ignore_index
    with pytest.raises(UserError, match="dataset.json declares 2 classes"):
        registry.build("dataset", "seg_nnunet", cfg(SegNnunetConfig, root=str(root), class_names=["a", "b", "c"]), seed=0)
