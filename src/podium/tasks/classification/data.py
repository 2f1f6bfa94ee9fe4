"""Classification datasets: scikit-learn digits, a folder tree of images, and CSV listings.

Each dataset is registered under a name (`data.name` in a config) with a dataclass schema, and
its factory returns the splits by name:

    build("dataset", "image_folder", cfg.data, seed=cfg.seed)
    # {"train": ..., "val": ..., "test": ...}   every "test*" split is evaluated

Every item is `(image, label)`: a float32 C x H x W tensor and an int. Every dataset has
`classes` (names, index = label), `targets` (all labels, for class-frequency weights),
`in_chans`, `skipped` (files dropped under `on_error: skip`) and `sample_id(i)`.

The image pipeline is the same everywhere, and `read_image_for_predict` reuses it on raw files
so that a served model sees exactly what it was trained on:

    decode (PIL) -> convert to `channels` -> tv_tensors.Image uint8 -> Resize(image_size, square)
    -> (train only) `augment` transforms -> ToDtype(float32, scale) -> Normalize(mean, std)

Mistakes the user can fix (a missing folder, an unknown label, a corrupt image, a misspelled
augmentation) raise `UserError` naming the file, row or config key and what was expected.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from podium.engine.registry import register
from podium.common.augment import augment_choices, build_augmentations, plain as _plain  # noqa: F401
from podium.common.images import load_image  # noqa: F401  (part of this module's API)
from podium.errors import UserError
from podium.common.corruptions import CorruptedDataset

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp")
ON_ERROR_CHOICES = ("raise", "skip")


# ---- schemas ------------------------------------------------------------------------------


@dataclass
class ImageDataConfig:
    """Fields every image-classification dataset accepts."""

    name: str = ""
    image_size: int = 32  # images are resized to image_size x image_size
    channels: int = 3  # 1 = grayscale, 3 = RGB; every image is converted to this
    mean: list[float] = field(default_factory=lambda: [0.5])  # normalisation: one value, or one per channel
    std: list[float] = field(default_factory=lambda: [0.5])
    # train-only torchvision.transforms.v2 ops, e.g. [{name: RandomRotation, degrees: 10}]
    augment: list[Any] = field(default_factory=list)
    on_error: str = "raise"  # raise | skip: an unreadable image stops the run, or is dropped at build time
    classes: Optional[list[str]] = None  # declared classes (order = label index); default: from train


@dataclass
class DigitsConfig(ImageDataConfig):
    """scikit-learn's 1,797 8x8 handwritten digits, upscaled."""

    name: str = "digits"
    val_fraction: float = 0.15  # of all samples
    test_fraction: float = 0.2  # of all samples
    split_seed: int = 0  # the split does not depend on the run seed
    corruption_seed: int = 1234  # test_corrupted: the same image always gets the same corruption
    corruption_severity: float = 1.0


@dataclass
class ImageFolderConfig(ImageDataConfig):
    """root/<split>/<class>/*.png with split folders train, val and test* (optional)."""

    name: str = "image_folder"
    root: Optional[str] = None  # required


@dataclass
class CsvConfig(ImageDataConfig):
    """CSV files listing image paths (relative to the CSV's folder) and labels."""

    name: str = "csv"
    train_csv: Optional[str] = None  # required
    val_csv: Optional[str] = None  # required
    test_csv: Optional[str] = None
    path_column: str = "path"
    label_column: str = "label"


def _as_config(cfg: Any, schema: type) -> Any:
    """Read `cfg` (a DictConfig, a mapping, or any object with attributes) into `schema`.

    Keys the schema does not know are ignored: the config layer has already validated the group
    against the registered schema, and `build_transform` only needs the common fields.
    """
    if isinstance(cfg, schema):
        return cfg
    if isinstance(cfg, DictConfig):
        # A required value still at '???' is left out, so it reads as unset ("data.root is
        # required ...") rather than as a path named '???'.
        cfg = {k: cfg[k] for k in cfg if not OmegaConf.is_missing(cfg, k)}
    cfg = _plain(cfg)
    names = [f.name for f in fields(schema)]
    if isinstance(cfg, Mapping):
        values = {k: cfg[k] for k in names if k in cfg}
    else:
        values = {k: _plain(getattr(cfg, k)) for k in names if hasattr(cfg, k)}
    return schema(**values)


