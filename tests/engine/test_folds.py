"""k-fold splits (podium.engine.folds): stratified, grouped, persisted and checked; one fold
applied to real family datasets; out-of-fold prediction sets concatenated by id."""

from __future__ import annotations

import csv
import json
from collections import Counter

import numpy as np
import pytest
import torch
from torchvision import tv_tensors

from podium.config import compose
from podium.engine import registry
from podium.engine.folds import apply_fold, make_folds, pool_keys, read_splits, write_splits
from podium.engine.predictions import PredictionSet, concat, write_predictions, read_predictions
from podium.errors import UserError


def _keys(counts: dict[str, int], patients: int = 0) -> list[dict]:
    keys = []
    for label, n in counts.items():
        for i in range(n):
            key = {"id": f"{label}-{i}", "label": label}
            if patients:
                key["patient"] = f"p{(len(keys)) % patients}"
            keys.append(key)
    return keys


def test_stratified_folds_keep_each_class_within_one_of_its_share():
    counts = {"a": 23, "b": 11, "c": 7, "d": 5}
    splits = make_folds(_keys(counts), n_folds=5, seed=3)
    assert splits["method"] == "StratifiedKFold"
    label = {k["id"]: k["label"] for k in _keys(counts)}
    all_ids = [i for ids in splits["ids"].values() for i in ids]
    assert sorted(all_ids) == sorted(label) and len(all_ids) == len(set(all_ids))
    for ids in splits["ids"].values():
        per_class = Counter(label[i] for i in ids)
        for cls, n in counts.items():
            assert abs(per_class[cls] - n / 5) < 1, (cls, per_class)


def test_groups_are_never_split_with_or_without_labels():
    keys = _keys({"a": 30, "b": 18}, patients=12)
    for with_labels in (True, False):
        ks = keys if with_labels else [{k: v for k, v in key.items() if k != "label"} for key in keys]
        splits = make_folds(ks, n_folds=4, seed=0, group_by="patient")
        assert splits["method"] == ("StratifiedGroupKFold" if with_labels else "GroupKFold")
        patient = {k["id"]: k["patient"] for k in keys}
        fold_of: dict[str, set] = {}
        for fold, ids in splits["ids"].items():
            for i in ids:
                fold_of.setdefault(patient[i], set()).add(fold)
        assert len(fold_of) == 12 and all(len(f) == 1 for f in fold_of.values())


def test_folds_depend_on_the_seed_only_and_bad_requests_are_user_errors():
    keys = _keys({"a": 20, "b": 20})
    assert make_folds(keys, 4, seed=1) == make_folds(keys, 4, seed=1)
    assert make_folds(keys, 4, seed=1)["ids"] != make_folds(keys, 4, seed=2)["ids"]
    unlabelled = [{"id": k["id"]} for k in keys]
    assert make_folds(unlabelled, 4)["method"] == "KFold"
    with pytest.raises(UserError, match="at least 2 folds"):
        make_folds(keys, 1)
    with pytest.raises(UserError, match="more than the 40 samples"):
        make_folds(keys, 41)
    with pytest.raises(UserError, match="group_by='patient'.*columns this dataset offers: id"):
        make_folds(unlabelled, 4, group_by="patient")


