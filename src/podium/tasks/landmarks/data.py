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

import csv
import json
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from podium.common.augment import plain
from podium.common.images import load_image
from podium.engine.registry import register
from podium.errors import UserError
from podium.tasks.landmarks.cache import PreprocessCache, resolve_cache_dir
from podium.tasks.landmarks.geometry import Letterbox, letterbox

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

#: The 19 ISBI 2015 landmarks, in the order of the challenge files (landmark 1 first).
ISBI2015_LANDMARKS = [
    "sella", "nasion", "orbitale", "porion", "subspinale", "supramentale", "pogonion", "menton",
    "gnathion", "gonion", "lower_incisal_incision", "upper_incisal_incision", "upper_lip",
    "lower_lip", "subnasale", "soft_tissue_pogonion", "posterior_nasal_spine",
    "anterior_nasal_spine", "articulare",
]  # fmt: skip
ISBI_SPLIT_DIRS = {"train": "TrainingData", "test1": "Test1Data", "test2": "Test2Data"}
ISBI_GROUND_TRUTHS = ("senior", "junior", "mean")
ISBI_LAYOUTS = ("csv", "original")

# Bump when the preprocessing below changes: it is part of every cache key.
PREPROCESS_VERSION = "letterbox-pil-bilinear-topleft-v1"


# ---- records --------------------------------------------------------------------------------


@dataclass(eq=False)
class LandmarkRecord:
    """One annotated image: `points` (K, 2) float64 (x, y) original pixels, `spacing` (x, y)
    mm/px. `size` is the (w, h) the image decodes to (read from the header by the readers)."""

    image_path: Path
    points: np.ndarray
    spacing: tuple[float, float]
    id: str
    size: Optional[tuple[int, int]] = None


def read_image_size(path: Path, where: str = "") -> tuple[int, int]:
    """(w, h) of an image as `load_image` decodes it (EXIF rotation included), from its header
    only (no pixel decode)."""
    prefix = f"{where}: " if where else ""
    if not path.is_file():
        raise UserError(f"{prefix}image {path} does not exist.")
    try:
        with Image.open(path) as img:
            w, h = img.size
            try:
                orientation = img.getexif().get(0x0112, 1)
            except Exception:  # noqa: BLE001 - a broken EXIF block only loses the rotation
                orientation = 1
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
        raise UserError(f"{prefix}cannot read image {path}: {e or type(e).__name__}") from None
    if orientation in (5, 6, 7, 8):  # transposed / rotated by 90 degrees
        w, h = h, w
    return int(w), int(h)


def _number(cell: Any, where: str, what: str) -> float:
    """A finite float from a table cell / JSON value, or a UserError naming where."""
    value = math.nan
    if not isinstance(cell, bool):
        try:
            value = float(cell.strip() if isinstance(cell, str) else cell)
        except (TypeError, ValueError):
            pass
    if not math.isfinite(value):
        raise UserError(f"{where}: {what} is {cell!r}, not a finite number.")
    return value


def _check_inside(points: np.ndarray, size: tuple[int, int], names: Sequence[str], where: str, path: Path) -> None:
    w, h = size
    inside = (points[:, 0] >= -0.5) & (points[:, 0] <= w - 0.5) & (points[:, 1] >= -0.5) & (points[:, 1] <= h - 0.5)
    if not inside.all():
        k = int(np.flatnonzero(~inside)[0])
        x, y = points[k]
        raise UserError(
            f"{where}: landmark {k + 1} ({names[k]!r}) at (x, y) = ({x:g}, {y:g}) is outside the "
            f"image {path} ({w} x {h} px, w x h). Coordinates are (x, y) = (column, row) in "
            f"pixels of the original image, 0-based; was x/y swapped or the wrong image listed?"
        )


def _record(path: Path, points: np.ndarray, spacing: tuple[float, float], rid: str, names: Sequence[str], where: str) -> LandmarkRecord:
    size = read_image_size(path, where)
    _check_inside(points, size, names, where, path)
    return LandmarkRecord(path, points, (float(spacing[0]), float(spacing[1])), rid, size)


