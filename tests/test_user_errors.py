"""Mistakes a user can fix exit with code 2 and a message naming the file or key (issue 20):
a corrupt metrics.json or config.yaml, out-of-range numbers, a weights file that is no torch
file, --out pointing at a folder, array files given where images are read."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from podium.cli import app
from podium.config import compose
from podium.errors import UserError

TINY = ["experiment=digits", "data.image_size=8", "model.width=4", "model.blocks=1", "trainer.max_steps=1",
        "trainer.num_workers=0", "tracking=none", "trainer.progress_bar=false", "data.augment=[]"]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def text(result) -> str:
    return " ".join(result.output.split())


def fake_run(root: Path, name: str = "run", config: str = "name: x\n") -> Path:
    """A folder that passes the "is a run folder" check (config.yaml inside)."""
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(config)
    return run


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("digits") / "run"
    result = invoke("train", *TINY, f"run.dir={run_dir}")
    assert result.exit_code == 0, result.output
    return run_dir


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, Path]:
    """Files that are not readable images, by kind."""
    import h5py

    folder = tmp_path_factory.mktemp("bad")
    files = {"object_npy": folder / "objects.npy", "h5": folder / "volume.h5",
             "truncated_png": folder / "truncated.png", "text": folder / "notes.txt"}
    np.save(files["object_npy"], np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with h5py.File(files["h5"], "w") as f:
        f["kspace"] = np.zeros((2, 4, 4), np.complex64)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(folder / "full.png")
    data = (folder / "full.png").read_bytes()
    files["truncated_png"].write_bytes(data[: len(data) // 2])
    files["text"].write_text("hello\n")
    return files


# ---- 1. podium runs with a corrupt metrics.json --------------------------------------------


@pytest.fixture
def runs_root(tmp_path) -> Path:
    good = fake_run(tmp_path, "good")
    (good / "metrics.json").write_text(json.dumps({"val/acc": 0.5}))
    broken = fake_run(tmp_path, "broken")
    (broken / "metrics.json").write_text('{"val/acc": 0.')  # cut off mid-write
    return tmp_path


def test_runs_table_lists_the_other_runs_and_warns_about_a_corrupt_metrics_json(runs_root):
    result = invoke("runs", "--root", runs_root)
    assert result.exit_code == 0, result.output
    out = text(result)
    assert f"{runs_root / 'broken' / 'metrics.json'}" in out and "warning" in out
    assert "unreadable metrics" in out and "val/acc 0.5000" in out


def test_runs_json_stays_parseable_with_a_corrupt_metrics_json(runs_root):
    result = invoke("runs", "--root", runs_root, "--json")
    assert result.exit_code == 0, result.output
    listed = {Path(s["run"]).name: s for s in json.loads(result.stdout)}  # the warning goes to stderr
    assert listed["good"]["status"] == "finished" and listed["good"]["metrics"] == {"val/acc": 0.5}
    assert listed["broken"]["status"] == "unreadable metrics" and listed["broken"]["metrics"] == {}
    assert "metrics.json" in listed["broken"]["problem"]


def test_runs_with_metrics_json_that_is_not_an_object(tmp_path):
    run = fake_run(tmp_path, "listed")
    (run / "metrics.json").write_text("[1, 2]")
    result = invoke("runs", "--root", tmp_path)
    assert result.exit_code == 0, result.output
    assert "unreadable metrics" in text(result) and "expected a JSON object" in text(result)


# ---- 2. numbers out of range, refused before any work starts --------------------------------


@pytest.mark.parametrize("override, shown, valid", [
    ("trainer.batch_size=0", "trainer.batch_size=0", ">= 1"),
    ("trainer.max_epochs=-1", "trainer.max_epochs=-1", ">= 0"),
    ("trainer.eval_batch_size=-1", "trainer.eval_batch_size=-1", ">= 0"),
    ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches=0", ">= 1"),
    ("trainer.val_every_n_epochs=0", "trainer.val_every_n_epochs=0", ">= 1"),
    ("trainer.max_steps=-5", "trainer.max_steps=-5", ">= 0"),
    ("trainer.grad_clip_norm=-1.0", "trainer.grad_clip_norm=-1.0", ">= 0"),
    ("trainer.prefetch_factor=0", "trainer.prefetch_factor=0", ">= 1"),
    ("trainer.ema.decay=1.0", "trainer.ema.decay=1.0", "in [0, 1)"),
    ("trainer.ema.decay=-0.1", "trainer.ema.decay=-0.1", "in [0, 1)"),
    ("optim.lr=0", "optim.lr=0.0", "> 0"),
    ("optim.lr=-1e-3", "optim.lr=-0.001", "> 0"),
    ("optim.betas=[0.9,1.5]", "optim.betas=[0.9, 1.5]", "in [0, 1)"),
    ("sched.min_lr_ratio=2", "sched.min_lr_ratio=2.0", "in [0, 1]"),
    ("sched.step_size=0", "sched.step_size=0", ">= 1"),
])
def test_out_of_range_values_name_the_key_value_and_range(override, shown, valid):
    with pytest.raises(UserError) as info:
        compose(["experiment=digits", override])
    assert str(info.value) == f"{shown} is out of range: it must be {valid}."


def test_values_on_the_edge_of_the_range_are_accepted():
    cfg = compose(["experiment=digits", "trainer.max_epochs=0", "trainer.eval_batch_size=0",
                   "trainer.num_workers=-1", "trainer.ema.decay=0.0", "sched.min_lr_ratio=1.0"])
    assert cfg.trainer.max_epochs == 0 and cfg.sched.min_lr_ratio == 1.0


def test_batch_size_zero_exits_2_before_a_run_folder_is_made(tmp_path):
    result = invoke("train", *TINY, "trainer.batch_size=0", f"run.root={tmp_path}")
    assert result.exit_code == 2, result.output
    assert "trainer.batch_size=0" in text(result) and ">= 1" in text(result)
    assert "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []


def test_an_eval_override_out_of_range_names_the_run_config(tmp_path, digits_run):
    result = invoke("eval", digits_run, "trainer.eval_batch_size=-3", "--out", tmp_path / "m.json")
    assert result.exit_code == 2, result.output
    assert "config.yaml" in text(result) and "trainer.eval_batch_size=-3" in text(result)


# ---- 3. model.weights that is not a torch file ---------------------------------------------


def test_train_with_a_png_as_model_weights_exits_2(tmp_path, bad_files):
    png = bad_files["truncated_png"].with_name("full.png")
    tiny = [o for o in TINY if not o.startswith("model.")]
    result = invoke("train", *tiny, "model=timm", "model.arch=resnet10t", f"model.weights={png}",
                    f"run.root={tmp_path}")
    assert result.exit_code == 2, result.output
    out = text(result)
    assert f"model.weights={png}" in out and "torch checkpoint or state_dict" in out
    assert "Traceback" not in result.output


@pytest.fixture
def weight_files(tmp_path, bad_files) -> dict[str, Path]:
    files = {"text": bad_files["text"], "npy": bad_files["object_npy"],
             "whole_model": tmp_path / "whole.pt", "bare_tensor": tmp_path / "tensor.pt",
             "bad_safetensors": tmp_path / "junk.safetensors"}
    torch.save(torch.nn.Linear(2, 2), files["whole_model"])
    torch.save(torch.zeros(3), files["bare_tensor"])
    files["bad_safetensors"].write_text("junk")
    return files


@pytest.mark.parametrize("kind, says", [
    ("text", "not a file written by torch.save"),
    ("npy", "not a file written by torch.save"),
    ("whole_model", "state_dict()"),
    ("bare_tensor", "holds Tensor"),
    ("bad_safetensors", "safetensors"),
])
def test_weights_files_that_are_not_state_dicts(weight_files, kind, says):
    from podium.common.weights import load_state_dict_file

    with pytest.raises(UserError) as info:
        load_state_dict_file(weight_files[kind])
    message = str(info.value)
    assert message.startswith(f"model.weights={weight_files[kind]}:") and says in message
    assert "weights_only=False" not in message  # torch's advice to unpickle anything is not ours


def test_missing_weights_file():
    from podium.common.weights import load_state_dict_file

    with pytest.raises(UserError, match="model.weights=/nowhere/w.pt: file does not exist"):
        load_state_dict_file(Path("/nowhere/w.pt"))


def test_encoder_weights_errors_name_their_own_key(bad_files):
    from podium.common.unet import load_local_weights

    with pytest.raises(UserError, match=r"^model\.encoder_weights=.*notes\.txt: cannot read it"):
        load_local_weights(torch.nn.Conv2d(3, 4, 3), str(bad_files["text"]), "encoder_weights", 3)


# ---- 4. a corrupt run config.yaml -----------------------------------------------------------


CORRUPT_CONFIGS = {
    "invalid_yaml": ("name: [unclosed\n  x: :\n", "invalid YAML (line 2"),
    "a_list": ("- a\n- b\n", "expected a mapping"),
    "a_word": ("just text\n", "expected a mapping"),
    "empty": ("", "an empty file"),
}


@pytest.mark.parametrize("kind", sorted(CORRUPT_CONFIGS))
@pytest.mark.parametrize("command", ["eval", "predict", "export", "serve", "resume"])
def test_corrupt_run_config_exits_2_naming_the_file(tmp_path, digits_run, kind, command):
    import shutil

    content, says = CORRUPT_CONFIGS[kind]
    run = tmp_path / "run"  # a real run (checkpoints and all) whose config.yaml got damaged
    shutil.copytree(digits_run, run)
    (run / "config.yaml").write_text(content)
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)
    args = {"eval": ["eval", run], "predict": ["predict", run, image, "--out", tmp_path / "p.csv"],
            "export": ["export", run, "--out", tmp_path / "export"], "serve": ["serve", run],
            "resume": ["train", f"resume={run}"]}[command]
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert f"{run / 'config.yaml'} is not a valid run config" in text(result) and says in text(result)


# ---- 5. predict --out pointing at a folder --------------------------------------------------


def test_predict_out_that_is_a_folder_exits_2_before_loading_the_model(tmp_path):
    run = fake_run(tmp_path)  # no checkpoint: the check must come first
    (tmp_path / "results").mkdir()
    result = invoke("predict", run, tmp_path, "--out", tmp_path / "results")
    assert result.exit_code == 2, result.output
    assert f"--out {tmp_path / 'results'} is an existing folder" in text(result)
    assert "must be a file path" in text(result)


def test_predict_out_under_a_file_exits_2(tmp_path):
    run = fake_run(tmp_path)
    (tmp_path / "taken").write_text("x")
    result = invoke("predict", run, tmp_path, "--out", tmp_path / "taken" / "p.csv")
    assert result.exit_code == 2, result.output
    assert f"{tmp_path / 'taken'} is a file, not a folder" in text(result)


def test_predict_creates_a_missing_parent_folder(tmp_path, digits_run, bad_files):
    out = tmp_path / "new" / "deeper" / "p.csv"
    result = invoke("predict", digits_run, bad_files["truncated_png"].with_name("full.png"), "--out", out)
    assert result.exit_code == 0, result.output
    assert len(out.read_text().splitlines()) == 2


# ---- 6. files that are not readable images --------------------------------------------------


@pytest.mark.parametrize("kind", ["object_npy", "h5", "truncated_png", "text"])
def test_predict_on_a_file_that_is_no_image_exits_2(tmp_path, digits_run, bad_files, kind):
    path = bad_files[kind]
    result = invoke("predict", digits_run, path, "--out", tmp_path / "p.csv")
    assert result.exit_code == 2, result.output
    out = text(result)
    assert f"{path}: cannot read image" in out and "PNG, JPEG" in out


@pytest.mark.parametrize("kind", ["object_npy", "h5", "truncated_png", "text"])
def test_every_image_family_reader_names_the_file_and_the_formats(bad_files, kind):
    from podium.common.images import load_image
    from podium.tasks.landmarks.data import load_letterboxed
    from podium.tasks.segmentation.readers import read_image

    path = bad_files[kind]
    readers = {"classification": lambda: load_image(path, 3), "segmentation": lambda: read_image(path),
               "landmarks": lambda: load_letterboxed(path, (32, 32), 1)}
    for family, read in readers.items():
        with pytest.raises(UserError) as info:
            read()
        assert f"{path}: cannot read image" in str(info.value) and "PNG, JPEG" in str(info.value), family


def test_array_files_are_told_apart_from_corrupt_images(bad_files):
    from podium.common.images import load_image

    with pytest.raises(UserError, match=r"\.h5 array files are not read by this task"):
        load_image(bad_files["h5"], 1)
    with pytest.raises(UserError, match="image file is truncated"):
        load_image(bad_files["truncated_png"], 1)


def test_bracketed_text_in_an_error_message_is_printed_as_text():
    """Messages name shapes and lists like "[width, height]": rich must not eat them as markup."""
    import typer
    from typer.testing import CliRunner

    from podium.cli import handle_errors
    from podium.errors import UserError

    app = typer.Typer()

    @app.command()
    @handle_errors
    def fail():
        raise UserError("task.submission_size must be [width, height] with positive integers, got [bold].")

    result = CliRunner().invoke(app, [])
    assert result.exit_code == 2
    assert "[width, height]" in result.output and "got [bold]." in result.output
