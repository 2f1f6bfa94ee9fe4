"""Classification datasets: digits splits, image folders, CSVs, bad input and the pipeline."""

from collections import Counter

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from podium.errors import UserError
from podium.tasks.classification import data
from podium.tasks.classification.data import (
    CsvConfig,
    DigitsConfig,
    ImageFolderConfig,
    build_transform,
    csv_dataset,
    digits,
    image_folder,
    load_image,
    read_image_for_predict,
)


def cfg(schema, **values):
    """A data group as the config layer hands it over: a DictConfig validated by the schema."""
    return OmegaConf.merge(OmegaConf.structured(schema), values)


def write_png(path, seed=0, size=(6, 6), mode="RGB"):
    """A small random (so asymmetric) image."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    channels = 3 if mode == "RGB" else 1
    arr = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    Image.fromarray(arr.squeeze(-1) if channels == 1 else arr, mode=mode).save(path)
    return path


def make_folder(root, splits=("train", "val", "test"), classes=("cat", "dog"), per_class=2):
    for s, split in enumerate(splits):
        for c, name in enumerate(classes):
            for i in range(per_class):
                write_png(root / split / name / f"{i}.png", seed=100 * s + 10 * c + i)
    return root


# ---- digits -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digit_splits():
    return digits(cfg(DigitsConfig, image_size=16), seed=0)


def test_digits_split_sizes(digit_splits):
    sizes = {name: len(ds) for name, ds in digit_splits.items()}
    assert sizes == {"train": 1168, "val": 270, "test": 359, "test_corrupted": 359}
    assert digit_splits["train"].classes == [str(d) for d in range(10)]


def test_digits_split_is_stratified_disjoint_and_ignores_the_run_seed(digit_splits):
    from sklearn.datasets import load_digits

    y = load_digits().target
    train, val, test = data._stratified_split(y, 0.15, 0.2, 0)
    assert len(set(train) | set(val) | set(test)) == len(y) == len(train) + len(val) + len(test)
    overall = np.bincount(y) / len(y)
    for idx in (train, val, test):
        share = np.bincount(y[idx], minlength=10) / len(idx)
        assert np.abs(share - overall).max() < 0.01
    # Class counts per split follow the overall shares to within one or two images.
    counts = Counter(digit_splits["test"].targets)
    assert all(abs(counts[d] - overall[d] * 359) <= 2 for d in range(10))
    other = digits(cfg(DigitsConfig, image_size=16), seed=123)
    assert other["test"].targets == digit_splits["test"].targets
    assert torch.equal(other["test"][7][0], digit_splits["test"][7][0])


def test_digits_items(digit_splits):
    x, y = digit_splits["train"][0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and isinstance(y, int)
    # ids are load_digits rows: stable whichever split a sample lands in, unique across splits
    test = digit_splits["test"]
    assert test.sample_id(42) == f"digits-{test.source_index[42]:04d}" != "digits-0042"
    ids = [ds.sample_id(i) for name in ("train", "val", "test") for ds in [digit_splits[name]] for i in range(len(ds))]
    assert len(set(ids)) == len(ids) == 1797
    assert digit_splits["test_corrupted"].sample_id(42) == test.sample_id(42)
    assert digit_splits["train"].in_chans == 3
    assert len(digit_splits["train"].targets) == 1168


def test_digits_corrupted_test_is_deterministic_and_differs_from_clean(digit_splits):
    clean, corrupted = digit_splits["test"], digit_splits["test_corrupted"]
    assert corrupted.targets == clean.targets
    for i in (0, 5, 100):
        assert torch.equal(corrupted[i][0], corrupted[i][0])
        assert corrupted[i][1] == clean[i][1]
    differ = sum(not torch.equal(corrupted[i][0], clean[i][0]) for i in range(20))
    assert differ >= 18
    again = digits(cfg(DigitsConfig, image_size=16), seed=5)["test_corrupted"]
    assert torch.equal(again[3][0], corrupted[3][0])
    other = digits(cfg(DigitsConfig, image_size=16, corruption_seed=99), seed=0)["test_corrupted"]
    assert any(not torch.equal(other[i][0], corrupted[i][0]) for i in range(10))


def test_digits_grayscale():
    ds = digits(cfg(DigitsConfig, image_size=12, channels=1), seed=0)
    for split in ("train", "val", "test", "test_corrupted"):
        assert ds[split][0][0].shape == (1, 12, 12)
        assert ds[split].in_chans == 1


def test_digits_bad_fractions():
    with pytest.raises(UserError, match="val_fraction"):
        digits(cfg(DigitsConfig, val_fraction=0.0), seed=0)


# ---- image folder -------------------------------------------------------------------------


def test_image_folder_reads_splits_and_classes(tmp_path):
    root = make_folder(tmp_path / "ds")
    write_png(root / "test_scanned" / "dog" / "x.png")
    write_png(root / "train" / "cat" / ".hidden.png")  # hidden files are ignored
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    ds = image_folder(cfg(ImageFolderConfig, root=str(root), image_size=8), seed=0)
    assert list(ds) == ["train", "val", "test", "test_scanned"]
    assert [len(ds[s]) for s in ds] == [4, 4, 4, 1]
    train = ds["train"]
    assert train.classes == ["cat", "dog"] and train.targets == [0, 0, 1, 1]
    assert train.sample_id(2) == "train/dog/0.png"
    x, y = train[3]
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32 and y == 1
    assert ds["test_scanned"].targets == [1] and train.skipped == []


def test_image_folder_numeric_classes_sort_numerically(tmp_path):
    root = make_folder(tmp_path / "ds", splits=("train", "val"), classes=("2", "10", "9"), per_class=1)
    ds = image_folder(cfg(ImageFolderConfig, root=str(root)), seed=0)
    assert ds["train"].classes == ["2", "9", "10"]


def test_image_folder_grayscale(tmp_path):
    root = make_folder(tmp_path / "ds", splits=("train", "val"))
    ds = image_folder(cfg(ImageFolderConfig, root=str(root), channels=1, image_size=10), seed=0)
    assert ds["val"][0][0].shape == (1, 10, 10) and ds["val"].in_chans == 1


def test_image_folder_missing_root(tmp_path):
    with pytest.raises(UserError, match="does not exist") as e:
        image_folder(cfg(ImageFolderConfig, root=str(tmp_path / "nope")), seed=0)
    assert str(tmp_path / "nope") in str(e.value)
    with pytest.raises(UserError, match="data.root is required"):
        image_folder(cfg(ImageFolderConfig), seed=0)


def test_image_folder_missing_val_and_empty_split(tmp_path):
    root = make_folder(tmp_path / "ds", splits=("train",))
    with pytest.raises(UserError, match="no 'val' folder"):
        image_folder(cfg(ImageFolderConfig, root=str(root)), seed=0)
    (root / "val" / "cat").mkdir(parents=True)
    with pytest.raises(UserError, match="no images found") as e:
        image_folder(cfg(ImageFolderConfig, root=str(root)), seed=0)
    assert str(root / "val") in str(e.value)


def test_image_folder_undeclared_class_names_the_folder(tmp_path):
    root = make_folder(tmp_path / "ds", splits=("train", "val"), classes=("cat", "dog"))
    with pytest.raises(UserError) as e:
        image_folder(cfg(ImageFolderConfig, root=str(root), classes=["cat", "cow"]), seed=0)
    assert str(root / "train" / "dog") in str(e.value) and "cow" in str(e.value)
    # A val class that train does not have is also refused.
    write_png(root / "val" / "bird" / "0.png")
    with pytest.raises(UserError, match="bird"):
        image_folder(cfg(ImageFolderConfig, root=str(root)), seed=0)


def test_image_folder_declared_classes_set_the_order(tmp_path):
    root = make_folder(tmp_path / "ds", splits=("train", "val"), classes=("cat", "dog"), per_class=1)
    ds = image_folder(cfg(ImageFolderConfig, root=str(root), classes=["dog", "cat", "cow"]), seed=0)
    assert ds["train"].classes == ["dog", "cat", "cow"] and ds["train"].targets == [1, 0]


def test_corrupt_file_raises_naming_the_file(tmp_path):
    root = make_folder(tmp_path / "ds", splits=("train", "val"))
    bad = root / "train" / "cat" / "broken.png"
    bad.write_bytes(b"not an image")
    ds = image_folder(cfg(ImageFolderConfig, root=str(root)), seed=0)
    index = [str(f) for f in ds["train"].files].index(str(bad))
    with pytest.raises(UserError, match="cannot read image") as e:
        ds["train"][index]
    assert str(bad) in str(e.value)


def test_corrupt_file_is_skipped_and_counted(tmp_path, caplog):
    root = make_folder(tmp_path / "ds", splits=("train", "val"))
    bad = root / "train" / "cat" / "broken.png"
    bad.write_bytes(b"not an image")
    with caplog.at_level("WARNING"):
        ds = image_folder(cfg(ImageFolderConfig, root=str(root), on_error="skip"), seed=0)
    assert ds["train"].skipped == [str(bad)] and len(ds["train"]) == 4
    assert all(ds["train"][i][0].shape == (3, 32, 32) for i in range(4))
    assert "skipped 1 unreadable" in caplog.text


def test_only_broken_images_is_an_empty_split(tmp_path):
    root = make_folder(tmp_path / "ds", splits=("train",))
    (root / "val" / "cat").mkdir(parents=True)
    (root / "val" / "cat" / "a.png").write_bytes(b"not an image")
    with pytest.raises(UserError, match="no usable images"):
        image_folder(cfg(ImageFolderConfig, root=str(root), on_error="skip"), seed=0)


# ---- csv ----------------------------------------------------------------------------------


def make_csv(tmp_path, rows, name="train.csv", header="path,label"):
    path = tmp_path / name
    path.write_text("\n".join([header] + [",".join(r) for r in rows]) + "\n")
    return path


def test_csv_reads_relative_paths(tmp_path):
    for i in range(4):
        write_png(tmp_path / "img" / f"{i}.png", seed=i)
    train = make_csv(tmp_path, [("img/0.png", "b"), ("img/1.png", "a"), ("img/2.png", "b")])
    val = make_csv(tmp_path, [("img/3.png", "a")], name="val.csv")
    test = make_csv(tmp_path, [(str(tmp_path / "img" / "0.png"), "a")], name="test.csv")
    ds = csv_dataset(
        cfg(CsvConfig, train_csv=str(train), val_csv=str(val), test_csv=str(test), image_size=8), seed=0
    )
    assert list(ds) == ["train", "val", "test"]
    assert ds["train"].classes == ["a", "b"] and ds["train"].targets == [1, 0, 1]
    assert ds["train"].sample_id(1) == "img/1.png"
    x, y = ds["val"][0]
    assert x.shape == (3, 8, 8) and y == 0
    assert len(ds["test"]) == 1


def test_csv_missing_column_lists_columns(tmp_path):
    train = make_csv(tmp_path, [("a.png", "x")], header="file,label")
    with pytest.raises(UserError) as e:
        csv_dataset(cfg(CsvConfig, train_csv=str(train), val_csv=str(train)), seed=0)
    assert str(train) in str(e.value) and "'file'" in str(e.value) and "'path'" in str(e.value)


def test_csv_unknown_label_names_the_file(tmp_path):
    write_png(tmp_path / "a.png")
    write_png(tmp_path / "b.png", seed=1)
    train = make_csv(tmp_path, [("a.png", "cat"), ("b.png", "dog")])
    with pytest.raises(UserError) as e:
        csv_dataset(cfg(CsvConfig, train_csv=str(train), val_csv=str(train), classes=["cat", "cow"]), seed=0)
    message = str(e.value)
    assert str(train) in message and "b.png" in message and "line 3" in message
    assert "'dog'" in message and "cat, cow" in message


def test_csv_missing_files_and_required_fields(tmp_path):
    write_png(tmp_path / "a.png")
    train = make_csv(tmp_path, [("a.png", "cat"), ("gone.png", "cat")])
    with pytest.raises(UserError, match="gone.png"):
        csv_dataset(cfg(CsvConfig, train_csv=str(train), val_csv=str(train)), seed=0)
    ds = csv_dataset(cfg(CsvConfig, train_csv=str(train), val_csv=str(train), on_error="skip"), seed=0)
    assert len(ds["train"]) == 1 and ds["train"].skipped == [str(tmp_path / "gone.png")]
    with pytest.raises(UserError, match="data.val_csv is required"):
        csv_dataset(cfg(CsvConfig, train_csv=str(train)), seed=0)
    with pytest.raises(UserError, match="does not exist"):
        csv_dataset(cfg(CsvConfig, train_csv=str(tmp_path / "x.csv"), val_csv=str(train)), seed=0)


def test_csv_corrupt_image_raise_and_skip(tmp_path):
    write_png(tmp_path / "a.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    train = make_csv(tmp_path, [("a.png", "cat"), ("bad.png", "cat")])
    ds = csv_dataset(cfg(CsvConfig, train_csv=str(train), val_csv=str(train)), seed=0)
    with pytest.raises(UserError, match="bad.png: cannot read image"):
        ds["train"][1]
    ds = csv_dataset(cfg(CsvConfig, train_csv=str(train), val_csv=str(train), on_error="skip"), seed=0)
    assert len(ds["val"]) == 1 and ds["val"].skipped == [str(tmp_path / "bad.png")]


# ---- pipeline -----------------------------------------------------------------------------


def test_augmentation_only_on_train(tmp_path):
    root = tmp_path / "ds"
    for split in ("train", "val"):
        write_png(root / split / "a" / "0.png", seed=3, size=(8, 8))  # the same image in both
    flip = [{"name": "RandomHorizontalFlip", "p": 1.0}]
    ds = image_folder(cfg(ImageFolderConfig, root=str(root), image_size=8, augment=flip), seed=0)
    train_x, val_x = ds["train"][0][0], ds["val"][0][0]
    assert not torch.equal(train_x, val_x)
    assert torch.allclose(train_x, val_x.flip(-1))


def test_unknown_augment_lists_choices():
    with pytest.raises(UserError) as e:
        build_transform(cfg(ImageFolderConfig, augment=[{"name": "RandomFlip"}]), train=True)
    message = str(e.value)
    assert "data.augment[0]" in message and "RandomHorizontalFlip" in message and "RandomRotation" in message
    # The eval pipeline never builds the augmentations.
    build_transform(cfg(ImageFolderConfig, augment=[{"name": "RandomFlip"}]), train=False)


def test_bad_augment_arguments_and_shape_changes():
    with pytest.raises(UserError, match=r"data.augment\[1\] \(RandomRotation\).*degrees"):
        build_transform({"augment": ["RandomHorizontalFlip", {"name": "RandomRotation", "dgrees": 5}]}, train=True)
    with pytest.raises(UserError, match=r"data.augment\[0\] \(RandomResizedCrop\)"):
        build_transform({"image_size": 32, "augment": [{"name": "RandomResizedCrop", "size": 16}]}, train=True)
    nested = {"name": "RandomApply", "p": 0.5, "transforms": [{"name": "RandomRotation", "degrees": 10}]}
    t = build_transform(cfg(ImageFolderConfig, augment=[nested]), train=True)
    assert "RandomApply" in repr(t)


def test_mean_std_per_channel_validation():
    with pytest.raises(UserError, match="data.mean has 2 values"):
        build_transform({"mean": [0.5, 0.5]}, train=False)
    build_transform({"channels": 3, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}, train=False)


def test_load_image_converts_channels_and_flattens_alpha(tmp_path):
    path = tmp_path / "rgba.png"
    Image.new("RGBA", (4, 3), (0, 0, 0, 0)).save(path)  # fully transparent
    img = load_image(path, channels=3)
    assert img.shape == (3, 3, 4) and img.dtype == torch.uint8 and int(img.min()) == 255
    grey = write_png(tmp_path / "g.png", mode="L")
    assert load_image(grey, channels=3).shape == (3, 6, 6)
    assert load_image(write_png(tmp_path / "c.png"), channels=1).shape == (1, 6, 6)
    with pytest.raises(UserError, match="cannot read image"):
        load_image(tmp_path / "missing.png", channels=3)


def test_predict_reads_like_the_eval_splits(tmp_path):
    root = make_folder(tmp_path / "ds", splits=("train", "val"))
    c = cfg(ImageFolderConfig, root=str(root), image_size=8, augment=[{"name": "RandomVerticalFlip", "p": 1.0}])
    ds = image_folder(c, seed=0)
    x = read_image_for_predict(ds["val"].files[0], c)
    assert type(x) is torch.Tensor and torch.equal(x, ds["val"][0][0])


def test_plain_objects_work_as_config(tmp_path):
    from types import SimpleNamespace

    root = make_folder(tmp_path / "ds", splits=("train", "val"), per_class=1)
    ds = image_folder(SimpleNamespace(root=str(root), image_size=4, channels=1), seed=0)
    assert ds["train"][0][0].shape == (1, 4, 4)


def test_required_value_left_at_missing_is_reported(tmp_path):
    c = OmegaConf.merge(OmegaConf.structured(ImageFolderConfig), {"root": "???"})
    with pytest.raises(UserError, match="data.root is required"):
        image_folder(c, seed=0)
