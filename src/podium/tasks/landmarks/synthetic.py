"""Synthetic X-ray-like landmark images, for tests and smoke runs without the ISBI 2015 data
(Wang et al., ISBI 2015 Grand Challenge on cephalometric landmark detection).

Each image is a dark, noisy background with a bright elliptical "skull" outline, a soft inner
texture and K landmarks drawn as distinct structures: a bright blob whose size depends on the
landmark's index, plus a short bar whose orientation is tied to the pose (a "corner"). The K
landmarks sit at fixed positions of a canonical layout inside the ellipse (so landmark k is
always the same anatomical place), moved by a random pose per image: rotation, isotropic scale,
translation and a small per-landmark jitter. Everything is seeded, so the same arguments write
byte-identical files.

Coordinates follow the family's conventions: (x, y) pixels, pixel centres at integer
coordinates; the images are rendered analytically at the pixel centres (no rasterisation
offset), each landmark being the exact centre of its blob.

    csv = write_synthetic_landmarks(folder, n_images=10, size=(96, 80), num_landmarks=5, seed=0)
    records, names = read_landmark_table(csv)
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from podium.engine.registry import register
from podium.errors import UserError
from podium.tasks.landmarks.cache import default_cache_dir
from podium.tasks.landmarks.data import (
    LandmarkDataConfig,
    as_config,
    check_common,
    make_splits,
    read_landmark_table,
)

__all__ = ["SyntheticLandmarksConfig", "canonical_layout", "synthetic_landmarks", "write_synthetic_landmarks"]

GENERATOR_VERSION = 1


def canonical_layout(num_landmarks: int) -> np.ndarray:
    """(K, 2) landmark positions in the unit ellipse's frame (x right, y down), independent of
    the seed: spread over an inner ring at radii that alternate, so neighbours are distinct."""
    k = np.arange(num_landmarks)
    angle = 2 * math.pi * k / max(1, num_landmarks) + 0.3
    radius = np.where(k % 2 == 0, 0.62, 0.4)
    return np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1)


def _render(h: int, w: int, rng: np.random.Generator, num_landmarks: int) -> tuple[np.ndarray, np.ndarray]:
    """One image (h, w) uint8 and its (K, 2) landmarks (x, y)."""
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    # Pose: the skull ellipse has semi-axes (a, b) ~ (0.36 w, 0.40 h) at scale 1.
    s = rng.uniform(0.85, 1.05)
    a, b = 0.36 * w * s, 0.40 * h * s
    theta = rng.uniform(-0.25, 0.25)  # radians
    cos, sin = math.cos(theta), math.sin(theta)
    # Half-extents of the rotated ellipse (plus its outline): the translation keeps it inside.
    ext_x = math.hypot(a * cos, b * sin) + 3
    ext_y = math.hypot(a * sin, b * cos) + 3
    cx = w / 2 - 0.5 + rng.uniform(-1, 1) * max(0.0, min(0.08 * w, w / 2 - ext_x))
    cy = h / 2 - 0.5 + rng.uniform(-1, 1) * max(0.0, min(0.08 * h, h / 2 - ext_y))

    def to_image(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x, y = u * a, v * b
        return cx + cos * x - sin * y, cy + sin * x + cos * y

    # Ellipse frame coordinates of every pixel centre.
    dx, dy = xs - cx, ys - cy
    u = (cos * dx + sin * dy) / a
    v = (-sin * dx + cos * dy) / b
    r = np.sqrt(u**2 + v**2)

    img = 0.08 + 0.05 * (xs / w) + 0.03 * (ys / h)  # uneven exposure
    img += 0.55 * np.exp(-((r - 1.0) ** 2) / (2 * 0.035**2))  # the skull's outline
    img += 0.12 * np.clip(1 - r, 0, 1) * (1 + 0.3 * np.sin(7 * u + 3 * v))  # soft inner texture

    layout = canonical_layout(num_landmarks) + rng.normal(0, 0.02, (num_landmarks, 2))
    lx, ly = to_image(layout[:, 0], layout[:, 1])
    unit = min(h, w) / 80.0
    for k in range(num_landmarks):
        sigma = unit * (1.0 + 0.35 * (k % 4))
        img += 0.7 * np.exp(-((xs - lx[k]) ** 2 + (ys - ly[k]) ** 2) / (2 * sigma**2))
        # A short faint bar beside the blob, its direction set by the index and the pose, so
        # that landmarks differ in shape as well as in place (like a corner next to a point).
        phi = theta + 2 * math.pi * k / max(1, num_landmarks)
        bx, by = lx[k] + 3 * sigma * math.cos(phi), ly[k] + 3 * sigma * math.sin(phi)
        along = (xs - bx) * math.cos(phi) + (ys - by) * math.sin(phi)
        across = -(xs - bx) * math.sin(phi) + (ys - by) * math.cos(phi)
        img += 0.25 * np.exp(-(along**2) / (2 * (1.5 * sigma) ** 2) - across**2 / (2 * (0.4 * sigma) ** 2))
    img += rng.normal(0, 0.02, img.shape)
    arr = np.clip(np.round(img * 255), 0, 255).astype(np.uint8)
    return arr, np.stack([lx, ly], axis=1)


def write_synthetic_landmarks(
    folder: str | Path,
    n_images: int,
    size: Sequence[int] = (96, 80),
    num_landmarks: int = 5,
    seed: int | Sequence[int] = 0,
) -> Path:
    """Write `n_images` PNGs (size = (h, w)) and `labels.csv` in the `read_landmark_table`
    format (image_path, L0_x, L0_y, ...; coordinates (x, y) in pixels) into `folder`; return the
    CSV's path."""
    h, w = int(size[0]), int(size[1])
    if h < 16 or w < 16:
        raise UserError(f"synthetic images must be at least 16 x 16 px, got size {[h, w]}.")
    if num_landmarks < 1 or n_images < 1:
        raise UserError(f"synthetic landmarks: need n_images >= 1 and num_landmarks >= 1, got {n_images}, {num_landmarks}.")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = [f"L{k}" for k in range(num_landmarks)]
    rows = []
    for i in range(n_images):
        arr, pts = _render(h, w, rng, num_landmarks)
        name = f"{i:04d}.png"
        Image.fromarray(arr, mode="L").save(folder / name)
        rows.append([name] + [f"{v:.4f}" for v in pts.reshape(-1)])
    csv_path = folder / "labels.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image_path"] + [f"{n}_{axis}" for n in names for axis in ("x", "y")])
        writer.writerows(rows)
    return csv_path


