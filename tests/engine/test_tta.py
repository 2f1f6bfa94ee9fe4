"""Test-time augmentation (podium.engine.tta): views and their exact inverses, merging rules,
TTAModel on each family's outputs, the config keys, and `podium eval / predict / export` with
tta=... on a tiny digits run."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from typer.testing import CliRunner

from podium.cli import app
from podium.engine import tta
from podium.engine.tta import TTAModel, View, view_set
from podium.errors import UserError

D4 = view_set("d4")
SIZES = [(5, 7), (6, 4), (8, 8)]


# ---- views ----------------------------------------------------------------------------------

def test_view_sets_are_the_named_groups():
    assert [v.name for v in view_set("none")] == ["identity"]
    assert len(view_set("flips")) == 3 and len(D4) == 8 and len(set(D4)) == 8
    assert [v.scale for v in view_set("scales", [0.5, 1.0, 2.0])] == [0.5, 1.0, 2.0]
    with pytest.raises(UserError, match="tta='foo'.*none, flips, d4, scales"):
        view_set("foo")
    with pytest.raises(UserError, match="tta_scales"):
        view_set("scales", [0.0])


def test_the_config_choices_are_the_engines_view_sets():
    from podium.config import CHOICES

    assert CHOICES["tta"] == tta.VIEW_SETS and CHOICES["tta_merge"] == tta.MERGES


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("view", D4, ids=lambda v: v.name)
def test_every_d4_view_is_undone_exactly_for_maps_and_points(view, size):
    h, w = size
    images = torch.randn(2, 3, h, w)
    turned = view.apply(images)
    expected = torch.rot90(images.flip(-1) if view.hflip else images, view.quarter_turns, (-2, -1))
    assert torch.equal(turned, expected)  # the exportable turns are torch.rot90's
    assert torch.equal(view.invert_map(turned, (h, w)), images)
    # a point follows its pixel: mark one pixel, find it in the view, map it back
    for x, y in [(0, 0), (w - 1, 0), (1, h - 1), (w // 2, h // 3)]:
        marked = torch.zeros(1, 1, h, w)
        marked[0, 0, y, x] = 1
        row, col = (view.apply(marked)[0, 0] == 1).nonzero()[0].tolist()
        point = torch.tensor([[float(x), float(y)]])
        assert view.map_points(point, size).tolist() == [[col, row]]
        assert view.invert_points(torch.tensor([[float(col), float(row)]]), size).tolist() == [[x, y]]


@pytest.mark.parametrize("scale", [0.5, 0.75, 1.5])
def test_scaled_views_undo_points_and_keep_map_sizes(scale):
    view, size = View(scale=scale, hflip=True, quarter_turns=1), (16, 24)
    points = torch.tensor([[[0.0, 0.0], [23.0, 15.0], [7.25, 3.5]]])
    assert torch.allclose(view.invert_points(view.map_points(points, size, 8), size, 8), points, atol=1e-5)
    turned = view.apply(torch.randn(1, 2, *size), divisor=8)
    assert turned.shape[-1] % 8 == 0 and turned.shape[-2] % 8 == 0  # the encoder's multiple
    assert view.invert_map(turned, size).shape[-2:] == size
    # a smooth map survives the round trip up to interpolation
    ramp = torch.linspace(0, 1, 24).expand(1, 1, 16, 24)
    assert (view.invert_map(view.apply(ramp), size) - ramp).abs().max() < 0.05


# ---- merging --------------------------------------------------------------------------------

class FlipSensitive(nn.Module):
    """logits = log [0.9, 0.1] when the first pixel is 1 (unflipped), log [0.5, 0.5] otherwise."""

    def forward(self, x):
        a = x[:, 0, 0, 0:1]
        return a * torch.tensor([0.9, 0.1]).log() + (1 - a) * torch.tensor([0.5, 0.5]).log()


@pytest.mark.parametrize("merge, expected", [("mean", [0.7, 0.3]), ("geometric", [0.75, 0.25])])
def test_probabilities_merge_by_mean_or_geometric_mean(merge, expected):
    images = torch.tensor([[[[1.0, 0.0]]]])
    model = TTAModel(FlipSensitive(), [View(), View(hflip=True)], "class_logits", merge)
    probs = model(images).softmax(1)
    # geometric: sqrt(0.9 * 0.5) : sqrt(0.1 * 0.5) = 0.6708 : 0.2236 -> 0.75 : 0.25
    assert torch.allclose(probs, torch.tensor([expected]), atol=1e-6)


def test_binary_masks_merge_as_sigmoid_probabilities():
    logits = [torch.full((1, 1, 2, 2), 2.0), torch.full((1, 1, 2, 2), -1.0)]
    model = TTAModel(nn.Identity(), [View()], "mask_logits", "mean")
    probs = [torch.sigmoid(v) for v in logits]
    mean = torch.sigmoid(model.merge_views("mask_logits", probs))
    assert torch.allclose(mean, (probs[0] + probs[1]) / 2, atol=1e-6)
    model.merge = "geometric"  # normalised geometric mean of (p, 1 - p) = sigmoid(mean logit)
    assert torch.allclose(model.merge_views("mask_logits", probs), torch.full((1, 1, 2, 2), 0.5), atol=1e-5)


def test_undescribed_outputs_and_kinds_are_refused():
    model = TTAModel(lambda x: {"logits": x, "extra": x}, D4, {"logits": "mask_logits"})
    with pytest.raises(ValueError, match="'extra'"):
        model(torch.randn(1, 2, 4, 4))
    with pytest.raises(ValueError, match="unknown kind"):
        TTAModel(nn.Identity(), D4, "probabilities")
    with pytest.raises(UserError, match="tta_merge"):
        TTAModel(nn.Identity(), D4, "class_logits", merge="median")


# ---- families' outputs ----------------------------------------------------------------------

class PooledClassifier(nn.Module):
    """1x1 conv, global average pool: invariant to every flip and turn by construction."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.conv(x).mean((2, 3))


