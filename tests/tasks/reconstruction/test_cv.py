"""Reconstruction cross-validation: one key per slice, folds grouped by volume (the default; any
other grouping refused), the fold's train part with the training masks and its held-out part
with the evaluation bank, for simulated and fastMRI data; and a tiny `podium cv` on simulated
k-space whose out-of-fold set holds every pool volume once and is scored.

    .venv/bin/python -m pytest -q tests/tasks/reconstruction/test_cv.py
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from typer.testing import CliRunner

from podium.cli import app
from podium.config import compose
from podium.engine import registry
from podium.engine.folds import apply_fold, make_folds, pool_keys
from podium.engine.predictions import read_predictions
from podium.errors import UserError
from podium.tasks.reconstruction import readers
from podium.tasks.reconstruction.cv import TrainFold
from podium.tasks.reconstruction.data import SliceDataset
from podium.tasks.reconstruction.simulated_data import SimulatedSlices
from tests.conftest import VARNET_TINY


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """Ten small textured ellipses as the simulation source (the MNI template takes seconds to
    load): 8 train images -> 4 pool volumes of 2 slices, 2 val images -> 1 val volume."""
    folder = tmp_path_factory.mktemp("recon-cv-source")
    y, x = np.mgrid[:40, :32]
    for i in range(10):
        rng = np.random.default_rng(i)
        head = (((y - 20) / (14 + i % 3)) ** 2 + ((x - 16) / 11) ** 2 < 1).astype(np.float32)
        np.save(folder / f"img{i:02d}.npy", head * (0.6 + 0.4 * rng.random((40, 32), dtype=np.float32)))
    return folder


def simulated(source: Path, tmp: Path, *extra: str) -> list[str]:
    return [*VARNET_TINY, f"data.source={source}", f"data.cache_dir={tmp / 'cache'}", f"run.dir={tmp / 'run'}",
            *extra]


def task_for(overrides):
    cfg = compose(overrides)
    return cfg, registry.build("task", cfg.task.name, cfg)


def volume_of(sample_id: str) -> str:
    return sample_id.split(":")[0]


def test_keys_are_slices_and_folds_keep_each_volume_whole(source, tmp_path):
    cfg, task = task_for(simulated(source, tmp_path))
    keys, picks = pool_keys(task, task.build_datasets())
    assert cfg.cv.group_by == "volume"  # the family's default, recorded in the run's config
    volumes = {k["volume"] for k in keys}
    assert volumes == {"train_000", "train_001", "train_002", "train_003", "val_000"}
    assert all(k["id"].startswith(k["volume"] + ":") for k in keys) and len(keys) == 10
    splits = make_folds(keys, 2, seed=0, group_by=cfg.cv.group_by)
    held = [{volume_of(i) for i in splits["ids"][str(f)]} for f in range(2)]
    assert held[0].isdisjoint(held[1]) and held[0] | held[1] == volumes


def test_another_grouping_is_refused(source, tmp_path):
    _, task = task_for(simulated(source, tmp_path, "cv.group_by=anatomy"))
    with pytest.raises(UserError, match="grouped by volume"):
        pool_keys(task, task.build_datasets())


def masks_of(dataset, index, times=2):
    return [dataset[index]["mask"].reshape(-1).numpy() for _ in range(times)]


def test_simulated_fold_trains_on_fresh_masks_and_holds_out_fixed_ones(source, tmp_path):
    cfg, task = task_for(simulated(source, tmp_path, "cv.folds=2", "cv.fold=0"))
    original = task.build_datasets()
    keys, _ = pool_keys(task, original)
    datasets = apply_fold(task, dict(original), cfg.cv)
    train, val = datasets["train"], datasets["val"]
    # held out: materialised pool volumes (+ maybe val_000), every slice at 4x and 8x, seeded masks
    assert isinstance(val, SliceDataset) and not val.policy.train and val.copies == 2
    held_volumes = {Path(info.path).stem for info, _ in val.slices}
    assert len(val) == 2 * len(val.slices) and task.cv_fold["val"] == len(val.slices)
    first, again = masks_of(val, 0)
    assert np.array_equal(first, again) and int(val[0]["acceleration"]) == 4 and int(val[1]["acceleration"]) == 8
    # trained on: fresh simulations of the kept images only, training masks (random each draw)
    parts = train.datasets if isinstance(train, TrainFold) else [train]
    sims = [p for p in parts if isinstance(p, SimulatedSlices)][0]
    assert sims.policy.train and len(sims.images) == 8 - 2 * len([v for v in held_volumes if v.startswith("train")])
    kept = {volume_of(k["id"]) for k in keys} - held_volumes
    assert kept and kept.isdisjoint(held_volumes)
    torch.manual_seed(0)
    drawn = {tuple(sims[0]["mask"].reshape(-1).numpy()) for _ in range(4)}
    assert len(drawn) > 1  # a new mask every draw
    for part in parts:
        if isinstance(part, SliceDataset):  # the val volume, when kept, trains with training masks
            assert part.policy.train and {Path(i.path).stem for i, _ in part.slices} == {"val_000"}


def write_volumes(folder: Path, names: list[str], slices=2, coils=2, h=24, w=20):
    folder.mkdir(parents=True)
    y, x = np.mgrid[:h, :w]
    for n, name in enumerate(names):
        rng = np.random.default_rng(n)
        image = (((y - h / 2) / 8) ** 2 + ((x - w / 2) / 7) ** 2 < 1) * (1 + rng.random((slices, 1, h, w)))
        kspace = np.fft.fftshift(np.fft.fft2(image * np.ones((1, coils, 1, 1))), axes=(-2, -1)).astype(np.complex64)
        readers.write_fastmri_h5(folder / f"{name}.h5", kspace, np.abs(image[:, 0]).astype(np.float32))


def test_fastmri_fold_pools_both_splits_by_volume(tmp_path):
    write_volumes(tmp_path / "train", ["file_a", "file_b", "file_c"])
    write_volumes(tmp_path / "val", ["file_d"])
    data = {"name": "fastmri", "train": str(tmp_path / "train"), "val": str(tmp_path / "val"),
            "cache_dir": str(tmp_path / "cache"), "mask": {"type": "equispaced_fraction", "center_fractions": [0.2],
                                                           "accelerations": [2]}}
    cfg = OmegaConf.create({"task": {"name": "reconstruction"}, "data": data, "seed": 0,
                            "cv": {"folds": 2, "fold": 1, "group_by": None, "splits": None, "seed": 0}})
    task = registry.build("task", "reconstruction", cfg)
    original = task.build_datasets()
    keys, _ = pool_keys(task, original)
    assert [k["id"] for k in keys] == [f"file_{v}:{s}" for v in "abcd" for s in range(2)]
    datasets = apply_fold(task, dict(original), cfg.cv)
    train, val = datasets["train"], datasets["val"]
    held = {Path(i.path).stem for i, _ in val.slices}
    trained = {Path(i.path).stem for i, _ in train.slices}
    assert held and trained and held.isdisjoint(trained) and held | trained == {"file_a", "file_b", "file_c", "file_d"}
    assert len(val.slices) == 2 * len(held) and len(train.slices) == 2 * len(trained)  # whole volumes
    assert not val.policy.train and val.policy is original["val"].policy
    assert train.policy.train and train.policy is original["train"].policy
    for dataset in (train, val):  # every picked slice loads, its volume index names its file
        for i in range(len(dataset)):
            sample = dataset[i]
            info, s = dataset.slices[i // dataset.copies]
            assert dataset.volume_names[int(sample["volume"])] == str(info.path) and int(sample["slice"]) == s


def test_podium_cv_on_simulated_kspace_covers_every_volume_once(source, tmp_path):
    out = tmp_path / "cv"
    args = [a for a in simulated(source, tmp_path) if not a.startswith("run.dir=")]
    result = CliRunner().invoke(app, ["cv", *args, "cv.folds=2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    splits = json.loads((out / "splits.json").read_text())
    assert splits["group_by"] == "volume" and splits["method"].startswith("GroupKFold")
    volumes = {volume_of(i) for i in splits["pool"]}
    oof = read_predictions(out / "predictions" / "oof")
    assert sorted(oof.ids) == sorted(f"{v}_acc{a}" for v in volumes for a in (4, 8))  # each volume once
    report = json.loads((out / "cv.json").read_text())
    assert report["oof"]["count"] == len(oof.ids) and 0 < report["oof"]["scores"]["ssim"] <= 1
    for k in range(2):
        fold = read_predictions(out / f"fold_{k}" / "predictions" / "val")
        assert {i.rsplit("_acc", 1)[0] for i in fold.ids} == {volume_of(i) for i in splits["ids"][str(k)]}
