"""The task's aggregation: per-volume SSIM / PSNR / NMSE as fastMRI computes them, groups by
acceleration x anatomy, and the SNU leaderboard mean of the acc4 and acc8 means."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from podium.tasks.reconstruction.metrics import psnr, ssim_fastmri
from podium.tasks.reconstruction.task import ReconstructionTask


def task(snu=False, keep_images=True):
    cfg = OmegaConf.create({"task": {"name": "reconstruction", "snu_metrics": snu, "keep_images": keep_images,
                                     "plots": 1}, "seed": 0})
    return ReconstructionTask(cfg)


class PredictionInKspace(torch.nn.Module):
    """Returns coil 0's real part: a test puts the (scaled) reconstruction it wants there."""

    def forward(self, kspace, mask, low):
        return kspace[:, 0, :, :, 0]


def batches_for(volume, acc, gt, pred, scales):
    """One batch per slice as the datasets make them: every slice divided by its own scale (the
    zero-filled maximum), the volume's maximum as SSIM data range."""
    out = []
    for s in range(len(gt)):
        k = torch.zeros(1, 1, *gt.shape[1:], 2)
        k[0, 0, :, :, 0] = torch.from_numpy(pred[s] / scales[s])
        out.append({"masked_kspace": k, "mask": torch.ones(1, 1, 1, gt.shape[2], 1),
                    "num_low_frequencies": torch.tensor([0]),
                    "target": torch.from_numpy(gt[s] / scales[s])[None].float(),
                    "max_value": torch.tensor([gt.max() / scales[s]]), "scale": torch.tensor([scales[s]]),
                    "fg_mask": torch.ones(1, *gt.shape[1:]), "volume": torch.tensor([volume]),
                    "slice": torch.tensor([s]), "acceleration": torch.tensor([acc]), "anatomy": torch.tensor([1]),
                    "index": torch.tensor([volume * 100 + s])})
    return out


def evaluate(t, batches):
    return [r for b in batches for r in t.evaluation_step(PredictionInKspace(), b, None)]