def _check_common(c: ImageDataConfig) -> tuple[list[float], list[float]]:
    """Validate the common fields; return mean and std with one value per channel."""
    if c.channels not in (1, 3):
        raise UserError(f"data.channels must be 1 (grayscale) or 3 (RGB), got {c.channels!r}.")
    if not isinstance(c.image_size, int) or c.image_size <= 0:
        raise UserError(f"data.image_size must be a positive integer, got {c.image_size!r}.")
    if c.on_error not in ON_ERROR_CHOICES:
        raise UserError(
            f"data.on_error must be one of {', '.join(ON_ERROR_CHOICES)}, got {c.on_error!r}."
        )
    stats = {}
    for key in ("mean", "std"):
        values = getattr(c, key)
        values = [values] if isinstance(values, (int, float)) else list(values)
        if len(values) == 1:
            values = values * c.channels
        if len(values) != c.channels:
            raise UserError(
                f"data.{key} has {len(values)} values; expected 1 or one per channel "
                f"(data.channels = {c.channels})."
            )
        stats[key] = [float(v) for v in values]
    if any(s <= 0 for s in stats["std"]):
        raise UserError(f"data.std must be positive, got {stats['std']}.")
    if c.classes is not None:
        declared = [str(x) for x in c.classes]
        if not declared or len(set(declared)) != len(declared):
            raise UserError(f"data.classes must be a non-empty list of distinct names, got {declared}.")
    return stats["mean"], stats["std"]


# ---- transforms ----------------------------------------------------------------------------


def build_transform(cfg: Any, train: bool) -> v2.Compose:
    """The pipeline from a uint8 `tv_tensors.Image` (see `load_image`) to the model's input.

    Only the train pipeline gets `cfg.augment`.
    """
    c = _as_config(cfg, ImageDataConfig)
    mean, std = _check_common(c)
    steps: list[Callable] = [v2.Resize((c.image_size, c.image_size), antialias=True)]
    if train:
        steps += build_augmentations(c.augment, c.channels, c.image_size)
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return v2.Compose(steps)


def read_image_for_predict(path: str | os.PathLike, cfg: Any) -> torch.Tensor:
    """Load a raw file exactly as the eval splits are loaded: a float32 C x H x W tensor."""
    c = _as_config(cfg, ImageDataConfig)
    image = build_transform(c, train=False)(load_image(path, c.channels))
    return image.as_subclass(torch.Tensor)


# ---- dataset classes ----------------------------------------------------------------------


class ImageFileDataset(Dataset):
    """Images read from files, decoded on access."""

    def __init__(
        self,
        files: Sequence[Path],
        labels: Sequence[int],
        classes: Sequence[str],
        transform: Callable,
        channels: int,
        ids: Sequence[str],
        skipped: Sequence[str] = (),
    ):
        self.files = list(files)
        self.targets = [int(y) for y in labels]
        self.classes = list(classes)
        self.transform = transform
        self.in_chans = channels
        self.ids = list(ids)
        self.skipped = list(skipped)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        image = self.transform(load_image(self.files[index], self.in_chans))
        return image.as_subclass(torch.Tensor), self.targets[index]

    def sample_id(self, index: int) -> str:
        return self.ids[index]


