"""Segmentation dataset layouts and file readers: image / label / FOV triples as `SegRecord`s.

Layouts:
- DRIVE (Staal et al., "Ridge-based vessel segmentation in color images of the retina", IEEE
  TMI 2004): `images/21_training.tif`, `1st_manual/21_manual1.gif` (255 = vessel),
  `mask/21_training_mask.gif` (255 = field of view); the test set names `NN_test.tif` and
  `NN_test_mask.gif`.
- any two folders matched by id (`pair_folders`), with a file-name pattern per folder;
- nnU-Net v2 raw datasets (Isensee et al., Nature Methods 2021): `dataset.json`,
  `imagesTr/{case}_0000.png`, `labelsTr/{case}.png` (2-D files only).

Patterns name files with an `{id}` placeholder (`{stem}` is the same) and shell wildcards:
"{id}_training.tif", "{stem}.*". The id must be the same in the image's and the mask's name.

Label files are decoded to the values stored in them (see `read_label`) and mapped to class ids
by a declared table; any other value is an error, never a silent class.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from podium.common.images import load_image
from podium.errors import UserError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp", ".gif"}
NNUNET_FILE_ENDINGS = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")


@dataclass
class SegRecord:
    """One image with its label map and (optionally) its field-of-view mask."""

    id: str
    image_path: Path
    mask_path: Path | None
    fov_path: Path | None = None


def natural_key(text: str) -> list:
    """Sort key that orders "2" before "10"."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def pattern_regex(pattern: str, key: str = "pattern") -> re.Pattern:
    """A file-name pattern with one `{id}` (or `{stem}`) placeholder and `*` / `?` wildcards as
    a regex whose group "id" captures the id (greedy: "{stem}.*" on "a.b.png" gives "a.b")."""
    parts = re.split(r"(\{id\}|\{stem\})", pattern)
    if sum(p in ("{id}", "{stem}") for p in parts) != 1 or "/" in pattern:
        raise UserError(
            f"{key} {pattern!r} must be a file name with exactly one {{id}} (or {{stem}}) placeholder, "
            f'e.g. "{{id}}_training.tif" or "{{stem}}.*".'
        )
    out = []
    for p in parts:
        if p in ("{id}", "{stem}"):
            out.append(r"(?P<id>.+)")
        else:
            out.append("".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in p))
    return re.compile("".join(out) + r"\Z")


def _index_folder(folder: Path, pattern: str, key: str, what: str) -> dict[str, list[Path]]:
    """id -> files in `folder` whose name matches `pattern` (hidden files skipped)."""
    if not folder.is_dir():
        raise UserError(f"{what} folder {folder} does not exist or is not a folder.")
    regex = pattern_regex(pattern, key)
    found: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        m = regex.match(path.name)
        if m:
            found.setdefault(m.group("id"), []).append(path)
    return found


def _single(files: list[Path], key: str, pattern: str, ident: str) -> Path:
    if len(files) > 1:
        names = ", ".join(p.name for p in files)
        raise UserError(f"{key} {pattern!r} matches several files for id {ident!r} ({names}); make the pattern specific.")
    return files[0]


def pair_folders(
    image_dir: str | Path,
    mask_dir: str | Path,
    image_pattern: str = "{stem}.*",
    mask_pattern: str = "{stem}.*",
    fov_dir: str | Path | None = None,
    fov_pattern: str | None = None,
) -> list[SegRecord]:
    """Records for the images of `image_dir` matched to masks (and FOV masks) by id, sorted by id
    (natural order). An image without a mask or FOV file is an error naming it and the pattern
    tried; masks without an image are ignored (logged)."""
    image_dir, mask_dir = Path(image_dir).expanduser(), Path(mask_dir).expanduser()
    images = _index_folder(image_dir, image_pattern, "data.image_pattern", "image")
    if not images:
        raise UserError(f"no file in {image_dir} matches data.image_pattern {image_pattern!r}.")
    masks = _index_folder(mask_dir, mask_pattern, "data.mask_pattern", "mask")
    fovs = None
    if fov_dir is not None:
        fov_pattern = fov_pattern or "{stem}.*"
        fovs = _index_folder(Path(fov_dir).expanduser(), fov_pattern, "data.fov_pattern", "FOV mask")
    records = []
    for ident in sorted(images, key=natural_key):
        image = _single(images[ident], "data.image_pattern", image_pattern, ident)
        if ident not in masks:
            tried = mask_pattern.replace("{id}", ident).replace("{stem}", ident)
            raise UserError(f"{image}: no mask in {mask_dir} (data.mask_pattern {mask_pattern!r}, tried {tried!r}).")
        mask = _single(masks[ident], "data.mask_pattern", mask_pattern, ident)
        fov = None
        if fovs is not None:
            if ident not in fovs:
                tried = fov_pattern.replace("{id}", ident).replace("{stem}", ident)
                raise UserError(f"{image}: no FOV mask in {fov_dir} (data.fov_pattern {fov_pattern!r}, tried {tried!r}).")
            fov = _single(fovs[ident], "data.fov_pattern", fov_pattern, ident)
        records.append(SegRecord(ident, image, mask, fov))
    orphans = sorted(set(masks) - set(images), key=natural_key)
    if orphans:
        log.info("%d masks in %s have no image (ids %s...)", len(orphans), mask_dir, ", ".join(orphans[:5]))
    return records


