"""Domain adaptation (task=uda) on generated street-like scenes: a tiny end-to-end run with every
switch on (DACS mixing, EMA teacher, MIC, lens warps with both branches, rare-class sampling,
photometric transfer, debug images), the splits it scores, what the teacher sees, resume-safe
state, and bad configs (exit 2). The real CamVid -> fisheye benchmark is benchmarks/uda_camvid_fisheye.py."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from podium.cli import app

CLASSES = "[sky,road,car]"


def scene(rng: np.random.Generator, h: int = 48, w: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Sky on top, road below the horizon, 1-2 cars (rare class) on the road; 255 = unlabelled."""
    label = np.zeros((h, w), np.uint8)
    horizon = int(rng.integers(h // 3, h // 2))
    label[horizon:] = 1
    for _ in range(int(rng.integers(1, 3))):
        y, x = int(rng.integers(horizon, h - 6)), int(rng.integers(0, w - 10))
        label[y:y + 6, x:x + 10] = 2
    colours = np.array([[90, 140, 230], [110, 110, 110], [200, 30, 30]], np.float32)
    image = colours[label] + rng.normal(0, 12, (h, w, 3))
    label[:2, :2] = 255
    return np.clip(image, 0, 255).astype(np.uint8), label


def write_scenes(root: Path, split: str, count: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    (root / split).mkdir(parents=True)
    (root / f"{split}annot").mkdir()
    for i in range(count):
        image, label = scene(rng)
        Image.fromarray(image).save(root / split / f"f{i:03d}.png")
        Image.fromarray(label).save(root / f"{split}annot" / f"f{i:03d}.png")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scenes")
    write_scenes(root, "train", 8, 0)
    write_scenes(root, "val", 3, 1)
    return root


def uda_args(root: Path, *extra: str) -> list[str]:
    return ["experiment=uda_camvid_fisheye", f"data.image_dir={root / 'train'}", f"data.mask_dir={root / 'trainannot'}",
            f"data.class_names={CLASSES}", "data.class_values=null", "data.scale=1.0",
            "data.patch_size=[32,64]", "model=seg_unet_small", "model.decoder_channels=[16,16,8,8,8]",
            f"task.target.image_dir={root / 'val'}", f"task.target.mask_dir={root / 'valannot'}",
            f"task.target.cache={root / 'cache'}", f"task.source_test.image_dir={root / 'val'}",
            f"task.source_test.mask_dir={root / 'valannot'}", "task.window=[64,64]", "task.mic_block=8",
            "trainer.max_steps=3", "trainer.val_every_n_steps=3", "sched.warmup_steps=1", "trainer.batch_size=2",
            "trainer.num_workers=0", "tracking=none", "trainer.progress_bar=false", *extra]


EVERYTHING = ["task.mix=classmix", "task.mic_ratio=0.7", "task.geometric=true", "task.dual_branch=true",
              "task.warp.p=1.0", "task.rare_class_temperature=0.01", "task.photometric_p=0.5", "task.debug_every=2",
              "task.pseudo_threshold=0.5"]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def uda_run(scenes) -> Path:
    run = scenes / "run"
    result = invoke("train", *uda_args(scenes, *EVERYTHING, f"run.dir={run}"))
    assert result.exit_code == 0, result.output
    return run


def test_every_switch_trains_and_scores_target_source_and_the_second_lens(uda_run):
    metrics = json.loads((uda_run / "metrics.json").read_text())
    for split in ("val", "test_source", "test_fisheye160_warm"):
        assert 0.0 <= metrics[f"{split}/miou"] <= 1.0, split
        assert f"{split}/iou_car" in metrics or f"{split}/iou/car" in metrics or any(
            k.startswith(f"{split}/") and "car" in k for k in metrics), sorted(metrics)
    header = (uda_run / "history.csv").read_text().splitlines()[0]
    for logged in ("train/source_loss", "train/mix_loss", "train/mic_loss", "train/pseudo_weight"):
        assert logged in header, header
    assert list((uda_run / "plots" / "debug").glob("step_*.png")), "debug images every task.debug_every steps"
    state = torch.load(uda_run / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    assert "teacher" in state["aux"], "the EMA teacher is checkpointed with the run"
    card = json.loads((uda_run / "run.json").read_text())
    assert card["classes"] == ["sky", "road", "car"]


def test_the_run_predicts_like_any_segmentation_run(uda_run, scenes, tmp_path):
    out = tmp_path / "pred.csv"
    result = invoke("predict", uda_run, scenes / "val" / "f000.png", "--out", out)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "pred_masks" / "f000.png").exists()


def test_source_only_needs_no_target_loader_and_no_teacher(scenes, tmp_path):
    result = invoke("train", *uda_args(scenes, f"run.dir={tmp_path / 'run'}", "trainer.max_steps=1",
                                       "trainer.val_every_n_steps=1"))
    assert result.exit_code == 0, result.output
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    assert state["aux"] == {}
    assert "val/miou" in json.loads((tmp_path / "run" / "metrics.json").read_text())


def _task(scenes, *extra):
    from podium.config import compose
    from podium.engine import registry

    cfg = compose(uda_args(scenes, *extra))
    return registry.build("task", cfg.task.name, cfg)


def test_the_teacher_sees_the_unaugmented_target_frame_and_mixing_follows_pixels(scenes):
    from podium.engine.ema import EMATeacher

    task = _task(scenes, "task.mix=classmix", "task.mic_ratio=0.7", "task.photometric_p=1.0", "task.geometric=true",
                 "task.warp.p=1.0")
    datasets = task.build_datasets()
    task.build_loss(datasets)
    model = task.build_model()
    seen = []

    class Spy(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            seen.append(x.clone())
            return self.inner(x)

    teacher = EMATeacher(model)
    teacher.model = Spy(teacher.model)
    source = torch.utils.data.default_collate([datasets["train"][0], datasets["train"][1]])
    target = torch.utils.data.default_collate([datasets["target"][0], datasets["target"][1]])
    ctx = SimpleNamespace(aux={"teacher": teacher}, step=5, run_dir=None, device=torch.device("cpu"),
                          fabric=SimpleNamespace(global_rank=0))
    out = task.training_step(model, {"train": source, "target": target}, ctx)
    assert len(seen) == 1 and torch.equal(seen[0], target["image"]), "the teacher labels the target frame as loaded"
    assert torch.isfinite(out["loss"]) and out["loss"].requires_grad
    out["loss"].backward()


@pytest.mark.parametrize("override, key", [
    ("task.target.lens=nosuchlens", "task.target.lens"),
    ("task.target.lens={fov: -10}", "task.target.lens.fov"),
    ("task.mix=cutmix", "task.mix"),
    ("task.dual_branch=true", "task.dual_branch"),
    ("task.pseudo_threshold=1.5", "task.pseudo_threshold"),
])
def test_bad_uda_configs_exit_2_naming_the_key(scenes, tmp_path, override, key):
    result = invoke("train", *uda_args(scenes, override, f"run.dir={tmp_path / 'run'}"))
    assert result.exit_code == 2, result.output
    assert key in result.output
    assert not list((tmp_path / "run").rglob("*.pt")), "nothing trained, nothing saved"


def test_eval_with_flip_and_scale_tta_scores_the_target_again(uda_run, tmp_path):
    run = tmp_path / "run"
    import shutil

    shutil.copytree(uda_run, run)
    result = invoke("eval", run, "tta=flips")
    assert result.exit_code == 0, result.output
    scored = json.loads(next((run / "eval").rglob("metrics.json")).read_text())
    assert 0.0 <= scored["val/miou"] <= 1.0


def test_a_real_camera_folder_without_labels_adapts_and_validates_on_the_source(scenes, tmp_path):
    """A user's own fisheye frames: images only (field of view estimated from the black border),
    no lens simulation, validation on source frames carved with data.val_count."""
    from podium.tasks.segmentation.lens import PRESETS, apply_lens

    camera = tmp_path / "camera"
    camera.mkdir()
    for path in sorted((scenes / "val").glob("*.png")):
        image, _, _ = apply_lens(np.asarray(Image.open(path).convert("RGB")), None, PRESETS["fisheye160_warm"])
        Image.fromarray(image).save(camera / path.name)
    result = invoke("train", *uda_args(scenes, f"task.target.image_dir={camera}", "task.target.mask_dir=null",
                                       "task.target.lens=null", "task.target.extra_lenses=[]", "data.val_count=2",
                                       "data.fov=estimate", "task.mix=classmix", "trainer.max_steps=1",
                                       "trainer.val_every_n_steps=1", f"run.dir={tmp_path / 'run'}"))
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert "val/miou" in metrics and not any(k.startswith("test_fisheye") for k in metrics)
