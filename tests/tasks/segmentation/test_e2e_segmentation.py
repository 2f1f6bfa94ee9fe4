"""End-to-end runs of the segmentation family through the CLI on tiny CPU configs: train / eval /
predict on generated fundus images (with the reconstruction head and several sliding windows),
the run folder's outputs, metrics recomputed from the saved probabilities, bad input (exit code
2, the file or key named, nothing written over), and a smoke run on the real DRIVE copy."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from podium.cli import app
from podium.tasks.segmentation import metrics as seg_metrics

REPO = Path(__file__).resolve().parents[3]
DRIVE = (REPO / ".." / "shared" / "data" / "drive" / "training").resolve()

FAST = ["trainer.batch_size=4", "trainer.num_workers=0", "tracking=none", "trainer.progress_bar=false"]


def synth(tmp: Path, epochs: int = 2) -> list[str]:
    # 64 x 64 images evaluated with 32 x 32 windows at overlap 0.5: 9 blended windows per image
    return ["experiment=seg_synthetic", f"data.root={tmp / 'gen'}", "data.count=10", "data.size=[64,64]",
            "data.val_count=2", "data.test_count=2", "data.patch_size=[32,32]", "data.patches_per_image=4",
            "model.decoder_channels=[32,16,16,8,8]", "model.recon_head=true", "model.recon_channels=16",
            "task.window=[32,32]", "task.tta_flips=[h]", f"trainer.max_epochs={epochs}", *FAST]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("seg")
    run_dir = tmp / "run"
    result = invoke("train", *synth(tmp), f"run.dir={run_dir}")
    assert result.exit_code == 0, result.output
    return run_dir


def test_run_folder_holds_metrics_predictions_and_plots(run):
    metrics = json.loads((run / "metrics.json").read_text())
    for split in ("val", "test"):
        for name in ("dice", "iou", "sensitivity", "specificity", "auc_roc", "aupr"):
            assert 0.0 <= metrics[f"{split}/{name}"] <= 1.0, (split, name)
    history = (run / "history.csv").read_text().splitlines()
    assert "train/recon_loss" in history[0] and "train/seg_loss" in history[0]  # the multi-task head trained
    plots = {p.name for p in (run / "plots").iterdir()}
    assert {"curves_val.png", "curves_test.png"} <= plots
    assert any(p.startswith("overlay_test_") for p in plots)
    rows = list(csv.DictReader((run / "predictions" / "test_per_image.csv").open()))
    assert len(rows) == 2 and {"id", "dice", "auc_roc", "tp", "fp", "fn", "tn"} <= rows[0].keys()


def test_saved_probabilities_reproduce_the_metrics(run):
    """predictions/<split>_probabilities.npz is what ensembles average: scoring it against the
    labels must give the run's metrics (up to its float16 storage)."""
    from podium.config import load_run_config
    from podium.engine import registry

    cfg = load_run_config(run, [])
    test = registry.build("dataset", cfg.data.name, cfg.data, seed=cfg.seed)["test"]
    saved = np.load(run / "predictions" / "test_probabilities.npz")
    records = [{"prob": saved[test.records[i].id].astype(np.float32), "target": test.full_label(i)}
               for i in range(len(test))]
    recomputed = seg_metrics.segmentation_metrics(records, num_classes=2)
    metrics = json.loads((run / "metrics.json").read_text())
    assert recomputed["auc_roc"] == pytest.approx(metrics["test/auc_roc"], abs=2e-3)
    assert recomputed["dice"] == pytest.approx(metrics["test/dice"], abs=1e-2)


