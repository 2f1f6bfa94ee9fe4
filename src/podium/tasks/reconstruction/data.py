"""Slice datasets for multi-coil reconstruction: fastMRI HDF5, the SNU challenge layout, raw
k-space files, and k-space simulated on the fly from real MR images.

Every dataset yields the same sample (see `make_sample`): masked k-space, its mask, the target
magnitude image, the volume's maximum (SSIM data range) and a foreground mask, all scaled by
the maximum of the zero-filled image — which is known at test time, so a model sees inputs of
the same scale whatever the scanner's units. Masks:
- training: fresh every time from `data.mask` (optionally mixed with every mask type by a
  probability that ramps over epochs, `mask.augment_p`), or the fixed bank when
  `mask.duplicate` exposes every k-space once per acceleration per epoch (its masks augmented
  with the same probability, at the copy's acceleration);
- evaluation: every slice once per acceleration, with a mask seeded from the file name and
  slice (each acceleration with its own centre fraction), so validation never changes between runs; files that carry their own mask (SNU,
  fastMRI test) use it.

    podium train experiment=varnet_demo
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from podium.common.structured import as_config as _as
from podium.engine.registry import register
from podium.errors import UserError
from podium.tasks.reconstruction import masks as mk
from podium.tasks.reconstruction import readers
from podium.tasks.reconstruction.fft import ifft2c_np
from podium.tasks.reconstruction.metrics import SNU_THRESHOLDS, snu_foreground_mask


# ---- configuration --------------------------------------------------------------------------
@dataclass
class MaskConfig:
    type: str = "equispaced_fraction"  # random | equispaced | equispaced_fraction | magic | magic_fraction | snu
    center_fractions: list[float] = field(default_factory=lambda: [0.08])
    accelerations: list[int] = field(default_factory=lambda: [4])
    augment_p: float = 0.0  # > 0: draw from every mask type with this (ramped) probability
    augment_schedule: str = "linear"  # linear | delayed | constant
    augment_start: float = 0.0  # fraction of training where the ramp starts
    augment_end: float = 1.0  # ... and reaches augment_p
    duplicate: bool = False  # fixed bank: each k-space once per acceleration per epoch


@dataclass
class MRIDataConfig:
    name: str = ""
    mask: MaskConfig = field(default_factory=MaskConfig)
    use_file_masks: bool = True  # evaluation: a file's own mask (SNU, fastMRI test) wins
    foreground: str = "relative"  # relative (threshold x volume max) | snu (absolute, by anatomy)
    foreground_threshold: float = 0.05
    max_slices: int = 0  # > 0: keep the first N slices of every split (quick runs)
    cache_dir: Optional[str] = None  # metadata / simulated-volume cache; null = ~/.cache/podium/mri


@dataclass
class FastMRIDataConfig(MRIDataConfig):
    """fastMRI multi-coil HDF5 folders (one file per acquisition)."""

    name: str = "fastmri"
    train: Optional[str] = None  # folder of .h5 files (required)
    val: Optional[str] = None  # (required)
    test: Optional[str] = None


@dataclass
class SNUDataConfig(MRIDataConfig):
    """The SNU FastMRI challenge layout: ROOT/{train,val}/{image,kspace}/*.h5."""

    name: str = "snu"
    root: Optional[str] = None  # (required)
    foreground: str = "snu"
    leaderboard: Optional[str] = None  # ROOT/leaderboard with acc4/ acc8/ (test splits)


@dataclass
class SimulatedDataConfig(MRIDataConfig):
    """k-space simulated from the MNI T1 template (or a folder of images); see simulate.py."""

    name: str = "simulated_mri"
    source: str = "mni"  # mni (tissue renderings) | mni_t1 (the smooth template) | a folder of images
    shape: list[int] = field(default_factory=lambda: [320, 256])  # (readout, phase)
    num_coils: int = 8
    object_width: list[float] = field(default_factory=lambda: [1.0, 1.2])  # > 1: FOV fold-over
    phase_band: list[float] = field(default_factory=lambda: [0.6, 0.75])  # acquired column fraction
    noise_ratio: list[float] = field(default_factory=lambda: [0.01, 0.02])
    scalp: str = "layered"  # layered | band (simulate.add_scalp)
    fat_to_brain: list[float] = field(default_factory=lambda: [1.0, 3.5])  # layered scalp fat / brain
    # raw k-space files whose calibration blocks give real coil maps (coil_bank.py); a share
    # real_maps_p of simulated slices use them, the rest analytic surface coils
    coil_maps: list[str] = field(default_factory=list)
    real_maps_p: float = 0.5
    calibration_fraction: float = 0.08  # centre columns read from each coil_maps file
    train_size: int = 200  # samples per epoch (fresh simulations every epoch)
    val_volumes: int = 2
    val_slices: int = 4  # per volume
    real_test: list[str] = field(default_factory=list)  # fully sampled raw k-space files (test_real)
    real_test_axes: str = "auto"


# ---- samples --------------------------------------------------------------------------------
def _rss(kspace: np.ndarray) -> np.ndarray:
    return np.sqrt((np.abs(ifft2c_np(kspace)) ** 2).sum(0))


def _crop(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    h, w = image.shape[-2:]
    th, tw = min(size[0], h), min(size[1], w)
    top, left = (h - th) // 2, (w - tw) // 2
    return image[..., top:top + th, left:left + tw]


def center_block_width(mask: np.ndarray, symmetric: bool = False) -> int:
    """Width of the contiguous sampled block around the centre column (the calibration lines),
    or with `symmetric` fastMRI's count 2 x min(run left of W // 2, run from W // 2) (32, not
    33, on an SNU mask where an equispaced line touches the block). 0: the centre column is not
    sampled."""
    w = len(mask)
    c = w // 2
    if not mask[c]:
        return 0
    if symmetric:
        right = int(np.argmin(np.append(np.asarray(mask[c:], bool), False)))
        left = int(np.argmin(np.append(np.asarray(mask[:c][::-1], bool), False)))
        return 2 * min(left, right)
    left = c
    while left > 0 and mask[left - 1]:
        left -= 1
    right = c
    while right < w - 1 and mask[right + 1]:
        right += 1
    return right - left + 1


def make_sample(kspace: np.ndarray, sampled: mk.SampledMask, target: np.ndarray | None, *,
                max_value: float | None, recon_size: tuple[int, int], fg_threshold: float,
                volume: int, slice_index: int, index: int, anatomy: int) -> dict[str, Any]:
    """The tensors a model and the metrics need, scaled by the zero-filled image's maximum."""
    mask = sampled.mask.astype(bool)
    if mask.shape[0] != kspace.shape[-1]:
        raise UserError(f"mask has {mask.shape[0]} columns but k-space has {kspace.shape[-1]}.")
    masked = kspace * mask[None, None, :]
    if target is None:
        target = _crop(_rss(kspace), recon_size)
    zero_filled = _crop(_rss(masked), target.shape)
    scale = float(zero_filled.max()) or 1.0
    max_value = float(target.max()) if max_value is None else float(max_value)
    fg = snu_foreground_mask(target, fg_threshold if fg_threshold > 0 else 0.0)
    masked = (masked / scale).astype(np.complex64)
    return {
        "masked_kspace": torch.view_as_real(torch.from_numpy(masked)),
        "mask": torch.from_numpy(mask.astype(np.float32)).view(1, 1, -1, 1),
        "num_low_frequencies": torch.tensor(sampled.num_low_frequencies or center_block_width(mask)),
        "target": torch.from_numpy(np.ascontiguousarray(target / scale, dtype=np.float32)),
        "max_value": torch.tensor(max_value / scale, dtype=torch.float32),
        "scale": torch.tensor(scale, dtype=torch.float64),
        "fg_mask": torch.from_numpy(np.asarray(fg, dtype=np.float32)),
        "acceleration": torch.tensor(int(sampled.acceleration)),
        "mask_augmented": torch.tensor(bool(sampled.augmented)),
        "volume": torch.tensor(volume), "slice": torch.tensor(slice_index), "index": torch.tensor(index),
        "anatomy": torch.tensor(anatomy),
    }


ANATOMIES = ["unknown", "brain", "knee"]


def anatomy_id(name: str | None) -> int:
    return ANATOMIES.index(name) if name in ANATOMIES else 0


class MaskPolicy:
    """Which mask a sample gets: fresh (optionally augmented) for training, seeded per slice and
    one copy per acceleration for evaluation (the fixed bank), or the file's own. With
    `duplicate` the training bank is augmented too: copy i of a sample is replaced, with the
    scheduled probability, by a pool mask at the same acceleration (so acc4/acc8 stay balanced)."""

    def __init__(self, cfg: MaskConfig, train: bool, max_epochs: int = 1):
        self.cfg, self.train, self.max_epochs = cfg, train, max(1, max_epochs)
        self.func = mk.build_mask_func(cfg.type, cfg.center_fractions, cfg.accelerations)
        self.augment = None
        if train and cfg.augment_p > 0:
            self.augment = self._augmentation(self.func, cfg.center_fractions, cfg.accelerations)
        self.bank, self.bank_augment = None, []
        if not train or cfg.duplicate:
            # each acceleration keeps its own centre fraction ([0.08, 0.04] -> 8 % at 4x, 4 % at 8x)
            self.bank = mk.MaskBank(accelerations=tuple(cfg.accelerations),
                                    center_fraction=[float(f) for f in cfg.center_fractions], kind=cfg.type)
            if self.augment is not None:
                self.bank_augment = [
                    self._augmentation(mk.build_mask_func(cfg.type, [f], [a]), [f], [a])
                    for f, a in zip(self.bank.center_fractions, self.bank.accelerations)]
        self.epoch = 0

    def _augmentation(self, base: mk.MaskFunc, fractions, accelerations) -> mk.MaskAugmentation:
        cfg = self.cfg
        pool = [mk.build_mask_func(t, fractions, accelerations) for t in mk.MASK_TYPES if t != "snu"]
        return mk.MaskAugmentation(base, pool, schedule=cfg.augment_schedule, p_max=cfg.augment_p,
                                   start=cfg.augment_start, end=cfg.augment_end)

    @property
    def copies(self) -> int:
        return len(self.cfg.accelerations) if self.bank is not None else 1

    @property
    def progress(self) -> float:
        return self.epoch / self.max_epochs

    def sample(self, key: str, copy: int, num_cols: int) -> mk.SampledMask:
        if self.bank is not None and not self.bank_augment:
            return self.bank.mask_for(key, num_cols, copy)
        rng = np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))
        if self.bank is not None:
            augment = self.bank_augment[copy]
            if rng.random() < augment.probability(self.progress):
                return augment.draw_from_pool(num_cols, rng)
            return self.bank.mask_for(key, num_cols, copy)
        if self.augment is not None:
            return self.augment(num_cols, rng, self.progress)
        return self.func(num_cols, rng)


# ---- datasets -------------------------------------------------------------------------------
class SliceDataset(Dataset):
    """fastMRI-format volumes, slice by slice, through the metadata-cached slice index."""

    def __init__(self, files: list[Path], cfg: MRIDataConfig, policy: MaskPolicy, cache_dir: Path | None,
                 symmetric_centre: bool = False):
        if not files:
            raise UserError("no .h5 volumes found for this split.")
        self.index = readers.SliceIndex.build(files, cache_dir=cache_dir)
        self.cfg, self.policy = cfg, policy
        self.slices = [self.index[i] for i in range(len(self.index))]
        if cfg.max_slices > 0:
            self.slices = self.slices[: cfg.max_slices]
        self.volume_names = [str(v.path) for v in self.index.volumes]
        self.symmetric_centre = symmetric_centre  # the model's centre_detection, for file masks
        # test files that carry their own mask are scored with it, once per slice
        self.file_masks = self._file_masks_for(policy, self.index.volumes)
        self.copies = 1 if self.file_masks else policy.copies

    def _file_masks_for(self, policy: MaskPolicy, volumes) -> bool:
        return self.cfg.use_file_masks and all(v.mask is not None for v in volumes) and (
            not policy.train or policy.augment is None)

    def set_epoch(self, epoch: int) -> None:
        self.policy.epoch = epoch

    def __len__(self):
        return len(self.slices) * self.copies

    def _threshold(self, info) -> float:
        if self.cfg.foreground == "snu":
            return SNU_THRESHOLDS.get(info.anatomy or "brain", SNU_THRESHOLDS["brain"])
        return self.cfg.foreground_threshold * float(info.max_value or 0.0)

    def __getitem__(self, index: int):
        info, s = self.slices[index // self.copies]
        data = readers.read_slice(info.path, s)
        kspace = data["kspace"]
        if self.file_masks:
            file_mask = np.asarray(data["mask"], bool)
            acc = int(info.acceleration or round(len(file_mask) / max(1, file_mask.sum())))
            sampled = mk.SampledMask(file_mask, center_block_width(file_mask, self.symmetric_centre), acc)
        else:
            sampled = self.policy.sample(f"{Path(info.path).name}:{s}", index % self.copies, kspace.shape[-1])
            sampled = mk.SampledMask(mk.apply_padding(sampled.mask, info.padding_left, info.padding_right),
                                     sampled.num_low_frequencies, sampled.acceleration, sampled.augmented)
        target = data.get("target")
        max_value = info.max_value if target is not None else None
        threshold = self._threshold(info) if target is not None else 0.0
        sample = make_sample(kspace, sampled, target, max_value=max_value, recon_size=info.recon_size,
                             fg_threshold=threshold, volume=self.volume_names.index(str(info.path)),
                             slice_index=s, index=index, anatomy=anatomy_id(info.anatomy))
        if threshold == 0.0:  # no stored target: foreground relative to the computed one
            t = sample["target"].numpy()
            sample["fg_mask"] = torch.from_numpy(snu_foreground_mask(t, self.cfg.foreground_threshold * t.max())
                                                 .astype(np.float32))
        return sample


def slice_subset(base, slices, policy: MaskPolicy, volume_names: list[str]):
    """A copy of `base` (a SliceDataset or SNUDataset) over `slices` ((VolumeInfo, slice)
    pairs, from any dataset of its kind) with `policy`'s masks; `volume_names` must name every
    slice's volume as `base` does (path or stem). Cross-validation folds are made of these."""
    out = copy.copy(base)
    out.slices, out.policy, out.volume_names = list(slices), policy, list(volume_names)
    out.file_masks = base._file_masks_for(policy, [info for info, _ in out.slices])
    out.copies = 1 if out.file_masks else policy.copies
    return out


def _h5_files(folder: str | None, key: str) -> list[Path]:
    if not folder:
        raise UserError(f"data.{key} is required: a folder of fastMRI .h5 files.")
    path = Path(folder)
    if not path.exists():
        raise UserError(f"data.{key}={folder}: folder not found.")
    return sorted(path.glob("*.h5")) if path.is_dir() else [path]


def _cache_dir(cfg: MRIDataConfig) -> Path:
    return Path(cfg.cache_dir).expanduser() if cfg.cache_dir else Path.home() / ".cache" / "podium" / "mri"


@register("dataset", "fastmri", schema=FastMRIDataConfig, help="fastMRI multi-coil HDF5 folders.")
def fastmri_datasets(cfg, seed: int = 0, max_epochs: int = 1, centre_detection: str = "contiguous", **_):
    cfg = _as(cfg, FastMRIDataConfig)
    cache, sym = _cache_dir(cfg), centre_detection == "symmetric"
    out = {"train": SliceDataset(_h5_files(cfg.train, "train"), cfg, MaskPolicy(cfg.mask, True, max_epochs), cache,
                                 sym),
           "val": SliceDataset(_h5_files(cfg.val, "val"), cfg, MaskPolicy(cfg.mask, False), cache, sym)}
    if cfg.test:
        out["test"] = SliceDataset(_h5_files(cfg.test, "test"), cfg, MaskPolicy(cfg.mask, False), cache, sym)
    return out



class SNUDataset(Dataset):
    """SNU challenge volumes: k-space + mask from `kspace/`, `image_label` and `max` from `image/`.

    The target is the 384 x 384 label image; the model's output is centre-cropped to it (the
    challenge's last step). The foreground mask is the leaderboard scorer's (absolute threshold
    by anatomy, erode/dilate/erode)."""

    def __init__(self, root: Path, cfg: SNUDataConfig, policy: MaskPolicy, cache_dir: Path | None,
                 symmetric_centre: bool = False):
        volumes = readers.snu_volume_pairs(root)
        if not volumes:
            raise UserError(f"{root}: no SNU volumes (expected image/ and kspace/ folders of .h5 files).")
        self.index = readers.SliceIndex.build(volumes, cache_dir=cache_dir)
        self.cfg, self.policy = cfg, policy
        self.slices = [self.index[i] for i in range(len(self.index))]
        if cfg.max_slices > 0:
            self.slices = self.slices[: cfg.max_slices]
        self.volume_names = [Path(v.path).stem for v in self.index.volumes]
        self.symmetric_centre = symmetric_centre  # the model's centre_detection, for file masks
        # evaluation always scores the file's own mask (the leaderboard's); training may draw
        # fresh masks (augmentation, the acc4/acc8 bank) instead
        self.file_masks = self._file_masks_for(policy, self.index.volumes)
        self.copies = 1 if self.file_masks else policy.copies

    def _file_masks_for(self, policy: MaskPolicy, volumes) -> bool:
        cfg = self.cfg
        return not policy.train or (cfg.use_file_masks and policy.augment is None and not cfg.mask.duplicate)

    def set_epoch(self, epoch: int) -> None:
        self.policy.epoch = epoch

    def __len__(self):
        return len(self.slices) * self.copies

    def __getitem__(self, index: int):
        info, s = self.slices[index // self.copies]
        data = readers.read_snu_slice(info.path, info.target_path, s)
        kspace, file_mask = data["kspace"], np.asarray(data["mask"], bool)
        name = Path(info.path).stem
        if self.file_masks:
            acc = int(info.acceleration or round(len(file_mask) / max(1, file_mask.sum())))
            sampled = mk.SampledMask(file_mask, center_block_width(file_mask, self.symmetric_centre), acc)
        else:
            sampled = self.policy.sample(f"{name}:{s}", index % self.copies, kspace.shape[-1])
        threshold = SNU_THRESHOLDS.get(info.anatomy or "brain", SNU_THRESHOLDS["brain"])
        return make_sample(kspace, sampled, data["target"], max_value=data["max_value"],
                           recon_size=data["target"].shape, fg_threshold=threshold,
                           volume=self.volume_names.index(name), slice_index=s, index=index,
                           anatomy=anatomy_id(info.anatomy))


@register("dataset", "snu", schema=SNUDataConfig, help="SNU FastMRI challenge layout (brain/knee, acc4/acc8).")
def snu_datasets(cfg, seed: int = 0, max_epochs: int = 1, centre_detection: str = "contiguous", **_):
    cfg = _as(cfg, SNUDataConfig)
    if not cfg.root:
        raise UserError("data.root is required: the SNU data folder holding train/ and val/.")
    root, cache, sym = Path(cfg.root), _cache_dir(cfg), centre_detection == "symmetric"
    out = {"train": SNUDataset(root / "train", cfg, MaskPolicy(cfg.mask, True, max_epochs), cache, sym),
           "val": SNUDataset(root / "val", cfg, MaskPolicy(cfg.mask, False), cache, sym)}
    if cfg.leaderboard:
        for acc in ("acc4", "acc8"):
            folder = Path(cfg.leaderboard) / acc
            if folder.exists():
                out[f"test_{acc}"] = SNUDataset(folder, cfg, MaskPolicy(cfg.mask, False), cache, sym)
    return out
