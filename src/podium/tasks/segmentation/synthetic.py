"""Synthetic fundus photographs with known vessel masks, for tests and CPU smoke runs without
DRIVE (Staal et al., IEEE TMI 2004), written in DRIVE's own layout so the same reader serves both.

Each image is an orange-red disc (the retina, darker towards its rim) in a dark aperture, a
bright optic disc, a darker macula, a branching vessel tree that starts at the optic disc and is
drawn as chains of capsules 1-4 px wide (thinner at each branching), and a few small bright
(exudate-like) and dark (haemorrhage-like) blobs that are NOT vessels, so a model must learn
shape, not darkness alone. A slight blur and sensor noise finish it. The vessel mask is exactly
the drawn tree inside the aperture; the FOV mask is the aperture.

Everything is seeded per image (`[seed, i]`), so the first images are the same whatever `count`,
and the same arguments write byte-identical files; a folder that already holds the same
generation is left as it is.

    root = write_synthetic_fundus("/tmp/fundus", count=8, size=(128, 128), seed=0)
    records = drive_records(root)      # images/01_training.tif, 1st_manual/01_manual1.gif, ...
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from podium.errors import UserError

__all__ = ["GENERATOR_VERSION", "render_fundus", "write_synthetic_fundus"]

GENERATOR_VERSION = 1


def _capsule(canvas: np.ndarray, x0: float, y0: float, x1: float, y1: float, width: float) -> None:
    """Mark the pixels whose centre lies within width / 2 of the segment (x0, y0)-(x1, y1)."""
    r = width / 2
    h, w = canvas.shape
    top, bottom = max(0, int(np.floor(min(y0, y1) - r))), min(h, int(np.ceil(max(y0, y1) + r)) + 1)
    left, right = max(0, int(np.floor(min(x0, x1) - r))), min(w, int(np.ceil(max(x0, x1) + r)) + 1)
    if top >= bottom or left >= right:
        return
    ys, xs = np.mgrid[top:bottom, left:right].astype(np.float64)
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((xs - x0) * dx + (ys - y0) * dy) / max(dx * dx + dy * dy, 1e-12), 0, 1)
    canvas[top:bottom, left:right] |= (xs - x0 - t * dx) ** 2 + (ys - y0 - t * dy) ** 2 <= r * r


def _grow(canvas: np.ndarray, rng: np.random.Generator, x: float, y: float, angle: float, width: float,
          depth: int, centre: tuple[float, float], radius: float) -> None:
    """Draw one vessel from (x, y) as a jittered walk, spawning thinner branches on the way."""
    step = max(1.5, 0.03 * radius)
    length = rng.uniform(0.6, 1.3) * radius / (1 + 0.5 * depth)
    travelled, bend = 0.0, rng.normal(0, 0.02)
    while travelled < length:
        bend = 0.8 * bend + rng.normal(0, 0.04)
        angle += bend
        nx, ny = x + step * math.cos(angle), y + step * math.sin(angle)
        if math.hypot(nx - centre[0], ny - centre[1]) > radius:  # left the aperture
            return
        _capsule(canvas, x, y, nx, ny, width)
        x, y, travelled = nx, ny, travelled + step
        if depth < 3 and rng.random() < 0.05:
            side = 1 if rng.random() < 0.5 else -1
            child = max(1.0, width * rng.uniform(0.55, 0.8))
            _grow(canvas, rng, x, y, angle + side * rng.uniform(0.4, 1.0), child, depth + 1, centre, radius)
            width = max(1.0, width * rng.uniform(0.8, 0.95))  # the parent thins after a branching


def _blob(ys: np.ndarray, xs: np.ndarray, x: float, y: float, r: float, power: int = 2) -> np.ndarray:
    return np.exp(-((((xs - x) ** 2 + (ys - y) ** 2) / r**2) ** power))


def render_fundus(height: int, width: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One synthetic fundus: (H, W, 3) uint8 RGB image, bool vessel mask, bool FOV mask."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    cx, cy = (width - 1) / 2, (height - 1) / 2
    radius = 0.46 * min(height, width)
    r = np.hypot(xs - cx, ys - cy) / radius
    fov = r <= 1.0

    base = np.array([rng.uniform(170, 215), rng.uniform(65, 100), rng.uniform(20, 45)])
    texture = ndimage.gaussian_filter(rng.normal(0, 1, (height, width)), sigma=max(1.0, min(height, width) / 25))
    texture /= max(1e-6, float(np.abs(texture).max()))
    shade = (1 - 0.35 * r**2) * (1 + 0.06 * texture)
    img = base[None, None, :] * shade[:, :, None]

    side = 1 if rng.random() < 0.5 else -1  # optic disc left or right of the macula
    odx = cx + side * 0.55 * radius * rng.uniform(0.85, 1.0)
    ody = cy + rng.uniform(-0.12, 0.12) * radius
    odr = 0.09 * min(height, width) * rng.uniform(0.9, 1.1)
    img *= 1 - 0.25 * _blob(ys, xs, cx - side * 0.1 * radius, cy, 1.5 * odr)[:, :, None]  # the macula
    img += _blob(ys, xs, odx, ody, odr, power=2)[:, :, None] * np.array([55.0, 75.0, 45.0])

    canvas = np.zeros((height, width), dtype=bool)
    trunks = int(rng.integers(4, 7))
    for k in range(trunks):
        angle = 2 * math.pi * k / trunks + rng.uniform(-0.3, 0.3)
        start = (odx + 0.3 * odr * math.cos(angle), ody + 0.3 * odr * math.sin(angle))
        _grow(canvas, rng, start[0], start[1], angle, rng.uniform(3.0, 4.0), 0, (cx, cy), radius)
    vessels = canvas & fov
    soft = ndimage.gaussian_filter(vessels.astype(np.float64), 0.6)
    img *= 1 - soft[:, :, None] * np.array([0.3, 0.5, 0.35])

    # Distractors: not vessels, and as dark / bright as vessels are.
    for _ in range(int(rng.integers(2, 6))):
        while True:
            lx, ly = rng.uniform(0, width), rng.uniform(0, height)
            if math.hypot(lx - cx, ly - cy) < 0.85 * radius and math.hypot(lx - odx, ly - ody) > 2 * odr:
                break
        blob = _blob(ys, xs, lx, ly, rng.uniform(1.5, 4.0) * min(height, width) / 128)[:, :, None]
        if rng.random() < 0.5:
            img += blob * np.array([45.0, 60.0, 5.0])  # exudate: bright yellow
        else:
            img *= 1 - blob * np.array([0.45, 0.6, 0.5])  # haemorrhage: dark red

    img = ndimage.gaussian_filter(img, sigma=(0.6, 0.6, 0))  # the camera's blur
    img += rng.normal(0, 3.0, img.shape)
    img[~fov] = rng.uniform(0, 8, (int((~fov).sum()), 3))  # the dark aperture
    return np.clip(np.round(img), 0, 255).astype(np.uint8), vessels, fov


def _spec(count: int, size: Sequence[int], seed: int) -> dict:
    return {"generator": "synthetic_fundus", "version": GENERATOR_VERSION, "count": int(count),
            "size": [int(size[0]), int(size[1])], "seed": int(seed)}


def _complete(root: Path, spec: dict) -> bool:
    try:
        return json.loads((root / "spec.json").read_text()) == spec
    except (OSError, ValueError):
        return False


def write_synthetic_fundus(root: str | Path, count: int, size: Sequence[int] = (128, 128), seed: int = 0) -> Path:
    """Write `count` synthetic fundus images of `size` (H, W) into `root` in the DRIVE layout
    (images/NN_training.tif, 1st_manual/NN_manual1.gif 0/255, mask/NN_training_mask.gif 0/255,
    plus spec.json) and return `root`. A `root` that already holds this generation is left
    untouched; one holding another generation of this function is replaced; any other non-empty
    folder is refused. Files are written to a temporary sibling and renamed into place, so
    parallel processes never read a half-written folder."""
    if len(size) != 2 or int(size[0]) < 32 or int(size[1]) < 32:
        raise UserError(f"synthetic fundus images must be at least 32 x 32 px, got size {list(size)}.")
    if count < 1:
        raise UserError(f"synthetic fundus: count must be >= 1, got {count}.")
    h, w = int(size[0]), int(size[1])
    root = Path(root).expanduser()
    spec = _spec(count, (h, w), seed)
    if _complete(root, spec):
        return root
    if root.exists() and any(root.iterdir()) and not (root / "spec.json").is_file():
        raise UserError(f"{root} is not empty and holds no synthetic fundus generation; choose an empty or new folder.")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        for sub in ("images", "1st_manual", "mask"):
            (tmp / sub).mkdir()
        digits = max(2, len(str(count)))
        for i in range(count):
            image, vessels, fov = render_fundus(h, w, np.random.default_rng([int(seed), i]))
            ident = f"{i + 1:0{digits}d}"
            Image.fromarray(image, mode="RGB").save(tmp / "images" / f"{ident}_training.tif")
            Image.fromarray(vessels.astype(np.uint8) * 255, mode="L").save(tmp / "1st_manual" / f"{ident}_manual1.gif")
            Image.fromarray(fov.astype(np.uint8) * 255, mode="L").save(tmp / "mask" / f"{ident}_training_mask.gif")
        (tmp / "spec.json").write_text(json.dumps(spec, indent=2))
        if root.exists() and not _complete(root, spec):  # an older generation (or an empty folder)
            shutil.rmtree(root, ignore_errors=True)
        try:
            os.replace(tmp, root)
        except OSError:
            if not _complete(root, spec):  # not another process's finished copy
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root