def test_eval_reproduces_the_training_metrics(run):
    result = invoke("eval", run)
    assert result.exit_code == 0, result.output
    written = json.loads((run / "eval" / "best" / "metrics.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    flat = written.get("metrics", written)
    for key in ("test/dice", "test/auc_roc", "val/aupr"):
        assert flat[key] == pytest.approx(metrics[key], abs=1e-6), key


def test_eval_with_d4_tta_maps_each_windows_masks_back(run):
    """tta=d4 (podium.engine.tta) turns and flips every sliding window, maps the probabilities
    back and averages them, on top of the run's own task.tta_flips: the scores stay sane and the
    saved maps are close to, but not, the plain ones."""
    result = invoke("eval", run, "--split", "test", "tta=d4")
    assert result.exit_code == 0, result.output
    (folder,) = [p for p in (run / "eval").iterdir()
                 if json.loads((p / "eval.json").read_text())["overrides"] == ["tta=d4"]]
    metrics = json.loads((folder / "metrics.json").read_text())
    assert 0.0 <= metrics["test/dice"] <= 1.0 and 0.0 <= metrics["test/auc_roc"] <= 1.0
    plain = np.load(run / "predictions" / "test_probabilities.npz")
    with_tta = np.load(folder / "predictions" / "test_probabilities.npz")
    for key in plain.files:
        a, b = plain[key].astype(np.float32), with_tta[key].astype(np.float32)
        assert a.shape == b.shape and 1e-3 < np.abs(a - b).max()
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.5  # the same mask, not a turned one


def test_predict_writes_masks_at_the_original_size(run, tmp_path):
    from podium.config import load_run_config

    cfg = load_run_config(run, [])
    images = sorted((Path(cfg.data.root)).glob("*/images/*.tif"))[:2]
    out = tmp_path / "pred.csv"
    result = invoke("predict", run, *images, "--out", out)
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 2
    for row, image in zip(rows, images):
        mask = np.asarray(Image.open(row["mask"]))
        assert mask.shape == np.asarray(Image.open(image)).shape[:2]
        assert set(np.unique(mask)) <= {0, 255}
        assert float(row["fraction_vessel"]) == pytest.approx((mask > 0).sum() / max(1, (mask >= 0).sum()), abs=0.2)
        assert (out.parent / "pred_masks" / f"{image.stem}_overlay.png").is_file()
        assert np.load(out.parent / "pred_masks" / f"{image.stem}_prob.npy").shape == mask.shape


def test_bad_input_exits_2_and_names_the_problem(tmp_path):
    base = synth(tmp_path, epochs=1)
    cases = [(["task.window=[48,48]"], "multiples of 32"),
             (["task.tta_flips=[diagonal]"], "task.tta_flips"),
             (["loss.ignore_index=0"], "loss.ignore_index"),
             (["data.clahe=purple"], "data.clahe"),
             (["data.patch_size=[512,512]"], "patch")]
    for overrides, expected in cases:
        result = invoke("train", *base, *overrides, f"run.dir={tmp_path / 'bad'}")
        assert result.exit_code == 2, (overrides, result.output)
        assert expected in result.output, (overrides, result.output)


def test_a_corrupt_image_names_the_file_and_leaves_the_run_alone(tmp_path, run):
    root = tmp_path / "gen"
    ok = invoke("train", *synth(tmp_path, epochs=1), "trainer.max_epochs=1", f"run.dir={tmp_path / 'first'}")
    assert ok.exit_code == 0, ok.output
    (folder,) = root.glob("*/images")
    victim = sorted(folder.glob("*.tif"))[3]
    victim.write_bytes(b"not an image at all")
    before = (tmp_path / "first" / "checkpoints" / "best.pt").read_bytes()
    result = invoke("train", *synth(tmp_path, epochs=1), f"run.dir={tmp_path / 'second'}")
    assert result.exit_code == 2, result.output
    assert victim.name in result.output
    assert (tmp_path / "first" / "checkpoints" / "best.pt").read_bytes() == before
    shutil.rmtree(root)  # the generator's cache would otherwise keep the corrupt file


@pytest.mark.realdata
@pytest.mark.skipif(not DRIVE.is_dir(), reason="../shared/data/drive is absent")
def test_drive_smoke_run(tmp_path):
    result = invoke("train", "experiment=drive_unet", f"data.root={DRIVE}", "data.max_images=2",
                    "data.patches_per_image=2", "trainer.max_epochs=1", *FAST, f"run.dir={tmp_path / 'run'}")
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert 0.0 <= metrics["test/auc_roc"] <= 1.0


def test_folder_layout_with_images_of_different_sizes(tmp_path):
    """seg_folder pairs by pattern; images of different sizes are evaluated one by one (not
    stacked) and the multi-class metrics come out per class."""
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    (tmp_path / "lab").mkdir()
    for i, (h, w) in enumerate([(64, 64), (70, 90), (64, 96), (80, 64), (72, 72), (64, 80)]):
        label = np.zeros((h, w), np.uint8)
        label[h // 4: h // 2, w // 4: w // 2] = 1
        label[h // 2:, w // 2:] = 2
        image = (rng.integers(0, 40, (h, w, 3)) + label[..., None] * 90).astype(np.uint8)
        Image.fromarray(image).save(tmp_path / "img" / f"case{i}.png")
        Image.fromarray(label).save(tmp_path / "lab" / f"case{i}_seg.png")
    run_dir = tmp_path / "run"
    result = invoke("train", "experiment=seg_synthetic", "data=seg_folder", f"data.root={tmp_path}",
                    "data.image_dir=img", "data.mask_dir=lab", "data.image_pattern='{id}.png'",
                    "data.mask_pattern='{id}_seg.png'", "data.class_names=[background,square,corner]",
                    "data.val_count=2", "data.test_count=1", "data.patch_size=[32,32]", "data.patches_per_image=4",
                    "model.decoder_channels=[32,16,16,8,8]", "task.window=[64,64]", "task.monitor=miou",
                    "trainer.max_epochs=1", *FAST, f"run.dir={run_dir}")
    assert result.exit_code == 0, result.output
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {"val/miou", "val/iou_square", "val/iou_corner", "test/miou"} <= metrics.keys()
    saved = np.load(run_dir / "predictions" / "val_probabilities.npz")
    assert len(saved.files) == 2
    for case in saved.files:  # class ids at each image's own size
        assert saved[case].shape == np.asarray(Image.open(tmp_path / "img" / f"{case}.png")).shape[:2]
