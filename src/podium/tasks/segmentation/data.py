"""Segmentation datasets: DRIVE (Staal et al., IEEE TMI 2004), paired image / mask folders,
nnU-Net v2 raw datasets (Isensee et al., Nature Methods 2021) and synthetic fundus images.

Pipeline, per image (pipeline.py: the schemas and the one preprocessing path shared with
predict and serving), done ONCE when the datasets are built (the factory decodes and
preprocesses every record eagerly and keeps the result in memory, uint8; DRIVE's 20 images take
~50 MB), so DataLoader workers fork after it and never decode a file:

    read_image (RGB uint8) + read_label (stored values -> class ids, data.class_values)
    + FOV (data.fov: file | estimate | none) -> resize by data.scale (area for the image,
    nearest for label and FOV) -> CLAHE (data.clahe) -> channels; pixels outside the FOV get
    label ignore_index.

Training (`SegPatchDataset`, split "train"): item i is a patch of image i % len(records),
drawn from a generator seeded with (seed, epoch, i) (`set_epoch` is called by the engine's
SeededDataset), so a run and its resume see the same patches whatever the worker count. With
probability `foreground_oversample` the patch is centred on a foreground pixel: a class present
in the image is drawn uniformly, then one of (at most 10,000, as nnU-Net keeps) its pixels
(nnU-Net's oversampling, which thin vessels and tiny lesions need); otherwise its corner is
uniform inside the image. Then torchvision.transforms.v2 on Image + Mask together: flips,
rotations by multiples of 90 degrees (of square patches), a small random affine (probability
`augment_affine_p`) whose area rotated in from outside the patch gets label ignore_index and
FOV False (masks are always resampled with nearest neighbour), and colour jitter on the image
only. Evaluation (`SegImageDataset`, "val" / "test"): whole scaled images, batch size 1 unless
all images share a size.

Items (both): image float32 (C, H, W) normalised with data.mean / data.std on [0, 1] values;
mask int64 (H, W), ignore_index outside the FOV; fov bool (H, W); index int64 (the record's
position in `dataset.records`).

Splits: records sorted by id (natural order); a permutation drawn from `split_seed` alone gives
the first `test_count` records to "test", the next `val_count` to "val", the rest to "train"
(each kept in id order), so the test set does not move when val_count changes.
`max_images` > 0 then keeps the first N records of every split (quick runs).

    splits = registry.build("dataset", "drive", cfg, seed=0)   # {"train": ..., "val": ...}
"""

from __future__ import annotations

import logging
import os
import time
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from podium.common.images import channel_stats
from podium.common.structured import as_config
from podium.engine.registry import register
from podium.errors import UserError
from podium.tasks.segmentation.pipeline import (
    DriveConfig,
    PreparedImage,
    SegDataConfig,
    SegFolderConfig,
    SegNnunetConfig,
    SyntheticFundusConfig,
    check_classes,
    check_common,
    default_values,
    normalise,
    prepare_record,
)
from podium.tasks.segmentation.readers import (
    SegRecord,
    drive_records,
    nnunet_records,
    pair_folders,
)
from podium.tasks.segmentation.synthetic import write_synthetic_fundus

log = logging.getLogger(__name__)

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
FOV_MODES = ("file", "estimate", "none")
MAX_LOCATIONS = 10_000  # foreground pixels kept per class and image for oversampling (nnU-Net's cap)


# ---- datasets -----------------------------------------------------------------------------