def _check_spacing(spacing: tuple[float, float], where: str) -> tuple[float, float]:
    sx, sy = spacing
    if not (sx > 0 and sy > 0):
        raise UserError(f"{where}: pixel spacing must be positive (mm per pixel), got ({sx:g}, {sy:g}).")
    return float(sx), float(sy)


def _as_spacing(spacing: float | Sequence[float]) -> tuple[float, float]:
    if isinstance(spacing, (int, float)):
        return float(spacing), float(spacing)
    values = [float(s) for s in spacing]
    if len(values) != 2:
        raise UserError(f"spacing must be one number or (x, y), got {spacing!r}.")
    return values[0], values[1]


# ---- generic tables -----------------------------------------------------------------------

_TABLE_HELP = (
    "expected a CSV with columns image_path, <name>_x, <name>_y, ... (optionally spacing_x, "
    "spacing_y), or a JSON {\"landmarks\": [names], \"images\": [{\"path\": ..., \"points\": "
    "[[x, y], ...], \"spacing\": [sx, sy]}]}"
)


def _resolve(cell: str, base: Path) -> Path:
    p = Path(cell).expanduser()
    return p if p.is_absolute() else base / p


def _read_table_csv(path: Path, spacing: tuple[float, float], images_dir: Optional[Path]) -> tuple[list[LandmarkRecord], list[str]]:
    base = images_dir if images_dir is not None else path.parent
    with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: tolerate Excel's BOM
        reader = csv.reader(f)
        header = next(reader, None)
        if not header:
            raise UserError(f"{path}: empty file; {_TABLE_HELP}.")
        header = [h.strip() for h in header]
        if "image_path" not in header:
            raise UserError(f"{path}: no 'image_path' column (columns: {', '.join(header)}); {_TABLE_HELP}.")
        path_col = header.index("image_path")
        sp_cols = [header.index(c) if c in header else None for c in ("spacing_x", "spacing_y")]
        if (sp_cols[0] is None) != (sp_cols[1] is None):
            raise UserError(f"{path}: give both spacing_x and spacing_y columns, or neither.")
        other = [i for i in range(len(header)) if i != path_col and i not in sp_cols]
        if len(other) % 2:
            raise UserError(
                f"{path}: the landmark columns must come in <name>_x, <name>_y pairs; found "
                f"{len(other)} columns: {', '.join(header[i] for i in other)}."
            )
        names, pairs = [], []
        for a, b in zip(other[0::2], other[1::2]):
            ha, hb = header[a], header[b]
            if not (ha.endswith("_x") and hb.endswith("_y") and ha[:-2] == hb[:-2] and ha[:-2]):
                raise UserError(
                    f"{path}: columns {ha!r}, {hb!r} are not a <name>_x, <name>_y pair (landmark "
                    f"columns are pairs, x first); {_TABLE_HELP}."
                )
            names.append(ha[:-2])
            pairs.append((a, b))
        if not names:
            raise UserError(f"{path}: no landmark columns; {_TABLE_HELP}.")
        if len(set(names)) != len(names):
            raise UserError(f"{path}: landmark names repeat: {', '.join(names)}.")
        records = []
        for row in reader:
            line = reader.line_num
            if not any(cell.strip() for cell in row):
                continue  # blank line
            where = f"{path}, line {line}"
            if len(row) != len(header):
                raise UserError(
                    f"{where}: {len(row)} values, the header has {len(header)} columns "
                    f"({len(names)} landmarks = {2 * len(names)} coordinates)."
                )
            cell = row[path_col].strip()
            if not cell:
                raise UserError(f"{where}: empty image_path.")
            points = np.array(
                [[_number(row[a], where, f"column {header[a]!r}"), _number(row[b], where, f"column {header[b]!r}")] for a, b in pairs],
                dtype=np.float64,
            )
            sp = spacing
            if sp_cols[0] is not None:
                sp = (_number(row[sp_cols[0]], where, "spacing_x"), _number(row[sp_cols[1]], where, "spacing_y"))
            sp = _check_spacing(sp, where)
            records.append(_record(_resolve(cell, base), points, sp, cell, names, f"{where} ({cell})"))
    if not records:
        raise UserError(f"{path}: no rows; {_TABLE_HELP}.")
    return records, names