class PointwiseSegmenter(nn.Module):
    """1x1 convs: masks and reconstructions move with the image (equivariant)."""

    divisor = 1

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.seg, self.rec = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return {"logits": self.seg(x), "recon": self.rec(x)}


class BrightestPoint(nn.Module):
    """(x, y) of the intensity-weighted centre (equivariant) and stride-2 heatmaps."""

    output_stride = 2

    def __init__(self, with_points: bool = True):
        super().__init__()
        self.with_points = with_points

    def forward(self, x):
        b, _, h, w = x.shape
        weights = x[:, 0].flatten(1).softmax(1).reshape(b, h, w)
        xs = torch.arange(w, dtype=x.dtype)
        ys = torch.arange(h, dtype=x.dtype)
        point = torch.stack([(weights.sum(1) * xs).sum(1), (weights.sum(2) * ys).sum(1)], -1)
        heat = nn.functional.avg_pool2d(x[:, :1], 2)
        out = {"heatmaps": heat.expand(b, 2, -1, -1), "sigma": torch.ones(2)}
        return {"points": point[:, None].expand(b, 2, 2), **out} if self.with_points else out


def task_outputs(name: str):
    from podium.engine import registry

    return registry.get("task", name).factory.tta_outputs(None)  # a hook that reads nothing of self


@pytest.mark.parametrize("merge", ["mean", "geometric"])
def test_an_invariant_classifier_answers_the_same_with_d4(merge):
    model, images = PooledClassifier(), torch.randn(3, 3, 10, 6)
    wrapped = TTAModel(model, D4, task_outputs("classification"), merge)
    assert torch.allclose(wrapped(images).softmax(1), model(images).softmax(1), atol=1e-6)


