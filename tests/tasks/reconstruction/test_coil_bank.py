"""Real coil maps for the simulator: estimated from a calibration block, drawn with augmentation,
tiled on the wide canvas, and wired into the simulated dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from podium.engine import registry
from podium.errors import UserError
from podium.tasks.reconstruction import simulate as sim
from podium.tasks.reconstruction.coil_bank import (
    CoilMapBank, calibration_block, calibration_maps, tile_to_canvas)
from podium.tasks.reconstruction.fft import fft2c_np

REAL_SCAN = Path(__file__).resolve().parents[3] / ".." / "shared" / "data" / "mri" / "espirit_brain_8ch.mat"


def head(h=64, w=48) -> np.ndarray:
    y, x = np.mgrid[:h, :w]
    return (((y - h / 2) / (h / 2.4)) ** 2 + ((x - w / 2) / (w / 2.4)) ** 2 < 1).astype(np.float32)


def scan_with_known_maps(h=64, w=48, coils=4, seed=0):
    """Fully sampled k-space of a head whose coil maps are smooth and known."""
    rng = np.random.default_rng(seed)
    maps = sim.coil_maps(coils, (h, w), rng, radius=1.4)
    truth = maps / np.sqrt((np.abs(maps) ** 2).sum(0, keepdims=True))
    return fft2c_np(maps * head(h, w)[None]).astype(np.complex64), truth


def coil_agreement(a: np.ndarray, b: np.ndarray, where: np.ndarray) -> float:
    """Mean |cos| between the per-pixel coil vectors (blind to a per-pixel phase)."""
    dot = np.abs((a.conj() * b).sum(0))
    norm = np.sqrt((np.abs(a) ** 2).sum(0) * (np.abs(b) ** 2).sum(0)) + 1e-12
    return float((dot / norm)[where].mean())


def test_calibration_maps_recover_known_coil_maps():
    kspace, truth = scan_with_known_maps()
    maps = calibration_maps(kspace, fraction=0.25)
    assert maps.shape == truth.shape and np.isfinite(maps).all()
    # unit root-sum-of-squares everywhere, background included (it is extrapolated, not zero)
    assert np.allclose(np.sqrt((np.abs(maps) ** 2).sum(0)), 1.0, atol=1e-3)
    inside = head() > 0
    assert coil_agreement(maps, truth, inside) > 0.97
    # a random coil vector agrees far less: the test can tell maps apart
    noise = np.random.default_rng(1).normal(size=truth.shape) + 0j
    assert coil_agreement(noise, truth, inside) < 0.8


def test_calibration_block_must_be_sampled():
    kspace, _ = scan_with_known_maps()
    assert calibration_block(kspace, 0.25) == (18, 30)
    holed = kspace.copy()
    holed[..., 24] = 0
    with pytest.raises(UserError, match="not all sampled"):
        calibration_block(holed, 0.25)


def test_draws_are_seeded_augmented_and_resampled():
    kspace, _ = scan_with_known_maps()
    bank = CoilMapBank([calibration_maps(kspace, 0.25)])
    a = bank.draw((80, 60), np.random.default_rng(3))
    b = bank.draw((80, 60), np.random.default_rng(3))
    c = bank.draw((80, 60), np.random.default_rng(4))
    assert a.shape == (4, 80, 60) and a.dtype == np.complex64
    assert np.array_equal(a, b)
    assert not np.allclose(a, c)
    # resampling and moving keep the maps a coil array: close to unit RSS
    assert np.abs(np.sqrt((np.abs(a) ** 2).sum(0)) - 1).max() < 0.1


def test_banks_refuse_mixed_coil_counts():
    with pytest.raises(UserError, match="number of coils"):
        CoilMapBank([np.ones((4, 8, 8), np.complex64), np.ones((8, 8, 8), np.complex64)])
    with pytest.raises(UserError, match="at least one"):
        CoilMapBank([])


def test_tiled_maps_fold_like_the_calibration_sees_them():
    """Periodic maps on the wide canvas: folding the coil images equals the maps times the
    folded object — the single-map model that a fold-over scan's calibration block measures."""
    rng = np.random.default_rng(0)
    maps = (rng.normal(size=(3, 10, 12)) + 1j * rng.normal(size=(3, 10, 12))).astype(np.complex64)
    obj = rng.random((10, 20)).astype(np.float32)
    canvas_maps = tile_to_canvas(maps, 20)
    assert canvas_maps.shape == (3, 10, 20)
    assert np.allclose(sim.fold(canvas_maps * obj[None], 12), maps * sim.fold(obj[None], 12)[0])