def _read_table_json(path: Path, spacing: tuple[float, float], images_dir: Optional[Path]) -> tuple[list[LandmarkRecord], list[str]]:
    base = images_dir if images_dir is not None else path.parent
    try:
        doc = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e}); {_TABLE_HELP}.") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("landmarks"), list) or not isinstance(doc.get("images"), list):
        raise UserError(f"{path}: needs a 'landmarks' list and an 'images' list; {_TABLE_HELP}.")
    names = [str(n) for n in doc["landmarks"]]
    if not names or len(set(names)) != len(names):
        raise UserError(f"{path}: 'landmarks' must be a non-empty list of distinct names, got {names}.")
    records = []
    for i, item in enumerate(doc["images"]):
        where = f"{path}, images[{i}]"
        if not isinstance(item, dict) or not isinstance(item.get("path"), str) or "points" not in item:
            raise UserError(f"{where}: needs 'path' (string) and 'points' ([[x, y], ...]); {_TABLE_HELP}.")
        where = f"{where} ({item['path']})"
        pts = item["points"]
        if not isinstance(pts, list) or len(pts) != len(names):
            got = len(pts) if isinstance(pts, list) else type(pts).__name__
            raise UserError(f"{where}: {got} points, expected {len(names)} (one [x, y] per landmark).")
        rows = []
        for k, p in enumerate(pts):
            if not isinstance(p, (list, tuple)) or len(p) != 2:
                raise UserError(f"{where}: point {k} ({names[k]!r}) is {p!r}, expected [x, y].")
            rows.append([_number(p[0], where, f"x of {names[k]!r}"), _number(p[1], where, f"y of {names[k]!r}")])
        sp = spacing
        if item.get("spacing") is not None:
            s = item["spacing"]
            if isinstance(s, (int, float)) and not isinstance(s, bool):
                s = [s, s]
            if not isinstance(s, list) or len(s) != 2:
                raise UserError(f"{where}: spacing is {s!r}, expected [sx, sy] (mm per pixel).")
            sp = (_number(s[0], where, "spacing x"), _number(s[1], where, "spacing y"))
        sp = _check_spacing(sp, where)
        records.append(_record(_resolve(item["path"], base), np.array(rows, dtype=np.float64), sp, item["path"], names, where))
    if not records:
        raise UserError(f"{path}: 'images' is empty.")
    return records, names


