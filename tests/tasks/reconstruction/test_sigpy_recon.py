"""Classical reconstruction through sigpy (sigpy_recon.py): ESPIRiT maps against sigpy's own
calibration, the soft-SENSE operator against sigpy's L1WaveletRecon, CS against zero filling,
two map sets against one on a folded slice, option checks, the lambda rule, and a run of
`model=cs_l1wavelet` through podium train / eval / predict."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from podium.engine import registry
from podium.errors import UserError
from podium.tasks.reconstruction import sigpy_recon as sr
from podium.tasks.reconstruction.classical import zero_filled
from podium.tasks.reconstruction.masks import SNUMask
from podium.tasks.reconstruction.simulate import SimulationParams, mni_slices, simulate_slice

sigpy = pytest.importorskip("sigpy")
import sigpy.mri  # noqa: E402  (the mri subpackage is not imported by sigpy itself)

REPO = Path(__file__).resolve().parents[3]
REAL_SLICE = (REPO / ".." / "shared" / "data" / "mri" / "espirit_brain_8ch.mat").resolve()


def simulated(object_width, seed=0, shape=(160, 256)):
    params = SimulationParams(shape=shape, object_width=object_width, noise_ratio=(0.01, 0.01))
    return simulate_slice(mni_slices()[40], params, np.random.default_rng(seed))


def undersample(kspace, acc):
    sampled = SNUMask([0.08], [acc])(kspace.shape[-1], np.random.default_rng(0))
    return kspace * sampled.mask, sampled.mask, sr.centre_block(sampled.mask, sampled.num_low_frequencies)


@pytest.fixture(scope="module")
def unfolded():
    return simulated((0.8, 0.8))


@pytest.fixture(scope="module")
def folded():
    return simulated((1.25, 1.25))


def test_first_set_is_sigpys_espirit_map(unfolded):
    kspace = unfolded.kspace
    mine = sr.espirit_maps(kspace, calib_width=16, sets=1)[0]
    theirs = sigpy.mri.app.EspiritCalib(kspace, calib_width=16, show_pbar=False).run()
    both = (np.abs(mine).sum(0) > 0) & (np.abs(theirs).sum(0) > 0)
    assert both.mean() > 0.3  # the object
    assert ((np.abs(mine).sum(0) > 0) != (np.abs(theirs).sum(0) > 0)).mean() < 0.01  # same crop
    # unit vectors per pixel: |<mine, theirs>| = 1 means equal up to a phase (sigpy's power
    # iteration stops after 100 steps, so a few pixels with a small eigengap differ slightly)
    overlap = np.abs((mine.conj() * theirs).sum(0))[both]
    assert np.median(overlap) > 0.9999
    assert np.percentile(overlap, 5) > 0.99


def test_second_set_is_orthogonal_and_covers_the_fold(folded):
    maps = sr.espirit_maps(folded.kspace, calib_width=16, sets=2)
    assert maps.shape == (2, 8, 160, 256)
    first, second = (np.abs(m).sum(0) > 0 for m in maps)
    both = first & second
    assert both.sum() > 50  # the fold-over bands hold a second eigenvector with eigenvalue ~ 1
    assert np.abs((maps[0].conj() * maps[1]).sum(0))[both].max() < 1e-4
    np.testing.assert_allclose(np.linalg.norm(maps[1], axis=0)[both], 1, atol=1e-4)


def test_one_set_operator_is_sigpys_l1wavelet_recon(unfolded):
    measured, mask, acs = undersample(unfolded.kspace, 4)
    maps = sr.espirit_maps(measured, acs, sets=1)
    mine = sr.reconstruct(measured, mask, maps, "l1wavelet", lamda=0.01, max_iter=20, complex_images=True)[0]
    scale = zero_filled(measured, mask).max()
    weights = np.broadcast_to(mask.astype(np.float32), measured.shape[1:])
    theirs = sigpy.mri.app.L1WaveletRecon((measured / scale).astype(np.complex64), maps[0], 0.01,
                                          weights=weights, max_iter=20, show_pbar=False).run() * scale
    np.testing.assert_allclose(mine, theirs, rtol=0, atol=1e-4 * np.abs(theirs).max())


@pytest.mark.parametrize("method", ["l1wavelet"])  # TV with its rule's weight does not (see DEFAULT_LAMBDA)
def test_compressed_sensing_beats_zero_filling_at_4x(folded, method):
    measured, mask, acs = undersample(folded.kspace, 4)
    maps = sr.espirit_maps(measured, acs, sets=2)
    cs = sr.score_magnitude(sr.reconstruct(measured, mask, maps, method), folded.target)
    zf = sr.score_magnitude(zero_filled(measured, mask), folded.target)
    assert cs["ssim"] > zf["ssim"] + 0.01
    assert cs["psnr"] > zf["psnr"] + 3


def test_two_map_sets_beat_one_on_a_folded_slice(folded):
    measured, mask, acs = undersample(folded.kspace, 4)
    maps = sr.espirit_maps(measured, acs, sets=2)
    one = sr.score_magnitude(sr.reconstruct(measured, mask, maps[:1], "l1wavelet", max_iter=50), folded.target)
    two = sr.score_magnitude(sr.reconstruct(measured, mask, maps, "l1wavelet", max_iter=50), folded.target)
    assert two["ssim"] > one["ssim"] + 0.01
    assert two["psnr"] > one["psnr"]


@pytest.mark.parametrize("override, key", [({"map_sets": 3}, "map_sets"), ({"lamda": -0.1}, "lamda"),
                                           ({"max_iter": 0}, "max_iter")])
def test_bad_options_name_the_key(override, key):
    with pytest.raises(UserError, match=f"model.{key}"):
        registry.build("model", "cs_l1wavelet", OmegaConf.create({"name": "cs_l1wavelet", **override}))


def test_bad_arguments_of_the_functions():
    kspace = np.zeros((2, 32, 32), np.complex64)
    with pytest.raises(UserError, match="sets"):
        sr.espirit_maps(kspace, (12, 20), sets=3)
    with pytest.raises(UserError, match="calib_width"):
        sr.espirit_maps(kspace, (14, 18))  # 4 calibration columns < the 6-wide kernel
    with pytest.raises(UserError, match="lamda"):
        sr.reconstruct(kspace, np.ones(32, bool), np.zeros((1, 2, 32, 32)), "tv", lamda=-1)
    with pytest.raises(UserError, match="method"):
        sr.reconstruct(kspace, np.ones(32, bool), np.zeros((1, 2, 32, 32)), "grappa")


def test_every_baseline_is_registered_and_parameter_free():
    import torch

    for name in ("sense", "cs_l1wavelet", "cs_tv"):
        model = registry.build("model", name, OmegaConf.create({"name": name, "max_iter": 3, "kernel_width": 4}))
        assert sum(p.numel() for p in model.parameters()) == 0
    # the VarNet's call: (B, C, H, W, 2) k-space, (B, 1, 1, W, 1) mask, centre width
    measured, mask, acs = undersample(simulated((1.0, 1.0), shape=(64, 128)).kspace, 4)
    batch = torch.view_as_real(torch.from_numpy(measured.astype(np.complex64)))[None]
    out = model(batch, torch.from_numpy(mask.astype(np.float32)).view(1, 1, 1, -1, 1), torch.tensor([acs[1] - acs[0]]))
    assert out.shape == (1, 64, 128) and torch.isfinite(out).all()


def test_choose_lambda_prefers_the_moderate_weight():
    params = SimulationParams(shape=(160, 256), object_width=(1.1, 1.1))
    best, means = sr.choose_lambda("l1wavelet", grid=(0.003, 0.3), accelerations=(4,), slices=1, params=params,
                                   max_iter=30)
    assert set(means) == {0.003, 0.3}
    assert best == 0.003 and means[0.003] > means[0.3]  # 0.3 of the image maximum wipes out detail
    with pytest.raises(UserError, match="grid"):
        sr.choose_lambda(grid=(-1.0,))


def _podium(*args, timeout=300):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "podium", *args], check=False, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.slow
def test_cs_run_trains_nothing_then_evaluates_and_predicts(tmp_path):
    import h5py

    from podium.tasks.reconstruction import readers

    run = tmp_path / "run"
    result = _podium("train", "experiment=classical_sim2real", "data.shape=[64,128]", "data.num_coils=4",
                     "data.real_test=[]", "model.max_iter=10", "model.kernel_width=4", "tracking=none",
                     "trainer.progress_bar=false", f"run.dir={run}", f"data.cache_dir={tmp_path / 'cache'}")
    assert result.returncode == 0, result.stdout + result.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0.3 < metrics["val/ssim_acc4_brain"] <= 1
    assert (run / "checkpoints" / "best.pt").is_file() and (run / "checkpoints" / "last.pt").is_file()
    assert len((run / "history.csv").read_text().strip().splitlines()) == 2  # one validation, no training

    result = _podium("eval", str(run))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ssim_acc8_brain" in result.stdout
    measured, _, _ = undersample(simulated((1.0, 1.0), shape=(64, 128)).kspace[:4], 4)
    scan = tmp_path / "scan.h5"
    readers.write_fastmri_h5(scan, measured[None], None, recon_size=(64, 128))
    out = tmp_path / "recon.h5"
    result = _podium("predict", str(run), str(scan), "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    with h5py.File(out) as f:
        image = f["reconstruction/scan.h5"][()]
    assert image.shape == (1, 64, 128) and np.isfinite(image).all() and image.max() > 0