def test_volume_metrics_equal_fastmri_evaluate_on_unevenly_scaled_slices():
    """fastMRI's evaluate.py, written out: NMSE and PSNR over the whole volume in its own units
    (PSNR data range gt.max()), SSIM per slice with the volume's maximum, averaged."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    rng = np.random.default_rng(0)
    gt = rng.random((3, 24, 20)) * np.array([1.0, 10.0, 0.1])[:, None, None]  # uneven slice brightness
    pred = gt + 0.05 * rng.normal(size=gt.shape) * np.array([1.0, 3.0, 0.1])[:, None, None]
    scales = [1.1 * g.max() for g in gt]  # each slice's own normalisation, as make_sample does
    metrics = task(keep_images=False).aggregate(evaluate(task(keep_images=False), batches_for(0, 4, gt, pred, scales)),
                                                "val")
    assert metrics["nmse"] == pytest.approx(((gt - pred) ** 2).sum() / (gt**2).sum(), rel=1e-6)
    assert metrics["psnr"] == pytest.approx(peak_signal_noise_ratio(gt, pred, data_range=gt.max()), abs=1e-5)
    reference_ssim = np.mean([structural_similarity(g, p, data_range=gt.max()) for g, p in zip(gt, pred)])
    assert metrics["ssim"] == pytest.approx(reference_ssim, abs=1e-6)


def snu_records(acc, slices, score, volume):
    return [{"volume": volume, "slice": s, "acceleration": acc, "anatomy": 1, "index": s, "max_value": 1.0,
             "scale": 1.0, "ssim": 0.5, "ssim_snu": score, "sse": 1.0, "energy": 2.0, "target_max": 1.0,
             "pixels": 4} for s in range(slices)]


def test_snu_scores_are_averaged_over_slices_and_the_leaderboard_over_accelerations():
    records = snu_records(4, 16, 0.90, 0) + snu_records(4, 36, 0.96, 1) + snu_records(8, 10, 0.80, 2)
    metrics = task(snu=True).aggregate(records, "val")
    acc4 = (16 * 0.90 + 36 * 0.96) / 52  # the scorer's mean over all slices, not of the two files
    assert metrics["ssim_snu_acc4_brain"] == pytest.approx(acc4)
    assert metrics["ssim_snu"] == pytest.approx((16 * 0.90 + 36 * 0.96 + 10 * 0.80) / 62)
    assert metrics["ssim_snu_leaderboard"] == pytest.approx((acc4 + 0.80) / 2)


def test_separate_leaderboard_splits_report_the_combined_score():
    t = task(snu=True)
    first = t.aggregate(snu_records(4, 16, 0.90, 0) + snu_records(4, 36, 0.96, 1), "test_acc4")
    assert "ssim_snu_leaderboard_combined" not in first
    second = t.aggregate(snu_records(8, 20, 0.80, 0), "test_acc8")
    assert second["ssim_snu_leaderboard_combined"] == pytest.approx(((16 * 0.90 + 36 * 0.96) / 52 + 0.80) / 2)
    assert "ssim_snu_leaderboard_combined" not in t.aggregate(snu_records(8, 2, 0.5, 0), "val")


def test_groups_by_acceleration_and_anatomy():
    rng = np.random.default_rng(1)
    gt = rng.random((2, 16, 16))
    t = task(keep_images=False)
    records = evaluate(t, batches_for(0, 4, gt, gt * 0.9, [1, 2]) + batches_for(1, 4, gt, gt * 0.8, [1, 1])
                       + batches_for(0, 8, gt, gt * 0.7, [3, 1]))
    metrics = t.aggregate(records, "val")
    for key in ("ssim_acc4_brain", "ssim_acc8_brain", "psnr_acc4_brain", "nmse_acc8_brain"):
        assert key in metrics
    # volumes are averaged inside a group, then groups and volumes overall
    acc4 = np.mean([ssim_fastmri(gt, gt * 0.9), ssim_fastmri(gt, gt * 0.8)])
    assert metrics["ssim_acc4_brain"] == pytest.approx(acc4, abs=1e-6)
    assert metrics["psnr_acc8_brain"] == pytest.approx(psnr(gt, gt * 0.7), abs=1e-5)


class VolumeDataset:
    """What visualize reads back: the target of a sample (in scaled units) and the volume names."""

    def __init__(self, gt, scales):
        self.gt, self.scales, self.volume_names = gt, scales, ["brain_acc4_7.h5"]

    def __getitem__(self, index):
        s = index % 100
        return {"target": torch.from_numpy(self.gt[s] / self.scales[s]).float(),
                "scale": torch.tensor(self.scales[s], dtype=torch.float64),
                "fg_mask": torch.ones(self.gt.shape[1:])}  # saved with the truth (write_truth)


def test_images_are_streamed_to_disk_not_kept_in_the_records(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    gt = rng.random((3, 16, 16)) * np.array([1.0, 5.0, 0.2])[:, None, None]
    pred = gt + rng.normal(size=gt.shape) * np.array([0.0001, 0.3, 0.01])[:, None, None]
    scales = [2.0, 7.0, 0.5]
    t = task()
    monkeypatch.setattr(t, "build_datasets", lambda: {"val": VolumeDataset(gt, scales)})
    records = evaluate(t, batches_for(0, 4, gt, pred, scales))
    # the records that are gathered and kept hold scalars and a file name, no image
    assert all(not isinstance(v, np.ndarray) for r in records for v in r.values())
    spooled = [Path(r["image_file"]) for r in records]
    assert all(p.is_file() for p in spooled)
    t.aggregate(records, "val")
    paths = t.save_predictions(records, "val", tmp_path / "predictions")
    assert [p.name for p in paths] == ["brain_acc4_7_acc4.h5"]
    with h5py.File(paths[0]) as f:  # the data's own units, slice order
        np.testing.assert_allclose(f["reconstruction"][()], pred, rtol=1e-6)
        assert f.attrs["acceleration"] == 4
    assert not any(p.exists() for p in spooled)  # the spool is emptied once written
    plotted = t.visualize(records, "val", tmp_path / "plots")
    assert sorted(p.name for p in plotted) == ["val_best_0.png", "val_worst_1.png"]
    assert all(p.is_file() for p in plotted)


def test_old_evaluation_passes_are_removed_from_the_spool(tmp_path):
    t = task()
    gt = np.random.default_rng(3).random((2, 8, 8))
    first = evaluate(t, batches_for(0, 4, gt, gt, [1, 1]))
    t.aggregate(first, "val")  # a per-epoch validation: nobody saves it
    evaluate(t, batches_for(0, 4, gt, gt, [1, 1]))
    assert all(Path(r["image_file"]).exists() for r in first)  # another rank may still read it
    t.aggregate(first, "val")
    evaluate(t, batches_for(0, 4, gt, gt, [1, 1]))
    assert not any(Path(r["image_file"]).exists() for r in first)


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


def test_saved_volumes_are_referenced_by_a_prediction_manifest(tmp_path, monkeypatch):
    from podium.engine.predictions import read_predictions

    rng = np.random.default_rng(3)
    gt = rng.random((3, 16, 16))
    pred = gt + 0.01
    t = task()
    monkeypatch.setattr(t, "build_datasets", lambda: {"val": VolumeDataset(gt, [1.0, 1.0, 1.0])})
    records = evaluate(t, batches_for(0, 4, gt, pred, [1.0, 1.0, 1.0]))
    t.aggregate(records, "val")
    (path,) = t.save_predictions(records, "val", tmp_path / "predictions")
    saved = read_predictions(tmp_path / "predictions" / "val")
    assert saved.kind == "volume" and saved.ids == [path.stem]
    assert saved.manifest["slices"][path.stem] == [0, 1, 2]
    np.testing.assert_allclose(saved.sample("reconstruction", path.stem), pred, rtol=1e-6)
    assert not list((tmp_path / "predictions" / "val").glob("*.npy"))  # referenced, not copied
