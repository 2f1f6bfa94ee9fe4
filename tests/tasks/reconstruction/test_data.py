"""Reconstruction datasets: sample scaling, mask policies, fastMRI / SNU / simulated / raw
splits, and bad input (named file, UserError)."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from podium.engine import registry
from podium.engine.loading import SeededDataset
from podium.errors import UserError
from podium.tasks.reconstruction import masks as mk
from podium.tasks.reconstruction import readers
from podium.tasks.reconstruction.data import (MaskConfig, MaskPolicy, center_block_width, make_sample)
from podium.tasks.reconstruction.fft import fft2c_np, ifft2c_np


def coil_kspace(c=3, h=24, w=20, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:h, :w]
    obj = (((y - h / 2) / 8) ** 2 + ((x - w / 2) / 7) ** 2 < 1).astype(np.complex64)
    maps = np.stack([np.exp(1j * k + 0.05 * (x - k * 3)) for k in range(c)])
    return fft2c_np(maps * obj + 0.01 * rng.normal(size=(c, h, w))).astype(np.complex64)


def sample_for(kspace, acc=4):
    sampled = mk.SNUMask([0.2], [acc])(kspace.shape[-1], np.random.default_rng(0))
    return sampled, make_sample(kspace, sampled, None, max_value=None, recon_size=kspace.shape[-2:],
                                fg_threshold=0.0, volume=0, slice_index=0, index=0, anatomy=1)


def test_make_sample_scales_by_the_zero_filled_maximum():
    kspace = coil_kspace()
    sampled, s = sample_for(kspace)
    masked = torch.view_as_complex(s["masked_kspace"]).numpy()
    zero_filled = np.sqrt((np.abs(ifft2c_np(masked)) ** 2).sum(0))
    assert zero_filled.max() == pytest.approx(1.0, rel=1e-5)  # the scale is known at test time
    assert np.abs(masked[..., ~sampled.mask]).max() == 0  # unsampled columns carry nothing
    full = np.sqrt((np.abs(ifft2c_np(kspace)) ** 2).sum(0))
    assert np.allclose(s["target"].numpy() * float(s["scale"]), full, rtol=1e-4, atol=1e-5)
    assert float(s["max_value"]) == pytest.approx(full.max() / float(s["scale"]), rel=1e-5)
    assert s["mask"].shape == (1, 1, 20, 1) and s["masked_kspace"].shape == (3, 24, 20, 2)
    assert int(s["num_low_frequencies"]) == sampled.num_low_frequencies and int(s["acceleration"]) == 4


def test_make_sample_refuses_a_mask_of_the_wrong_width():
    kspace = coil_kspace()
    sampled = mk.SNUMask([0.2], [4])(16, np.random.default_rng(0))
    with pytest.raises(UserError, match="16 columns"):
        make_sample(kspace, sampled, None, max_value=None, recon_size=(24, 20), fg_threshold=0.0,
                    volume=0, slice_index=0, index=0, anatomy=0)


def test_center_block_width():
    mask = np.zeros(20, bool)
    mask[8:13] = True
    mask[::4] = True
    assert center_block_width(mask) == 5
    assert center_block_width(np.zeros(20, bool)) == 0


def test_symmetric_center_block_width_counts_as_fastmri_on_snu_masks():
    mask = mk.SNUMask([0.08], [4])(396, np.random.default_rng(0)).mask  # a line touches the block
    assert center_block_width(mask) == 33
    assert center_block_width(mask, symmetric=True) == 32  # fastMRI's get_pad_and_num_low_freqs
    assert center_block_width(np.zeros(20, bool), symmetric=True) == 0


def test_file_masks_get_the_models_centre_detection(tmp_path):
    mask = mk.SNUMask([0.3], [4])(20, np.random.default_rng(0)).mask  # centre 7..12 + line at 6
    for split in ("train", "val"):
        (tmp_path / split).mkdir()
        write_volume(tmp_path / split / "a.h5", [coil_kspace() * mask], with_mask=mask)
    widths = {mode: int(registry.build("dataset", "fastmri", fastmri_cfg(tmp_path), seed=0,
                                       centre_detection=mode)["val"][0]["num_low_frequencies"])
              for mode in ("contiguous", "symmetric")}
    assert widths == {"contiguous": center_block_width(mask), "symmetric": center_block_width(mask, True)}
    assert widths["contiguous"] != widths["symmetric"]


def test_evaluation_masks_are_fixed_and_cover_every_acceleration():
    policy = MaskPolicy(MaskConfig(type="equispaced_fraction", center_fractions=[0.08, 0.04],
                                   accelerations=[4, 8]), train=False)
    assert policy.copies == 2
    a4, a8 = policy.sample("file.h5:3", 0, 96), policy.sample("file.h5:3", 1, 96)
    assert (a4.acceleration, a8.acceleration) == (4, 8)
    assert np.array_equal(a4.mask, policy.sample("file.h5:3", 0, 96).mask)  # same every run


def test_training_masks_follow_the_sample_seed_and_the_augmentation_ramp():
    cfg = MaskConfig(type="equispaced", accelerations=[4], augment_p=1.0, augment_schedule="linear")
    policy = MaskPolicy(cfg, train=True, max_epochs=10)
    torch.manual_seed(0)
    first = policy.sample("x", 0, 64).mask
    torch.manual_seed(0)
    assert np.array_equal(first, policy.sample("x", 0, 64).mask)
    assert policy.augment.probability(0 / 10) == 0.0 and policy.augment.probability(10 / 10) == 1.0


def centre_run(mask: np.ndarray, num_low: int) -> int:
    """Sampled columns of the centre block placed as the mask functions place it."""
    start = (len(mask) - num_low + 1) // 2
    return int(mask[start:start + num_low].sum())


def test_evaluation_masks_use_each_accelerations_own_centre_fraction():
    policy = MaskPolicy(MaskConfig(type="equispaced_fraction", center_fractions=[0.08, 0.04],
                                   accelerations=[4, 8]), train=False)
    a4, a8 = policy.sample("file.h5:3", 0, 368), policy.sample("file.h5:3", 1, 368)
    assert (a4.num_low_frequencies, a8.num_low_frequencies) == (29, 15)  # round(368 x 0.08 / 0.04)
    assert centre_run(a8.mask, 15) == 15
    # outside the 15 centre columns the 8x mask is its equispaced lines, not a 29-wide block
    assert centre_run(a8.mask, 29) < 29


def test_duplicate_bank_masks_are_augmented_with_the_configured_probability():
    """`mask.duplicate` (the acc4/acc8 bank) and `mask.augment_p` compose: the share of bank
    masks replaced by a pool mask follows the schedule, at the copy's own acceleration."""
    cfg = MaskConfig(type="snu", center_fractions=[0.08, 0.08], accelerations=[4, 8], augment_p=0.5,
                     augment_schedule="constant", duplicate=True)
    policy = MaskPolicy(cfg, train=True, max_epochs=10)
    torch.manual_seed(0)
    drawn = [policy.sample(f"brain_acc4_{i}:0", i % 2, 396) for i in range(400)]
    augmented = [m for m in drawn if m.augmented]
    assert 160 <= len(augmented) <= 240  # binomial(400, 0.5): 200 +- 4 sigma
    assert all(m.acceleration == (4, 8)[i % 2] for i, m in enumerate(drawn))
    bank = mk.MaskBank((4, 8), 0.08, "snu")
    plain = [m for i, m in enumerate(drawn) if not m.augmented]
    assert all(np.array_equal(m.mask, bank.mask_for(f"brain_acc4_{i}:0", 396, i % 2).mask)
               for i, m in enumerate(drawn) if not m.augmented) and plain
    # the ramp still applies: nothing is augmented before augment_start
    ramped = MaskPolicy(MaskConfig(type="snu", center_fractions=[0.08, 0.08], accelerations=[4, 8],
                                   augment_p=0.5, augment_start=0.5, duplicate=True), train=True, max_epochs=10)
    assert not any(ramped.sample(f"k{i}", i % 2, 396).augmented for i in range(100))


