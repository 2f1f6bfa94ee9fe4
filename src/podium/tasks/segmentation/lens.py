"""Fisheye lens simulator (the UDA target camera) and random geometric distortion for training.

A rectilinear (pinhole) source frame is re-projected through an equidistant fisheye lens, the
most common fisheye model (r = f * theta; Kannala & Brandt, "A generic camera model and
calibration method for conventional, wide-angle, and fish-eye lenses", IEEE TPAMI 2006), the
way the WoodScape / synthetic-fisheye UDA literature builds a fisheye target from a pinhole
dataset (e.g. Ye et al., "Universal semantic segmentation for fisheye urban driving images",
2020). For output pixel (u, v), centre at (u + 0.5, v + 0.5) in continuous coordinates where
the image spans [0, W] x [0, H]:

    r = |(u + 0.5, v + 0.5) - circle centre|,  R = radius * W_out,  f = R / radians(fov / 2)
    theta = r / f  (azimuth kept),  r_src = f_src * tan(theta),  f_src = (W_src / 2) / tan(source_hfov / 2)

around the source centre (W_src / 2, H_src / 2). A pixel is valid when r <= R, theta < 90 deg
and the source point lies inside the source frame [0, W_src] x [0, H_src]. Images are sampled
bilinearly (torch grid_sample, align_corners=False, border padding so the frame edge never
blends with black), labels by the source pixel that holds the point (floor), never interpolated.

Photometric signature, in this order: vignetting gain 1 - vignetting * (r / R)^2 (polynomial
falloff: the loss at the circle's edge is exactly `vignetting`), per-channel colour gains,
Gaussian noise (std on the 0-255 scale, np.random.default_rng(seed)), clip to 0-255, round.

Presets, valid fraction of a CamVid frame (480 x 360, source_hfov 90; measured with
`lens_grid(PRESETS[name], (360, 480), (360, 480))[1].mean()`, the same at scale 0.5):
- "fisheye190": 190 deg, circle radius 0.75 W, centred, near-neutral (vignetting 0.15, noise 2):
  valid 0.503.
- "fisheye160_warm": 160 deg, radius 0.6 W, centre (0.48, 0.53), warm cast (1.08, 1.0, 0.85),
  vignetting 0.35, noise 3: valid 0.454.
A 90 deg pinhole source covers at most 51 deg off-axis (its corners), far less than a fisheye's
80-95 deg, so the black border of the result is the source frame's barrel-shaped outline, not
the lens circle; a circle small enough to show whole (radius <= H / 2W = 0.375) would leave only
13-18 % of the frame valid at these fovs, hence the large radii.

    lens = resolve_lens({"preset": "fisheye160_warm", "noise": 0})
    fish, label, valid = apply_lens(image, label, lens, ignore_index=11)
    folder = write_fisheye_folder("camvid/val", "camvid/valannot", default_lens_cache(), lens,
                                  ignore_value=11, scale=0.5)   # images/ labels/ fov/ lens.json

`random_warp` is the batched training-time counterpart (random lens or barrel, affine, elastic
after Simard et al., "Best practices for convolutional neural networks applied to visual
document analysis", ICDAR 2003), one sampling grid per sample, on the tensors' device.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from podium.errors import UserError
from podium.tasks.segmentation.preprocess import resize_image, resize_mask, scaled_size
from podium.tasks.segmentation.readers import IMAGE_SUFFIXES, read_image, read_label

__all__ = ["PRESETS", "Lens", "WarpConfig", "apply_lens", "check_lens", "check_warp", "default_lens_cache",
           "lens_grid", "random_warp", "resolve_lens", "write_fisheye_folder"]

CACHE_VERSION = 1  # bump when the written files would change for the same arguments


@dataclass(frozen=True)
class Lens:
    fov: float = 190.0  # degrees across the image circle's diameter (equidistant: r = f * theta)
    radius: float = 0.5  # circle radius / output WIDTH (0.5 touches left/right; > H / 2W: cropped circle)
    centre: tuple[float, float] = (0.5, 0.5)  # circle centre as fractions of (width, height)
    source_hfov: float = 90.0  # horizontal FOV (deg) of the rectilinear source camera
    vignetting: float = 0.0  # brightness loss at the circle's edge, gain 1 - v (r / R)^2, in [0, 1)
    colour: tuple[float, float, float] = (1.0, 1.0, 1.0)  # per-channel gains (R, G, B)
    noise: float = 0.0  # Gaussian sensor noise std on the 0-255 scale


PRESETS: dict[str, Lens] = {
    "fisheye190": Lens(fov=190.0, radius=0.75, vignetting=0.15, colour=(1.0, 1.0, 1.02), noise=2.0),
    "fisheye160_warm": Lens(fov=160.0, radius=0.6, centre=(0.48, 0.53), vignetting=0.35,
                            colour=(1.08, 1.0, 0.85), noise=3.0),
}


# ---- configuration -------------------------------------------------------------------------


def _number(value, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise UserError(f"{key} must be a number, got {value!r}.")
    return float(value)


def _numbers(value, n: int, key: str, what: str) -> tuple[float, ...]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != n:
        raise UserError(f"{key} must be {n} numbers ({what}), got {value!r}.")
    return tuple(_number(v, key) for v in value)


def check_lens(lens: Lens, key: str = "task.target.lens") -> Lens:
    """The lens with plain float fields; UserError naming `key.<field>` and its valid range."""
    fov, radius = _number(lens.fov, f"{key}.fov"), _number(lens.radius, f"{key}.radius")
    hfov, vig = _number(lens.source_hfov, f"{key}.source_hfov"), _number(lens.vignetting, f"{key}.vignetting")
    noise = _number(lens.noise, f"{key}.noise")
    centre = _numbers(lens.centre, 2, f"{key}.centre", "fractions of width and height")
    colour = _numbers(lens.colour, 3, f"{key}.colour", "R, G, B gains")
    checks = [
        (0 < fov < 360, "fov", "in (0, 360) degrees", fov),
        (radius > 0, "radius", "> 0 (a fraction of the output width)", radius),
        (all(0 <= c <= 1 for c in centre), "centre", "in [0, 1] x [0, 1]", list(centre)),
        (0 < hfov < 180, "source_hfov", "in (0, 180) degrees", hfov),
        (0 <= vig < 1, "vignetting", "in [0, 1)", vig),
        (all(g > 0 for g in colour), "colour", "3 gains > 0", list(colour)),
        (noise >= 0, "noise", ">= 0 (std on the 0-255 scale)", noise),
    ]
    for ok, name, rng, got in checks:
        if not (ok and all(math.isfinite(v) for v in np.ravel(got))):
            raise UserError(f"{key}.{name} must be {rng}, got {got}.")
    return Lens(fov, radius, centre, hfov, vig, colour, noise)  # type: ignore[arg-type]


def resolve_lens(spec, key: str = "task.target.lens") -> Lens:
    """A Lens from a preset name, a mapping of Lens fields (optionally `preset: name` to start
    from), or a Lens; UserError naming the key for a bad value, preset or field."""
    names = [f.name for f in fields(Lens)]

    def preset(name) -> Lens:
        if not isinstance(name, str) or name not in PRESETS:
            raise UserError(f"{key}: unknown lens preset {name!r}; presets: {', '.join(sorted(PRESETS))}.")
        return PRESETS[name]

    if isinstance(spec, Lens):
        return check_lens(spec, key)
    if isinstance(spec, str):
        return check_lens(preset(spec), key)
    if isinstance(spec, Mapping) or hasattr(spec, "keys"):
        items = {str(k): spec[k] for k in spec.keys()}
        base = preset(items.pop("preset")) if "preset" in items else Lens()
        unknown = sorted(set(items) - set(names))
        if unknown:
            raise UserError(f"{key}.{unknown[0]} is not a lens field; fields: preset, {', '.join(names)}.")
        items = {k: tuple(v) if k in ("centre", "colour") and hasattr(v, "__iter__") and not isinstance(v, str)
                 else v for k, v in items.items()}
        return check_lens(replace(base, **items), key)
    raise UserError(f"{key} must be a preset name ({', '.join(sorted(PRESETS))}) or a mapping of lens "
                    f"fields, got {spec!r}.")


def default_lens_cache() -> Path:
    """`$XDG_CACHE_HOME/podium/segmentation/fisheye`, else under `~/.cache`."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "podium" / "segmentation" / "fisheye"


