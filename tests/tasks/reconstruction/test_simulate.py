"""The k-space simulator: fold-over, acquired band, noise level, coil maps, HDF5 output."""

from __future__ import annotations

import numpy as np
import pytest
from omegaconf import OmegaConf

from podium.engine import registry
from podium.errors import UserError
from podium.tasks.reconstruction import readers
from podium.tasks.reconstruction import simulate as sim
from podium.tasks.reconstruction.fft import ifft2c_np

SMALL = sim.SimulationParams(shape=(64, 48), num_coils=4)


def small_dataset_cfg(tmp_path, **extra):
    return OmegaConf.create({"name": "simulated_mri", "shape": [48, 40], "num_coils": 4, "train_size": 2,
                             "val_volumes": 1, "val_slices": 1, "cache_dir": str(tmp_path / "cache"), **extra})


@pytest.fixture(scope="module")
def mni():
    return sim.mni_slices("axial", step=6)


def phantom(h=60, w=50) -> np.ndarray:
    y, x = np.mgrid[:h, :w]
    return (((y - h / 2) / (h / 2.3)) ** 2 + ((x - w / 2) / (w / 2.3)) ** 2 < 1).astype(np.float32)


def test_fold_sums_the_canvas_modulo_the_field_of_view():
    canvas = np.arange(2 * 10, dtype=np.float32).reshape(1, 2, 10)  # width 10 folded into 6
    out = sim.fold(canvas, 6)
    assert out.shape == (1, 2, 6)
    assert out.sum() == pytest.approx(canvas.sum())  # nothing lost
    offset = (10 - 6) // 2  # canvas column 2 lands on FOV column 0
    assert out[0, 0, 0] == canvas[0, 0, offset] + canvas[0, 0, offset + 6]
    assert np.array_equal(sim.fold(canvas[..., 3:9], 6), canvas[..., 3:9])  # no fold when it fits


def test_band_limits_centre_the_acquired_columns():
    assert sim.band_limits(256, 168 / 256) == (44, 212)  # the ESPIRiT slice: columns 44-211
    left, right = sim.band_limits(48, 0.5)
    assert right - left == 24 and left == 12