class TensorImageDataset(Dataset):
    """Images held in memory as a uint8 N x c x h x w tensor (c = 1 is replicated to in_chans)."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: Sequence[int],
        classes: Sequence[str],
        transform: Callable,
        channels: int,
        id_prefix: str,
        source_index: Sequence[int] | None = None,
    ):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"expected uint8 N x C x H x W images, got {images.dtype} {tuple(images.shape)}")
        self.images = images
        self.targets = [int(y) for y in labels]
        self.classes = list(classes)
        self.transform = transform
        self.in_chans = channels
        self.id_prefix = id_prefix
        # ids name the sample in its source (e.g. its row in load_digits), not its position in a
        # split, so that folds, ensembles and diffs of differently split runs line up
        self.source_index = None if source_index is None else [int(i) for i in source_index]
        self.skipped: list[str] = []

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        image = self.images[index]
        if image.shape[0] != self.in_chans:
            image = image.expand(self.in_chans, -1, -1).contiguous()
        image = self.transform(tv_tensors.Image(image))
        return image.as_subclass(torch.Tensor), self.targets[index]

    def sample_id(self, index: int) -> str:
        return f"{self.id_prefix}-{index if self.source_index is None else self.source_index[index]:04d}"


# ---- shared helpers -----------------------------------------------------------------------


def _sort_labels(labels: Sequence[str]) -> list[str]:
    """Sorted class names; all-integer names sort numerically (so '10' comes after '9')."""
    unique = sorted(set(labels))
    if unique and all(re.fullmatch(r"-?\d+", x) for x in unique):
        return sorted(unique, key=int)
    return unique


def _class_index(classes: list[str], declared: bool) -> Callable[[str, str], int]:
    """Label name -> index; an unknown label is a UserError naming where it was found."""
    index = {name: i for i, name in enumerate(classes)}
    origin = "data.classes" if declared else "the classes found in the train split"

    def lookup(label: str, where: str) -> int:
        if label not in index:
            raise UserError(f"{where}: label {label!r} is not one of {origin}: {', '.join(classes)}.")
        return index[label]

    return lookup


def _find_unreadable(files: Sequence[Path], channels: int) -> list[int]:
    """Fully decode every file once (threads: PIL releases the GIL while decoding); return the
    positions of the ones that fail."""

    def bad(path: Path) -> bool:
        try:
            load_image(path, channels)
            return False
        except UserError:
            return True

    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        flags = list(pool.map(bad, files))
    return [i for i, flag in enumerate(flags) if flag]


def _file_split(
    c: ImageDataConfig,
    split: str,
    files: list[Path],
    labels: list[int],
    ids: list[str],
    classes: list[str],
    source: str,
    skipped: Sequence[str] = (),
) -> ImageFileDataset:
    """Make one split's dataset; under on_error=skip, verify the images and drop bad ones."""
    skipped = list(skipped)
    if c.on_error == "skip" and files:
        bad = set(_find_unreadable(files, c.channels))
        if bad:
            skipped += [str(files[i]) for i in sorted(bad)]
            keep = [i for i in range(len(files)) if i not in bad]
            files = [files[i] for i in keep]
            labels = [labels[i] for i in keep]
            ids = [ids[i] for i in keep]
    if skipped:
        log.warning(
            "data: skipped %d unreadable image(s) in split %r (on_error=skip), e.g. %s",
            len(skipped), split, skipped[0],
        )
    if not files:
        extra = f" ({len(skipped)} unreadable image(s) were skipped)" if skipped else ""
        raise UserError(f"{source}: split {split!r} has no usable images{extra}.")
    transform = build_transform(c, train=split == "train")
    return ImageFileDataset(files, labels, classes, transform, c.channels, ids, skipped)


# ---- digits -------------------------------------------------------------------------------