def test_simulator_uses_the_bank_only_when_asked():
    kspace, _ = scan_with_known_maps()
    bank = CoilMapBank([calibration_maps(kspace, 0.25)])
    image = head(60, 50)
    params = sim.SimulationParams(shape=(64, 48), num_coils=4)
    plain = sim.simulate_slice(image, params, np.random.default_rng(7))
    off = sim.simulate_slice(image, params, np.random.default_rng(7), bank)  # real_maps_p = 0
    assert np.array_equal(plain.kspace, off.kspace)
    real = sim.simulate_slice(image, sim.SimulationParams(shape=(64, 48), num_coils=4, real_maps_p=1.0),
                              np.random.default_rng(7), bank)
    # bank maps are FOV-periodic on the canvas, analytic ones are not
    assert np.allclose(real.maps[..., :8], real.maps[..., 48:56])
    assert not np.allclose(plain.maps[..., :8], plain.maps[..., 48:56])
    with pytest.raises(UserError, match="data.num_coils"):
        sim.simulate_slice(image, sim.SimulationParams(shape=(64, 48), num_coils=8, real_maps_p=1.0),
                           np.random.default_rng(7), bank)


def _cfg(tmp_path, **extra):
    return OmegaConf.create({"name": "simulated_mri", "shape": [48, 40], "num_coils": 4, "train_size": 2,
                             "val_volumes": 1, "val_slices": 1, "cache_dir": str(tmp_path / "cache"),
                             "mask": {"type": "snu", "center_fractions": [0.1, 0.1], "accelerations": [4, 8]},
                             **extra})


def test_simulated_dataset_reads_coil_maps_from_raw_files(tmp_path):
    kspace, _ = scan_with_known_maps(h=48, w=40)
    np.save(tmp_path / "calib.npy", kspace)
    ds = registry.build("dataset", "simulated_mri", _cfg(tmp_path, coil_maps=[str(tmp_path / "calib.npy")],
                                                         real_maps_p=1.0), seed=0)
    assert ds["train"].coil_bank is not None and ds["train"].params.real_maps_p == 1.0
    registry.build("dataset", "simulated_mri", _cfg(tmp_path), seed=0)
    # validation volumes with and without real maps are cached apart
    assert len(list((tmp_path / "cache").glob("sim-*"))) == 2


@pytest.mark.parametrize("extra, match", [
    ({"coil_maps": ["missing.npy"]}, "data.coil_maps: missing.npy not found"),
    ({"coil_maps": ["CALIB"], "real_maps_p": 1.5}, "data.real_maps_p"),
    ({"coil_maps": ["CALIB"], "calibration_fraction": 0.0}, "data.calibration_fraction"),
])
def test_bad_coil_map_settings_name_the_key(tmp_path, extra, match):
    kspace, _ = scan_with_known_maps(h=48, w=40)
    np.save(tmp_path / "calib.npy", kspace)
    extra = {k: ([str(tmp_path / "calib.npy")] if v == ["CALIB"] else v) for k, v in extra.items()}
    with pytest.raises(UserError, match=match):
        registry.build("dataset", "simulated_mri", _cfg(tmp_path, **extra), seed=0)


@pytest.mark.skipif(not REAL_SCAN.exists(), reason="../shared/data/mri not present")
def test_real_scan_maps_are_broad_head_coil_profiles():
    """The ESPIRiT scan's 8 maps from its 8 % centre block: finite, unit RSS, and each coil
    sees a large part of the head (no coil dominates less than a tenth of the image)."""
    bank = CoilMapBank.from_files([REAL_SCAN])
    maps = bank.map_sets[0]
    assert maps.shape == (8, 320, 256) and np.isfinite(maps).all()
    strongest = np.abs(maps).argmax(0)
    shares = np.bincount(strongest.ravel(), minlength=8) / strongest.size
    assert shares.max() < 0.5 and (np.abs(maps) > 0.3).mean(axis=(1, 2)).min() > 0.1