def drive_records(root: str | Path) -> list[SegRecord]:
    """The DRIVE layout under `root` (a `training/` or `test/` folder): images/, 1st_manual/,
    mask/; file names `NN_training.tif` / `NN_test.tif`, `NN_manual1.gif`, `NN_<split>_mask.gif`."""
    root = Path(root).expanduser()
    missing = [d for d in ("images", "1st_manual", "mask") if not (root / d).is_dir()]
    if missing:
        raise UserError(
            f"data.root {root} is not a DRIVE folder: missing {', '.join(m + '/' for m in missing)} "
            f"(expected images/NN_training.tif, 1st_manual/NN_manual1.gif, mask/NN_training_mask.gif)."
        )
    split = "training"
    if not any(p.name.endswith("_training.tif") for p in (root / "images").iterdir()):
        split = "test"
    return pair_folders(
        root / "images", root / "1st_manual", f"{{id}}_{split}.tif", "{id}_manual1.gif",
        root / "mask", f"{{id}}_{split}_mask.gif",
    )  # fmt: skip


def nnunet_records(root: str | Path) -> tuple[list[SegRecord], dict[str, int], list[str]]:
    """An nnU-Net v2 raw dataset folder: (records of imagesTr/labelsTr, labels {name: value}
    from dataset.json, channel names in channel order). One image file per case (`_0000`, RGB or
    grey, as nnU-Net's NaturalImage2DIO reads 2-D images); label files hold class values."""
    root = Path(root).expanduser()
    meta_path = root / "dataset.json"
    if not meta_path.is_file():
        raise UserError(f"data.root {root} has no dataset.json (an nnU-Net v2 raw dataset folder is expected).")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{meta_path}: cannot read JSON: {e}") from None
    for key in ("labels", "file_ending", "channel_names"):
        if key not in meta:
            raise UserError(f"{meta_path}: missing key {key!r} (nnU-Net v2 dataset.json).")
    ending = str(meta["file_ending"]).lower()
    if ending not in NNUNET_FILE_ENDINGS:
        raise UserError(f"{meta_path}: file_ending {meta['file_ending']!r} is not a 2-D image type "
                        f"({', '.join(NNUNET_FILE_ENDINGS)}).")
    labels = {}
    for name, value in dict(meta["labels"]).items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{meta_path}: label {name!r} has value {value!r}; only integer labels are supported "
                            f"(not nnU-Net region lists).")
        labels[str(name)] = value
    if sorted(labels.values()) != list(range(len(labels))):
        raise UserError(f"{meta_path}: label values {sorted(labels.values())} must be consecutive from 0.")
    channels = meta["channel_names"]
    channel_names = [str(channels[k]) for k in sorted(channels, key=lambda k: int(k))]
    ext = meta["file_ending"]
    records = pair_folders(root / "imagesTr", root / "labelsTr", f"{{id}}_0000{ext}", f"{{id}}{ext}")
    extra = sorted((root / "imagesTr").glob(f"*_0001{ext}"))
    if extra:
        raise UserError(f"{extra[0]}: cases with several image files (_0001, ...) are not supported; "
                        f"store 2-D RGB cases as one _0000{ext} file.")
    if "numTraining" in meta and int(meta["numTraining"]) != len(records):
        log.warning("%s: numTraining is %s but imagesTr holds %d cases", meta_path, meta["numTraining"], len(records))
    return records, labels, channel_names


