"""Landmark annotation readers: ISBI 2015 (CSV copy and the original challenge layout) and
generic CSV / JSON tables. Records hold (x, y) points in ORIGINAL pixels (pixel centres at
integer coordinates) and the (x, y) spacing in mm; every problem in the input raises UserError
naming the file and the line or row. See `podium.tasks.landmarks.data` for the challenge.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image

from podium.common.images import unreadable_image
from podium.errors import UserError


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
        if w <= 0 or h <= 0:  # Pillow opens an HDF5 file as a 0 x 0 stub image
            raise ValueError(f"{img.format} file without pixels")
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
        raise UserError(f"{prefix}{unreadable_image(path, str(e) or type(e).__name__)}") from None
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