def test_splits_json_round_trips_and_a_mismatch_names_the_file(tmp_path):
    keys = _keys({"a": 9, "b": 9})
    path = write_splits(tmp_path / "splits.json", make_folds(keys, 3))
    assert read_splits(path, keys) == json.loads(path.read_text())
    with pytest.raises(UserError, match=rf"{path}.*1 sample\(s\) in no fold.*1 id\(s\) not in the data"):
        read_splits(path, keys[:-1] + [{"id": "new", "label": "a"}])
    bad = json.loads(path.read_text())
    bad["ids"]["1"].append(bad["ids"]["0"][0])
    (tmp_path / "overlap.json").write_text(json.dumps(bad))
    with pytest.raises(UserError, match="overlap.json.*folds must be disjoint"):
        read_splits(tmp_path / "overlap.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(UserError, match="broken.json"):
        read_splits(tmp_path / "broken.json")


# ---- one fold applied to a family's datasets -----------------------------------------------


@pytest.fixture(scope="module")
def digits_fold():
    cfg = compose(["experiment=digits", "data.image_size=12", "cv.folds=3", "cv.fold=1",
                   "data.augment=[{name: RandomVerticalFlip, p: 1.0}]"])
    task = registry.build("task", "classification", cfg)
    original = dict(task.build_datasets())
    keys, picks = pool_keys(task, original)
    return cfg, task, original, keys, picks, apply_fold(task, original, cfg.cv)


def test_apply_fold_holds_one_fold_out_with_eval_transforms(digits_fold):
    from podium.tasks.classification import data as cls_data

    cfg, task, original, keys, picks, folded = digits_fold
    splits = make_folds(keys, 3, seed=0)
    val_ids = [folded["val"].sample_id(i) for i in range(len(folded["val"]))]
    train_ids = [folded["train"].sample_id(i) for i in range(len(folded["train"]))]
    assert sorted(val_ids) == sorted(splits["ids"]["1"])
    assert not set(val_ids) & set(train_ids) and len(val_ids) + len(train_ids) == len(keys)
    assert task.build_datasets() is folded  # the task's own hooks (saved ids) see the fold
    assert folded["test"] is original["test"] and folded["test_corrupted"] is original["test_corrupted"]
    # a held-out sample that came from the train split: eval preprocessing (no flip)
    row = next(i for i, p in enumerate(folded["val"].dataset.picks) if p[0] == 0)
    part, index = folded["val"].dataset.picks[row]
    raw = tv_tensors.Image(original["train"].images[index].expand(3, -1, -1))
    image, label, returned_index = folded["val"][row]
    assert returned_index == row and label == original["train"].targets[index]
    assert torch.equal(image, cls_data.build_transform(cfg.data, train=False)(raw).as_subclass(torch.Tensor))
    # and a training sample that came from val is augmented (flipped)
    row = next(i for i, p in enumerate(folded["train"].picks) if p[0] == 1)
    _, index = folded["train"].picks[row]
    raw = tv_tensors.Image(original["val"].dataset.images[index].expand(3, -1, -1))
    flipped = cls_data.build_transform(cfg.data, train=True)(raw).as_subclass(torch.Tensor)
    assert torch.equal(folded["train"][row][0], flipped)
    assert not torch.equal(flipped, cls_data.build_transform(cfg.data, train=False)(raw).as_subclass(torch.Tensor))


def test_apply_fold_out_of_range_or_without_folds_is_a_user_error(digits_fold):
    cfg = compose(["experiment=digits", "data.image_size=12", "cv.folds=3", "cv.fold=3"])
    task = registry.build("task", "classification", cfg)
    with pytest.raises(UserError, match="cv.fold=3 is out of range"):
        apply_fold(task, task.build_datasets(), cfg.cv)
    cfg = compose(["experiment=digits", "data.image_size=12", "cv.fold=0"])
    task = registry.build("task", "classification", cfg)
    with pytest.raises(UserError, match="needs cv.folds >= 2"):
        apply_fold(task, task.build_datasets(), cfg.cv)


def test_csv_columns_group_classification_folds(tmp_path):
    from PIL import Image

    rows = []
    for i in range(24):
        Image.fromarray(np.full((8, 8), i * 10, np.uint8)).save(tmp_path / f"{i}.png")
        rows.append([f"{i}.png", "ab"[i % 2], f"patient{i // 3}"])
    for name, part in (("train.csv", rows[:18]), ("val.csv", rows[18:])):
        with (tmp_path / name).open("w", newline="") as f:
            csv.writer(f).writerows([["path", "label", "patient"], *part])
    cfg = compose(["data=csv", f"data.train_csv={tmp_path / 'train.csv'}", f"data.val_csv={tmp_path / 'val.csv'}",
                   "data.image_size=8", "data.channels=1", "data.augment=[]", "data.mean=[0.5]", "data.std=[0.5]"])
    task = registry.build("task", "classification", cfg)
    keys, _ = pool_keys(task, task.build_datasets())
    assert keys[0] == {"id": "0.png", "label": 0, "patient": "patient0"}
    splits = make_folds(keys, 4, group_by="patient")
    patient = {k["id"]: k["patient"] for k in keys}
    for fold, ids in splits["ids"].items():
        others = {patient[i] for f, o in splits["ids"].items() if f != fold for i in o}
        assert not {patient[i] for i in ids} & others


def test_segmentation_fold_ids_and_dataset_kinds(tmp_path):
    from podium.tasks.segmentation.data import SegImageDataset, SegPatchDataset

    cfg = compose(["experiment=seg_synthetic", f"data.root={tmp_path}", "data.count=9", "data.size=[48,48]",
                   "data.val_count=3", "data.test_count=2", "data.patch_size=[32,32]", "cv.folds=3", "cv.fold=2"])
    task = registry.build("task", "segmentation", cfg)
    original = dict(task.build_datasets())
    keys, _ = pool_keys(task, original)
    folded = apply_fold(task, original, cfg.cv)
    held = make_folds(keys, 3)["ids"]["2"]
    assert isinstance(folded["val"], SegImageDataset) and isinstance(folded["train"], SegPatchDataset)
    assert sorted(r.id for r in folded["val"].records) == sorted(held)
    assert {r.id for r in folded["train"].records} == {k["id"] for k in keys} - set(held)
    assert folded["test"] is original["test"] and folded["val"][0]["index"] == 0


def test_landmark_fold_ids_and_augmentation_only_in_train(tmp_path):
    from podium.tasks.landmarks.synthetic import write_synthetic_landmarks

    table = write_synthetic_landmarks(tmp_path, 10, (32, 32), 3, seed=0)
    rows = list(csv.reader(table.open()))
    for name, part in (("train.csv", rows[1:8]), ("val.csv", rows[8:])):
        with (tmp_path / name).open("w", newline="") as f:
            csv.writer(f).writerows([rows[0], *part])
    cfg = compose(["experiment=landmarks_synthetic", "data=landmark_table", f"data.train={tmp_path / 'train.csv'}",
                   f"data.val={tmp_path / 'val.csv'}", "data.image_size=[32,32]", "data.cache_dir=none",
                   "cv.folds=5", "cv.fold=4"])
    task = registry.build("task", "landmarks", cfg)
    original = dict(task.build_datasets())
    keys, _ = pool_keys(task, original)
    folded = apply_fold(task, original, cfg.cv)
    assert [r.id for r in folded["val"].records] == make_folds(keys, 5)["ids"]["4"]
    assert len(folded["train"]) == 8 and folded["train"].train and not folded["val"].train
    assert folded["val"].augment is None


def test_duplicate_ids_across_train_and_val_are_refused():
    class Keyed:
        def cv_keys(self, dataset):
            return [{"id": i} for i in dataset]

    with pytest.raises(UserError, match="distinct sample ids.*'b'"):
        pool_keys(Keyed(), {"train": ["a", "b"], "val": ["b", "c"]})


# ---- out-of-fold sets -------------------------------------------------------------------------


def _class_set(folder, ids, seed):
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(3), len(ids)).astype(np.float32)
    write_predictions(folder, "class_probs", ids, {"probs": probs}, truth={"labels": rng.integers(0, 3, len(ids))},
                      split="val", classes=["x", "y", "z"])
    return read_predictions(folder)


def test_concat_keeps_every_row_once_and_refuses_overlaps_or_other_kinds(tmp_path):
    a = _class_set(tmp_path / "a", ["1", "2"], 0)
    b = _class_set(tmp_path / "b", ["3", "4", "5"], 1)
    oof = read_predictions(concat([a, b]).write(tmp_path / "oof").parent)
    assert oof.ids == ["1", "2", "3", "4", "5"]
    for s in (a, b):
        for i in s.ids:
            np.testing.assert_array_equal(oof.sample("probs", i), s.sample("probs", i))
            assert oof.sample("labels", i) == s.sample("labels", i)
    with pytest.raises(UserError, match="both hold sample '2'"):
        concat([a, _class_set(tmp_path / "c", ["2", "6"], 2)])
    points = PredictionSet({"kind": "points", "arrays": {"points": {"file": "points.npy"}}}, ["9"],
                           {"points": np.zeros((1, 2, 2))})
    with pytest.raises(UserError, match="different kind"):
        concat([a, points])
