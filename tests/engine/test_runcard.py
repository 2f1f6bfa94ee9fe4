"""The run card (run.json): written by `podium train`, enough with config.yaml to rebuild the model
and predict after the training data is gone; older runs without it still rebuild from the data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from podium.cli import app
from podium.engine import runcard
from podium.errors import UserError

FOLDER = ["data=image_folder", "data.image_size=12", "model.width=4", "model.blocks=1", "trainer.max_epochs=1",
          "trainer.batch_size=4", "trainer.num_workers=0", "tracking=none", "trainer.progress_bar=false"]


def write_png(path: Path, value: int, size: int = 12) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((size, size, 3), value, np.uint8)
    arr[: size // 2, : size // 2] = 255 - value
    Image.fromarray(arr).save(path)


def folder_dataset(root: Path) -> None:
    # three classes, not the digits' ten: a head rebuilt without the card would not fit
    for split in ("train", "val"):
        for cls, value in (("cat", 40), ("dog", 130), ("owl", 220)):
            for i in range(3):
                write_png(root / split / cls / f"{i}.png", value + i)


def train_without_data(tmp: Path) -> Path:
    """A finished image-folder run under `tmp` whose training data has been deleted."""
    folder_dataset(tmp / "data")
    run_dir = tmp / "run"
    result = CliRunner().invoke(app, ["train", *FOLDER, f"data.root={tmp / 'data'}", f"run.dir={run_dir}"])
    assert result.exit_code == 0, result.output
    shutil.rmtree(tmp / "data")
    return run_dir


@pytest.fixture(scope="module")
def trained(card_run) -> Path:
    return card_run  # tests/conftest.py: train_without_data, trained once per worker (read only)


def test_train_writes_the_card(trained):
    card = json.loads((trained / "run.json").read_text())
    assert card["task"] == "classification" and card["model"] == "small_cnn"
    assert card["classes"] == ["cat", "dog", "owl"] and card["num_classes"] == 3
    assert card["model_kwargs"] == {"num_classes": 3, "in_chans": 3}
    assert card["input"]["size"] == [12, 12] and card["input"]["channels"] == 3
    assert card["output"]["kind"] == "class_probs"


def test_predict_works_without_the_training_data(trained, tmp_path):
    images = tmp_path / "images"
    write_png(images / "a.png", 40)
    write_png(images / "b.png", 220, size=30)  # any size: resized as in training
    out = tmp_path / "pred.csv"
    result = CliRunner().invoke(app, ["predict", str(trained), str(images), "--out", str(out)])
    assert result.exit_code == 0, result.output
    lines = out.read_text().splitlines()
    assert lines[0] == "id,label,prob_cat,prob_dog,prob_owl" and len(lines) == 3
    assert sum(float(x) for x in lines[1].split(",")[2:]) == pytest.approx(1.0, abs=1e-4)


def test_load_model_rebuilds_the_trained_weights_from_the_folder_alone(trained):
    task, model, card = runcard.load_model(trained, "best")
    assert card["classes"] == task.classes == ["cat", "dog", "owl"]
    saved = torch.load(trained / "checkpoints" / "best.pt", map_location="cpu", weights_only=True)["model"]
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, saved[key])
    assert not model.training
    with torch.no_grad():
        assert model(task.example_input()).shape == (1, 3)  # the card's input shape, no data read


def test_a_run_without_card_says_why_it_needs_the_data(trained, tmp_path):
    old = tmp_path / "old-run"
    shutil.copytree(trained, old)
    (old / "run.json").unlink()  # as a run from before run cards
    with pytest.raises(UserError, match="no run.json.*rebuilt from the training data"):
        runcard.load_model(old)
    out = tmp_path / "pred.csv"
    write_png(tmp_path / "a.png", 40)
    result = CliRunner().invoke(app, ["predict", str(old), str(tmp_path / "a.png"), "--out", str(out)])
    assert result.exit_code == 2 and "no run.json" in result.output, result.output


def test_a_damaged_card_is_a_user_error(tmp_path):
    (tmp_path / "run.json").write_text("{not json")
    with pytest.raises(UserError, match="run.json is not valid JSON"):
        runcard.read_card(tmp_path)
    (tmp_path / "run.json").write_text(json.dumps({"task": "classification"}))
    with pytest.raises(UserError, match="expected a run card"):
        runcard.read_card(tmp_path)
    (tmp_path / "run.json").write_text(json.dumps({"task": "t", "model": "m", "model_kwargs": {}, "format": 99}))
    with pytest.raises(UserError, match="upgrade podium"):
        runcard.read_card(tmp_path)
    assert runcard.read_card(tmp_path / "nowhere") is None


def test_a_card_of_another_model_is_refused(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    card = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**card, "model": "timm"}))
    with pytest.raises(UserError, match="describes task=classification model=timm"):
        runcard.load_model(run)


def test_a_changed_head_size_in_the_card_fails_on_the_checkpoint(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    card = json.loads((run / "run.json").read_text())
    card["model_kwargs"]["num_classes"] = 5
    (run / "run.json").write_text(json.dumps(card))
    with pytest.raises(UserError, match="does not fit this run's model"):
        runcard.load_model(run)



def test_load_model_gives_the_ema_weights_when_the_run_evaluates_with_them(trained, tmp_path):
    from torch.optim.swa_utils import AveragedModel

    from podium.engine.checkpoint import atomic_save

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    path = run / "checkpoints" / "best.pt"
    data = torch.load(path, map_location="cpu", weights_only=True)
    _, model, _ = runcard.load_model(run)
    ema = AveragedModel(model, use_buffers=True)
    with torch.no_grad():
        for p in ema.module.parameters():
            p.add_(1.0)  # weights the plain model does not have
    data["ema"] = ema.state_dict()
    atomic_save(data, path)
    _, plain, _ = runcard.load_model(run, overrides=["trainer.ema.enabled=false"])
    _, averaged, _ = runcard.load_model(run, overrides=["trainer.ema.enabled=true"])
    for key, value in averaged.state_dict().items():
        torch.testing.assert_close(value, ema.module.state_dict()[key])
        torch.testing.assert_close(plain.state_dict()[key], data["model"][key])


def test_every_command_names_the_checkpoints_a_run_has(trained, tmp_path):
    """predict, eval, export and serve share `checkpoint_path`: a misnamed checkpoint lists
    the run's own before anything is built."""
    with pytest.raises(UserError, match=r"no checkpoint 'epoch3'.*choose one of: best, last"):
        runcard.checkpoint_path(trained, "epoch3")
    with pytest.raises(UserError, match=r"checkpoint file .*nowhere\.pt does not exist"):
        runcard.checkpoint_path(trained, str(tmp_path / "nowhere.pt"))
    assert runcard.checkpoint_path(trained, "last") == trained / "checkpoints" / "last.pt"
    write_png(tmp_path / "a.png", 40)
    result = CliRunner().invoke(app, ["predict", str(trained), str(tmp_path / "a.png"), "--out",
                                      str(tmp_path / "p.csv"), "--checkpoint", "epoch3"])
    assert result.exit_code == 2 and "choose one of: best, last" in result.output, result.output
