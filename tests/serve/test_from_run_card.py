"""export and serve build the model from the run folder alone (config.yaml, run.json, the
checkpoint): the training data may be gone. A tiny three-class image-folder run is trained, its
folder deleted, then exported and served in-process; every family's serving hooks are checked
with a card and no data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from podium.cli import app
from podium.config import compose
from podium.engine import registry
from podium.serve.export import load_onnx_session, read_spec
from podium.serve.server import ServeConfig, build_server, load_backend, task_for_run
from tests.engine.test_runcard import write_png
from tests.tasks.test_run_cards import FAMILIES, FAST

CLASSES = ["cat", "dog", "owl"]


@pytest.fixture(scope="module")
def trained(card_run) -> Path:
    """A finished image-folder run whose training data has been deleted (tests/conftest.py, read only)."""
    return card_run


def png_bytes(path: Path, value: int) -> bytes:
    write_png(path, value)  # a picture like the training ones
    return path.read_bytes()


def test_export_onnx_without_the_training_data(trained, tmp_path):
    out = tmp_path / "onnx"
    result = CliRunner().invoke(app, ["export", str(trained), "--format", "onnx", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert read_spec(out)["output"]["classes"] == CLASSES
    probs = load_onnx_session(out, threads=1).run(None, {"image": np.zeros((2, 3, 12, 12), np.float32)})[0]
    assert probs.shape == (2, 3) and np.allclose(probs.sum(1), 1, atol=1e-5)


def test_server_answers_without_the_training_data(trained, tmp_path):
    server = build_server(trained, ServeConfig(isolate_export=False, threads=1))
    prepared = server.app.state.podium_reader.from_bytes(png_bytes(tmp_path / "owl.png", 220))
    assert prepared.image.shape == (3, 12, 12)
    api = server.lit_api
    api.setup("cpu")  # what a LitServe worker does: the exported ONNX graph in ONNX Runtime
    answer = api.encode_response(api.predict(prepared))
    assert answer["label"] in CLASSES and list(answer["probabilities"]) == CLASSES
    assert sum(answer["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    # the PyTorch backend gives the same probabilities
    task, run_torch = load_backend(trained, ServeConfig(backend="torch", threads=1))
    assert task.card is not None
    torch_probs = run_torch(prepared.image[None])[0]
    np.testing.assert_allclose(torch_probs, list(answer["probabilities"].values()), atol=1e-4)


def test_task_for_run_takes_names_from_the_card(trained):
    task = task_for_run(trained)
    assert task.card["classes"] == CLASSES
    assert task.serving_spec()["output"]["classes"] == CLASSES  # no data folder to read them from


def test_a_run_without_card_says_why_it_needs_its_data(trained, tmp_path):
    old = tmp_path / "old-run"
    shutil.copytree(trained, old)
    (old / "run.json").unlink()  # as a run from before run cards
    result = CliRunner().invoke(app, ["export", str(old), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "no run.json" in result.output, result.output


# ---- every family's serving hooks from a card, with the data gone ---------------------------


def _task_with_card(family: str, tmp: Path, monkeypatch):
    """(task built with its data, a fresh task given the first's card whose data cannot be read)."""
    cfg = compose([*FAMILIES[family](tmp), *FAST])
    trained = registry.build("task", cfg.task.name, cfg)
    trained.build_datasets()
    card = json.loads(json.dumps(trained.describe()))
    restored = registry.build("task", cfg.task.name, cfg)
    restored.use_card(card)

    def no_data():
        raise AssertionError("the training data was read, not the card")

    monkeypatch.setattr(restored, "build_datasets", no_data)
    return trained, restored


@pytest.mark.parametrize("family", ["classification", "segmentation", "landmarks"])
def test_image_families_serve_from_the_card(family, tmp_path, monkeypatch):
    trained, task = _task_with_card(family, tmp_path, monkeypatch)
    module = task.serving_module(task.build_model().eval())
    example = task.serving_example()
    assert example.shape == trained.serving_example().shape
    spec = task.serving_spec()
    assert spec["input"]["channels"] == example.shape[1]
    image = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 30, 26), dtype=np.uint8))
    if spec["input"]["channels"] == 1:
        image = image[:1]
    tensor, meta = task.serving_preprocess(image)
    with torch.no_grad():
        row = module(tensor[None].float())[0]
    answer = task.serving_postprocess(row, meta)
    json.dumps(answer)


def test_reconstruction_traces_the_card_shape_without_data(tmp_path, monkeypatch):
    from podium.tasks.reconstruction.serving import KspaceToImage

    trained, task = _task_with_card("reconstruction", tmp_path, monkeypatch)
    example = task.serving_example()
    assert example.shape == trained.serving_example().shape == (1, 4, 48, 40, 2)
    kspace, mask, low = task.example_input()
    assert mask.shape == trained.example_input()[1].shape and 0 < mask.sum() < mask.numel()
    assert int(low[0]) == task.card["input"]["example"]["low_frequencies"]
    with torch.no_grad():
        image = KspaceToImage(task.build_model().eval())(example)
    assert image.shape == (1, 48, 40) and torch.isfinite(image).all()
    assert task.serving_spec()["input"]["kind"] == "kspace"
    # a card written before `input.example`: a documented default shape
    del task.card["input"]["example"]
    assert task.serving_example().shape == (1, 4, 64, 64, 2)
