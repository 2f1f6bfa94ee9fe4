"""podium.serve.export on a tiny trained digits run: ONNX / TorchScript / Triton exports agree
with PyTorch on real images at several batch sizes, the Triton repository is laid out and
configured as Triton expects, preprocess.json lets a client (PIL + numpy only) rebuild the model
input, and mistakes raise UserError without leaving half a folder behind."""

from __future__ import annotations

import io
import json
import re
import shutil

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from podium.cli import app
from podium.common.images import decode_image_bytes
from podium.errors import UserError
from podium.serve import export as ex
from podium.serve.export import export_run, load_onnx_session, load_serving_module, parity
from podium.tasks.classification.task import ClassificationTask


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, digits_run):
    # tests/conftest.py's DIGITS_TINY run, copied under a name Triton needs sanitised
    return shutil.copytree(digits_run, tmp_path_factory.mktemp("export") / "Digits-Run.1")


@pytest.fixture(scope="module")
def exports(run_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    return {fmt: export_run(run_dir, fmt, root / fmt) for fmt in ex.FORMATS}


@pytest.fixture(scope="module")
def served(run_dir):
    return load_serving_module(run_dir)  # (task, PyTorch serving module)


@pytest.fixture(scope="module")
def val_batch(served):
    """Eight real validation digits, as the evaluation loader gives them."""
    val = served[0].build_datasets()["val"]
    return torch.stack([val[i][0] for i in range(8)])


def test_onnx_matches_pytorch_on_real_images_at_any_batch_size(exports, served, val_batch):
    task, module = served
    model = onnx.load(str(exports["onnx"] / "model.onnx"))
    (graph_input,), (graph_output,) = model.graph.input, model.graph.output
    assert graph_input.name == "image" and graph_output.name == "probabilities"
    assert graph_input.type.tensor_type.shape.dim[0].dim_param  # a named, dynamic batch axis
    spec = json.loads((exports["onnx"] / "preprocess.json").read_text())
    assert spec["opset"] == 17 == model.opset_import[0].version and spec["format"] == "onnx"

    for rows in (1, 5, 8):
        assert parity(exports["onnx"], val_batch[:rows], module=module)["max_abs"] < 1e-4
    session = load_onnx_session(exports["onnx"], threads=1)
    probs = session.run(None, {"image": val_batch.numpy()})[0]
    with torch.no_grad():
        expected = module(val_batch).numpy()
    np.testing.assert_allclose(probs, expected, atol=1e-4)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    answer = task.serving_postprocess(torch.from_numpy(probs[0]), {})
    assert answer["label"] == str(int(expected[0].argmax()))


def test_torchscript_matches_pytorch(exports, served, val_batch):
    assert sorted(p.name for p in exports["torchscript"].iterdir()) == [ex.MARKER_FILE, "model.pt", "preprocess.json"]
    for rows in (1, 5):
        assert parity(exports["torchscript"], val_batch[:rows], module=served[1])["max_abs"] < 1e-5
    scripted = ex.load_torchscript(exports["torchscript"])
    with torch.no_grad():
        torch.testing.assert_close(scripted(val_batch), served[1](val_batch), atol=1e-5, rtol=0)


def pbtxt_block(text: str, name: str) -> str:
    match = re.search(rf"^{name} [\[{{](.*?)^[\]}}]", text, re.DOTALL | re.MULTILINE)
    assert match, f"no {name} block in:\n{text}"
    return match.group(1)


def test_triton_repository_layout_and_config(run_dir, exports, served, val_batch):
    repo = exports["triton"].parent
    assert exports["triton"] == repo / "digits_run_1"
    files = sorted(str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file())
    assert files == ["digits_run_1/.podium-export.json", "digits_run_1/1/model.onnx", "digits_run_1/config.pbtxt",
                     "digits_run_1/preprocess.json"]
    text = (exports["triton"] / "config.pbtxt").read_text()
    assert re.search(r'^name: "digits_run_1"$', text, re.MULTILINE)
    assert re.search(r'^platform: "onnxruntime_onnx"$', text, re.MULTILINE)
    assert re.search(r"^max_batch_size: 8$", text, re.MULTILINE)
    inputs, outputs = pbtxt_block(text, "input"), pbtxt_block(text, "output")
    assert 'name: "image"' in inputs and "data_type: TYPE_FP32" in inputs and "dims: [ 3, 16, 16 ]" in inputs
    assert 'name: "probabilities"' in outputs and "data_type: TYPE_FP32" in outputs and "dims: [ 10 ]" in outputs
    batching = pbtxt_block(text, "dynamic_batching")
    assert "preferred_batch_size: [ 4, 8 ]" in batching and "max_queue_delay_microseconds: 5000" in batching
    group = pbtxt_block(text, "instance_group")
    assert "count: 1" in group and "kind: KIND_CPU" in group
    assert text.count("{") == text.count("}") and text.count("[") == text.count("]")
    assert parity(exports["triton"], val_batch[:5], module=served[1])["max_abs"] < 1e-4

    # a second model joins the same repository; the first is left alone
    second = export_run(run_dir, "triton", repo, model_name="digits", max_batch_size=16,
                        preferred_batch_sizes=(2, 16), max_queue_delay_us=100, instances=2)
    text2 = (second / "config.pbtxt").read_text()
    assert "max_batch_size: 16" in text2 and "preferred_batch_size: [ 2, 16 ]" in text2
    assert "max_queue_delay_microseconds: 100" in text2 and "count: 2" in pbtxt_block(text2, "instance_group")
    assert (repo / "digits_run_1" / "config.pbtxt").read_text() == text


def client_preprocess(data: bytes, spec: dict) -> np.ndarray:
    """What a client without podium does with preprocess.json: PIL and numpy only."""
    for step in spec["preprocess"]:
        if step["op"] == "decode":
            image = Image.open(io.BytesIO(data)).convert(step["mode"])
        elif step["op"] == "resize":
            assert step["interpolation"] == "bilinear"
            height, width = step["size"]
            image = image.resize((width, height), Image.BILINEAR)  # PIL antialiases when shrinking
        elif step["op"] == "scale":
            x = np.asarray(image, np.float32) * np.float32(step["factor"])
            x = x[..., None] if x.ndim == 2 else x
        elif step["op"] == "normalize":
            x = (x - np.float32(step["mean"])) / np.float32(step["std"])
        else:
            raise AssertionError(f"unknown step {step}")
    return x.transpose(2, 0, 1)


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_preprocess_json_lets_a_client_reproduce_the_model_input(run_dir, exports, served, val_batch):
    task, module = served
    spec = json.loads((exports["onnx"] / "preprocess.json").read_text())
    assert spec["task"] == "classification" and spec["output"]["classes"] == [str(d) for d in range(10)]
    (normalize,) = [s for s in spec["preprocess"] if s["op"] == "normalize"]
    assert normalize["mean"] == [0.5] * 3 and normalize["std"] == [0.5] * 3
    # names, not the exporting machine's folders (the run lies outside the cwd: its name only)
    assert spec["checkpoint"] == "best" and spec["run"] == spec["exported_from"] == "Digits-Run.1"
    assert str(run_dir.parent) not in (exports["onnx"] / "preprocess.json").read_text()
    assert spec["input_name"] == "image" and spec["output_name"] == "probabilities" and spec["podium_version"]

    # The real 8 x 8 digits as grayscale PNG uploads, enlarged to 16 x 16: PIL's bilinear resize
    # and torchvision's uint8 one agree exactly when enlarging.
    val = task.build_datasets()["val"]
    client, served_inputs = [], []
    for i in range(8):
        digit = val.images[i][0].numpy()
        data = png_bytes(digit)
        x, _ = task.serving_preprocess(decode_image_bytes(data, channels=3))
        served_inputs.append(x)
        client.append(client_preprocess(data, spec))
    served_inputs, client = torch.stack(served_inputs), np.stack(client)
    torch.testing.assert_close(served_inputs, val_batch, atol=1e-6, rtol=0)  # one path: eval = serving
    np.testing.assert_allclose(client, val_batch.numpy(), atol=1e-3)
    probs = load_onnx_session(exports["onnx"]).run(None, {"image": client})[0]
    with torch.no_grad():
        np.testing.assert_allclose(probs, module(val_batch).numpy(), atol=1e-4)

    # Shrinking: PIL and torchvision's antialiased filters round differently by at most one
    # uint8 level, i.e. 1/255/std after normalisation; exact reproduction is not possible here.
    photo = np.random.default_rng(0).integers(0, 256, (40, 52, 3), dtype=np.uint8)
    x, _ = task.serving_preprocess(decode_image_bytes(png_bytes(photo), channels=3))
    np.testing.assert_allclose(client_preprocess(png_bytes(photo), spec), x.numpy(), atol=1 / 255 / 0.5 + 1e-5)


def test_mistakes_raise_user_error(run_dir, tmp_path):
    with pytest.raises(UserError, match="onnx, torchscript, triton"):
        export_run(run_dir, "tflite", tmp_path / "a")
    with pytest.raises(UserError, match="best, last"):
        export_run(run_dir, "onnx", tmp_path / "a", checkpoint="epoch3")
    with pytest.raises(UserError, match="does not exist"):
        export_run(tmp_path / "no-such-run", "onnx", tmp_path / "a")
    with pytest.raises(UserError, match="preferred batch sizes"):
        export_run(run_dir, "triton", tmp_path / "a", max_batch_size=4, preferred_batch_sizes=(4, 8))
    with pytest.raises(UserError, match="opset"):
        export_run(run_dir, "onnx", tmp_path / "a", opset=9)
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="is a file"):
        export_run(run_dir, "triton", tmp_path / "file")
    assert not (tmp_path / "a").exists()

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        export_run(run_dir, "onnx", taken)
    # --overwrite replaces only a previous export: a folder of someone else's files stays as it is
    with pytest.raises(UserError, match=f"{taken} is not a podium export"):
        export_run(run_dir, "torchscript", taken, overwrite=True)
    assert [p.name for p in taken.iterdir()] == ["notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    export_run(run_dir, "torchscript", empty, overwrite=True)
    assert sorted(p.name for p in empty.iterdir()) == [".podium-export.json", "model.pt", "preprocess.json"]
    export_run(run_dir, "onnx", empty, overwrite=True)  # a previous export is replaced
    assert sorted(p.name for p in empty.iterdir()) == [".podium-export.json", "model.onnx", "preprocess.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


class BatchBakedIn(torch.nn.Module):
    """A graph that only works at the traced batch size (a Python int from the shape)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, image):
        return torch.softmax(self.model(image).reshape(int(image.shape[0]), -1), dim=1)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("fmt, error", [("onnx", RuntimeError), ("torchscript", torch.jit.TracingCheckError)])
def test_an_export_that_fails_leaves_the_old_folder_untouched(run_dir, tmp_path, monkeypatch, fmt, error):
    # ONNX: ONNX Runtime refuses the baked reshape at batch size 1 in the export's own check;
    # TorchScript: torch.jit.trace's check_inputs at other batch sizes.
    monkeypatch.setattr(ClassificationTask, "serving_module", lambda self, model: BatchBakedIn(model))
    out = tmp_path / "out"
    with pytest.raises(error):
        export_run(run_dir, fmt, out)
    assert not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("old")
    (out / ex.MARKER_FILE).write_text("{}")  # a previous export: overwrite may replace it
    with pytest.raises(error):
        export_run(run_dir, fmt, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [ex.MARKER_FILE, "keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_cli_export_and_its_errors(run_dir, tmp_path):
    """`podium export` wires export_run: a Triton repository, and exit 2 for an unknown format."""
    import subprocess
    import sys

    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    repo = tmp_path / "repo"
    ok = subprocess.run([sys.executable, "-m", "podium", "export", str(run_dir), "--format", "triton",
                         "--out", str(repo)], capture_output=True, text=True, env=env, timeout=300)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    (model,) = [p for p in repo.iterdir() if p.is_dir()]
    assert (model / "config.pbtxt").exists() and (model / "1" / "model.onnx").exists()
    bad = subprocess.run([sys.executable, "-m", "podium", "export", str(run_dir), "--format", "tflite",
                          "--out", str(tmp_path / "x")], capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2 and "tflite" in bad.stdout + bad.stderr
    assert "Traceback" not in bad.stderr


@pytest.mark.parametrize("max_batch_size, preferred", [(1, [1]), (2, [1, 2]), (4, [2, 4]), (8, [4, 8]),
                                                       (16, [8, 16])])
def test_triton_preferred_batch_sizes_follow_max_batch_size(max_batch_size, preferred):
    """`podium export --format triton --max-batch-size N` failed for N < 8 with the fixed [4, 8]."""
    assert ex.default_preferred_batch_sizes(max_batch_size) == preferred
    ex._check_triton_options("m", max_batch_size, preferred, 5000, 1, "cpu")


def test_cli_triton_export_with_a_small_max_batch_size(run_dir, tmp_path):
    result = CliRunner().invoke(app, ["export", str(run_dir), "--format", "triton", "--out", str(tmp_path),
                                      "--max-batch-size", "2"])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "digits_run_1" / "config.pbtxt").read_text()
    assert "max_batch_size: 2" in text and "preferred_batch_size: [ 1, 2 ]" in text


def test_cli_overwrite_refuses_a_folder_that_is_not_an_export(run_dir, tmp_path):
    """`--overwrite` once deleted a projects folder with other runs in it (exit 0)."""
    projects = tmp_path / "projects"
    (projects / "other-run").mkdir(parents=True)
    (projects / "other-run" / "metrics.json").write_text("{}")
    result = CliRunner().invoke(app, ["export", str(run_dir), "--out", str(projects), "--overwrite"])
    message = "".join(result.output.replace("│", " ").split())  # rich wraps long paths
    assert result.exit_code == 2 and "notapodiumexport" in message and str(projects).replace(" ", "") in message
    assert (projects / "other-run" / "metrics.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["projects"]

    previous = tmp_path / "exported"
    assert CliRunner().invoke(app, ["export", str(run_dir), "--out", str(previous)]).exit_code == 0
    again = CliRunner().invoke(app, ["export", str(run_dir), "--out", str(previous), "--format", "torchscript",
                                     "--overwrite"])
    assert again.exit_code == 0, again.output
    assert (previous / "model.pt").is_file() and not (previous / "model.onnx").exists()