# ---- registered dataset -------------------------------------------------------------------


@dataclass
class SyntheticLandmarksConfig(LandmarkDataConfig):
    """Generated X-ray-like images with known landmarks (written once into `root`)."""

    name: str = "synthetic_landmarks"
    root: Optional[str] = None  # generated here if missing; default: under the user cache
    n_train: int = 24
    n_val: int = 6
    n_test: int = 6
    size: list[int] = field(default_factory=lambda: [96, 80])  # generated image (H, W)
    num_landmarks: int = 5
    image_size: list[int] = field(default_factory=lambda: [64, 48])  # network input (H, W)
    seed: int = 0  # generator seed (not the run seed)
    spacing: float = 0.1  # mm per pixel


def _ensure_generated(root: Path, c: SyntheticLandmarksConfig) -> dict[str, Path]:
    """Generate the three splits under `root` unless a matching generation is there already.

    Generation goes to a temporary sibling folder first and is renamed into place, so parallel
    processes (DDP ranks) never read a half-written split.
    """
    spec = {
        "version": GENERATOR_VERSION, "n": [c.n_train, c.n_val, c.n_test], "size": list(c.size),
        "num_landmarks": c.num_landmarks, "seed": c.seed,
    }  # fmt: skip
    tag = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    target = root / f"gen-{tag}"
    splits = {"train": c.n_train, "val": c.n_val, "test": c.n_test}
    csvs = {s: target / s / "labels.csv" for s in splits}
    if all(p.is_file() for p in csvs.values()):
        return csvs
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".gen-{tag}-", dir=root))
    try:
        for j, (split, n) in enumerate(splits.items()):
            write_synthetic_landmarks(tmp / split, n, c.size, c.num_landmarks, seed=[c.seed, j])
        (tmp / "spec.json").write_text(json.dumps(spec, indent=2))
        try:
            os.replace(tmp, target)
        except OSError:
            if not all(p.is_file() for p in csvs.values()):  # not someone else's finished copy
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return csvs


@register("dataset", "synthetic_landmarks", schema=SyntheticLandmarksConfig)
def synthetic_landmarks(cfg: Any, *, seed: int) -> dict[str, Dataset]:
    """Synthetic X-ray-like landmark images (generated once); splits train, val, test."""
    c = as_config(cfg, SyntheticLandmarksConfig)
    check_common(c)
    if len(c.size) != 2 or min(c.size) < 16:
        raise UserError(f"data.size must be [H, W] with both >= 16, got {list(c.size)}.")
    for key in ("n_train", "n_val", "n_test", "num_landmarks"):
        if getattr(c, key) < 1:
            raise UserError(f"data.{key} must be >= 1, got {getattr(c, key)}.")
    if not c.spacing > 0:
        raise UserError(f"data.spacing must be positive (mm per pixel), got {c.spacing!r}.")
    root = Path(c.root).expanduser() if c.root else default_cache_dir() / "synthetic"
    csvs = _ensure_generated(root, c)
    splits, names = {}, []
    for split, path in csvs.items():
        records, names = read_landmark_table(path, c.spacing)
        # every split names its files 0000.png...: the split makes the ids unique across splits
        # (cross-validation pools train and val; ensembles and diffs align by id)
        splits[split] = [dataclasses.replace(r, id=f"{split}/{r.id}") for r in records]
    return make_splits(c, splits, names)
