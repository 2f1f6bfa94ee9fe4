"""Competition export: run-length encoded masks in a CSV, one row per image and class.

The convention is Kaggle's: the pixels of an (H, W) mask are numbered 1 .. H*W in column-major
order (top to bottom, then left to right: pixel (row r, column c) is number c*H + r + 1), and a
mask is written "start length start length ..." with the runs sorted and not touching pixels
twice; an empty mask is "-1". A submission is a CSV with the header `id,class,rle`: for every
image `id` one row per class name, its mask at the challenge's fixed output size (960 x 540,
W x H, for the 2023 camera-invariant domain adaptation challenge), "-1" when the class is absent.

    from podium.tasks.segmentation import rle
    rle.encode(np.array([[0, 0, 1], [1, 0, 0], [1, 0, 0]]))          # -> "2 2 7 1"
    rows = rle.submission_rows("frame_0001", class_map, ["road", "car"], size=(960, 540))
    rle.write_submission(rows, "submission.csv")
    maps = rle.read_submission("submission.csv", (960, 540), ["road", "car"])  # id -> (540, 960)

`podium predict RUN images/ --out pred.csv -o task.submission_size=[960,540]` writes
pred_submission.csv beside pred.csv (ids = the input file stems).
"""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from podium.errors import UserError

HEADER = ["id", "class", "rle"]
DEFAULT_SIZE = (960, 540)  # (W, H) of the challenge's submissions
EMPTY = "-1"
_NUMBERS = re.compile(r"[0-9]+(?: [0-9]+)*")


def check_size(size, key: str = "task.submission_size") -> tuple[int, int]:
    """(W, H) as two positive ints, or a UserError naming `key`."""
    values = list(size) if hasattr(size, "__iter__") and not isinstance(size, str) else [size]
    if len(values) != 2 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0
                                   for v in values):
        raise UserError(f"{key}={values}: expected two positive integers, width then height "
                        f"(the challenge's is [{DEFAULT_SIZE[0]}, {DEFAULT_SIZE[1]}]).")
    return int(values[0]), int(values[1])