def write_volume(path, kspace_slices, with_mask=None):
    target = np.stack([np.sqrt((np.abs(ifft2c_np(k)) ** 2).sum(0)) for k in kspace_slices]).astype(np.float32)
    return readers.write_fastmri_h5(path, np.stack(kspace_slices), target, recon_size=target.shape[-2:],
                                    mask=with_mask)


def fastmri_cfg(tmp_path, **extra):
    base = {"name": "fastmri", "train": str(tmp_path / "train"), "val": str(tmp_path / "val"),
            "cache_dir": str(tmp_path / "cache"),
            "mask": {"type": "equispaced_fraction", "center_fractions": [0.2, 0.1], "accelerations": [4, 8]}}
    return OmegaConf.create({**base, **extra})


def test_fastmri_datasets_serve_every_slice_once_per_acceleration_in_validation(tmp_path):
    for split in ("train", "val"):
        (tmp_path / split).mkdir()
        write_volume(tmp_path / split / "a.h5", [coil_kspace(seed=i) for i in range(2)])
    ds = registry.build("dataset", "fastmri", fastmri_cfg(tmp_path), seed=0, max_epochs=4)
    assert len(ds["train"]) == 2 and len(ds["val"]) == 4
    accs = sorted(int(ds["val"][i]["acceleration"]) for i in range(4))
    assert accs == [4, 4, 8, 8]
    train = SeededDataset(ds["train"], seed=0)
    a, b = train[(0, 0)], train[(0, 1)]  # a fresh mask per epoch, reproducible per (epoch, index)
    assert torch.equal(a["mask"], train[(0, 0)]["mask"])
    assert a["target"].shape == (24, 20) and b["target"].shape == (24, 20)