def test_multi_scale_views_feed_the_classifier_resized_inputs():
    model, images = PooledClassifier(), torch.rand(2, 3, 16, 16)
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape[-2:])))
    wrapped = TTAModel(model, view_set("scales", [0.5, 1.0, 1.5]), task_outputs("classification"))
    probs = wrapped(images).softmax(1)
    assert seen == [(8, 8), (16, 16), (24, 24)]
    # a pooled 1x1 conv sees nearly the same mean colour at every scale
    assert torch.allclose(probs, model(images).softmax(1), atol=2e-2)


def test_segmentation_masks_are_mapped_back_through_the_sliding_window():
    from podium.tasks.segmentation.inference import predict_probabilities

    model, images = PointwiseSegmenter(), torch.randn(2, 3, 12, 20)
    wrapped = TTAModel(model, D4, task_outputs("segmentation"))
    plain = predict_probabilities(model, images, (8, 12), overlap=0.5)
    with_tta = predict_probabilities(wrapped, images, (8, 12), overlap=0.5)  # non-square windows turn
    assert torch.allclose(with_tta, plain, atol=1e-5)
    out = wrapped(images)
    assert torch.allclose(out["recon"], model(images)["recon"], atol=1e-5)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's note on the classic exporter
def test_d4_on_non_square_maps_exports_to_onnx(tmp_path):
    import onnxruntime

    wrapped = TTAModel(PointwiseSegmenter(), D4, task_outputs("segmentation")).eval()
    images = torch.randn(2, 3, 8, 12)
    path = tmp_path / "seg.onnx"
    torch.onnx.export(LogitsOnly(wrapped), (images,), str(path), opset_version=17,
                      dynamo=False, input_names=["image"], dynamic_axes={"image": {0: "batch"}})
    got = onnxruntime.InferenceSession(str(path)).run(None, {"image": images[:1].numpy()})[0]
    with torch.no_grad():
        assert np.abs(got - wrapped(images[:1])["logits"].numpy()).max() < 1e-5


class LogitsOnly(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)["logits"]


