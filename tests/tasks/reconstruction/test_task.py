"""The task's aggregation: per-volume SSIM / PSNR / NMSE as fastMRI computes them, groups by
acceleration x anatomy, and the SNU leaderboard mean of the acc4 and acc8 means."""

from __future__ import annotations

import numpy as np
import pytest
from omegaconf import OmegaConf

from podium.tasks.reconstruction.metrics import psnr, ssim_fastmri
from podium.tasks.reconstruction.task import ReconstructionTask


def task(snu=False):
    cfg = OmegaConf.create({"task": {"name": "reconstruction", "snu_metrics": snu, "keep_images": True, "plots": 1},
                            "seed": 0})
    return ReconstructionTask(cfg)


def records_for(volume, acc, gt, pred, anatomy=1):
    maxval = float(gt.max())
    out = []
    for s in range(len(gt)):
        out.append({"volume": volume, "slice": s, "acceleration": acc, "anatomy": anatomy, "index": s,
                    "max_value": maxval, "scale": 1.0,
                    "ssim": ssim_fastmri(gt[s][None], pred[s][None], maxval=maxval),
                    "ssim_snu": 0.5 if acc == 4 else 0.9,
                    "sse": float(((gt[s] - pred[s]) ** 2).sum()), "energy": float((gt[s] ** 2).sum()),
                    "pixels": gt[s].size, "pred": pred[s], "target": gt[s]})
    return out


def test_volume_metrics_equal_the_fastmri_definitions():
    rng = np.random.default_rng(0)
    gt = rng.random((3, 24, 20))
    gt[1] *= 2  # the volume maximum, not each slice's, is the data range
    pred = gt + 0.05 * rng.normal(size=gt.shape)
    metrics = task().aggregate(records_for(0, 4, gt, pred), "val")
    assert metrics["ssim"] == pytest.approx(ssim_fastmri(gt, pred), abs=1e-9)
    assert metrics["psnr"] == pytest.approx(psnr(gt, pred), abs=1e-6)
    assert metrics["nmse"] == pytest.approx(((gt - pred) ** 2).sum() / (gt**2).sum(), rel=1e-9)


def test_groups_and_the_leaderboard_mean():
    rng = np.random.default_rng(1)
    gt = rng.random((2, 16, 16))
    records = (records_for(0, 4, gt, gt * 0.9) + records_for(1, 4, gt, gt * 0.8)
               + records_for(0, 8, gt, gt * 0.7))
    metrics = task(snu=True).aggregate(records, "val")
    for key in ("ssim_acc4_brain", "ssim_acc8_brain", "psnr_acc4_brain", "ssim_snu_acc8_brain"):
        assert key in metrics
    # volumes are averaged inside a group, then groups and volumes overall
    acc4 = np.mean([ssim_fastmri(gt, gt * 0.9), ssim_fastmri(gt, gt * 0.8)])
    assert metrics["ssim_acc4_brain"] == pytest.approx(acc4, abs=1e-9)
    # leaderboard: mean of the acc4 mean (0.5) and the acc8 mean (0.9), not the pooled mean
    assert metrics["ssim_snu_leaderboard"] == pytest.approx(0.7)
    assert metrics["ssim_snu"] == pytest.approx((0.5 + 0.5 + 0.9) / 3)


def test_visualize_plots_the_best_and_worst_slices(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    gt = rng.random((3, 16, 16))
    pred = gt + rng.normal(size=gt.shape) * np.array([0.01, 0.3, 0.1])[:, None, None]
    t = task()
    monkeypatch.setattr(t, "_volume_name", lambda split, volume: "vol")
    paths = t.visualize(records_for(0, 4, gt, pred), "val", tmp_path)
    names = sorted(p.name for p in paths)
    assert names == ["val_best_0.png", "val_worst_1.png"]


def test_empty_split_is_a_user_error():
    from podium.errors import UserError

    with pytest.raises(UserError, match="no slices"):
        task().aggregate([], "test")
