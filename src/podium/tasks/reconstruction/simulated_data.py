"""Datasets built from simulated k-space, and a test split from real fully sampled raw k-space.

Training slices are simulated on the fly — a new head position, size, coil array, phase, noise
and acquired band every epoch, from the sample's own seed, so runs stay exactly reproducible
and resumable — while validation volumes are simulated once, written as fastMRI HDF5 under the
cache folder (keyed by the simulation parameters) and read back through the fastMRI reader,
like any user's data. `real_test` adds a `test_real` split: fully sampled raw k-space files
(`.mat`, `.npy`, BART `.cfl`) undersampled retrospectively with the evaluation masks.

    podium train experiment=varnet_demo
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from podium.common.structured import as_config
from podium.engine.registry import register
from podium.errors import UserError
from podium.tasks.reconstruction import rawfiles
from podium.tasks.reconstruction import simulate as sim
from podium.tasks.reconstruction.coil_bank import CoilMapBank
from podium.tasks.reconstruction.data import (
    MaskPolicy, SimulatedDataConfig, SliceDataset, _cache_dir, anatomy_id, make_sample)


def simulation_params(cfg: SimulatedDataConfig) -> sim.SimulationParams:
    if cfg.scalp not in sim.SCALP_STYLES:  # refused before anything is simulated
        raise UserError(f"data.scalp={cfg.scalp!r}: expected one of {', '.join(sim.SCALP_STYLES)}.")
    ratio = list(cfg.fat_to_brain)
    if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
        raise UserError(f"data.fat_to_brain={ratio}: expected [low, high] with 0 < low <= high.")
    return sim.SimulationParams(shape=tuple(cfg.shape), num_coils=cfg.num_coils,
                                object_width=tuple(cfg.object_width), phase_band=tuple(cfg.phase_band),
                                noise_ratio=tuple(cfg.noise_ratio), scalp=cfg.scalp,
                                fat_to_brain=tuple(cfg.fat_to_brain),
                                real_maps_p=cfg.real_maps_p if cfg.coil_maps else 0.0)


def coil_map_bank(cfg: SimulatedDataConfig):
    """Real coil maps from `data.coil_maps` (None when the list is empty)."""
    if not cfg.coil_maps:
        return None
    if not 0.0 <= cfg.real_maps_p <= 1.0:
        raise UserError(f"data.real_maps_p={cfg.real_maps_p}: expected a probability in [0, 1].")
    if not 0.0 < cfg.calibration_fraction < 1.0:
        raise UserError(f"data.calibration_fraction={cfg.calibration_fraction}: expected a fraction in (0, 1).")
    bank = CoilMapBank.from_files(list(cfg.coil_maps), cfg.calibration_fraction)
    if bank.num_coils != cfg.num_coils:  # fail before training, not at the first drawn slice
        raise UserError(f"data.coil_maps: the scans have {bank.num_coils} coils, data.num_coils is {cfg.num_coils}.")
    return bank


def source_images(cfg: SimulatedDataConfig) -> list[np.ndarray]:
    """mni: crisp tissue renderings from the template's grey/white-matter maps (see
    simulate.render_tissues); mni_t1: the smooth T1 template itself; else a folder of images."""
    if cfg.source == "mni":
        return sim.mni_slices("axial", tissues=True)
    if cfg.source == "mni_t1":
        return sim.mni_slices("axial")
    return sim.images_from_folder(cfg.source)


def split_images(images: list[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Every fifth image (from the third) is held out for validation."""
    val = [im for i, im in enumerate(images) if i % 5 == 2]
    train = [im for i, im in enumerate(images) if i % 5 != 2]
    return train, val


class SimulatedSlices(Dataset):
    """`size` samples per epoch, each simulated from a source image with the sample's seed."""

    def __init__(self, images: list[np.ndarray], params: sim.SimulationParams, cfg: SimulatedDataConfig,
                 policy: MaskPolicy, size: int, coil_bank: CoilMapBank | None = None):
        if not images:
            raise UserError("no source images to simulate from.")
        self.images, self.params, self.cfg, self.policy, self.size = images, params, cfg, policy, size
        self.coil_bank = coil_bank
        self.volume_names = ["simulated"]

    def set_epoch(self, epoch: int) -> None:
        self.policy.epoch = epoch

    def __len__(self):
        return self.size

    def __getitem__(self, index: int):
        # the seed comes from torch's generator, which SeededDataset sets per (seed, epoch, index)
        rng = np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))
        image = self.images[int(rng.integers(len(self.images)))]
        s = sim.simulate_slice(image, self.params, rng, self.coil_bank)
        sampled = self.policy.sample(f"sim:{index}", 0, s.kspace.shape[-1])
        mask = sampled.mask.copy()
        left, right = s.padding
        mask[:left] = False  # never-acquired columns carry no data
        mask[right:] = False
        sampled = type(sampled)(mask, sampled.num_low_frequencies, sampled.acceleration, sampled.augmented)
        return make_sample(s.kspace, sampled, s.target, max_value=None, recon_size=s.target.shape,
                           fg_threshold=self.cfg.foreground_threshold * float(s.target.max()),
                           volume=0, slice_index=0, index=index, anatomy=anatomy_id("brain"))