def test_a_position_dependent_mask_is_averaged_in_the_original_frame():
    def left_half(x):  # marks the left half of whatever it is shown, as logits for class 1
        logits = torch.zeros(x.shape[0], 2, *x.shape[-2:])
        logits[:, 1, :, : x.shape[-1] // 2] = 50.0
        logits[:, 0, :, x.shape[-1] // 2:] = 50.0
        return {"logits": logits}

    # identity marks the left half, hflip the right half, vflip (hflip + 2 turns) the left half
    probs = TTAModel(left_half, view_set("flips"), {"logits": "mask_logits"})(torch.zeros(1, 3, 4, 6))["logits"]
    foreground = probs.softmax(1)[0, 1]
    assert torch.allclose(foreground[:, :3], torch.full((4, 3), 2 / 3), atol=1e-5)
    assert torch.allclose(foreground[:, 3:], torch.full((4, 3), 1 / 3), atol=1e-5)


def test_landmark_points_and_heatmaps_are_mapped_back():
    from podium.tasks.landmarks.task import LandmarkTask

    images = torch.zeros(1, 1, 8, 12)
    images[0, 0, 2, 9] = 30.0  # one bright pixel at (x=9, y=2)
    model = BrightestPoint()
    wrapped = TTAModel(model, D4, task_outputs("landmarks"))
    assert wrapped.output_stride == 2 and wrapped.divisor == 2
    out, plain = wrapped(images), model(images)
    assert torch.allclose(out["points"], plain["points"], atol=1e-4)
    assert torch.allclose(out["heatmaps"], plain["heatmaps"], atol=1e-6)  # stride-2 maps turn back exactly
    # decoded the way the task decodes heatmaps (the stride read from the wrapper)
    task = LandmarkTask(OmegaConf.create({"task": {"decode": "argmax", "decode_window": 5}}))
    heat_only = BrightestPoint(with_points=False)
    decoded = task._points_once(TTAModel(heat_only, D4, task_outputs("landmarks")), images)
    assert torch.allclose(decoded, task._points_once(heat_only, images), atol=1e-4)
    assert decoded[0, 0].tolist() == [8.5, 2.5]  # the 2x2 cell around (9, 2), in input pixels


def test_a_corner_point_averages_to_the_centre_over_d4():
    def corner(x):  # always answers the view's top-left pixel
        return {"points": torch.zeros(x.shape[0], 1, 2)}

    points = TTAModel(corner, D4, {"points": "points"})(torch.zeros(1, 1, 5, 9))["points"]
    assert points[0, 0].tolist() == [4.0, 2.0]  # ((9 - 1) / 2, (5 - 1) / 2)


def test_reconstruction_refuses_tta_with_the_reason():
    from podium.engine import registry

    task = object.__new__(registry.get("task", "reconstruction").factory)
    cfg = OmegaConf.create({"tta": "d4"})
    with pytest.raises(UserError, match="tta=d4.*k-space.*tta=none"):
        tta.check(cfg, task)
    assert tta.wrap(model := nn.Identity(), OmegaConf.create({"tta": "none"}), task) is model


# ---- the CLI on a tiny digits run -----------------------------------------------------------

TINY = ["experiment=digits", "data.image_size=16", "model.width=8", "model.blocks=2", "trainer.max_epochs=1",
        "trainer.num_workers=0", "tracking=none", "trainer.progress_bar=false", "data.augment=[]"]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("tta") / "run"
    result = CliRunner().invoke(app, ["train", *TINY, f"run.dir={run_dir}"])
    assert result.exit_code == 0, result.output
    return run_dir


def eval_probs(run_dir, overrides):
    result = CliRunner().invoke(app, ["eval", str(run_dir), "--split", "test", *overrides])
    assert result.exit_code == 0, result.output
    folders = [p for p in (run_dir / "eval").iterdir()
               if json.loads((p / "eval.json").read_text())["overrides"] == overrides]
    assert len(folders) == 1
    metrics = json.loads((folders[0] / "metrics.json").read_text())
    with (folders[0] / "predictions" / "test.csv").open() as f:
        rows = list(csv.DictReader(f))
    probs = np.array([[float(v) for k, v in r.items() if k.startswith("prob_")] for r in rows])
    return metrics, probs


def test_podium_eval_with_d4_writes_its_own_metrics_and_differs(digits_run):
    metrics_none, probs_none = eval_probs(digits_run, [])
    metrics_d4, probs_d4 = eval_probs(digits_run, ["tta=d4"])
    assert "test/macro_f1" in metrics_d4 and math.isfinite(metrics_d4["test/macro_f1"])
    assert probs_none.shape == probs_d4.shape and np.allclose(probs_d4.sum(1), 1, atol=1e-4)
    assert np.abs(probs_d4 - probs_none).max() > 1e-3  # digits are not rotation invariant
    _, probs_geo = eval_probs(digits_run, ["tta=d4", "tta_merge=geometric"])
    assert np.abs(probs_geo - probs_d4).max() > 1e-4


def test_predict_uses_the_tta_override(digits_run, tmp_path):
    from PIL import Image

    image = tmp_path / "x.png"
    Image.fromarray((np.arange(64).reshape(8, 8) * 4).astype(np.uint8)).save(image)
    rows = {}
    for name, extra in (("none", []), ("d4", ["-o", "tta=d4"])):
        out = tmp_path / f"{name}.csv"
        result = CliRunner().invoke(app, ["predict", str(digits_run), str(image), "--out", str(out), *extra])
        assert result.exit_code == 0, result.output
        rows[name] = next(csv.DictReader(out.open()))
    probs = {k: np.array([float(v) for c, v in r.items() if c.startswith("prob_")]) for k, r in rows.items()}
    assert np.abs(probs["d4"] - probs["none"]).max() > 1e-4


def test_a_run_from_before_tta_takes_the_override(digits_run, tmp_path):
    import shutil

    import yaml

    old = tmp_path / "old"
    shutil.copytree(digits_run, old, ignore=shutil.ignore_patterns("eval"))
    cfg = yaml.safe_load((old / "config.yaml").read_text())
    for key in ("tta", "tta_merge", "tta_scales"):
        cfg.pop(key)
    (old / "config.yaml").write_text(yaml.safe_dump(cfg))
    _, probs_none = eval_probs(old, [])
    _, probs_flips = eval_probs(old, ["tta=flips"])
    assert np.abs(probs_flips - probs_none).max() > 1e-4


def test_bad_tta_values_exit_2_naming_the_key(digits_run, tmp_path):
    result = CliRunner().invoke(app, ["eval", str(digits_run), "tta=foo"])
    assert result.exit_code == 2 and "tta='foo'" in result.output and "d4" in result.output
    result = CliRunner().invoke(app, ["train", *TINY, "tta_merge=median", f"run.dir={tmp_path / 'r'}"])
    assert result.exit_code == 2 and "tta_merge" in result.output


def test_reconstruction_with_d4_exits_2_before_training(tmp_path):
    result = CliRunner().invoke(app, ["train", "experiment=varnet_demo", "tta=d4", "tracking=none",
                                      f"run.dir={tmp_path / 'r'}"])
    assert result.exit_code == 2, result.output
    assert "tta=d4" in result.output and "k-space" in result.output
    assert not (tmp_path / "r" / "checkpoints" / "last.pt").exists()


def test_export_with_flips_matches_the_pytorch_tta_model(digits_run, tmp_path):
    from rich.console import Console

    from podium.engine.session import trainer_for_run
    from podium.engine.parallel import unwrap as _unwrap
    from podium.serve.export import export_run, load_serving_module, parity, read_spec

    folder = export_run(digits_run, "onnx", tmp_path / "onnx", overrides=["tta=flips"])
    spec = read_spec(folder)
    assert spec["tta"]["views"] == "flips" and len(spec["tta"]["view_names"]) == 3
    batch = torch.randn(3, spec["input"]["channels"], 16, 16)
    assert parity(folder, batch, run_dir=digits_run)["max_abs"] < 1e-5  # the PyTorch graph, same TTA
    trainer, _ = trainer_for_run(digits_run, ["trainer.accelerator=cpu", "tta=flips"], Console(stderr=True), "best",
                                 with_data=False)
    reference = TTAModel(_unwrap(trainer.eval_model(tta=False)).eval(), view_set("flips"), "class_logits")
    with torch.no_grad():
        expected = reference(batch).softmax(1)
        _, plain = load_serving_module(digits_run)
        assert parity(folder, batch, module=lambda x: expected)["max_abs"] < 1e-5
        assert (plain(batch) - expected).abs().max() > 1e-4  # the export did apply the flips
    ts = export_run(digits_run, "torchscript", tmp_path / "ts", overrides=["tta=d4"])
    assert parity(ts, batch, run_dir=digits_run)["max_abs"] < 1e-5


def test_cli_export_and_the_torch_serving_backend_take_the_tta_override(digits_run, tmp_path):
    import json

    import numpy as np

    from podium.serve.export import load_serving_module
    from podium.serve.server import ServeConfig, load_backend

    result = CliRunner().invoke(app, ["export", str(digits_run), "--format", "onnx", "--out", str(tmp_path / "x"),
                                      "-o", "tta=flips"])
    assert result.exit_code == 0, result.output
    spec = json.loads((tmp_path / "x" / "preprocess.json").read_text())
    assert spec["tta"]["views"] == "flips" and spec["overrides"] == ["tta=flips"]

    batch = np.random.default_rng(0).normal(size=(2, spec["input"]["channels"], 16, 16)).astype(np.float32)
    _, served = load_backend(digits_run, ServeConfig(backend="torch", overrides=("tta=flips",)))
    _, plain = load_backend(digits_run, ServeConfig(backend="torch"))
    _, module = load_serving_module(digits_run, overrides=["tta=flips"])
    with torch.no_grad():
        expected = module(torch.from_numpy(batch)).numpy()
    assert np.abs(served(batch) - expected).max() < 1e-5
    assert np.abs(plain(batch) - expected).max() > 1e-4
