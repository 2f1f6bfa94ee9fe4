"""Classical baselines (zero filling, GRAPPA, coil maps, CG-SENSE, LS scaling) on a noise-free
8-coil ellipse phantom, plus one real-data check on the FOV-aliased ESPIRiT brain slice."""

from pathlib import Path

import numpy as np
import pytest

from podium.errors import UserError
from podium.tasks.reconstruction.classical import (
    GRAPPA_LAMDA_CANDIDATES, estimate_sensitivities, grappa, ls_scale, sense, zero_filled,
)

SIZE, COILS, CENTRE = 64, 8, 8
MRI_DATA = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "mri"


@pytest.fixture(autouse=True, scope="module")
def single_blas_thread():
    """One BLAS thread: on a busy 2-core machine OpenBLAS's spinning threads made the GRAPPA
    calibration's many small solves up to 100x slower (29 s instead of 0.3 s for the real slice).
    threadpoolctl comes with scikit-learn; without it the tests still run, only slower."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def fft2c(x):
    axes = (-2, -1)
    return np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(x, axes=axes), norm="ortho"), axes=axes)


def nmse(estimate, truth):
    return np.linalg.norm(estimate - truth) ** 2 / np.linalg.norm(truth) ** 2


def equispaced_mask(width, acceleration, centre, offset=None):
    """Lines every `acceleration` columns from `offset` (default (W // 2) % R) plus a centre block
    of `centre` columns starting at (W - centre + 1) // 2; returns (mask, (start, stop))."""
    mask = np.zeros(width, bool)
    mask[(width // 2) % acceleration if offset is None else offset::acceleration] = True
    start = (width - centre + 1) // 2
    mask[start:start + centre] = True
    return mask, (start, start + centre)


@pytest.fixture(scope="module")
def phantom():
    """(object (H, W) real, maps (C, H, W) with unit RSS, fully sampled k-space (C, H, W))."""
    y, x = np.mgrid[-1:1:SIZE * 1j, -1:1:SIZE * 1j]
    image = np.zeros((SIZE, SIZE))
    for cx, cy, a, b, value in [(0, 0, .75, .9, 1.0), (0, 0, .65, .8, -.4), (-.25, .1, .15, .3, .3),
                                (.3, -.2, .2, .12, .5), (.1, .5, .08, .08, .6)]:
        image += value * (((x - cx) / a) ** 2 + ((y - cy) / b) ** 2 <= 1)
    angles = 2 * np.pi * np.arange(COILS) / COILS
    maps = np.stack([  # coils on a ring around the object, each with its own smooth phase
        np.exp(-((x - 1.2 * np.cos(t)) ** 2 + (y - 1.2 * np.sin(t)) ** 2) / 1.5)
        * np.exp(1j * (np.cos(t) * x + np.sin(t) * y + t)) for t in angles])
    maps /= np.sqrt((np.abs(maps) ** 2).sum(axis=0))
    return image, maps, fft2c(maps * image).astype(np.complex64)


def test_zero_filled_fully_sampled_is_the_object_magnitude(phantom):
    image, _, kspace = phantom
    full = zero_filled(kspace, np.ones(SIZE, bool))
    assert full.shape == (SIZE, SIZE)
    np.testing.assert_allclose(full, np.abs(image), atol=1e-5)  # maps have unit RSS


def test_zero_filled_ignores_unsampled_columns(phantom):
    _, _, kspace = phantom
    mask, _ = equispaced_mask(SIZE, 4, CENTRE)
    noisy = kspace.copy()
    noisy[:, :, ~mask] = 1e3  # garbage where nothing was sampled must not leak in
    expected = zero_filled(kspace * mask, mask)
    np.testing.assert_allclose(zero_filled(noisy, mask), expected, atol=1e-5)


@pytest.mark.parametrize("acceleration", [2, 3, 4])
def test_grappa_keeps_acquired_columns_and_fills_every_missing_one(phantom, acceleration):
    _, _, kspace = phantom
    mask, acs = equispaced_mask(SIZE, acceleration, CENTRE)
    filled = grappa(kspace * mask, mask, acs=acs, lamda=1e-6)
    assert filled.shape == kspace.shape and filled.dtype == np.complex64
    np.testing.assert_array_equal(filled[:, :, mask], kspace[:, :, mask])
    # Every missing column, the ones at the k-space edges included (zero-padded sources), gets
    # a prediction: the phantom has signal in every column.
    assert (np.abs(filled[:, :, ~mask]).sum(axis=(0, 1)) > 0).all()


@pytest.mark.parametrize("acceleration", [2, 4])
def test_grappa_beats_zero_filling_by_a_large_factor(phantom, acceleration):
    image, _, kspace = phantom
    mask, acs = equispaced_mask(SIZE, acceleration, CENTRE)
    truth = np.abs(image)
    baseline = nmse(zero_filled(kspace * mask, mask), truth)
    filled = grappa(kspace * mask, mask, acs=acs, lamda=1e-6)  # noise-free: little regularisation
    assert nmse(zero_filled(filled, np.ones(SIZE, bool)), truth) < baseline / 20


def longest_sampled_run(mask, start, stop):
    while start > 0 and mask[start - 1]:
        start -= 1
    while stop < mask.size and mask[stop]:
        stop += 1
    return start, stop


@pytest.mark.parametrize("offset", [0, 1, 2, 3])
def test_grappa_works_for_every_lattice_offset(phantom, offset):
    # The 8-line centre block (columns 28..35) sits on the lattice for some offsets and breaks it
    # for others. Inferred: the acceleration (most common gap) and the calibration block (the
    # longest sampled run, which takes in a lattice line touching the centre block).
    image, _, kspace = phantom
    mask, acs = equispaced_mask(SIZE, 4, CENTRE, offset=offset)
    inferred = grappa(kspace * mask, mask, lamda=1e-6)
    run = longest_sampled_run(mask, *acs)
    assert (run != acs) == (offset in (0, 3))
    explicit = grappa(kspace * mask, mask, acs=slice(*run), lamda=1e-6, acceleration=4)
    np.testing.assert_array_equal(inferred, explicit)
    np.testing.assert_array_equal(inferred[:, :, mask], kspace[:, :, mask])
    assert nmse(zero_filled(inferred, np.ones(SIZE, bool)), np.abs(image)) < 0.005


def test_grappa_lamda_candidates_choose_by_calibration_error(phantom):
    image, _, kspace = phantom
    mask, acs = equispaced_mask(SIZE, 2, CENTRE)
    # Noise-free data: the cross-validation must take the small lamda, exactly.
    chosen = grappa(kspace * mask, mask, acs=acs, lamda=(1.0, 1e-6))
    np.testing.assert_array_equal(chosen, grappa(kspace * mask, mask, acs=acs, lamda=1e-6))
    # Noisy data, where little regularisation makes GRAPPA worse than zero filling (as on the real
    # slice): the choice is as good as the better fixed value.
    rng = np.random.default_rng(0)
    scale = 0.01 * np.abs(kspace).max()
    noise = rng.standard_normal(kspace.shape) + 1j * rng.standard_normal(kspace.shape)
    noisy = kspace + scale * noise
    truth = np.abs(image)
    full = np.ones(SIZE, bool)
    errors = {}
    for lamda in (1e-6, 1.0, (1e-6, 1.0)):
        filled = grappa(noisy * mask, mask, acs=acs, lamda=lamda)
        errors[lamda] = nmse(zero_filled(filled, full), truth)
    assert errors[1e-6] > 1.3 * errors[1.0]  # the noise is strong enough for lamda to matter
    assert errors[1e-6] > nmse(zero_filled(noisy * mask, mask), truth)
    assert errors[(1e-6, 1.0)] <= min(errors[1e-6], errors[1.0]) * 1.05


def test_grappa_reduces_kernel_to_a_narrow_calibration_block_and_refuses_too_narrow(phantom):
    _, _, kspace = phantom
    mask, acs = equispaced_mask(SIZE, 4, CENTRE)
    # 8 ACS columns cannot hold 4 lattice lines at R = 4: two are used, as if asked for two.
    np.testing.assert_array_equal(grappa(kspace * mask, mask, acs=acs, kernel=(5, 4)),
                                  grappa(kspace * mask, mask, acs=acs, kernel=(5, 2)))
    with pytest.raises(UserError, match="too narrow"):  # 2 columns: no room for target + source
        grappa(kspace * mask, mask, acs=(31, 33))


def test_grappa_rejects_bad_arguments(phantom):
    _, _, kspace = phantom
    mask, acs = equispaced_mask(SIZE, 4, CENTRE)
    with pytest.raises(UserError, match="not all sampled"):
        grappa(kspace * mask, mask, acs=(acs[0] - 2, acs[1]))
    with pytest.raises(UserError, match="mask must be"):
        grappa(kspace, mask[:-1], acs=acs)
    with pytest.raises(UserError, match="lamda"):
        grappa(kspace * mask, mask, acs=acs, lamda=-1.0)


@pytest.mark.parametrize("acceleration", [2, 4])
def test_sense_with_true_maps_recovers_the_object(phantom, acceleration):
    image, maps, kspace = phantom
    mask, _ = equispaced_mask(SIZE, acceleration, CENTRE)
    recon = sense(kspace * mask, mask, maps, iterations=100, lamda=0.0)
    assert recon.shape == (SIZE, SIZE) and np.iscomplexobj(recon)
    assert nmse(recon, image) < (1e-8 if acceleration == 2 else 1e-3)
    assert nmse(recon, image) < nmse(zero_filled(kspace * mask, mask), np.abs(image)) / 50


def test_sense_rejects_maps_of_the_wrong_shape(phantom):
    _, maps, kspace = phantom
    with pytest.raises(UserError, match="maps must have"):
        sense(kspace, np.ones(SIZE, bool), maps[:, :-1])


def test_estimated_sensitivities_match_the_true_maps_on_the_object(phantom):
    image, maps, kspace = phantom
    mask, acs = equispaced_mask(SIZE, 4, CENTRE)
    estimate = estimate_sensitivities(kspace * mask, acs)
    assert estimate.shape == maps.shape
    inside = np.abs(image) > 0.1
    overlap = np.abs((estimate.conj() * maps).sum(axis=0))
    norms = np.sqrt((np.abs(estimate) ** 2).sum(axis=0) * (np.abs(maps) ** 2).sum(axis=0))
    correlation = overlap[inside] / norms[inside]
    assert correlation.mean() > 0.99 and correlation.min() > 0.95
    assert np.abs(estimate[:, :3, :3]).max() == 0  # no object in the corners: outside the support
    # Good enough for SENSE to beat zero filling clearly.
    recon = np.abs(sense(kspace * mask, mask, estimate))
    assert nmse(recon, np.abs(image)) < nmse(zero_filled(kspace * mask, mask), np.abs(image)) / 3


def test_ls_scale_is_the_least_squares_optimum():
    rng = np.random.default_rng(1)
    reference = rng.random((16, 16))
    recon = 3.0 * reference + 0.1 * rng.random((16, 16))
    scaled = ls_scale(recon, reference)
    assert not np.iscomplexobj(scaled)
    best, *_ = np.linalg.lstsq(recon.reshape(-1, 1), reference.ravel(), rcond=None)
    np.testing.assert_allclose(scaled, recon * best[0], rtol=1e-12)
    error = np.linalg.norm(scaled - reference)
    for factor in (0.99, 1.01):
        assert np.linalg.norm(factor * scaled - reference) > error
    complex_recon = recon * np.exp(0.3j)  # complex inputs: a complex factor undoes the phase
    unrotated = ls_scale(complex_recon, reference.astype(complex))
    np.testing.assert_allclose(unrotated, scaled, atol=1e-12)
    np.testing.assert_array_equal(ls_scale(np.zeros(4), np.ones(4)), np.zeros(4))


@pytest.mark.realdata
@pytest.mark.skipif(not MRI_DATA.is_dir(), reason=f"{MRI_DATA} is not available")
def test_grappa_beats_zero_filling_on_the_real_espirit_slice():
    from scipy.io import loadmat
    from skimage.metrics import structural_similarity

    kspace = np.transpose(loadmat(MRI_DATA / "espirit_brain_8ch.mat")["DATA"], (2, 0, 1))
    kspace = kspace.astype(np.complex64)  # (coils, readout 320, phase 256)
    width = kspace.shape[-1]
    reference = zero_filled(kspace, np.ones(width, bool))

    def ssim(recon):
        recon = ls_scale(recon, reference)
        return structural_similarity(reference, recon, win_size=7, data_range=reference.max())

    mask, acs = equispaced_mask(width, 4, round(0.08 * width))
    baseline = ssim(zero_filled(kspace * mask, mask))
    assert baseline == pytest.approx(0.737, abs=0.002)  # reference.md's zero-filled figure
    filled = grappa(kspace * mask, mask, acs=acs, lamda=GRAPPA_LAMDA_CANDIDATES)
    assert ssim(zero_filled(filled, np.ones(width, bool))) > baseline + 0.02