def encode(mask: np.ndarray) -> str:
    """(H, W) binary mask (any dtype; nonzero = on) -> "start length ..." or "-1" when empty."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"encode expects an (H, W) mask, got shape {mask.shape}")
    flat = mask.astype(bool).ravel(order="F")  # column-major: down each column, then right
    if not flat.any():
        return EMPTY
    padded = np.concatenate([[False], flat, [False]])
    # 1-based pixel numbers where the value changes: run starts and one-past-run ends, alternating
    edges = np.flatnonzero(padded[1:] != padded[:-1]) + 1
    edges[1::2] -= edges[::2]
    return " ".join(map(str, edges.tolist()))


def decode(rle: str, shape: Sequence[int]) -> np.ndarray:
    """"start length ..." (or "-1") -> (H, W) bool mask. ValueError saying what is wrong with a
    malformed string: a token that is not a non-negative integer, an odd count, a zero start or
    length, runs out of order or overlapping, a run past the last pixel."""
    h, w = int(shape[0]), int(shape[1])
    text = " ".join(str(rle).split())
    if text in (EMPTY, ""):
        return np.zeros((h, w), dtype=bool)
    if not _NUMBERS.fullmatch(text):
        bad = next(t for t in text.split() if not t.isdigit() or not t.isascii())
        raise ValueError(f"token {bad!r} is not a non-negative integer (expected \"start length ...\" or \"-1\")")
    numbers = np.array(text.split(), dtype=np.int64)
    if len(numbers) % 2:
        raise ValueError(f"{len(numbers)} numbers: expected start/length pairs (an even count)")
    starts, lengths = numbers[::2], numbers[1::2]
    if (starts < 1).any() or (lengths < 1).any():
        i = int(np.flatnonzero((starts < 1) | (lengths < 1))[0])
        raise ValueError(f"run {i + 1} ({starts[i]} {lengths[i]}): starts and lengths must be >= 1")
    ends = starts + lengths  # one past the last pixel of each run (1-based)
    clash = np.flatnonzero(starts[1:] < ends[:-1])
    if len(clash):
        i = int(clash[0]) + 1
        raise ValueError(f"run {i + 1} starts at {starts[i]}, inside or before run {i} "
                         f"({starts[i - 1]} .. {ends[i - 1] - 1}): runs must be sorted and not overlap")
    if ends[-1] - 1 > h * w:
        raise ValueError(f"the last run ends at pixel {ends[-1] - 1}, past the {h * w} pixels of a "
                         f"{w} x {h} (W x H) mask")
    # runs are sorted and disjoint: +1 at each start, -1 one past each end, cumulative sum
    steps = np.zeros(h * w + 1, dtype=np.int32)
    np.add.at(steps, starts - 1, 1)
    np.add.at(steps, ends - 1, -1)
    return (np.cumsum(steps[:-1]) > 0).reshape((h, w), order="F")


def submission_rows(image_id: str, label_map: np.ndarray, class_names: Sequence[str],
                    size: Sequence[int] = DEFAULT_SIZE, ignore: int | None = None) -> list[dict]:
    """One row {"id", "class", "rle"} per class of `class_names` (class k = label k) for an
    (H, W) class-id map, resized to `size` (W, H) with nearest neighbour. Pixels labelled
    `ignore` (the data's ignore label) are claimed by no class; any other label outside
    0 .. K-1 is a ValueError."""
    from podium.tasks.segmentation.preprocess import resize_mask

    width, height = check_size(size, "size")
    label_map = np.asarray(label_map)
    if label_map.ndim != 2:
        raise ValueError(f"submission_rows expects an (H, W) class-id map, got shape {label_map.shape}")
    resized = resize_mask(label_map, (height, width))  # class ids are never interpolated
    known = (resized >= 0) & (resized < len(class_names))
    if ignore is not None:
        known |= resized == ignore
    if not known.all():
        raise ValueError(f"{image_id}: label {resized[~known].flat[0]} is outside the {len(class_names)} classes"
                         + (f" and not the ignore label {ignore}" if ignore is not None else ""))
    return [{"id": str(image_id), "class": str(name),
             "rle": encode((resized == k) & (resized != ignore) if ignore is not None else resized == k)}
            for k, name in enumerate(class_names)]


def write_submission(rows: Sequence[dict], path) -> Path:
    """Write `rows` as a CSV with the header id,class,rle. Two rows for the same (id, class) are
    a UserError (two input files with the same stem, for instance)."""
    path = Path(path)
    seen: set[tuple[str, str]] = set()
    for row in rows:
        key = (str(row["id"]), str(row["class"]))
        if key in seen:
            raise UserError(f"{path}: two rows for id {key[0]!r}, class {key[1]!r} (inputs with the same "
                            "file stem? the id is the stem): rename one of them.")
        seen.add(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=HEADER, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)  # a reader never sees half a file
    return path


@contextmanager
def _long_fields():
    # a noisy 960 x 540 mask encodes to more than csv's default 131072-character field limit
    old = csv.field_size_limit()
    csv.field_size_limit(2**31 - 1)
    try:
        yield
    finally:
        csv.field_size_limit(old)


def read_submission(path, size: Sequence[int], class_names: Sequence[str],
                    unclaimed: int = 255) -> dict[str, np.ndarray]:
    """The decoder: id -> (H, W) class-id map for a submission CSV at `size` (W, H). Pixels no
    class claims get `unclaimed`. A UserError names the file, the line and what is wrong: a
    missing header, an unknown class, a repeated or missing (id, class) row, a malformed RLE,
    a pixel claimed by two classes."""
    path = Path(path)
    width, height = check_size(size, "size")
    index = {str(name): k for k, name in enumerate(class_names)}
    if 0 <= unclaimed < len(class_names):
        raise ValueError(f"unclaimed={unclaimed} is a class id; use a value outside 0 .. {len(class_names) - 1}")
    if not path.is_file():
        raise UserError(f"{path}: submission file does not exist.")
    dtype = np.uint8 if len(class_names) < 256 and 0 <= unclaimed < 256 else np.int32
    maps: dict[str, np.ndarray] = {}
    seen: dict[str, set[str]] = {}
    with _long_fields(), path.open(newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or [n.strip() for n in reader.fieldnames] != HEADER:
            raise UserError(f"{path}: the header is {reader.fieldnames}; expected {','.join(HEADER)}.")
        for row in reader:
            line = reader.line_num
            where = f"{path}, line {line}"
            if None in row or any(row.get(k) is None for k in HEADER):
                raise UserError(f"{where}: expected 3 fields ({','.join(HEADER)}).")
            image_id, name = row["id"], row["class"]
            if name not in index:
                raise UserError(f"{where}: unknown class {name!r}; the classes are {list(class_names)}.")
            if name in seen.setdefault(image_id, set()):
                raise UserError(f"{where}: a second row for id {image_id!r}, class {name!r}.")
            seen[image_id].add(name)
            try:
                mask = decode(row["rle"], (height, width))
            except ValueError as err:
                raise UserError(f"{where} (id {image_id!r}, class {name!r}): bad RLE: {err}.") from None
            target = maps.setdefault(image_id, np.full((height, width), unclaimed, dtype=dtype))
            clash = mask & (target != unclaimed)
            if clash.any():
                r, c = (int(v) for v in np.argwhere(clash)[0])
                other = class_names[int(target[r, c])]
                raise UserError(f"{where} (id {image_id!r}, class {name!r}): pixel {c * height + r + 1} "
                                f"(row {r}, column {c}) is also claimed by class {other!r}.")
            target[mask] = index[name]
    for image_id, names in seen.items():
        missing = [n for n in class_names if n not in names]
        if missing:
            raise UserError(f"{path}: id {image_id!r} has no row for class(es) {missing} "
                            "(every image needs one row per class, \"-1\" when absent).")
    return maps