class RawKspaceSlices(Dataset):
    """Fully sampled raw k-space files, one slice each, one copy per evaluation acceleration."""

    def __init__(self, files: list[str], axes: str, cfg: SimulatedDataConfig, policy: MaskPolicy):
        self.kspaces = []
        for f in files:
            if not Path(f).exists():
                raise UserError(f"data.real_test: {f} not found.")
            self.kspaces.append(rawfiles.read_kspace_file(f, axes=axes))
        self.cfg, self.policy = cfg, policy
        self.volume_names = [Path(f).name for f in files]

    def __len__(self):
        return len(self.kspaces) * self.policy.copies

    def __getitem__(self, index: int):
        vol = index // self.policy.copies
        kspace = self.kspaces[vol]
        sampled = self.policy.sample(self.volume_names[vol], index % self.policy.copies, kspace.shape[-1])
        target = sim.rss_image(kspace)
        sample = make_sample(kspace, sampled, target, max_value=None, recon_size=target.shape,
                             fg_threshold=self.cfg.foreground_threshold * float(target.max()),
                             volume=vol, slice_index=0, index=index, anatomy=anatomy_id("brain"))
        return sample


def _simulation_folder(cfg: SimulatedDataConfig, params: sim.SimulationParams, fields: dict,
                       coil_bank: CoilMapBank | None) -> Path:
    """A cache folder whose name hashes everything that shapes the volumes written into it."""
    fields = {"params": asdict(params), "source": cfg.source, **fields, "version": 2}  # bump when the simulator changes
    if coil_bank is not None:  # the maps' files, by content (a path alone could be rewritten)
        fields["coil_maps"] = [hashlib.sha1(m.tobytes()).hexdigest() for m in coil_bank.map_sets]
        fields["calibration_fraction"] = cfg.calibration_fraction
    key = json.dumps(fields, sort_keys=True)
    folder = _cache_dir(cfg) / f"sim-{hashlib.sha1(key.encode()).hexdigest()[:12]}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# ---- cross-validation: the training images as volumes ------------------------------------
# The train split simulates fresh slices from any training image every epoch, so its samples
# have no identity to fold; its source images do. For CV they are grouped, in order, into
# volumes of `data.val_slices` slices (neighbouring template slices, like a scan), named
# `train_<k>`: a fold that holds one out trains on the other images and evaluates the held-out
# ones materialised once as fastMRI HDF5 (like the val volumes) under the cache folder.
POOL_PREFIX = "train"


def pool_slices(dataset: SimulatedSlices) -> list[tuple[str, int]]:
    """(volume name, slice in it) of each of `dataset`'s source images, in image order."""
    n = max(1, int(dataset.cfg.val_slices))
    return [(f"{POOL_PREFIX}_{i // n:03d}", i % n) for i in range(len(dataset.images))]


def materialise_pool_volumes(dataset: SimulatedSlices, names: list[str]) -> list[Path]:
    """The HDF5 files of the named pool volumes (`pool_slices`), simulated once each."""
    cfg, n = dataset.cfg, max(1, int(dataset.cfg.val_slices))
    folder = _simulation_folder(cfg, dataset.params, {"pool_slices": n, "images": len(dataset.images)},
                                dataset.coil_bank)
    paths = []
    for name in names:
        k = int(name.rsplit("_", 1)[1])
        path = folder / f"{name}.h5"
        if not path.exists():  # seeds apart from the val volumes' (0..val_volumes-1)
            sim.simulate_volume_h5(path, dataset.images[k * n:(k + 1) * n], dataset.params, seed=100_003 + k,
                                   coil_bank=dataset.coil_bank)
        paths.append(path)
    return paths


def _materialise_val(cfg: SimulatedDataConfig, images: list[np.ndarray], seed: int,
                     coil_bank: CoilMapBank | None = None) -> list[Path]:
    """Simulate the validation volumes once; the folder name hashes everything that shapes them."""
    params = simulation_params(cfg)
    folder = _simulation_folder(cfg, params, {"volumes": cfg.val_volumes, "slices": cfg.val_slices, "seed": seed},
                                coil_bank)
    paths = []
    for v in range(cfg.val_volumes):
        path = folder / f"val_{v:03d}.h5"
        if not path.exists():
            picks = [images[(v * cfg.val_slices + i) % len(images)] for i in range(cfg.val_slices)]
            sim.simulate_volume_h5(path, picks, params, seed=seed * 1000 + v, coil_bank=coil_bank)
        paths.append(path)
    return paths


@register("dataset", "simulated_mri", schema=SimulatedDataConfig,
          help="Multi-coil k-space simulated from real MR images (FOV fold-over, coil maps, noise).")
def simulated_datasets(cfg, seed: int = 0, max_epochs: int = 1, centre_detection: str = "contiguous", **_):
    cfg = as_config(cfg, SimulatedDataConfig)
    if len(cfg.shape) != 2:
        raise UserError(f"data.shape={list(cfg.shape)}: expected [readout, phase].")
    train_images, val_images = split_images(source_images(cfg))
    params = simulation_params(cfg)
    bank = coil_map_bank(cfg)
    out = {"train": SimulatedSlices(train_images, params, cfg, MaskPolicy(cfg.mask, True, max_epochs),
                                    cfg.train_size, bank)}
    val_files = _materialise_val(cfg, val_images or train_images, seed=0, coil_bank=bank)
    out["val"] = SliceDataset(val_files, cfg, MaskPolicy(cfg.mask, False), _cache_dir(cfg),
                              centre_detection == "symmetric")
    if cfg.real_test:
        out["test_real"] = RawKspaceSlices(list(cfg.real_test), cfg.real_test_axes, cfg, MaskPolicy(cfg.mask, False))
    return out