def _stratified_split(
    labels: np.ndarray, val_fraction: float, test_fraction: float, split_seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    n = len(labels)
    n_test = int(round(test_fraction * n))
    n_val = int(round(val_fraction * n))
    index = np.arange(n)
    rest, test = train_test_split(index, test_size=n_test, stratify=labels, random_state=split_seed)
    train, val = train_test_split(rest, test_size=n_val, stratify=labels[rest], random_state=split_seed)
    return np.sort(train), np.sort(val), np.sort(test)


@register("dataset", "digits", schema=DigitsConfig)
def digits(cfg: Any, *, seed: int) -> dict[str, Dataset]:
    """scikit-learn digits (8x8, upscaled) with a stratified split and a corrupted test split."""
    c = _as_config(cfg, DigitsConfig)
    _check_common(c)
    for key in ("val_fraction", "test_fraction"):
        if not 0.0 < getattr(c, key) < 1.0:
            raise UserError(f"data.{key} must be between 0 and 1, got {getattr(c, key)!r}.")
    if c.val_fraction + c.test_fraction >= 0.9:
        raise UserError(
            f"data.val_fraction + data.test_fraction = {c.val_fraction + c.test_fraction:.2f} "
            f"leaves too little to train on; keep the sum below 0.9."
        )
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # Pixel values are 0..16: stretch to 0..255 so uint8 scaling gives the usual [0, 1] range.
    images = torch.from_numpy(np.round(bunch.images * (255.0 / 16.0))).to(torch.uint8).unsqueeze(1)
    names = [str(int(y)) for y in bunch.target]
    classes = [str(x) for x in c.classes] if c.classes is not None else _sort_labels(names)
    lookup = _class_index(classes, declared=c.classes is not None)
    labels = np.array([lookup(name, f"digits sample {i}") for i, name in enumerate(names)])

    # The split is stratified on the digit and depends on split_seed only, never on the run seed.
    train_idx, val_idx, test_idx = _stratified_split(
        bunch.target, c.val_fraction, c.test_fraction, c.split_seed
    )

    def split(idx: np.ndarray, name: str, transform: Callable) -> TensorImageDataset:
        t = torch.from_numpy(idx)
        return TensorImageDataset(
            images[t], labels[idx].tolist(), classes, transform, c.channels, "digits", source_index=idx.tolist()
        )

    eval_tf = build_transform(c, train=False)
    # test_corrupted: the test images resized but not yet normalised, corrupted per
    # (corruption_seed, index), then normalised like every eval split.
    resize_only = v2.Resize((c.image_size, c.image_size), antialias=True)
    corrupted = CorruptedDataset(
        split(test_idx, "test_corrupted", resize_only),
        seed=c.corruption_seed,
        severity=c.corruption_severity,
        transform=eval_tf,
    )
    return {
        "train": split(train_idx, "train", build_transform(c, train=True)),
        "val": split(val_idx, "val", eval_tf),
        "test": split(test_idx, "test", eval_tf),
        "test_corrupted": corrupted,
    }


# ---- image folder -------------------------------------------------------------------------

_FOLDER_LAYOUT = (
    "root/train/<class>/*.png and root/val/<class>/*.png (optionally root/test*/<class>/...), "
    f"image extensions {', '.join(IMAGE_EXTENSIONS)}"
)


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(folder: Path) -> list[Path]:
    """Images under `folder` (nested folders included), hidden files (e.g. macOS '._x.png')
    excluded, in a stable order."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


@register("dataset", "image_folder", schema=ImageFolderConfig)
def image_folder(cfg: Any, *, seed: int) -> dict[str, Dataset]:
    """root/<split>/<class>/<image> folders; classes are the train sub-folder names."""
    c = _as_config(cfg, ImageFolderConfig)
    _check_common(c)
    if not c.root:
        raise UserError(
            f"data.root is required for dataset 'image_folder': a folder laid out as {_FOLDER_LAYOUT}."
        )
    root = Path(c.root).expanduser()
    if not root.is_dir():
        raise UserError(f"data.root {root} does not exist or is not a folder; expected {_FOLDER_LAYOUT}.")
    split_dirs = {
        p.name: p for p in _visible_dirs(root) if p.name in ("train", "val") or p.name.startswith("test")
    }
    for required in ("train", "val"):
        if required not in split_dirs:
            found = ", ".join(p.name for p in _visible_dirs(root)) or "none"
            raise UserError(
                f"{root}: no '{required}' folder (folders found: {found}); expected {_FOLDER_LAYOUT}."
            )

    train_classes = [p.name for p in _visible_dirs(split_dirs["train"])]
    if not train_classes:
        raise UserError(f"{split_dirs['train']}: no class folders; expected {_FOLDER_LAYOUT}.")
    declared = c.classes is not None
    classes = [str(x) for x in c.classes] if declared else _sort_labels(train_classes)
    lookup = _class_index(classes, declared)

    order = ["train", "val"] + sorted(name for name in split_dirs if name.startswith("test"))
    datasets: dict[str, Dataset] = {}
    for name in order:
        split_dir = split_dirs[name]
        files, labels = [], []
        for class_dir in _visible_dirs(split_dir):
            label = lookup(class_dir.name, f"{class_dir} (class folder)")
            found = _image_files(class_dir)
            files += found
            labels += [label] * len(found)
        if not files:
            raise UserError(
                f"{split_dir}: no images found; expected {split_dir}/<class>/*.png ({_FOLDER_LAYOUT})."
            )
        ids = [f.relative_to(root).as_posix() for f in files]
        datasets[name] = _file_split(c, name, files, labels, ids, classes, str(split_dir))
    return datasets


# ---- csv ----------------------------------------------------------------------------------


def _read_csv(path: Path, path_column: str, label_column: str, key: str) -> list[tuple[int, str, str]]:
    """Rows of (line number, path cell, label cell); every problem names the CSV (and row)."""
    if not path.is_file():
        raise UserError(
            f"{key} {path} does not exist; expected a CSV file with columns {path_column!r} and "
            f"{label_column!r}."
        )
    with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: tolerate Excel's BOM
        reader = csv.DictReader(f)
        columns = [name for name in reader.fieldnames or []]
        missing = [col for col in (path_column, label_column) if col not in columns]
        if missing:
            raise UserError(
                f"{path}: missing column(s) {', '.join(map(repr, missing))}; columns found: "
                f"{', '.join(map(repr, columns)) or 'none (empty file)'}. Set data.path_column / "
                f"data.label_column to the right names."
            )
        rows = []
        for row in reader:
            cell_path = (row.get(path_column) or "").strip()
            cell_label = (row.get(label_column) or "").strip()
            if not cell_path and not cell_label:
                continue  # blank line
            if not cell_path or not cell_label:
                raise UserError(
                    f"{path}, line {reader.line_num}: empty {path_column!r} or {label_column!r} cell."
                )
            rows.append((reader.line_num, cell_path, cell_label))
    if not rows:
        raise UserError(
            f"{path}: no rows; expected one row per image with columns {path_column!r} and "
            f"{label_column!r}."
        )
    return rows


@register("dataset", "csv", schema=CsvConfig)
def csv_dataset(cfg: Any, *, seed: int) -> dict[str, Dataset]:
    """Images listed in CSV files (path, label); relative paths start at the CSV's folder."""
    c = _as_config(cfg, CsvConfig)
    _check_common(c)
    for key in ("train_csv", "val_csv"):
        if not getattr(c, key):
            raise UserError(
                f"data.{key} is required for dataset 'csv' (a CSV with columns "
                f"{c.path_column!r}, {c.label_column!r})."
            )
    sources = {"train": ("data.train_csv", c.train_csv), "val": ("data.val_csv", c.val_csv)}
    if c.test_csv:
        sources["test"] = ("data.test_csv", c.test_csv)
    tables = {
        split: (Path(p).expanduser(), _read_csv(Path(p).expanduser(), c.path_column, c.label_column, key))
        for split, (key, p) in sources.items()
    }

    declared = c.classes is not None
    classes = [str(x) for x in c.classes] if declared else _sort_labels([r[2] for r in tables["train"][1]])
    lookup = _class_index(classes, declared)

    datasets: dict[str, Dataset] = {}
    for split, (csv_path, rows) in tables.items():
        files, labels, ids, missing = [], [], [], []
        for line, cell_path, cell_label in rows:
            file = Path(cell_path).expanduser()
            file = file if file.is_absolute() else csv_path.parent / file
            label = lookup(cell_label, f"{csv_path}, line {line} ({cell_path})")
            if not file.is_file():  # cheap to check now rather than mid-epoch
                missing.append((line, file))
                continue
            files.append(file)
            labels.append(label)
            ids.append(cell_path)
        if missing and c.on_error == "raise":
            shown = "; ".join(f"line {line}: {file}" for line, file in missing[:5])
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            raise UserError(
                f"{csv_path}: {len(missing)} listed image(s) do not exist: {shown}{more}. Paths are "
                f"relative to the CSV's folder; set data.on_error: skip to drop them."
            )
        skipped = [str(file) for _, file in missing]
        datasets[split] = _file_split(c, split, files, labels, ids, classes, str(csv_path), skipped)
    return datasets
