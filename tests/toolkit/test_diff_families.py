"""`Task.sample_image` for segmentation and landmarks: the picture behind a saved sample id (any
split, for out-of-fold sets); `podium diff` of two tiny segmentation runs (disagreeing pixels in
red on the pictures) and of two tiny landmark runs (both runs' points on the pictures).

    .venv/bin/python -m pytest -q tests/toolkit/test_diff_families.py
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from podium.cli import app
from podium.config import compose
from podium.engine import registry
from podium.engine.runcard import task_for_run

runner = CliRunner()
FAST = ["trainer.batch_size=4", "trainer.num_workers=0", "tracking=none", "trainer.progress_bar=false"]


def seg_args(tmp: Path, seed: int) -> list[str]:
    # tests/tasks/segmentation/test_e2e_segmentation.py's tiny settings, one epoch, no recon head
    return ["experiment=seg_synthetic", f"data.root={tmp / 'gen'}", "data.count=8", "data.size=[64,64]",
            "data.val_count=2", "data.test_count=2", "data.patch_size=[32,32]", "data.patches_per_image=2",
            "model.decoder_channels=[32,16,16,8,8]", "task.window=[32,32]", "trainer.max_epochs=1",
            f"seed={seed}", f"run.dir={tmp / f'seed{seed}'}", *FAST]


@pytest.fixture(scope="module")
def seg_runs(tmp_path_factory) -> list[Path]:
    tmp = tmp_path_factory.mktemp("seg-diff")
    for seed in (0, 1):
        result = runner.invoke(app, ["train", *seg_args(tmp, seed)])
        assert result.exit_code == 0, result.output
    return [tmp / "seed0", tmp / "seed1"]


def test_segmentation_sample_image_is_the_ids_picture_from_any_split(seg_runs):
    task = task_for_run(seg_runs[0])
    datasets = task.build_datasets()
    for split in ("test", "train"):
        record = datasets[split].records[0]
        image = task.sample_image("val", record.id)  # an id of another split is found too
        stored = np.asarray(Image.open(record.image_path).convert("RGB"))
        assert image.dtype == np.uint8 and image.shape == stored.shape == (64, 64, 3)
        assert np.abs(image.astype(int) - stored).mean() < 2  # the same picture, not a neighbour's
    assert task.sample_image("test", "no-such-id") is None


def test_podium_diff_of_two_segmentation_runs_draws_the_pictures(seg_runs, tmp_path):
    out = tmp_path / "diff"
    result = runner.invoke(app, ["diff", str(seg_runs[0]), str(seg_runs[1]), "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "diff.json").read_text())
    assert report["kind"] == "mask_probs" and report["grid_skipped"] is None, report.get("grid_skipped")
    grid = np.asarray(Image.open(out / "diff.png").convert("RGB")).astype(int)
    assert report["grid"] == str(out / "diff.png")
    red = (grid[..., 0] > 150) & (grid[..., 1] < 90) & (grid[..., 2] < 90)
    coloured = np.abs(grid[..., 0] - grid[..., 1]) + np.abs(grid[..., 1] - grid[..., 2]) > 30
    assert red.any() and (coloured & ~red).mean() > 0.05  # disagreement in red over the colour fundus pictures


LANDMARKS = ["experiment=landmarks_synthetic", "data.n_train=4", "data.n_val=2", "data.n_test=2", "data.size=[48,40]",
             "data.image_size=[32,32]", "data.num_landmarks=3", "model.encoder=resnet10t", "model.encoder_depth=3",
             "model.decoder_channels=[16,16,16]", "trainer.max_epochs=1", *FAST]


def test_landmarks_sample_image_is_the_original_picture(tmp_path):
    cfg = compose([*LANDMARKS, f"data.root={tmp_path / 'gen'}", f"data.cache_dir={tmp_path / 'cache'}"])
    task = registry.build("task", cfg.task.name, cfg)
    datasets = task.build_datasets()
    # ids are unique across the generated splits (val/0000.png, train/0003.png): the asked split
    # comes first, an id only another split holds is found there
    for split, asked in (("val", "val"), ("train", "test")):
        r = datasets[split].records[-1]
        assert split == asked or r.id not in {x.id for x in datasets[asked].records}
        image = task.sample_image(asked, r.id)
        stored = np.asarray(Image.open(r.image_path).convert("L"))
        assert image.dtype == np.uint8 and sorted(stored.shape) == [40, 48]  # the file, not the 32 x 32 input
        assert np.array_equal(image, stored)
    assert task.sample_image("val", "no-such-id") is None


def test_podium_diff_of_two_landmark_runs_draws_both_answers_on_the_pictures(tmp_path):
    runs = []
    for seed in (0, 1):
        runs.append(tmp_path / f"seed{seed}")
        result = runner.invoke(app, ["train", *LANDMARKS, f"data.root={tmp_path / 'gen'}", f"seed={seed}",
                                     f"data.cache_dir={tmp_path / 'cache'}", f"run.dir={runs[-1]}"])
        assert result.exit_code == 0, result.output
    out = tmp_path / "diff"
    result = runner.invoke(app, ["diff", *map(str, runs), "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "diff.json").read_text())
    assert report["kind"] == "points" and report["grid_skipped"] is None, report.get("grid_skipped")
    grid = np.asarray(Image.open(out / "diff.png").convert("RGB")).astype(int)
    cyan = (grid[..., 0] < 80) & (grid[..., 1] > 180) & (grid[..., 2] > 180)
    orange = (grid[..., 0] > 200) & (grid[..., 1] > 90) & (grid[..., 1] < 170) & (grid[..., 2] < 80)
    assert cyan.any() and orange.any()  # A's and B's points drawn on grey pictures
