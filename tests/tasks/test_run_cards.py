"""Every family's run card (Task.describe()): plain JSON with the keys readers rely on, and enough
to build the same model without the training data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from podium.config import compose
from podium.engine import registry

FAST = ["trainer.num_workers=0", "tracking=none", "trainer.progress_bar=false"]


def _pngs(folder: Path, count: int = 6, size: int = 40) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return folder


FAMILIES = {
    "classification": lambda tmp: ["experiment=digits", "data.image_size=16", "model.width=8", "model.blocks=2"],
    "segmentation": lambda tmp: ["experiment=seg_synthetic", f"data.root={tmp / 'gen'}", "data.count=4",
                                 "data.size=[48,48]", "data.val_count=1", "data.test_count=1",
                                 "data.patch_size=[32,32]", "model.decoder_channels=[32,16,16,8,8]",
                                 "task.window=[32,32]"],
    "landmarks": lambda tmp: ["experiment=landmarks_synthetic", "data.n_train=3", "data.n_val=2", "data.n_test=1",
                              "data.size=[48,40]", "data.image_size=[32,32]", "data.num_landmarks=3",
                              f"data.root={tmp / 'gen'}", f"data.cache_dir={tmp / 'cache'}",
                              "model.encoder=resnet10t", "model.encoder_depth=3",
                              "model.decoder_channels=[16,16,16]"],
    "reconstruction": lambda tmp: ["experiment=varnet_demo", "data.shape=[48,40]", "data.num_coils=4",
                                   "data.train_size=4", "data.val_slices=2", "model.cascades=1", "model.chans=4",
                                   "model.sens_chans=2", "model.pools=2", "model.sens_pools=2"],
    "moco": lambda tmp: ["experiment=moco_synthetic", "data.crop_size=[32,32]", "data.val_count=2",
                         "data.repeats=2", "model.backbone=resnet10t", f"data.root={_pngs(tmp / 'images')}",
                         "data.synthetic=0", "data.patterns=[*.png]"],
}
NAMES = {"classification": ("classes", "num_classes"), "segmentation": ("classes", "num_classes"),
         "landmarks": ("landmarks", "num_landmarks")}


def _task(family: str, tmp: Path):
    cfg = compose([*FAMILIES[family](tmp), *FAST])
    return registry.build("task", cfg.task.name, cfg)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_card_is_json_and_builds_the_same_model_without_data(family, tmp_path, monkeypatch):
    task = _task(family, tmp_path)
    task.build_datasets()
    card = task.describe()
    assert json.loads(json.dumps(card)) == card  # plain JSON: no tuples, tensors or numpy scalars
    assert {"format", "task", "model", "model_kwargs", "input", "output"} <= set(card)
    assert card["task"] == task.cfg.task.name and card["model"] == task.cfg.model.name
    assert {"kind", "meaning"} <= set(card["output"]) and "channels" in card["input"]
    if family in NAMES:
        names, count = NAMES[family]
        assert len(card[names]) == card[count] > 0
        assert "mean" in card["input"] and "std" in card["input"]
    from_data = task.build_model().state_dict()

    restored = _task(family, tmp_path)
    restored.use_card(json.loads(json.dumps(card)))

    def no_data():
        raise AssertionError("the model was built from the training data, not from the card")

    monkeypatch.setattr(restored, "build_datasets", no_data)
    from_card = restored.build_model().state_dict()
    assert {k: tuple(v.shape) for k, v in from_card.items()} == {k: tuple(v.shape) for k, v in from_data.items()}
    if family in NAMES:  # export traces this batch: the card gives its shape
        assert restored.example_input().shape == task.example_input().shape


# ---- predict from the run folder alone ---------------------------------------------------------


def _train_then_delete_data(tmp: Path, args: list[str]) -> Path:
    from typer.testing import CliRunner

    from podium.cli import app

    run_dir = tmp / "run"
    result = CliRunner().invoke(app, ["train", *args, *FAST, "trainer.max_epochs=1", "trainer.batch_size=4",
                                      f"run.dir={run_dir}"])
    assert result.exit_code == 0, result.output
    assert (run_dir / "run.json").is_file()
    return run_dir


def _predict(run_dir: Path, images: list[Path], out: Path):
    from typer.testing import CliRunner

    from podium.cli import app

    result = CliRunner().invoke(app, ["predict", str(run_dir), *map(str, images), "--out", str(out)])
    assert result.exit_code == 0, result.output
    import csv

    with out.open(newline="") as f:
        return list(csv.DictReader(f))


def test_segmentation_predicts_without_the_training_data(tmp_path):
    import shutil

    run_dir = _train_then_delete_data(tmp_path, FAMILIES["segmentation"](tmp_path) + ["data.patches_per_image=2"])
    (image,) = list((tmp_path / "gen").rglob("images/*"))[:1]
    kept = tmp_path / "input" / image.name
    kept.parent.mkdir()
    shutil.copy(image, kept)
    shutil.rmtree(tmp_path / "gen")
    rows = _predict(run_dir, [kept], tmp_path / "masks.csv")
    assert len(rows) == 1 and {"fraction_background", "fraction_vessel"} <= set(rows[0])
    assert Path(rows[0]["mask"]).is_file()


def test_landmarks_predict_without_the_data_decodes_as_the_evaluation(tmp_path):
    """heatmap_mse regresses heat, not logits: the decoder must learn that from the run's loss
    even though predicting from the card builds no loss for training. The points must equal
    those the training-time evaluation wrote (with the data and the loss built)."""
    import shutil

    run_dir = _train_then_delete_data(tmp_path, FAMILIES["landmarks"](tmp_path) + ["loss=heatmap_mse"])
    (test_dir,) = (tmp_path / "gen").glob("gen-*/test")
    kept = tmp_path / "input" / "0000.png"
    kept.parent.mkdir()
    shutil.copy(test_dir / "0000.png", kept)
    shutil.rmtree(tmp_path / "gen")
    shutil.rmtree(tmp_path / "cache")
    (row,) = _predict(run_dir, [kept], tmp_path / "points.csv")
    with (run_dir / "predictions" / "test.csv").open(newline="") as f:
        import csv

        evaluated = {r["id"]: r for r in csv.DictReader(f)}["test/0000.png"]  # generated ids carry their split
    for k in range(3):
        for a in ("x", "y"):
            assert float(row[f"L{k}_{a}_px"]) == pytest.approx(float(evaluated[f"L{k}_{a}"]), abs=0.02), (k, a)