# ---- file readers --------------------------------------------------------------------------


def read_image(path: str | Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB (greyscale files are replicated); UserError for an unreadable file."""
    image = load_image(path, 3)
    return np.ascontiguousarray(image.as_subclass(torch.Tensor).numpy().transpose(1, 2, 0))


def _decode_values(path: Path) -> np.ndarray:
    """The values stored in a label / mask file as an (H, W) integer array.

    Palette images (GIF, indexed PNG): a grey palette (DRIVE's GIFs) gives the grey levels, a
    colour palette (Pascal VOC style) gives the palette indices, which are the class values.
    Bilevel images give 0 / 255. An RGB file must have equal channels (colour-coded labels are
    not supported: convert them to class values first).
    """
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode == "P":
                palette = np.asarray(img.getpalette() or [], dtype=np.int64).reshape(-1, 3)
                grey = palette.size > 0 and bool((palette[:, 0] == palette[:, 1]).all() and (palette[:, 1] == palette[:, 2]).all())
                arr = np.asarray(img.convert("L") if grey else img)
            elif img.mode in ("1", "LA", "PA"):
                arr = np.asarray(img.convert("L"))
            elif img.mode in ("RGB", "RGBA"):
                rgb = np.asarray(img.convert("RGB"))
                if not ((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()):
                    raise UserError(f"{path}: label file is colour-coded ({img.mode}); store one class value per "
                                    f"pixel (greyscale or palette image).")
                arr = rgb[..., 0]
            else:  # L, I, I;16, F
                arr = np.asarray(img)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
        raise UserError(f"{path}: cannot read label file: {str(e) or type(e).__name__}") from None
    if arr.ndim != 2:
        raise UserError(f"{path}: label file has shape {arr.shape}; expected a single-channel (H, W) image.")
    if arr.dtype.kind == "f" and not (np.all(np.isfinite(arr)) and np.all(arr == np.round(arr))):
        raise UserError(f"{path}: label file holds non-integer values.")
    return arr.astype(np.int64)


def _check_size(arr: np.ndarray, path: Path, expected_hw, image_path) -> None:
    if expected_hw is not None and tuple(arr.shape) != tuple(int(s) for s in expected_hw):
        h, w = arr.shape
        raise UserError(
            f"{path} is {w} x {h} px but its image {image_path or ''} is {int(expected_hw[1])} x "
            f"{int(expected_hw[0])} px (width x height); a mask must match its image."
        )


def read_label(
    path: str | Path,
    values: Mapping[int, int] | None = None,
    *,
    expected_hw: Sequence[int] | None = None,
    image_path: str | Path | None = None,
) -> np.ndarray:
    """(H, W) int64 label map from a gif / png / tif file (see `_decode_values`).

    `values` maps stored values to class ids (DRIVE: {0: 0, 255: 1}); a stored value not in it is
    a UserError naming the file and the unexpected values. None keeps the stored values.
    `expected_hw` (the image's (H, W)) checks the size; the error names both files and sizes.
    """
    path = Path(path)
    arr = _decode_values(path)
    _check_size(arr, path, expected_hw, image_path)
    if values is None:
        return arr
    stored = np.unique(arr)
    known = np.array(sorted(int(k) for k in values), dtype=np.int64)
    unknown = stored[~np.isin(stored, known)]
    if unknown.size:
        shown = ", ".join(str(v) for v in unknown[:10]) + (", ..." if unknown.size > 10 else "")
        raise UserError(
            f"{path}: unexpected label values {shown}; the declared values are "
            f"{', '.join(str(v) for v in known)} (data.class_values)."
        )
    lut_keys = known
    lut_vals = np.array([int(values[int(k)]) for k in known], dtype=np.int64)
    return lut_vals[np.searchsorted(lut_keys, arr)]


def read_fov(path: str | Path, *, expected_hw: Sequence[int] | None = None,
             image_path: str | Path | None = None) -> np.ndarray:
    """bool (H, W) field of view from a mask file: stored value >= 128 (of 255) or, for 0/1
    files, 1 means inside. An empty field of view is a UserError."""
    path = Path(path)
    arr = _decode_values(path)
    _check_size(arr, path, expected_hw, image_path)
    top = int(arr.max(initial=0))
    fov = arr >= (1 if top <= 1 else 128)
    if not fov.any():
        raise UserError(f"{path}: the field-of-view mask is empty (no pixel inside); nothing would count.")
    return fov
