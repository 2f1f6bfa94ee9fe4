"""End-to-end runs of the reconstruction family through the CLI on tiny CPU configs: train on
simulated k-space, eval (per-acceleration groups, predictions as HDF5, plots), predict on
undersampled files, FI-VarNet with LSKA, and bad input (exit code 2, file and key named)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from podium.tasks.reconstruction import readers
from podium.tasks.reconstruction.fft import fft2c_np

REPO = Path(__file__).resolve().parents[3]
REAL_SLICE = (REPO / ".." / "shared" / "data" / "mri" / "espirit_brain_8ch.mat").resolve()

TINY = ["experiment=varnet_demo", "data.shape=[48,40]", "data.num_coils=4", "data.train_size=4",
        "data.val_slices=2", "model.cascades=1", "model.chans=4", "model.sens_chans=2", "model.pools=2",
        "model.sens_pools=2", "trainer.max_epochs=1", "trainer.num_workers=0", "tracking=none",
        "trainer.progress_bar=false"]


def podium(*args, timeout=300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "podium", *args], check=False, capture_output=True,
                          text=True, timeout=timeout, env=env)


def undersampled_kspace(c=4, h=48, w=40) -> np.ndarray:
    y, x = np.mgrid[:h, :w]
    obj = (((y - h / 2) / 18) ** 2 + ((x - w / 2) / 15) ** 2 < 1).astype(np.complex64)
    maps = np.stack([np.exp(1j * k + 0.03 * (x - 10 * k)) for k in range(c)])
    k = fft2c_np(maps * obj).astype(np.complex64)
    mask = np.zeros(w, bool)
    mask[::4] = True
    mask[17:23] = True
    return k * mask


@pytest.fixture(scope="module")
def trained(tmp_path_factory, varnet_run):
    # tests/conftest.py trains this TINY run once per worker (the serving tests read it too);
    # a copy, since eval writes into the run
    return shutil.copytree(varnet_run, tmp_path_factory.mktemp("recon") / "run")


@pytest.mark.slow
def test_train_writes_a_complete_run(trained):
    metrics = json.loads((trained / "metrics.json").read_text())
    for acc in (4, 8):
        assert 0 < metrics[f"val/ssim_acc{acc}_brain"] <= 1
        assert metrics[f"val/psnr_acc{acc}_brain"] > 0
    assert metrics["val/ssim"] == pytest.approx(
        (metrics["val/ssim_acc4_brain"] + metrics["val/ssim_acc8_brain"]) / 2, rel=1e-6)
    preds = sorted((trained / "predictions" / "val").glob("*.h5"))
    assert [p.name.split("_acc")[1] for p in preds] == ["4.h5", "8.h5"]
    with h5py.File(preds[0]) as f:
        assert f["reconstruction"].shape == (2, 48, 40)
    assert any(p.name.startswith("val_worst") for p in (trained / "plots").iterdir())
    assert (trained / "checkpoints" / "best.pt").exists()


@pytest.mark.slow
def test_eval_and_predict(trained, tmp_path):
    result = podium("eval", str(trained))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ssim_acc8_brain" in result.stdout
    npy = tmp_path / "scan.npy"
    np.save(npy, undersampled_kspace())
    h5 = tmp_path / "scan.h5"
    readers.write_fastmri_h5(h5, np.stack([undersampled_kspace()] * 2), None, recon_size=(48, 40))
    out = tmp_path / "out" / "recon.h5"
    result = podium("predict", str(trained), str(npy), str(h5), "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    with h5py.File(out) as f:
        assert f["reconstruction/scan.npy"].shape == (1, 48, 40)
        assert f["reconstruction/scan.h5"].shape == (2, 48, 40)
        assert np.isfinite(f["reconstruction/scan.h5"][()]).all()
    assert (tmp_path / "out" / "recon_scan.h5.png").exists()


@pytest.mark.slow
def test_predict_with_self_supervised_adaptation(trained, tmp_path):
    """--override task.adapt.steps=N fine-tunes a copy per slice (the outcome is recorded in the
    output's attributes), the run's checkpoint is untouched, and a bad share exits 2 naming it."""
    npy = tmp_path / "scan.npy"
    np.save(npy, undersampled_kspace())
    best = trained / "checkpoints" / "best.pt"
    before = best.read_bytes()
    plain, adapted = tmp_path / "plain.h5", tmp_path / "adapted.h5"
    assert podium("predict", str(trained), str(npy), "--out", str(plain)).returncode == 0
    result = podium("predict", str(trained), str(npy), "--out", str(adapted), "-o", "task.adapt.steps=4",
                    "-o", "task.adapt.val_every=1", "-o", "task.adapt.lr=0.01")
    assert result.returncode == 0, result.stdout + result.stderr
    with h5py.File(plain) as f, h5py.File(adapted) as g:
        a, b = f["reconstruction/scan.npy"][()], g["reconstruction/scan.npy"][()]
        attrs = dict(g["reconstruction/scan.npy"].attrs)
    assert a.shape == b.shape and np.isfinite(b).all()
    assert attrs["adapt_steps_run"].tolist() == [4]
    assert attrs["adapt_val_loss_best"][0] <= attrs["adapt_val_loss_start"][0]
    # the kept weights are the adapted ones exactly when they beat the pretrained on held-out k-space
    assert (attrs["adapt_best_step"][0] > 0) == (not np.allclose(a, b))
    assert best.read_bytes() == before
    result = podium("predict", str(trained), str(npy), "--out", str(tmp_path / "x.h5"), "-o", "task.adapt.val_fraction=1.5")
    assert result.returncode == 2 and "task.adapt.val_fraction" in result.stdout + result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("content, message", [
    (lambda: np.abs(undersampled_kspace()), "complex"),
    (lambda: np.where(np.arange(40) == 3, np.nan, 1) * undersampled_kspace(), "NaN"),
    (lambda: np.array([{"not": "k-space"}], dtype=object), "pickling"),  # refused, never unpickled
])
def test_predict_bad_kspace_exits_2_naming_the_file(trained, tmp_path, content, message):
    bad = tmp_path / "bad.npy"
    np.save(bad, content())
    result = podium("predict", str(trained), str(bad), "--out", str(tmp_path / "o.h5"))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "bad.npy" in result.stderr + result.stdout and message in result.stderr + result.stdout
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "o.h5").exists()


@pytest.mark.slow
def test_missing_kspace_key_exits_2(trained, tmp_path):
    bad = tmp_path / "nokey.h5"
    with h5py.File(bad, "w") as f:
        f.create_dataset("reconstruction_rss", data=np.zeros((1, 8, 8), np.float32))
    result = podium("predict", str(trained), str(bad), "--out", str(tmp_path / "o.h5"))
    assert result.returncode == 2
    out = result.stderr + result.stdout
    assert "nokey.h5" in out and "kspace" in out and "reconstruction_rss" in out  # the datasets it has
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_fivarnet_with_lska_trains(tmp_path):
    args = [a for a in TINY if not a.startswith("model.")]
    result = podium("train", *args, "model=fivarnet", "model.feature_cascades=1", "model.image_cascades=1",
                    "model.feature_dim=4", "model.unet_chans=4", "model.sens_chans=2", "model.pools=2",
                    "model.sens_pools=2", "model.lska_kernel=7", "loss=ssim_l1", "trainer.gradient_checkpointing=true",
                    f"run.dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}")
    assert result.returncode == 0, result.stdout + result.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert 0 < metrics["val/ssim"] <= 1


def test_unknown_mask_type_is_a_config_error(tmp_path):
    result = podium("train", *TINY, "data.mask.type=spiral", f"run.dir={tmp_path / 'run'}",
                    f"data.cache_dir={tmp_path / 'cache'}")
    assert result.returncode == 2
    assert "spiral" in result.stderr + result.stdout
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()


@pytest.mark.slow
@pytest.mark.realdata
@pytest.mark.skipif(not REAL_SLICE.exists(), reason="../shared/data/mri not present")
def test_real_slice_is_a_test_split(trained, tmp_path):
    out = tmp_path / "metrics.json"
    result = podium("eval", str(trained), f"data.real_test=[{REAL_SLICE}]", "data.shape=[48,40]",
                    "--split", "test_real", "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    metrics = json.loads(out.read_text())
    assert 0 < metrics["test_real/ssim_acc4_brain"] <= 1 and 0 < metrics["test_real/ssim_acc8_brain"] <= 1


def write_snu(root: Path, names: list[str]) -> None:
    """A tiny SNU-layout folder: k-space (slices, coils, H, W) + mask, labels cropped to 32 x 32."""
    rng = np.random.default_rng(0)
    for name in names:
        full = np.stack([undersampled_kspace() * 0 + fft2c_np(np.stack([
            np.outer(np.hanning(48), np.hanning(40)) * np.exp(1j * c) * (1 + 0.1 * rng.random((48, 40)))
            for c in range(4)])).astype(np.complex64) for _ in range(2)])
        acc = 4 if "acc4" in name else 8
        mask = np.zeros(40, np.float32)
        mask[(40 // 2) % acc::acc] = 1
        mask[17:23] = 1
        image = np.sqrt((np.abs(np.fft.ifft2(full, norm="ortho")) ** 2).sum(1))[:, 8:40, 4:36].astype(np.float32)
        for sub in ("kspace", "image"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        with h5py.File(root / "kspace" / name, "w") as f:
            f.create_dataset("kspace", data=full * mask)
            f.create_dataset("mask", data=mask)
        with h5py.File(root / "image" / name, "w") as f:
            f.create_dataset("image_label", data=image)
            f.create_dataset("image_input", data=image)
            f.attrs["max"] = float(image.max())


@pytest.mark.slow
def test_snu_recipe_trains_with_mask_augmentation_and_leaderboard_ssim(tmp_path):
    write_snu(tmp_path / "snu" / "train", ["brain_acc4_1.h5", "brain_acc8_2.h5"])
    write_snu(tmp_path / "snu" / "val", ["brain_acc4_3.h5", "brain_acc8_4.h5"])
    # the recipe's augmentation with a constant probability, so that two tiny epochs exercise it
    result = podium("train", "experiment=varnet_snu", f"data.root={tmp_path / 'snu'}", "model=varnet_small",
                    "model.cascades=1", "model.chans=4", "model.sens_chans=2", "model.pools=2", "model.sens_pools=2",
                    "data.mask.augment_schedule=constant",
                    "trainer.max_epochs=2", "trainer.num_workers=0", "tracking=none", "trainer.progress_bar=false",
                    f"run.dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}")
    assert result.returncode == 0, result.stdout + result.stderr
    # mask.duplicate (the acc4/acc8 bank) and mask.augment_p compose: 16 bank masks drawn,
    # about half of them from the augmentation pool
    history = (tmp_path / "run" / "history.csv").read_text().splitlines()
    column = history[0].split(",").index("train/masks_augmented")
    assert 0 < float(history[-1].split(",")[column]) < 16
    # the recipe keeps predictions and error maps (streamed to disk), and leaves no spool behind
    assert sorted(p.name for p in (tmp_path / "run" / "predictions" / "val").glob("*.h5")) == [
        "brain_acc4_3_acc4.h5", "brain_acc8_4_acc8.h5"]
    assert any(p.name.startswith("val_worst") for p in (tmp_path / "run" / "plots").iterdir())
    assert not (tmp_path / "run" / ".eval_spool").exists()
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert -1 <= metrics["val/ssim_snu_leaderboard"] <= 1  # an untrained model may score below 0
    assert metrics["val/ssim_snu_leaderboard"] == pytest.approx(
        (metrics["val/ssim_snu_acc4_brain"] + metrics["val/ssim_snu_acc8_brain"]) / 2, rel=1e-6)
