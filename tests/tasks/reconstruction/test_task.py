"""The task's aggregation: per-volume SSIM / PSNR / NMSE as fastMRI computes them, groups by
acceleration x anatomy, and the SNU leaderboard mean of the acc4 and acc8 means."""

from __future__ import annotations

import numpy as np
import pytest
import torch
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


class RowWeightedZeroFill(torch.nn.Module):
    """RSS of the zero-filled image times a ramp over the rows: not mirror-symmetric, so the
    readout-flip average differs from one pass by a known amount."""

    def forward(self, kspace, mask, low):
        from podium.tasks.reconstruction.fft import ifft2c, rss_complex

        image = rss_complex(ifft2c(kspace * mask), dim=1)
        return image * torch.linspace(1.0, 2.0, image.shape[-2])[:, None]


def test_readout_flip_tta_averages_the_mirrored_pass_in_evaluation_only():
    from podium.tasks.reconstruction.serving import KspaceToImage

    torch.manual_seed(0)
    kspace = torch.randn(1, 3, 10, 8, 2)
    mask = torch.zeros(1, 1, 1, 8, 1)
    mask[..., ::2, :] = 1
    mask[..., 3:5, :] = 1
    batch = {"masked_kspace": kspace * mask, "mask": mask, "num_low_frequencies": torch.tensor([2]),
             "target": torch.zeros(1, 10, 8)}
    model = RowWeightedZeroFill().eval()
    cfg = OmegaConf.create({"task": {"name": "reconstruction", "snu_metrics": False, "keep_images": True,
                                     "plots": 1, "tta_readout_flip": True}, "seed": 0})
    plain, averaged = task().reconstruct(model, batch), ReconstructionTask(cfg).reconstruct(model, batch)
    ramp = torch.linspace(1.0, 2.0, 10)[:, None]
    # the mirrored pass weighs every row by the mirrored ramp: the mean ramp is 1.5 everywhere
    assert torch.allclose(averaged, plain / ramp * 1.5, atol=1e-5)
    model.train()  # training steps never pay for the second pass
    assert torch.allclose(ReconstructionTask(cfg).reconstruct(model, batch), plain)
    model.eval()
    served = KspaceToImage(model, readout_flip=True)(batch["masked_kspace"])
    assert torch.allclose(served, averaged, atol=1e-5)