# ---- geometry ------------------------------------------------------------------------------


def _fisheye_to_source(dx: Tensor, dy: Tensor, R, fov_deg, f_src) -> tuple[Tensor, Tensor, Tensor]:
    """Offsets from the circle centre (output px) -> offsets from the source centre (source px)
    and "inside the circle and in front of the camera". Parameters broadcast (batched warps)."""
    r = torch.hypot(dx, dy)
    f = R / (fov_deg * (math.pi / 360.0))
    theta = r / f
    ok = (r <= R) & (theta < math.pi / 2)
    # tan(theta) / r -> 1 / f as r -> 0; behind the camera: 0 (masked by `ok` anyway).
    safe_theta = torch.where(ok, theta, torch.zeros_like(theta))
    scale = torch.where(r > 0, f_src * torch.tan(safe_theta) / torch.clamp(r, min=1e-12),
                        f_src / f * torch.ones_like(r))
    scale = torch.where(ok, scale, torch.zeros_like(scale))
    return dx * scale, dy * scale, ok


@functools.lru_cache(maxsize=8)  # ~4 MB an entry at 480 x 360
def _lens_coords(lens: Lens, source_hw: tuple[int, int], out_hw: tuple[int, int]):
    """(source x, source y in continuous px (H, W) float64, valid (H, W) bool, r / R), read-only."""
    (hs, ws), (h, w) = source_hw, out_hw
    y, x = torch.meshgrid(torch.arange(h, dtype=torch.float64) + 0.5, torch.arange(w, dtype=torch.float64) + 0.5,
                          indexing="ij")
    R = lens.radius * w
    f_src = (ws / 2) / math.tan(math.radians(lens.source_hfov) / 2)
    dx, dy, ok = _fisheye_to_source(x - lens.centre[0] * w, y - lens.centre[1] * h, R, lens.fov, f_src)
    sx, sy = ws / 2 + dx, hs / 2 + dy
    valid = ok & (sx >= 0) & (sx <= ws) & (sy >= 0) & (sy <= hs)
    rel = torch.hypot(x - lens.centre[0] * w, y - lens.centre[1] * h) / R
    out = [t.numpy() for t in (sx, sy, valid, rel)]
    for a in out:
        a.setflags(write=False)
    return tuple(out)