def read_landmark_table(
    path: str | Path, spacing: float | Sequence[float] = 1.0, images_dir: str | Path | None = None
) -> tuple[list[LandmarkRecord], list[str]]:
    """Read a landmark table; returns (records, landmark names in order).

    Coordinates are (x, y) = (column, row) in original image pixels, 0-based, pixel centres at
    integer coordinates.

    - CSV: `image_path` then `<name>_x,<name>_y` column pairs (landmark order = column order,
      names = the column prefixes), optional `spacing_x,spacing_y` columns (mm/px).
    - JSON (`.json`): {"landmarks": [names], "images": [{"path": ..., "points": [[x, y], ...],
      "spacing": [sx, sy]}]} (spacing optional per image).

    Image paths are relative to `images_dir`, by default the table's folder. `spacing` applies
    where the table gives none. The record id is the path as written in the table.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"landmark table {path} does not exist; {_TABLE_HELP}.")
    sp = _check_spacing(_as_spacing(spacing), str(path))
    base = Path(images_dir).expanduser() if images_dir is not None else None
    if path.suffix.lower() == ".json":
        return _read_table_json(path, sp, base)
    return _read_table_csv(path, sp, base)


# ---- ISBI 2015 ----------------------------------------------------------------------------


def read_isbi_csv(csv_path: str | Path, images_dir: str | Path, spacing: float = 0.1) -> list[LandmarkRecord]:
    """The CSV copy of ISBI 2015 (`image_path,1_x,1_y,...,19_x,19_y`, senior doctor).

    Record ids are the image stems ("001"); names are `ISBI2015_LANDMARKS`. Coordinates (x, y).
    """
    csv_path = Path(csv_path).expanduser()
    records, names = read_landmark_table(csv_path, spacing, images_dir)
    expected = [str(k) for k in range(1, 20)]
    if names != expected:
        raise UserError(
            f"{csv_path}: expected the 19 ISBI 2015 landmark column pairs 1_x,1_y ... 19_x,19_y "
            f"in order, found {len(names)} landmark(s): {', '.join(names)}."
        )
    for r in records:
        r.id = Path(r.id).stem
    return records


def _read_isbi_txt(path: Path, image: Path) -> np.ndarray:
    """The first 19 lines of an annotation file, each `x,y` (later lines hold other info)."""
    if not path.is_file():
        raise UserError(f"{image}: annotation file {path} does not exist.")
    lines = path.read_text(encoding="utf-8-sig", errors="replace").splitlines()
    points = []
    for n, text in enumerate(lines[:19], start=1):
        parts = [p for p in re.split(r"[,\s;]+", text.strip()) if p]
        where = f"{path}, line {n}"
        if len(parts) != 2:
            raise UserError(
                f"{where}: {text.strip()!r} is not 'x,y'; an annotation file starts with 19 lines "
                f"'x,y', one per landmark (it has {len(lines)} line(s))."
            )
        points.append([_number(parts[0], where, "x"), _number(parts[1], where, "y")])
    if len(points) != 19:
        raise UserError(f"{path}: {len(points)} landmark line(s), expected 19 lines 'x,y'.")
    return np.array(points, dtype=np.float64)


def read_isbi_original(
    root: str | Path, split: str = "train", ground_truth: str = "senior", spacing: float = 0.1
) -> list[LandmarkRecord]:
    """The original challenge layout under `root`:

        RawImage/{TrainingData,Test1Data,Test2Data}/NNN.bmp
        AnnotationsByMD/{400_senior,400_junior}/NNN.txt   (19 lines 'x,y' first)

    `split` in train/test1/test2; `ground_truth` senior (the challenge's), junior, or mean (the
    average of the two doctors). Coordinates are (x, y) original pixels.
    """
    root = Path(root).expanduser()
    if split not in ISBI_SPLIT_DIRS:
        raise UserError(f"ISBI 2015 split {split!r} is not one of {', '.join(ISBI_SPLIT_DIRS)}.")
    if ground_truth not in ISBI_GROUND_TRUTHS:
        raise UserError(f"ground_truth {ground_truth!r} is not one of {', '.join(ISBI_GROUND_TRUTHS)}.")
    image_dir = root / "RawImage" / ISBI_SPLIT_DIRS[split]
    if not image_dir.is_dir():
        raise UserError(
            f"{image_dir} does not exist; the original ISBI 2015 layout is "
            f"RawImage/{{TrainingData,Test1Data,Test2Data}}/NNN.bmp + "
            f"AnnotationsByMD/{{400_senior,400_junior}}/NNN.txt under the root."
        )
    images = sorted(
        p for p in image_dir.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
    )
    if not images:
        raise UserError(f"{image_dir}: no images ({', '.join(IMAGE_EXTENSIONS)}).")
    doctors = ["senior", "junior"] if ground_truth == "mean" else [ground_truth]
    sp = _check_spacing(_as_spacing(spacing), "spacing")
    records = []
    for img in images:
        pts = [_read_isbi_txt(root / "AnnotationsByMD" / f"400_{d}" / f"{img.stem}.txt", img) for d in doctors]
        points = np.mean(pts, axis=0) if len(pts) > 1 else pts[0]
        where = str(root / "AnnotationsByMD" / f"400_{doctors[0]}" / f"{img.stem}.txt")
        records.append(_record(img, points, sp, img.stem, ISBI2015_LANDMARKS, where))
    return records


# ---- augmentation -------------------------------------------------------------------------


@dataclass
class LandmarkAugmentConfig:
    """Train-only augmentation; the points move with the image."""

    enabled: bool = True
    rotation_deg: float = 10.0  # uniform in [-rotation_deg, rotation_deg]
    scale: list[float] = field(default_factory=lambda: [0.9, 1.1])  # [min, max] zoom
    translate: float = 0.05  # max shift, as a fraction of the input width / height
    brightness: float = 0.2  # ColorJitter factors
    contrast: float = 0.2
    noise_std: float = 0.02  # Gaussian noise on the [0, 1] image


def check_augment(a: LandmarkAugmentConfig, where: str = "data.augment") -> None:
    scale = list(a.scale)
    if len(scale) != 2 or not 0 < scale[0] <= scale[1]:
        raise UserError(f"{where}.scale must be [min, max] with 0 < min <= max, got {scale}.")
    checks = {
        "rotation_deg": 0 <= a.rotation_deg <= 180,
        "translate": 0 <= a.translate <= 1,
        "brightness": a.brightness >= 0,
        "contrast": a.contrast >= 0,
        "noise_std": a.noise_std >= 0,
    }
    for key, ok in checks.items():
        if not ok:
            limit = {"rotation_deg": "in [0, 180]", "translate": "in [0, 1]"}.get(key, ">= 0")
            raise UserError(f"{where}.{key} must be {limit}, got {getattr(a, key)!r}.")


def affine_matrix(
    angle: float, translate: Sequence[float], scale: float, shear: Sequence[float], canvas_size: Sequence[int]
) -> np.ndarray:
    """The 3 x 3 matrix `apply_affine` applies to (x, y, 1) points, pixel-centre convention.

    torchvision's convention (`v2.functional.affine`): rotate by `angle` degrees, shear and
    scale about the image centre, then translate by `translate` pixels; in pixel-centre
    coordinates the centre is ((W - 1) / 2, (H - 1) / 2).
    """
    h, w = int(canvas_size[0]), int(canvas_size[1])
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    rot, sx, sy = math.radians(angle), math.radians(shear[0]), math.radians(shear[1])
    a = math.cos(rot - sy) / math.cos(sy)
    b = -math.cos(rot - sy) * math.tan(sx) / math.cos(sy) - math.sin(rot)
    c = math.sin(rot - sy) / math.cos(sy)
    d = -math.sin(rot - sy) * math.tan(sx) / math.cos(sy) + math.cos(rot)
    rss = np.array([[a, b], [c, d]], dtype=np.float64) * float(scale)
    m = np.eye(3)
    m[:2, :2] = rss
    m[:2, 2] = np.array([cx + translate[0], cy + translate[1]]) - rss @ np.array([cx, cy])
    return m


def apply_affine(
    image: torch.Tensor,
    points: torch.Tensor,
    angle: float,
    translate: Sequence[float],
    scale: float,
    shear: Sequence[float] = (0.0, 0.0),
    interpolation: v2.InterpolationMode = v2.InterpolationMode.BILINEAR,
    fill: float = 0,
) -> tuple[tv_tensors.Image, torch.Tensor]:
    """Apply one affine to a (C, H, W) image and its (K, 2) points (float64 out) with
    `v2.functional.affine`, the points as `tv_tensors.KeyPoints`.

    torchvision's KeyPoints kernel rotates and scales about (W/2, H/2) in the corner-based
    convention its image kernels use (pixel i spans [i, i+1]); our points have pixel centres at
    integers, so they are shifted by +0.5 into that convention and back afterwards. Without the
    shift a 10 degree / 1.1x affine would move points ~0.15 px off the image content.
    """
    h, w = image.shape[-2:]
    image = image if isinstance(image, tv_tensors.Image) else tv_tensors.Image(image)
    kp = tv_tensors.KeyPoints(points.to(torch.float64) + 0.5, canvas_size=(h, w))
    kwargs = dict(angle=float(angle), translate=[float(t) for t in translate], scale=float(scale), shear=[float(v) for v in shear])
    image = TF.affine(image, **kwargs, interpolation=interpolation, fill=fill)
    kp = TF.affine(kp, **kwargs)
    return image, kp.as_subclass(torch.Tensor) - 0.5


class LandmarkAugment:
    """(uint8 image, (K, 2) points) -> (float32 image in [0, 1], moved points).

    Random affine (parameters drawn by `v2.RandomAffine.make_params`, applied by
    `apply_affine`), brightness/contrast jitter, then Gaussian noise on the float image. Uses the
    global torch RNG (seeded per DataLoader worker by the engine).
    """

    def __init__(self, cfg: LandmarkAugmentConfig):
        check_augment(cfg)
        self.cfg = cfg
        lo, hi = (float(s) for s in cfg.scale)
        self.affine = None
        if cfg.rotation_deg > 0 or cfg.translate > 0 or (lo, hi) != (1.0, 1.0):
            self.affine = v2.RandomAffine(
                degrees=float(cfg.rotation_deg),
                translate=(float(cfg.translate), float(cfg.translate)) if cfg.translate > 0 else None,
                scale=(lo, hi),
            )
        self.jitter = (
            v2.ColorJitter(brightness=float(cfg.brightness), contrast=float(cfg.contrast))
            if cfg.brightness > 0 or cfg.contrast > 0
            else None
        )
        self.noise = v2.GaussianNoise(mean=0.0, sigma=float(cfg.noise_std), clip=True) if cfg.noise_std > 0 else None
        self.to_float = v2.ToDtype(torch.float32, scale=True)

    def move(self, image: tv_tensors.Image, points: torch.Tensor) -> tuple[tv_tensors.Image, torch.Tensor]:
        """The geometric part only."""
        if self.affine is None:
            return image, points
        params = self.affine.make_params([image])
        return apply_affine(image, points, params["angle"], params["translate"], params["scale"], params["shear"])

    def __call__(self, image: tv_tensors.Image, points: torch.Tensor) -> tuple[tv_tensors.Image, torch.Tensor]:
        image, points = self.move(image, points)
        if self.jitter is not None:
            image = self.jitter(image)
        image = self.to_float(image)
        if self.noise is not None:
            image = self.noise(image)
        return image, points


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


def prepare_image(path: str | Path, cfg: Any) -> tuple[torch.Tensor, Letterbox]:
    """A raw file through exactly the eval pipeline of the datasets built from `cfg` (a data
    config of any landmark dataset: image_size, channels, mean, std are read, the rest ignored):
    float32 normalised (C, H, W) tensor and its Letterbox (map predictions back with
    `letterbox.inverse` or `points_to_original`). No cache: predictions run on new files."""
    common = {f.name for f in fields(LandmarkDataConfig)} - {"name", "augment", "cache_dir"}
    if isinstance(cfg, Mapping) or hasattr(cfg, "keys"):
        values = {k: plain(cfg[k]) for k in common if k in cfg}
    else:
        values = {k: plain(getattr(cfg, k)) for k in common if hasattr(cfg, k)}
    c = LandmarkDataConfig(**values)
    check_common(c)
    raw, lb = load_letterboxed(path, c.image_size, c.channels)
    image = v2.ToDtype(torch.float32, scale=True)(tv_tensors.Image(raw))
    mean, std = _norm_stats(c.mean, c.channels, "mean"), _norm_stats(c.std, c.channels, "std")
    return v2.Normalize(mean, std)(image).as_subclass(torch.Tensor), lb


def _norm_stats(values: Sequence[float] | float, channels: int, key: str) -> list[float]:
    values = [values] if isinstance(values, (int, float)) else list(values)
    if len(values) == 1:
        values = values * channels
    if len(values) != channels:
        raise UserError(f"data.{key} has {len(values)} values; expected 1 or {channels} (data.channels).")
    return [float(v) for v in values]


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
        self.normalize = v2.Normalize(_norm_stats(mean, channels, "mean"), _norm_stats(std, channels, "std"))

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


def as_config(cfg: Any, schema: type) -> Any:
    """A DictConfig / mapping / dataclass -> an instance of `schema` (nested augment included)."""
    if isinstance(cfg, schema):
        return cfg
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), plain(cfg) if not isinstance(cfg, dict) else cfg)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        msg = str(e).splitlines()[0]
        raise UserError(f"data{'.' + key if key else ''}: {msg}") from None


def check_common(c: LandmarkDataConfig) -> None:
    size = list(c.image_size)
    if len(size) != 2 or any(not isinstance(s, int) or s < 8 for s in size):
        raise UserError(f"data.image_size must be [H, W] with integers >= 8, got {size}.")
    if c.channels not in (1, 3):
        raise UserError(f"data.channels must be 1 (grayscale) or 3 (RGB), got {c.channels!r}.")
    _norm_stats(c.mean, c.channels, "mean")
    std = _norm_stats(c.std, c.channels, "std")
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