def test_fastmri_file_mask_of_the_wrong_width_names_the_file(tmp_path):
    for split in ("train", "val"):
        (tmp_path / split).mkdir()
    bad = np.zeros(12, bool)
    bad[::2] = True
    write_volume(tmp_path / "train" / "a.h5", [coil_kspace()])
    path = tmp_path / "val" / "bad.h5"
    write_volume(path, [coil_kspace()])
    with h5py.File(path, "a") as f:  # a mask narrower than the k-space
        f.create_dataset("mask", data=bad)
    with pytest.raises(UserError, match=r"bad.h5.*'mask'.*12 columns"):  # caught when the index is built
        registry.build("dataset", "fastmri", fastmri_cfg(tmp_path), seed=0)


def test_fastmri_missing_folder_names_the_key(tmp_path):
    with pytest.raises(UserError, match="data.train"):
        registry.build("dataset", "fastmri", fastmri_cfg(tmp_path), seed=0)


def test_snu_layout(tmp_path):
    kspace = np.stack([coil_kspace(w=24, seed=i) for i in range(2)])
    label = np.abs(ifft2c_np(kspace)).sum(1)[:, 2:18, 4:20].astype(np.float32)  # a 16 x 16 "384 crop"
    mask = np.zeros(24, bool)
    mask[::4] = True
    mask[10:14] = True
    for split in ("train", "val"):
        for sub in ("kspace", "image"):
            (tmp_path / split / sub).mkdir(parents=True)
        with h5py.File(tmp_path / split / "kspace" / "brain_acc4_1.h5", "w") as f:
            f.create_dataset("kspace", data=kspace)
            f.create_dataset("mask", data=mask.astype(np.float32))
        with h5py.File(tmp_path / split / "image" / "brain_acc4_1.h5", "w") as f:
            f.create_dataset("image_label", data=label)
            f.create_dataset("image_input", data=label)
            f.attrs["max"] = float(label.max())
    cfg = OmegaConf.create({"name": "snu", "root": str(tmp_path), "cache_dir": str(tmp_path / "cache"),
                            "mask": {"type": "snu", "center_fractions": [0.08, 0.08], "accelerations": [4, 8]}})
    ds = registry.build("dataset", "snu", cfg, seed=0)
    s = ds["val"][1]
    assert s["target"].shape == (16, 16) and int(s["slice"]) == 1
    assert torch.equal(s["mask"].flatten().bool(), torch.from_numpy(mask))  # the file's own mask
    assert float(s["max_value"]) * float(s["scale"]) == pytest.approx(label.max(), rel=1e-5)
    assert s["fg_mask"].shape == (16, 16)


def test_simulated_datasets_with_a_real_style_test_split(tmp_path):
    raw = coil_kspace(c=4, h=48, w=40)
    np.save(tmp_path / "real.npy", raw)
    cfg = OmegaConf.create({"name": "simulated_mri", "shape": [48, 40], "num_coils": 4, "train_size": 3,
                            "val_volumes": 1, "val_slices": 2, "cache_dir": str(tmp_path / "cache"),
                            "real_test": [str(tmp_path / "real.npy")],
                            "mask": {"type": "snu", "center_fractions": [0.1, 0.1], "accelerations": [4, 8]}})
    ds = registry.build("dataset", "simulated_mri", cfg, seed=0, max_epochs=2)
    assert len(ds["train"]) == 3 and len(ds["val"]) == 4 and len(ds["test_real"]) == 2
    train = SeededDataset(ds["train"], seed=0)
    s = train[(1, 0)]
    assert s["masked_kspace"].shape == (4, 48, 40, 2)
    assert torch.equal(s["masked_kspace"], train[(1, 0)]["masked_kspace"])  # reproducible
    assert not torch.equal(s["masked_kspace"], train[(1, 1)]["masked_kspace"])  # fresh every epoch
    # validation volumes are written once and reused
    files = list((tmp_path / "cache").glob("sim-*/val_*.h5"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    registry.build("dataset", "simulated_mri", cfg, seed=0)
    assert files[0].stat().st_mtime_ns == mtime
    real = ds["test_real"][1]
    assert int(real["acceleration"]) == 8 and real["target"].shape == (48, 40)