def lens_grid(lens: Lens, source_hw: tuple[int, int], out_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Per output pixel, where it samples the source: (grid (H, W, 2) float32 x/y in
    grid_sample's [-1, 1] convention with align_corners=False, valid (H, W) bool). Invalid
    pixels get -2 (outside the frame: zero padding samples black there)."""
    (hs, ws) = (int(source_hw[0]), int(source_hw[1]))
    sx, sy, valid, _ = _lens_coords(check_lens(lens, "lens"), (hs, ws), (int(out_hw[0]), int(out_hw[1])))
    grid = np.stack([2 * sx / ws - 1, 2 * sy / hs - 1], axis=-1)
    grid[~valid] = -2.0
    return grid.astype(np.float32), valid.copy()


def apply_lens(image: np.ndarray, label: np.ndarray | None, lens: Lens, out_hw=None, seed: int = 0,
               ignore_index: int = 255) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """(H, W, 3) uint8 RGB -> (fisheye uint8 image, black outside valid; label (nearest,
    ignore_index outside valid) or None; valid (H, W) bool), with the photometric signature."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"apply_lens expects an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
    lens = check_lens(lens, "lens")  # plain tuples: hashable for the grid cache
    hs, ws = image.shape[:2]
    out_hw = (hs, ws) if out_hw is None else (int(out_hw[0]), int(out_hw[1]))
    sx, sy, valid, rel = _lens_coords(lens, (hs, ws), out_hw)
    grid, _ = lens_grid(lens, (hs, ws), out_hw)
    src = torch.from_numpy(np.require(image, requirements=["W", "C"])).permute(2, 0, 1)[None].to(torch.float32)
    # Border padding: a valid point near the frame edge never blends with black outside it.
    out = F.grid_sample(src, torch.from_numpy(grid)[None], mode="bilinear", padding_mode="border",
                        align_corners=False)[0].permute(1, 2, 0).numpy().astype(np.float64)
    out *= (1.0 - lens.vignetting * np.minimum(rel, 1.0) ** 2)[..., None]
    out *= np.asarray(lens.colour, dtype=np.float64)
    if lens.noise > 0:
        out += np.random.default_rng(seed).normal(0.0, lens.noise, out.shape)
    out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    out[~valid] = 0
    warped = None
    if label is not None:
        if label.shape != (hs, ws):
            raise ValueError(f"label shape {label.shape} differs from the image's {(hs, ws)}")
        # The source pixel whose area holds the point (x in [i, i + 1) -> i); the frame's far
        # edge (x == W) belongs to the last pixel.
        cols = np.clip(np.floor(sx), 0, ws - 1).astype(np.int64)
        rows = np.clip(np.floor(sy), 0, hs - 1).astype(np.int64)
        warped = label[rows, cols].copy()
        warped[~valid] = ignore_index
    return out, warped, valid.copy()


# ---- the simulated target camera on disk ---------------------------------------------------


def _image_files(folder: Path, what: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise UserError(f"{what} folder {folder} does not exist or is not a folder.")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if path.stem in found:
            raise UserError(f"{path} and {found[path.stem]} share the stem {path.stem!r}; keep one file per stem.")
        found[path.stem] = path
    return found


def write_fisheye_folder(image_dir, mask_dir, out_root, lens: Lens, *, seed: int = 0, ignore_value: int = 255,
                         scale: float = 1.0) -> Path:
    """Write the simulated target camera once; return out_root / f"{slug}-{hash12}" holding
    images/<stem>.png, labels/<stem>.png (stored label values, ignore_value outside the valid
    area; only with mask_dir), fov/<stem>.png (255 inside) and lens.json. Image i (sorted by
    name) gets noise seed `seed + i`. A complete folder (lens.json present) is reused as it is."""
    lens = check_lens(lens, "lens")
    image_dir = Path(image_dir).expanduser()
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale <= 16:
        raise UserError(f"scale must be in (0, 16], got {scale!r}.")
    if isinstance(ignore_value, bool) or not isinstance(ignore_value, (int, np.integer)) or not 0 <= ignore_value < 256:
        raise UserError(f"ignore_value must be an integer in 0..255 (labels are stored as uint8), "
                        f"got {ignore_value!r}.")
    images = _image_files(image_dir, "image")
    if not images:
        raise UserError(f"image folder {image_dir} holds no image ({', '.join(sorted(IMAGE_SUFFIXES))}).")
    masks = None
    if mask_dir is not None:
        mask_dir = Path(mask_dir).expanduser()
        masks = _image_files(mask_dir, "mask")
        missing = [p for s, p in images.items() if s not in masks]
        if missing:
            raise UserError(f"{missing[0]}: no label file with the stem {missing[0].stem!r} in {mask_dir}.")
    order = sorted(images)
    spec = {"lens": asdict(lens), "seed": int(seed), "scale": float(scale), "ignore_value": int(ignore_value),
            "version": CACHE_VERSION,
            "images": [[images[s].name, images[s].stat().st_size] for s in order],
            "labels": [[masks[s].name, masks[s].stat().st_size] for s in order] if masks is not None else None}
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{image_dir.name}-fov{lens.fov:g}").strip("_") or "fisheye"
    root = Path(out_root).expanduser() / f"{slug}-{digest}"
    if (root / "lens.json").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        for sub in ("images", "fov") + (("labels",) if masks is not None else ()):
            (tmp / sub).mkdir()
        fractions = []
        for i, stem in enumerate(order):
            image = read_image(images[stem])
            label = None
            if masks is not None:
                label = read_label(masks[stem], None, expected_hw=image.shape[:2], image_path=images[stem])
                if label.min(initial=0) < 0 or label.max(initial=0) > 255:
                    raise UserError(f"{masks[stem]}: label values outside 0..255 cannot be stored as uint8 PNG.")
            if scale != 1.0:
                hw = scaled_size(image.shape[0], image.shape[1], scale)
                image = resize_image(image, hw)
                label = None if label is None else resize_mask(label, hw)
            fish, warped, valid = apply_lens(image, label, lens, seed=int(seed) + i, ignore_index=int(ignore_value))
            Image.fromarray(fish, mode="RGB").save(tmp / "images" / f"{stem}.png")
            Image.fromarray(valid.astype(np.uint8) * 255, mode="L").save(tmp / "fov" / f"{stem}.png")
            if warped is not None:
                Image.fromarray(warped.astype(np.uint8), mode="L").save(tmp / "labels" / f"{stem}.png")
            fractions.append(float(valid.mean()))
        meta = {**{k: v for k, v in spec.items() if k not in ("images", "labels")},
                "source": {"image_dir": str(image_dir), "mask_dir": None if masks is None else str(mask_dir)},
                "count": len(order), "labels": masks is not None, "size_hw": list(fish.shape[:2]),
                "mean_valid_fraction": float(np.mean(fractions))}
        (tmp / "lens.json").write_text(json.dumps(meta, indent=2))  # written last: marks it complete
        if root.exists():  # an incomplete leftover (no lens.json): ours to replace
            shutil.rmtree(root, ignore_errors=True)
        try:
            os.replace(tmp, root)
        except OSError:
            if not (root / "lens.json").is_file():  # not another process's finished copy
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


# ---- random geometric augmentation (batched, torch) ----------------------------------------


@dataclass
class WarpConfig:
    p: float = 0.5  # probability per sample of the whole geometric augmentation
    fisheye_p: float = 0.5  # of those: probability of a random lens warp (else the barrel model)
    fov: tuple[float, float] = (120.0, 200.0)  # random lens fov (deg); radius U(0.45, 0.75) W, centre +-0.05
    barrel: tuple[float, float] = (-0.3, 0.3)  # k1 of r_src = r (1 + k1 r^2), r / half-diagonal; < 0 pincushion
    rotation: float = 10.0  # affine: degrees, U(-rotation, rotation)
    scale: tuple[float, float] = (0.8, 1.25)  # affine zoom, U(min, max)
    shift: float = 0.1  # affine shift, U(-shift, shift) of the width / height
    elastic_alpha: float = 0.0  # elastic displacement magnitude: RMS in pixels; 0 = off
    elastic_sigma: float = 8.0  # smoothing (pixels) of the random displacement field
    source_hfov: float = 90.0  # horizontal FOV (deg) the random lens assumes for the input images


def check_warp(cfg: WarpConfig, key: str = "task.warp") -> None:
    """UserError naming `key.<field>` and its valid range for every bad WarpConfig value."""

    def pair(name: str, lo_ok, hi_ok) -> bool:
        v = getattr(cfg, name)
        return (not isinstance(v, (str, bytes)) and hasattr(v, "__len__") and len(v) == 2
                and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)
                and lo_ok(v[0]) and hi_ok(v[1]) and v[0] <= v[1])

    def num(name: str, ok) -> bool:
        v = getattr(cfg, name)
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and ok(v)

    checks = [
        (num("p", lambda v: 0 <= v <= 1), "p", "in [0, 1]"),
        (num("fisheye_p", lambda v: 0 <= v <= 1), "fisheye_p", "in [0, 1]"),
        (pair("fov", lambda v: v > 0, lambda v: v < 360), "fov", "[min, max] degrees with 0 < min <= max < 360"),
        (pair("barrel", lambda v: v > -1, lambda v: True), "barrel", "[min, max] k1 with -1 < min <= max"),
        (num("rotation", lambda v: v >= 0), "rotation", ">= 0 degrees"),
        (pair("scale", lambda v: v > 0, lambda v: True), "scale", "[min, max] with 0 < min <= max"),
        (num("shift", lambda v: 0 <= v < 1), "shift", "in [0, 1) of the size"),
        (num("elastic_alpha", lambda v: v >= 0), "elastic_alpha", ">= 0 pixels"),
        (num("elastic_sigma", lambda v: v > 0), "elastic_sigma", "> 0 pixels"),
        (num("source_hfov", lambda v: 0 < v < 180), "source_hfov", "in (0, 180) degrees"),
    ]
    for ok, name, rng in checks:
        if not ok:
            raise UserError(f"{key}.{name} must be {rng}, got {getattr(cfg, name)!r}.")


def _gaussian_blur(field: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian smoothing of (B, C, H, W), replicate padding."""
    half = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-half, half + 1, dtype=field.dtype, device=field.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = field.shape[1]
    out = F.conv2d(F.pad(field, (half, half, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(out, (0, 0, half, half), mode="replicate"), k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def _warp_coords(b: int, h: int, w: int, cfg: WarpConfig, g: torch.Generator, device) -> tuple[Tensor, Tensor]:
    """For b chosen samples: source pixel coordinates (b, H, W, 2) continuous px and "inside
    the lens circle" (b, H, W). Forward order lens|barrel -> affine -> elastic, so the output
    pixel p is traced back: elastic, inverse affine, then the lens / barrel map."""

    def uniform(lo, hi, n=b):
        return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)

    lens_on = torch.rand(b, generator=g, dtype=torch.float64) < cfg.fisheye_p
    fov, radius = uniform(*cfg.fov), uniform(0.45, 0.75)
    jx, jy = uniform(-0.05, 0.05), uniform(-0.05, 0.05)
    k1 = uniform(*cfg.barrel)
    angle = uniform(-cfg.rotation, cfg.rotation) * (math.pi / 180)
    zoom = uniform(*cfg.scale)
    tx, ty = uniform(-cfg.shift, cfg.shift) * w, uniform(-cfg.shift, cfg.shift) * h
    noise = (torch.rand(b, 2, h, w, generator=g) * 2 - 1) if cfg.elastic_alpha > 0 else None

    def col(v: Tensor) -> Tensor:
        return v.to(device=device, dtype=torch.float32).view(-1, 1, 1)

    y, x = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float32) + 0.5,
                          torch.arange(w, device=device, dtype=torch.float32) + 0.5, indexing="ij")
    x, y = x.expand(b, h, w), y.expand(b, h, w)
    if noise is not None:
        # Simard's smoothed U(-1, 1) field, rescaled to an RMS of alpha px per sample (his alpha
        # multiplies a field whose size shrinks like 1 / sigma, which makes alpha hard to read).
        d = _gaussian_blur(noise.to(device=device, dtype=torch.float32), cfg.elastic_sigma)
        d = d * (cfg.elastic_alpha / d.square().mean(dim=(1, 2, 3), keepdim=True).sqrt().clamp(min=1e-12))
        x, y = x + d[:, 0], y + d[:, 1]
    cx, cy = w / 2, h / 2
    cos, sin, s = torch.cos(col(angle)), torch.sin(col(angle)), col(zoom)
    ox, oy = x - cx - col(tx), y - cy - col(ty)
    ax, ay = (cos * ox + sin * oy) / s, (-sin * ox + cos * oy) / s  # inverse rotation, inverse zoom
    # The random lens: circle centre jittered around the image centre, source = the input image.
    f_src = (w / 2) / math.tan(math.radians(cfg.source_hfov) / 2)
    lx, ly, inside = _fisheye_to_source(ax + cx - (0.5 + col(jx)) * w, ay + cy - (0.5 + col(jy)) * h,
                                        col(radius) * w, col(fov), f_src)
    # Barrel / pincushion: r_src = r (1 + k1 r^2), r in units of the half-diagonal.
    r2 = (ax**2 + ay**2) / (cx**2 + cy**2)
    bx, by = ax * (1 + col(k1) * r2), ay * (1 + col(k1) * r2)
    on = col(lens_on.to(torch.float64)) > 0.5
    sx, sy = cx + torch.where(on, lx, bx), cy + torch.where(on, ly, by)
    return torch.stack([sx, sy], dim=-1), torch.where(on, inside, torch.ones_like(inside))


def random_warp(images: Tensor, labels: Tensor | None, valid: Tensor | None, cfg: WarpConfig,
                generator: torch.Generator, ignore_index: int = 255) -> tuple[Tensor, Tensor | None, Tensor]:
    """Per sample, with probability cfg.p, one random sampling grid (lens or barrel, affine,
    elastic): images bilinear (0.0 out of frame), labels and valid nearest (labels:
    ignore_index where the result is not valid). Returns (images, labels, valid); samples not
    chosen pass unchanged. All parameters are drawn from the CPU `generator`."""
    check_warp(cfg)
    b, _, h, w = images.shape
    device = images.device
    valid = torch.ones(b, h, w, dtype=torch.bool, device=device) if valid is None else valid.to(torch.bool)
    chosen = torch.rand(b, generator=generator, dtype=torch.float64) < cfg.p
    idx = torch.nonzero(chosen).flatten()
    if idx.numel() == 0:
        return images, labels, valid
    coords, inside = _warp_coords(int(idx.numel()), h, w, cfg, generator, device)
    idx = idx.to(device)
    in_frame = inside & (coords[..., 0] >= 0) & (coords[..., 0] <= w) & (coords[..., 1] >= 0) & (coords[..., 1] <= h)
    grid = torch.stack([2 * coords[..., 0] / w - 1, 2 * coords[..., 1] / h - 1], dim=-1)
    grid = torch.where(in_frame[..., None], grid, torch.full_like(grid, -2.0))
    sub = images.index_select(0, idx)
    warped = F.grid_sample(sub, grid.to(sub.dtype), mode="bilinear", padding_mode="border", align_corners=False)
    warped = warped * in_frame[:, None].to(warped.dtype)
    # Labels and valid ride together through ONE nearest-neighbour sampling (exact for ids < 2^24).
    planes = [valid.index_select(0, idx).to(torch.float32)]
    if labels is not None:
        planes.append(labels.index_select(0, idx).to(torch.float32))
    near = F.grid_sample(torch.stack(planes, 1), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    new_valid = (near[:, 0] > 0.5) & in_frame
    images_out = images.clone()
    images_out[idx] = warped
    valid_out = valid.clone()
    valid_out[idx] = new_valid
    labels_out = None
    if labels is not None:
        ignore = torch.full_like(near[:, 1], ignore_index, dtype=labels.dtype)
        new_labels = torch.where(new_valid, near[:, 1].round().to(labels.dtype), ignore)
        labels_out = labels.clone()
        labels_out[idx] = new_labels
    return images_out, labels_out, valid_out