class _SegDataset(Dataset):
    """Shared state. Attributes: `records`, `num_classes`, `class_names`, `in_chans`,
    `ignore_index`, `cfg` (the SegDataConfig), `prepared` (PreparedImage per record)."""

    def __init__(self, records: Sequence[SegRecord], cfg: SegDataConfig, class_names: Sequence[str],
                 values: Mapping[int, int] | None = None, prepared: Sequence[PreparedImage] | None = None):
        check_common(cfg)
        self.cfg = cfg
        self.records = list(records)
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.in_chans = int(cfg.channels)
        self.ignore_index = int(cfg.ignore_index)
        values = dict(values) if values is not None else default_values(self.num_classes, self.ignore_index)
        check_classes(cfg, self.class_names, values)
        self.values = values
        if prepared is None:  # decode once, here, before any worker forks
            prepared = [prepare_record(r, cfg, values) for r in self.records]
        self.prepared = list(prepared)
        if len(self.prepared) != len(self.records):
            raise ValueError("prepared images and records differ in length")
        self.mean = channel_stats(cfg.mean, cfg.channels, "mean")
        self.std = channel_stats(cfg.std, cfg.channels, "std")

    def sample_id(self, index: int) -> str:
        return self.records[index].id

    def as_image_dataset(self) -> SegImageDataset:
        """The same records as whole images (e.g. to evaluate or plot the training split),
        sharing the preprocessed arrays: nothing is decoded again."""
        return SegImageDataset(self.records, self.cfg, self.class_names, self.values, self.prepared)

    def display_image(self, index: int) -> np.ndarray:
        """(H, W, 3) uint8 RGB at the scaled size, before CLAHE (for overlays)."""
        return self.prepared[index].display.copy()

    def full_label(self, index: int) -> np.ndarray:
        """(H, W) int64 class ids at the scaled size, ignore_index outside the FOV (as items)."""
        return self.prepared[index].label.numpy().astype(np.int64)

    def full_fov(self, index: int) -> np.ndarray:
        """(H, W) bool field of view at the scaled size."""
        return self.prepared[index].fov.numpy().copy()

    def _item(self, image: torch.Tensor, label: torch.Tensor, fov: torch.Tensor, index: int) -> dict[str, torch.Tensor]:
        return {
            "image": normalise(image, self.mean, self.std).contiguous(),
            "mask": label.to(torch.int64).contiguous(),
            "fov": fov.to(torch.bool).contiguous(),
            "index": torch.tensor(index, dtype=torch.int64),
        }


class SegImageDataset(_SegDataset):
    """Whole scaled images for evaluation; one item per record."""

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        p = self.prepared[index]
        return self._item(p.image, p.label, p.fov, index)


class RandomRot90(v2.Transform):
    """Rotation by k * 90 degrees (k uniform in 0..3; 0 or 2 for non-square inputs, which keep
    their shape). Lossless, unlike an affine: no interpolation and nothing rotated in."""

    def __init__(self, square: bool):
        super().__init__()
        self.square = square

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        k = int(torch.randint(0, 4 if self.square else 2, ()).item())
        return {"k": k if self.square else 2 * k}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if params["k"] == 0:
            return inpt
        return tv_tensors.wrap(torch.rot90(inpt.as_subclass(torch.Tensor), params["k"], dims=(-2, -1)), like=inpt)


def build_augment(c: SegDataConfig) -> v2.Compose:
    """Flips, rot90, random affine (image bilinear, masks nearest; fill: image 0, masks
    ignore_index) and colour jitter (image only). Draws from the global torch RNG."""
    ops: list[v2.Transform] = [v2.RandomHorizontalFlip()]
    if c.augment_vflip:
        ops.append(v2.RandomVerticalFlip())
    if c.augment_rot90:
        ops.append(RandomRot90(c.patch_size[0] == c.patch_size[1]))
    zoom = tuple(float(z) for z in c.augment_scale)
    if c.augment_affine_p > 0 and (c.augment_rotation > 0 or zoom != (1.0, 1.0)):
        affine = v2.RandomAffine(
            degrees=float(c.augment_rotation), scale=zoom, interpolation=v2.InterpolationMode.BILINEAR,
            fill={tv_tensors.Image: 0, tv_tensors.Mask: c.ignore_index},
        )
        ops.append(v2.RandomApply([affine], p=float(c.augment_affine_p)))
    j = float(c.augment_jitter)
    if j > 0:
        colour = {"saturation": j, "hue": j / 10} if c.channels == 3 else {}
        ops.append(v2.ColorJitter(brightness=j, contrast=j, **colour))
    return v2.Compose(ops)


