"""Landmark datasets: ISBI 2015 cephalograms (CSV copy or the original challenge layout) and
generic landmark tables (CSV / JSON).

Challenge: C.-W. Wang et al., "A benchmark for comparison of dental radiography analysis
algorithms", Medical Image Analysis 2016 (ISBI 2015 Grand Challenge): 400 lateral cephalograms,
1935 x 2400 px (w x h) at 0.1 mm/px, 19 landmarks annotated by a senior and a junior doctor;
training 001-150, Test1 151-300, Test2 301-400. The challenge's ground truth is the senior
doctor's file (except landmark 16 on Test2); `ground_truth: mean` averages the two doctors as
some toolkits do. Whichever is used is part of the result and must be reported with it.

Conventions (see `podium.tasks.landmarks`):
- coordinates are (x, y) = (column, row) in pixels of the ORIGINAL image, float64, pixel
  centres at integer coordinates (0-based), so a point is inside a W x H image when
  -0.5 <= x <= W - 0.5 and -0.5 <= y <= H - 0.5.
- `LandmarkRecord.spacing` is (x, y) millimetres per pixel.
- items are dicts of tensors: image (C, H, W) float32 (normalised), points (K, 2) float32 in
  input pixels, visible (K,) bool, index () int64, letterbox (5,) float64 [scale, pad_x, pad_y,
  orig_w, orig_h] (see geometry.py), spacing (2,) float64.

Pipeline of `LandmarkDataset`:

    decode (load_image, `channels`) -> letterbox to image_size (H, W), content top-left
    [both cached as .npy by PreprocessCache] -> (train only) RandomAffine (points move with the
    image as tv_tensors.KeyPoints) -> brightness/contrast jitter -> float32 in [0, 1]
    -> Gaussian noise -> Normalize(mean, std)

Points that augmentation pushes off the input canvas keep their (outside) coordinates and get
visible = False; a loss should ignore them. Every problem in the input (a missing annotation
file, a wrong landmark count, a non-numeric value, a point outside its image, a missing image)
raises `UserError` naming the file and the line or row.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from podium.common.augment import plain
from podium.common.images import channel_stats, load_image
from podium.common.structured import as_config
from podium.engine.registry import register
from podium.errors import UserError
from podium.tasks.landmarks.augment import (
    LandmarkAugment,
    LandmarkAugmentConfig,
    check_augment,
)
from podium.tasks.landmarks.cache import PreprocessCache, resolve_cache_dir
from podium.tasks.landmarks.geometry import Letterbox, letterbox
from podium.tasks.landmarks.readers import (
    ISBI2015_LANDMARKS,
    ISBI_GROUND_TRUTHS,
    ISBI_LAYOUTS,
    LandmarkRecord,
    read_image_size,
    read_isbi_csv,
    read_isbi_original,
    read_landmark_table,
)

log = logging.getLogger(__name__)

# Bump when the preprocessing below changes: it is part of every cache key.
PREPROCESS_VERSION = "letterbox-pil-bilinear-topleft-v1"

# ---- dataset ------------------------------------------------------------------------------


def preprocess_params(image_size: Sequence[int], channels: int) -> dict[str, Any]:
    """The cache parameters of the decode + letterbox step."""
    return {"op": PREPROCESS_VERSION, "out_hw": [int(image_size[0]), int(image_size[1])], "channels": int(channels)}


def load_letterboxed(
    path: str | Path,
    image_size: Sequence[int],
    channels: int,
    cache: Optional[PreprocessCache] = None,
    size: Optional[tuple[int, int]] = None,
) -> tuple[torch.Tensor, Letterbox]:
    """Decode + letterbox one file (through `cache`): uint8 (C, H, W) tensor and its Letterbox.

    `size` is the original (w, h) when already known (records carry it); otherwise it is read
    from the file's header, so a cache hit never decodes the image.
    """
    path = Path(path)
    out_h, out_w = int(image_size[0]), int(image_size[1])
    if size is None:
        size = read_image_size(path)
    lb = Letterbox.fit(size[0], size[1], out_w, out_h)

    def make() -> np.ndarray:
        decoded = load_image(path, channels)  # (C, h, w) uint8, UserError if unreadable
        h, w = decoded.shape[-2:]
        if (w, h) != tuple(size):
            raise UserError(f"{path}: decodes to {w} x {h} px but its header says {size[0]} x {size[1]}.")
        arr = decoded.as_subclass(torch.Tensor).numpy()
        arr = arr[0] if channels == 1 else np.moveaxis(arr, 0, -1)
        return letterbox(np.ascontiguousarray(arr), out_h, out_w)[0]

    cache = cache or PreprocessCache(None)
    arr = cache.get_or_create(path, preprocess_params(image_size, channels), make)
    t = torch.from_numpy(np.ascontiguousarray(arr))
    t = t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1).contiguous()
    if t.shape != (channels, out_h, out_w) or t.dtype != torch.uint8:
        raise RuntimeError(f"preprocess cache returned {t.dtype} {tuple(t.shape)} for {path}")
    return t, lb


def _common_config(cfg: Any) -> LandmarkDataConfig:
    """The fields every landmark data config shares (image_size, channels, mean, std)."""
    common = {f.name for f in fields(LandmarkDataConfig)} - {"name", "augment", "cache_dir"}
    if isinstance(cfg, Mapping) or hasattr(cfg, "keys"):
        values = {k: plain(cfg[k]) for k in common if k in cfg}
    else:
        values = {k: plain(getattr(cfg, k)) for k in common if hasattr(cfg, k)}
    c = LandmarkDataConfig(**values)
    check_common(c)
    return c


def _normalise(raw: torch.Tensor, c: LandmarkDataConfig) -> torch.Tensor:
    image = v2.ToDtype(torch.float32, scale=True)(tv_tensors.Image(raw))
    mean, std = channel_stats(c.mean, c.channels, "mean"), channel_stats(c.std, c.channels, "std")
    return v2.Normalize(mean, std)(image).as_subclass(torch.Tensor)


def prepare_image(path: str | Path, cfg: Any) -> tuple[torch.Tensor, Letterbox]:
    """A raw file through exactly the eval pipeline of the datasets built from `cfg` (a data
    config of any landmark dataset: image_size, channels, mean, std are read, the rest ignored):
    float32 normalised (C, H, W) tensor and its Letterbox (map predictions back with
    `letterbox.inverse` or `points_to_original`). No cache: predictions run on new files."""
    c = _common_config(cfg)
    raw, lb = load_letterboxed(path, c.image_size, c.channels)
    return _normalise(raw, c), lb


def prepare_decoded(image: torch.Tensor, cfg: Any) -> tuple[torch.Tensor, Letterbox]:
    """`prepare_image` for an already decoded uint8 (C, H, W) image (a served upload)."""
    c = _common_config(cfg)
    if image.ndim != 3 or image.shape[0] != c.channels or image.dtype != torch.uint8:
        raise UserError(f"image has shape {tuple(image.shape)} ({image.dtype}); the model expects uint8 "
                        f"(C, H, W) with C = {c.channels}.")
    arr = image.as_subclass(torch.Tensor).numpy()
    arr = arr[0] if c.channels == 1 else np.moveaxis(arr, 0, -1)
    boxed, lb = letterbox(np.ascontiguousarray(arr), int(c.image_size[0]), int(c.image_size[1]))
    raw = torch.from_numpy(np.ascontiguousarray(boxed))
    raw = raw.unsqueeze(0) if raw.ndim == 2 else raw.permute(2, 0, 1).contiguous()
    return _normalise(raw, c), lb


class LandmarkDataset(Dataset):
    """Records -> item dicts (see the module docstring). Attributes: `records`,
    `landmark_names`, `num_landmarks`, `in_chans`, `image_size` (H, W), `train`."""

    def __init__(
        self,
        records: Sequence[LandmarkRecord],
        landmark_names: Sequence[str],
        image_size: Sequence[int],
        channels: int = 1,
        cache: Optional[PreprocessCache] = None,
        augment: Optional[LandmarkAugmentConfig] = None,
        train: bool = False,
        mean: Sequence[float] | float = (0.5,),
        std: Sequence[float] | float = (0.5,),
    ):
        self.records = list(records)
        self.landmark_names = list(landmark_names)
        self.num_landmarks = len(self.landmark_names)
        for r in self.records:
            if r.points.shape != (self.num_landmarks, 2):
                raise UserError(
                    f"{r.image_path}: {r.points.shape[0]} landmarks, the dataset has "
                    f"{self.num_landmarks} ({', '.join(self.landmark_names)})."
                )
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.in_chans = int(channels)
        self.cache = cache if cache is not None else PreprocessCache(None)
        self.train = bool(train)
        self.augment = LandmarkAugment(augment) if (train and augment is not None and augment.enabled) else None
        self.to_float = v2.ToDtype(torch.float32, scale=True)
        self.normalize = v2.Normalize(channel_stats(mean, channels, "mean"), channel_stats(std, channels, "std"))

    def __len__(self) -> int:
        return len(self.records)

    def sample_id(self, index: int) -> str:
        return self.records[index].id

    def letterbox(self, index: int) -> Letterbox:
        r = self.records[index]
        size = r.size or read_image_size(r.image_path)
        return Letterbox.fit(size[0], size[1], self.image_size[1], self.image_size[0])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        r = self.records[index]
        raw, lb = load_letterboxed(r.image_path, self.image_size, self.in_chans, self.cache, r.size)
        image = tv_tensors.Image(raw)
        points = torch.from_numpy(lb.forward(np.asarray(r.points, dtype=np.float64)))
        if self.augment is not None:
            image, points = self.augment(image, points)
        else:
            image = self.to_float(image)
        image = self.normalize(image).as_subclass(torch.Tensor)
        h, w = self.image_size
        x, y = points[:, 0], points[:, 1]
        visible = (x >= -0.5) & (x <= w - 0.5) & (y >= -0.5) & (y <= h - 0.5)
        return {
            "image": image.contiguous(),
            "points": points.to(torch.float32),
            "visible": visible,
            "index": torch.tensor(index, dtype=torch.int64),
            "letterbox": lb.as_tensor(),
            "spacing": torch.tensor(r.spacing, dtype=torch.float64),
        }


# ---- schemas ------------------------------------------------------------------------------


@dataclass
class LandmarkDataConfig:
    """Fields every landmark dataset accepts."""

    name: str = ""
    image_size: list[int] = field(default_factory=lambda: [256, 208])  # network input (H, W)
    channels: int = 1  # 1 = grayscale, 3 = RGB
    mean: list[float] = field(default_factory=lambda: [0.5])  # Normalize after scaling to [0, 1]
    std: list[float] = field(default_factory=lambda: [0.5])
    # preprocessed-image cache folder; null = ~/.cache/podium/landmarks, "none" = no cache
    cache_dir: Optional[str] = None
    augment: LandmarkAugmentConfig = field(default_factory=LandmarkAugmentConfig)


@dataclass
class Isbi2015Config(LandmarkDataConfig):
    """ISBI 2015 cephalograms (Wang et al.): 150 train images (val carved out), Test1, Test2."""

    name: str = "isbi2015"
    root: Optional[str] = None  # required, e.g. ../shared/data/isbi2015_ceph
    layout: str = "csv"  # csv (images/ + train_senior.csv, test1_senior.csv) | original (RawImage/, AnnotationsByMD/)
    ground_truth: str = "senior"  # senior | junior | mean (layout original only; csv has senior)
    val_count: int = 15  # validation images carved from the 150 training images
    split_seed: int = 0  # the val carve depends on this only, never on the run seed
    spacing: float = 0.1  # mm per pixel
    max_images: int = 0  # > 0: keep the first N of every split (quick tests)
    test_splits: list[str] = field(default_factory=lambda: ["test1"])  # test1 | test2 (original layout)


@dataclass
class LandmarkTableConfig(LandmarkDataConfig):
    """Landmark tables (CSV or JSON, see read_landmark_table) for train / val / test."""

    name: str = "landmark_table"
    train: Optional[str] = None  # required
    val: Optional[str] = None  # required
    test: Optional[str] = None
    spacing: float = 1.0  # mm per pixel where a table gives none (1.0: errors in pixels)


def check_common(c: LandmarkDataConfig) -> None:
    size = list(c.image_size)
    if len(size) != 2 or any(not isinstance(s, int) or s < 8 for s in size):
        raise UserError(f"data.image_size must be [H, W] with integers >= 8, got {size}.")
    if c.channels not in (1, 3):
        raise UserError(f"data.channels must be 1 (grayscale) or 3 (RGB), got {c.channels!r}.")
    channel_stats(c.mean, c.channels, "mean")
    std = channel_stats(c.std, c.channels, "std")
    if any(s <= 0 for s in std):
        raise UserError(f"data.std must be positive, got {std}.")
    check_augment(c.augment)


def make_splits(
    c: LandmarkDataConfig, splits: dict[str, list[LandmarkRecord]], names: Sequence[str]
) -> dict[str, LandmarkDataset]:
    """One LandmarkDataset per split sharing one cache; only 'train' is augmented."""
    cache = PreprocessCache(resolve_cache_dir(c.cache_dir))
    return {
        split: LandmarkDataset(
            records, names, c.image_size, c.channels, cache,
            augment=c.augment, train=split == "train", mean=c.mean, std=c.std,
        )
        for split, records in splits.items()
    }


# ---- registered datasets ------------------------------------------------------------------


def _carve_val(records: list[LandmarkRecord], val_count: int, split_seed: int) -> tuple[list, list]:
    if not 1 <= val_count < len(records):
        raise UserError(
            f"data.val_count must be between 1 and {len(records) - 1} (the training images), "
            f"got {val_count}."
        )
    perm = np.random.default_rng(split_seed).permutation(len(records))
    val_idx = set(perm[:val_count].tolist())
    train = [r for i, r in enumerate(records) if i not in val_idx]
    val = [r for i, r in enumerate(records) if i in val_idx]
    return train, val


@register("dataset", "isbi2015", schema=Isbi2015Config)
def isbi2015(cfg: Any, *, seed: int) -> dict[str, Dataset]:
    """ISBI 2015 cephalometric landmarks (19 points, 0.1 mm/px); splits train, val, test1[, test2]."""
    c = as_config(cfg, Isbi2015Config)
    check_common(c)
    if not c.root:
        raise UserError(
            "data.root is required for dataset 'isbi2015': the folder with images/ and "
            "train_senior.csv, test1_senior.csv (layout: csv) or RawImage/ and AnnotationsByMD/ "
            "(layout: original)."
        )
    root = Path(c.root).expanduser()
    if not root.is_dir():
        raise UserError(f"data.root {root} does not exist or is not a folder.")
    if c.layout not in ISBI_LAYOUTS:
        raise UserError(f"data.layout must be one of {', '.join(ISBI_LAYOUTS)}, got {c.layout!r}.")
    if c.ground_truth not in ISBI_GROUND_TRUTHS:
        raise UserError(f"data.ground_truth must be one of {', '.join(ISBI_GROUND_TRUTHS)}, got {c.ground_truth!r}.")
    if c.layout == "csv" and c.ground_truth != "senior":
        raise UserError(
            f"data.ground_truth={c.ground_truth!r} is not available with layout 'csv': the CSV copy "
            f"has the senior doctor's annotation only. Use ground_truth: senior, or layout: "
            f"original with the challenge's AnnotationsByMD/400_senior and 400_junior folders."
        )
    tests = list(c.test_splits)
    for t in tests:
        if t not in ("test1", "test2"):
            raise UserError(f"data.test_splits entries must be test1 or test2, got {t!r}.")
    if c.layout == "csv" and "test2" in tests:
        raise UserError(
            "data.test_splits: test2 (images 301-400) is not in the CSV copy (only "
            "train_senior.csv and test1_senior.csv); use test_splits: [test1], or layout: original."
        )
    if not c.spacing > 0:
        raise UserError(f"data.spacing must be positive (mm per pixel), got {c.spacing!r}.")
    if c.max_images < 0:
        raise UserError(f"data.max_images must be >= 0 (0 = all), got {c.max_images}.")

    def read(split: str) -> list[LandmarkRecord]:
        if c.layout == "csv":
            table = root / f"{'train' if split == 'train' else split}_senior.csv"
            if not table.is_file():
                raise UserError(f"{table} does not exist (layout csv expects images/ + train_senior.csv, test1_senior.csv).")
            records = read_isbi_csv(table, root / "images", c.spacing)
        else:
            records = read_isbi_original(root, split, c.ground_truth, c.spacing)
        return sorted(records, key=lambda r: r.id)

    train, val = _carve_val(read("train"), c.val_count, c.split_seed)
    splits = {"train": train, "val": val}
    for t in tests:
        splits[t] = read(t)
    if c.max_images > 0:
        splits = {k: v[: c.max_images] for k, v in splits.items()}
    return make_splits(c, splits, ISBI2015_LANDMARKS)


@register("dataset", "landmark_table", schema=LandmarkTableConfig)
def landmark_table(cfg: Any, *, seed: int) -> dict[str, Dataset]:
    """Landmarks listed in CSV/JSON tables (read_landmark_table) for train, val and test."""
    c = as_config(cfg, LandmarkTableConfig)
    check_common(c)
    for key in ("train", "val"):
        if not getattr(c, key):
            raise UserError(f"data.{key} is required for dataset 'landmark_table': a CSV or JSON landmark table.")
    if not c.spacing > 0:
        raise UserError(f"data.spacing must be positive (mm per pixel), got {c.spacing!r}.")
    splits, names = {}, None
    for split in ("train", "val", "test"):
        value = getattr(c, split)
        if not value:
            continue
        records, split_names = read_landmark_table(value, c.spacing)
        if names is None:
            names = split_names
        elif split_names != names:
            raise UserError(
                f"data.{split} ({value}) has landmarks {', '.join(split_names)}; the train table "
                f"has {', '.join(names)}. Every table must list the same landmarks in the same order."
            )
        splits[split] = records
    return make_splits(c, splits, names or [])