def test_simulated_slice_is_band_limited_and_folds(mni):
    params = sim.SimulationParams(shape=(64, 48), num_coils=4, object_width=(1.3, 1.3), phase_band=(0.5, 0.5))
    s = sim.simulate_slice(mni[len(mni) // 2], params, np.random.default_rng(0))
    assert s.kspace.shape == (4, 64, 48) and s.kspace.dtype == np.complex64
    left, right = s.padding
    assert np.abs(s.kspace[..., :left]).max() == 0 and np.abs(s.kspace[..., right:]).max() == 0
    assert np.abs(s.kspace[..., left:right]).min(axis=(0, 1)).max() > 0
    assert s.maps.shape[-1] > 48  # the coil maps live on the wide canvas: the head folds over
    assert np.allclose(s.target, np.sqrt((np.abs(ifft2c_np(s.kspace)) ** 2).sum(0)), atol=1e-4)


def test_measured_noise_ratio_recovers_the_simulated_one(mni):
    for ratio in (0.01, 0.03):
        # at the ESPIRiT slice's size the outermost readout rows hold noise only
        params = sim.SimulationParams(shape=(320, 256), num_coils=4, noise_ratio=(ratio, ratio))
        s = sim.simulate_slice(mni[len(mni) // 2], params, np.random.default_rng(1))
        assert sim.measure_noise_ratio(s.kspace) == pytest.approx(ratio, rel=0.1)


def test_simulation_is_deterministic_per_seed(mni):
    a = sim.simulate_slice(mni[3], SMALL, np.random.default_rng(5))
    b = sim.simulate_slice(mni[3], SMALL, np.random.default_rng(5))
    c = sim.simulate_slice(mni[3], SMALL, np.random.default_rng(6))
    assert np.array_equal(a.kspace, b.kspace)
    assert not np.allclose(a.kspace, c.kspace)


def test_coil_maps_fall_off_away_from_their_coil():
    maps = sim.coil_maps(8, (64, 64), np.random.default_rng(0), radius=1.4)
    assert maps.shape == (8, 64, 64)
    magnitude = np.abs(maps)
    # each coil sees its own side of the head best: brightest on the border, weaker in the middle
    for m in magnitude:
        peak = np.unravel_index(m.argmax(), m.shape)
        assert min(peak[0], peak[1], 63 - peak[0], 63 - peak[1]) == 0
        assert m.max() > 1.3 * m[32, 32]
    assert len({np.unravel_index(m.argmax(), m.shape) for m in magnitude}) > 4  # coils are spread
    # the receive phase varies smoothly (no more than about a cycle across the image)
    steps = np.abs(np.angle(maps[:, :, 1:] * np.conj(maps[:, :, :-1])))
    assert steps.max() < 0.3


@pytest.mark.parametrize("style", ["layered", "band"])
def test_add_scalp_surrounds_the_brain_with_a_bright_ring(style):
    brain = phantom() * 0.5
    head = sim.add_scalp(brain, np.random.default_rng(0), style, fat_to_brain=(1.5, 2.0))
    assert head.shape[0] > brain.shape[0]  # padded to hold the layers
    centre_row = head[head.shape[0] // 2]
    brain_cols = np.nonzero(centre_row > 0.3)[0]
    assert centre_row.max() > brain.max()  # fat is brighter than the brain on T1
    assert centre_row[brain_cols.min() - 3] < 0.2  # dark CSF/skull between brain and scalp


def test_layered_scalp_has_dark_bone_between_bright_rings_at_the_drawn_brightness():
    brain = phantom(120, 100) * 0.5
    for seed in range(5):
        rng = np.random.default_rng(seed)
        head = sim.add_scalp(brain, rng, "layered", fat_to_brain=(2.0, 3.0))
        row = head[head.shape[0] // 2]
        centre = head.shape[1] // 2
        brain_left = centre - np.argmax(row[:centre][::-1] < 0.3)  # the brain's left edge
        ring = row[:brain_left][::-1]  # from the brain outwards
        fat = int(np.argmax(ring))
        # the fat, the brightest layer, is 0.7-1 x (2-3 x the brain), up to texture and blur
        assert 0.5 * 2.0 * 0.7 * 0.85 < ring[fat] < 0.5 * 3.0 * 1.15
        # between brain and fat: the dark skull tables (cortical bone gives no signal)
        assert ring[:fat].min() < 0.2 * ring[fat]  # (thin layers, blurred by partial volume)
    with pytest.raises(UserError, match="data.scalp"):
        sim.add_scalp(brain, np.random.default_rng(0), "thick")


def test_band_scalp_is_the_earlier_model_draw_for_draw():
    """The earlier model is kept draw for draw, so its simulations stay reproducible (the sum
    and maximum below were computed with it before the layered model existed)."""
    head = sim.add_scalp(phantom() * 0.5, np.random.default_rng(0), "band")
    assert head.shape == (108, 98)
    assert float(head.sum()) == pytest.approx(1490.75341796875, rel=1e-6)
    assert float(head.max()) == pytest.approx(0.9959065318107605, rel=1e-6)
    again = sim.add_scalp(phantom() * 0.5, np.random.default_rng(0), "band", fat_to_brain=(5.0, 6.0))
    assert np.array_equal(head, again)  # fat_to_brain applies to the layered model only


def test_mni_slices_are_real_heads(mni):
    assert len(mni) > 5
    for s in mni:
        assert s.max() == pytest.approx(1.0) and s.shape == (233, 197)  # anterior-posterior rows


def test_images_from_folder(tmp_path):
    np.save(tmp_path / "a.npy", phantom())
    (tmp_path / "notes.txt").write_text("ignored")
    images = sim.images_from_folder(tmp_path)
    assert len(images) == 1 and images[0].max() == 1.0
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images"):
        sim.images_from_folder(tmp_path / "empty")
    with pytest.raises(UserError, match="not found"):
        sim.images_from_folder(tmp_path / "missing")


def test_simulated_volume_is_valid_fastmri_hdf5(tmp_path, mni):
    path = sim.simulate_volume_h5(tmp_path / "vol.h5", mni[2:4], SMALL, seed=0)
    info = readers.read_volume_info(path)
    assert info.num_slices == 2 and info.num_coils == 4 and info.shape == (64, 48)
    data = readers.read_slice(path, 1)
    # the header's encoding limits are the acquired band, shared by the volume's slices
    assert np.abs(data["kspace"][..., : info.padding_left]).max() == 0
    assert np.abs(data["kspace"][..., info.padding_right:]).max() == 0
    assert np.abs(data["kspace"][..., info.padding_left]).max() > 0
    assert np.allclose(data["target"], sim.rss_image(data["kspace"]), atol=1e-5)
    assert info.max_value == pytest.approx(float(max(readers.read_slice(path, i)["target"].max() for i in range(2))))


def test_tissue_rendering_is_crisper_than_the_template():
    stacks = sim.mni_slices("axial", step=20, tissues=True)
    assert stacks[0].shape == (3, 233, 197)
    stack = stacks[len(stacks) // 2]
    rendered = sim.render_tissues(stack, np.random.default_rng(0))
    template = stack[0] * rendered.max()

    def high_frequency_share(img):
        spectrum = np.abs(np.fft.fftshift(np.fft.fft2(img))) ** 2
        h, w = img.shape
        centre = spectrum[h // 2 - h // 8:h // 2 + h // 8, w // 2 - w // 8:w // 2 + w // 8].sum()
        return 1 - centre / spectrum.sum()

    assert high_frequency_share(rendered) > 1.5 * high_frequency_share(template)
    brain = (stack[1] + stack[2]) > 0.5
    white = brain & (stack[2] > 0.8)
    grey = brain & (stack[1] > 0.8)
    assert rendered[white].mean() > rendered[grey].mean()  # T1 contrast: white matter brighter
    other = sim.render_tissues(stack, np.random.default_rng(1))
    assert not np.allclose(rendered, other)  # intensities and texture are randomised


def test_tissue_stacks_simulate_like_images():
    stack = sim.mni_slices("axial", step=20, tissues=True)[2]
    s = sim.simulate_slice(stack, SMALL, np.random.default_rng(0))
    assert s.kspace.shape == (4, 64, 48) and np.isfinite(s.target).all()


@pytest.mark.parametrize("extra, match", [
    ({"scalp": "thick"}, "data.scalp='thick'"),
    ({"fat_to_brain": [3.0, 1.0]}, r"data.fat_to_brain=\[3.0, 1.0\]"),
    ({"fat_to_brain": [0.0, 2.0]}, "data.fat_to_brain"),
])
def test_bad_scalp_settings_name_the_key(tmp_path, extra, match):
    with pytest.raises(UserError, match=match):
        registry.build("dataset", "simulated_mri", small_dataset_cfg(tmp_path, **extra), seed=0)
    assert not list((tmp_path / "cache").glob("sim-*/*.h5"))  # refused before anything is simulated


def test_band_scalp_is_selectable_from_the_config(tmp_path):
    ds = registry.build("dataset", "simulated_mri", small_dataset_cfg(tmp_path, scalp="band"), seed=0)
    assert ds["train"].params.scalp == "band"
    registry.build("dataset", "simulated_mri", small_dataset_cfg(tmp_path, scalp="layered"), seed=0)
    assert len(list((tmp_path / "cache").glob("sim-*"))) == 2  # cached apart