class SegPatchDataset(_SegDataset):
    """Training patches: len = len(records) * patches_per_image (see the module docstring)."""

    def __init__(self, records: Sequence[SegRecord], cfg: SegDataConfig, class_names: Sequence[str],
                 values: Mapping[int, int] | None = None, prepared: Sequence[PreparedImage] | None = None,
                 *, seed: int = 0):
        super().__init__(records, cfg, class_names, values, prepared)
        self.seed, self.epoch = int(seed), 0
        self.patch_size = (int(cfg.patch_size[0]), int(cfg.patch_size[1]))
        ph, pw = self.patch_size
        for r, p in zip(self.records, self.prepared):
            h, w = p.fov.shape
            if h < ph or w < pw:
                raise UserError(f"{r.image_path}: image is {h} x {w} px (H x W, after data.scale={cfg.scale}), "
                                f"smaller than data.patch_size {[ph, pw]}; lower the patch size.")
        self.locations = [self._locations(r, p) for r, p in zip(self.records, self.prepared)]
        self.augment = build_augment(cfg) if cfg.augment else None

    def _locations(self, record: SegRecord, p: PreparedImage) -> list[np.ndarray]:
        """Flat pixel indices per foreground class present (classes 1..K-1), at most
        MAX_LOCATIONS each, subsampled deterministically from the record id."""
        flat = p.label.numpy().ravel()
        out = []
        for k in range(1, self.num_classes):
            idx = np.flatnonzero(flat == k)
            if idx.size > MAX_LOCATIONS:
                rng = np.random.default_rng([zlib.crc32(record.id.encode()), k])
                idx = np.sort(rng.choice(idx, MAX_LOCATIONS, replace=False))
            if idx.size:
                out.append(idx)
        return out

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.records) * int(self.cfg.patches_per_image)

    def patch_origin(self, index: int, rng: np.random.Generator) -> tuple[int, int, bool]:
        """(top, left, oversampled) of item `index`'s patch."""
        r = index % len(self.records)
        h, w = self.prepared[r].fov.shape
        ph, pw = self.patch_size
        locations = self.locations[r]
        if locations and rng.random() < self.cfg.foreground_oversample:
            cls = locations[int(rng.integers(len(locations)))]
            y, x = divmod(int(cls[int(rng.integers(cls.size))]), w)
            # Centred on the pixel, shifted to stay inside the image (the pixel stays inside).
            return min(max(y - ph // 2, 0), h - ph), min(max(x - pw // 2, 0), w - pw), True
        return int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1)), False

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        r = index % len(self.records)
        rng = np.random.default_rng([self.seed % 2**64, self.epoch, int(index)])
        top, left, _ = self.patch_origin(index, rng)
        return self.patch_item(r, top, left, rng)

    def patch_item(self, r: int, top: int, left: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """The item of record `r`'s patch at (top, left), augmented with a seed drawn from `rng`."""
        ph, pw = self.patch_size
        p = self.prepared[r]
        image = p.image[:, top : top + ph, left : left + pw]
        label = p.label[top : top + ph, left : left + pw].to(torch.int64)
        fov = p.fov[top : top + ph, left : left + pw]
        if self.augment is not None:
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(int(rng.integers(2**63)))
                image, label, fov = self.augment(tv_tensors.Image(image), tv_tensors.Mask(label),
                                                 tv_tensors.Mask(fov.to(torch.int64)))
            # The FOV rides as 1 / 0; the affine's fill (ignore_index, never 1) marks "outside".
            fov = fov.as_subclass(torch.Tensor) == 1
            label = label.as_subclass(torch.Tensor)
            label = torch.where(fov, label, torch.full_like(label, self.ignore_index))
            image = image.as_subclass(torch.Tensor)
        return self._item(image, label, fov, r)


# ---- splits and registered datasets -------------------------------------------------------


def carve_splits(records: Sequence[SegRecord], val_count: int, test_count: int, split_seed: int
                 ) -> dict[str, list[SegRecord]]:
    """train / val[/ test] from one permutation drawn from split_seed (see the module docstring)."""
    n = len(records)
    if val_count < 0 or test_count < 0 or val_count + test_count > n - 1:
        raise UserError(f"data.val_count ({val_count}) + data.test_count ({test_count}) must leave at least one "
                        f"of the {n} images for training.")
    perm = np.random.default_rng(split_seed).permutation(n)
    test_idx = set(perm[:test_count].tolist())
    val_idx = set(perm[test_count : test_count + val_count].tolist())
    splits = {"train": [r for i, r in enumerate(records) if i not in test_idx and i not in val_idx]}
    if val_count:
        splits["val"] = [r for i, r in enumerate(records) if i in val_idx]
    if test_count:
        splits["test"] = [r for i, r in enumerate(records) if i in test_idx]
    return splits


def fraction_subset(records: Sequence, fraction: float, split_seed: int) -> list:
    """A subset of round(fraction * n) records (at least one), drawn with split_seed, in id order:
    fast iteration on part of the data (data.fraction) with the same subset in every run."""
    n = len(records)
    keep = max(1, round(fraction * n))
    chosen = np.sort(np.random.default_rng([split_seed, 7]).permutation(n)[:keep])
    return [records[i] for i in chosen]


def make_splits(c: SegDataConfig, records: Sequence[SegRecord], class_names: Sequence[str],
                values: Mapping[int, int], *, seed: int) -> dict[str, Dataset]:
    """Carve, preprocess every kept record once, and build the split datasets."""
    check_classes(c, class_names, values)
    splits = carve_splits(list(records), c.val_count, c.test_count, c.split_seed)
    if c.fraction < 1:
        splits["train"] = fraction_subset(splits["train"], c.fraction, c.split_seed)
    if c.max_images > 0:
        splits = {k: v[: c.max_images] for k, v in splits.items()}
    start = time.perf_counter()
    prepared = {k: [prepare_record(r, c, values) for r in v] for k, v in splits.items()}
    log.info("%s: preprocessed %d images in %.1f s (%s)", c.name, sum(len(v) for v in splits.values()),
             time.perf_counter() - start, ", ".join(f"{k} {len(v)}" for k, v in splits.items()))
    out: dict[str, Dataset] = {}
    for split, recs in splits.items():
        if split == "train":
            out[split] = SegPatchDataset(recs, c, class_names, values, prepared[split], seed=seed)
        else:
            out[split] = SegImageDataset(recs, c, class_names, values, prepared[split])
    return out


def _root(c: SegDataConfig, what: str) -> Path:
    if not c.root:
        raise UserError(f"data.root is required for dataset {c.name!r}: {what}.")
    root = Path(c.root).expanduser()
    if not root.is_dir():
        raise UserError(f"data.root {root} does not exist or is not a folder.")
    return root


def _values(c: SegDataConfig, default: Mapping[int, int] | None) -> dict[int, int]:
    if c.class_values is not None:
        return {int(k): int(v) for k, v in c.class_values.items()}
    return dict(default) if default is not None else default_values(len(c.class_names), c.ignore_index)


DRIVE_VALUES = {0: 0, 255: 1}


@register("dataset", "drive", schema=DriveConfig)
def drive(cfg: Any, *, seed: int) -> dict[str, Dataset]:
    """DRIVE retinal vessels (Staal et al. 2004): train / val[/ test] carved from one DRIVE folder."""
    c = as_config(cfg, DriveConfig)
    check_common(c)
    records = drive_records(_root(c, "the DRIVE training/ folder with images/, 1st_manual/ and mask/"))
    return make_splits(c, records, c.class_names, _values(c, DRIVE_VALUES), seed=seed)


@register("dataset", "seg_folder", schema=SegFolderConfig)
def seg_folder(cfg: Any, *, seed: int) -> dict[str, Dataset]:
    """Images and label maps in two folders matched by id; train / val[/ test] carved from them."""
    c = as_config(cfg, SegFolderConfig)
    check_common(c)
    for key in ("image_dir", "mask_dir"):
        if not getattr(c, key):
            raise UserError(f"data.{key} is required for dataset 'seg_folder'.")
    base = Path(c.root).expanduser() if c.root else Path(".")

    def where(value: str | None) -> Path | None:
        return None if not value else base / Path(value).expanduser()

    records = pair_folders(where(c.image_dir), where(c.mask_dir), c.image_pattern, c.mask_pattern,
                           where(c.fov_dir), c.fov_pattern)
    return make_splits(c, records, c.class_names, _values(c, None), seed=seed)


@register("dataset", "seg_nnunet", schema=SegNnunetConfig)
def seg_nnunet(cfg: Any, *, seed: int) -> dict[str, Dataset]:
    """nnU-Net v2 raw dataset (imagesTr / labelsTr, 2-D); classes from dataset.json."""
    c = as_config(cfg, SegNnunetConfig)
    check_common(c)
    records, labels, _ = nnunet_records(_root(c, "the nnU-Net raw dataset folder with dataset.json"))
    ignore_value = labels.pop("ignore", None)  # nnU-Net v2's ignore label: pixels that never count
    names = [n for n, _ in sorted(labels.items(), key=lambda kv: kv[1])]
    if c.class_names and len(c.class_names) != len(names):
        raise UserError(f"data.class_names has {len(c.class_names)} entries; dataset.json declares "
                        f"{len(names)} classes ({', '.join(names)}). Leave class_names empty to use those.")
    class_names = list(c.class_names) or names
    default = {v: v for v in labels.values()}
    if ignore_value is not None:
        default[ignore_value] = c.ignore_index
    return make_splits(c, records, class_names, _values(c, default), seed=seed)


def default_synthetic_root() -> Path:
    """`$XDG_CACHE_HOME/podium/segmentation/synthetic_fundus`, else under `~/.cache`."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "podium" / "segmentation" / "synthetic_fundus"


@register("dataset", "synthetic_fundus", schema=SyntheticFundusConfig)
def synthetic_fundus(cfg: Any, *, seed: int) -> dict[str, Dataset]:
    """Synthetic fundus images with vessel masks (generated once, DRIVE layout)."""
    c = as_config(cfg, SyntheticFundusConfig)
    check_common(c)
    base = Path(c.root).expanduser() if c.root else default_synthetic_root()
    folder = base / f"n{c.count}-{c.size[0]}x{c.size[1]}-seed{c.seed}" if len(c.size) == 2 else base
    records = drive_records(write_synthetic_fundus(folder, c.count, c.size, c.seed))
    return make_splits(c, records, c.class_names, _values(c, DRIVE_VALUES), seed=seed)
