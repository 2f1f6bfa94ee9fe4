"""Deterministic "document competition" corruptions: robustness test splits and training transforms.

Document-image competitions score models on scans that arrive rotated by quarter turns, slightly
skewed or in perspective, mirrored, noisy (sensor or photon noise), blurred, too dark or too
bright, with a colour cast, or JPEG-compressed. This module reproduces those defects so a clean
test set can be turned into a corrupted one, and so that training sees the same corruptions
(`Corrupt`, a torchvision v2 transform usable in `data.augment` for every data source):

    rng = numpy.random.default_rng([seed, index])
    corrupted = corrupt(image, rng, severity=1.0)           # a random subset of the ops
    corrupted = corrupt(image, rng, ops=["hflip", "noise"])  # exactly these ops, in this order

    test_corrupted = CorruptedDataset(raw_test_dataset, seed=1234, transform=eval_transform)

    data.augment: [{name: Corrupt, severity: 1.0, p: 0.8}]   # in a config: train on them too

Everything is deterministic: all randomness comes from the numpy `Generator` passed in (and a
torch generator seeded from it for the noise), never from the global RNGs, so a corrupted test
split is the same in every run, process and DataLoader worker.

Images are C x H x W tensors, either uint8 (0..255) or float in [0, 1]; the result has the input's
dtype, shape and type (a `tv_tensors.Image` stays one).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

# An op takes a float image in [0, 1], the numpy rng, a torch generator (for per-pixel noise) and
# the severity, and returns a float image (not necessarily clamped; `corrupt` clamps at the end).
CorruptionOp = Callable[[torch.Tensor, np.random.Generator, torch.Generator, float], torch.Tensor]


def _sign(rng: np.random.Generator) -> float:
    return 1.0 if rng.random() < 0.5 else -1.0


def _rotate90(x: torch.Tensor, rng, gen, severity: float) -> torch.Tensor:
    """A quarter, half or three-quarter turn (a scan fed in the wrong way round)."""
    k = int(rng.integers(1, 4))
    h, w = x.shape[-2:]
    # torch.rot90 is exact (no interpolation), unlike an affine rotation by 90 degrees.
    out = torch.rot90(x, k, dims=(-2, -1))
    if out.shape[-2:] != (h, w):
        # Non-square images: keep the shape so the image still batches with the others.
        out = TF.resize(out, [h, w], antialias=True)
    return out


def _border_fill(x: torch.Tensor) -> list[float]:
    """Per-channel mean of the border pixels: the colour that rotation should pad with, so a
    white page gets white corners and a black digit background black ones."""
    border = torch.cat([x[..., 0, :], x[..., -1, :], x[..., :, 0], x[..., :, -1]], dim=-1)
    return border.mean(dim=-1).tolist()


def _rotate_small(x: torch.Tensor, rng, gen, severity: float) -> torch.Tensor:
    """A skew of 3..15 degrees either way (scaled by severity)."""
    angle = _sign(rng) * rng.uniform(3.0, 15.0) * severity
    return TF.rotate(x, angle, interpolation=InterpolationMode.BILINEAR, fill=_border_fill(x))


def _hflip(x: torch.Tensor, rng, gen, severity: float) -> torch.Tensor:
    return TF.horizontal_flip(x)


def _vflip(x: torch.Tensor, rng, gen, severity: float) -> torch.Tensor:
    return TF.vertical_flip(x)


def _noise(x: torch.Tensor, rng, gen, severity: float) -> torch.Tensor:
    """Additive Gaussian noise (sensor / scanner noise). TF.gaussian_noise draws from the global
    RNG, so the noise is drawn here from the per-item generator instead."""
    sigma = rng.uniform(0.03, 0.10) * severity
    return x + sigma * torch.randn(x.shape, generator=gen, dtype=x.dtype)


def _brightness(x: torch.Tensor, rng, gen, severity: float) -> torch.Tensor:
    factor = max(0.05, 1.0 + _sign(rng) * rng.uniform(0.15, 0.40) * severity)
    return TF.adjust_brightness(x, factor)


def _contrast(x: torch.Tensor, rng, gen, severity: float) -> torch.Tensor:
    factor = max(0.05, 1.0 + _sign(rng) * rng.uniform(0.20, 0.50) * severity)
    if x.shape[-3] in (1, 3):
        return TF.adjust_contrast(x, factor)
    # adjust_contrast only knows grey and RGB; other channel counts blend with their own mean.
    mean = x.mean(dim=(-3, -2, -1), keepdim=True)
    return (x - mean) * factor + mean


def _color_shift(x: torch.Tensor, rng, gen, severity: float) -> torch.Tensor:
    """An independent offset per channel (a colour cast; a plain shift on grey images)."""
    offsets = rng.uniform(-0.15, 0.15, size=x.shape[-3]) * severity
    return x + torch.as_tensor(offsets, dtype=x.dtype).view(-1, 1, 1)


def _perspective(x: torch.Tensor, rng, gen, severity: float) -> torch.Tensor:
    """A page photographed at an angle: each corner moves inwards by up to 12 % of the side."""
    h, w = x.shape[-2:]
    corners = [[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]]
    moved = [[cx + (1 if cx == 0 else -1) * rng.uniform(0, 0.12) * severity * w,
              cy + (1 if cy == 0 else -1) * rng.uniform(0, 0.12) * severity * h] for cx, cy in corners]
    return TF.perspective(x, corners, moved, interpolation=InterpolationMode.BILINEAR, fill=_border_fill(x))


def _shot_noise(x: torch.Tensor, rng, gen, severity: float) -> torch.Tensor:
    """Photon (Poisson) noise: stronger in bright areas, unlike additive Gaussian noise. 15..60
    photons at full intensity (fewer with higher severity)."""
    photons = rng.uniform(15.0, 60.0) / max(severity, 1e-3)
    return torch.poisson(x.clamp(0, 1) * photons, generator=gen) / photons


def _jpeg(x: torch.Tensor, rng, gen, severity: float) -> torch.Tensor:
    """JPEG artefacts (blocking, ringing) at quality 10..50 (lower with severity); images that
    are neither grey nor RGB pass unchanged (JPEG has no other channel counts)."""
    import io

    from PIL import Image

    if x.shape[-3] not in (1, 3):
        return x
    quality = int(np.clip(round(50 - rng.uniform(0, 40) * severity), 1, 95))
    pixels = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    buffer = io.BytesIO()  # Pillow's codec (torchvision's JPEG I/O is deprecated)
    Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(buffer, "JPEG", quality=quality)
    decoded = np.asarray(Image.open(buffer)).reshape(pixels.shape)
    return torch.from_numpy(decoded.copy()).permute(2, 0, 1).to(x.dtype) / 255.0


def _blur(x: torch.Tensor, rng, gen, severity: float) -> torch.Tensor:
    """Gaussian blur (an out-of-focus scan); the kernel is capped at the image size."""
    sigma = rng.uniform(0.5, 1.5) * severity
    if sigma < 0.1:
        return x
    k = 2 * math.ceil(2 * sigma) + 1
    largest_odd = min(x.shape[-2:]) - (1 - min(x.shape[-2:]) % 2)
    k = min(k, largest_odd)
    if k < 3:
        return x
    return TF.gaussian_blur(x, [k, k], [sigma, sigma])


#: The corruptions by name. When several are drawn they are applied in this order: geometry
#: first, then blur and photometric shifts, noise (as a sensor adds it), and JPEG compression
#: last (as a camera or an upload stores the image).
CORRUPTIONS: dict[str, CorruptionOp] = {
    "rotate90": _rotate90,
    "rotate_small": _rotate_small,
    "perspective": _perspective,
    "hflip": _hflip,
    "vflip": _vflip,
    "blur": _blur,
    "brightness": _brightness,
    "contrast": _contrast,
    "color_shift": _color_shift,
    "noise": _noise,
    "shot_noise": _shot_noise,
    "jpeg": _jpeg,
}
#: What `corrupt(ops=None)` draws from: the ops the corrupted test splits were made with. Kept
#: fixed so that a test split (and every score reported on it) stays the same as ops are added.
TEST_SPLIT_OPS = ("rotate90", "rotate_small", "hflip", "vflip", "blur", "brightness", "contrast",
                  "color_shift", "noise")
#: Ops that move pixels: they would separate an image from its mask or key points.
GEOMETRIC_OPS = frozenset({"rotate90", "rotate_small", "perspective", "hflip", "vflip"})


def corrupt(
    image: torch.Tensor,
    rng: np.random.Generator,
    severity: float = 1.0,
    ops: Sequence[str] | None = None,
    max_ops: int = 3,
) -> torch.Tensor:
    """Corrupt one C x H x W image (uint8, or float in [0, 1]).

    With `ops=None`, 1..`max_ops` distinct corruptions are drawn from `TEST_SPLIT_OPS` and applied
    in the table's order; with `ops`, exactly those are applied, in the given order. `severity`
    scales the continuous magnitudes (angles, noise, shifts, blur); flips and quarter turns are
    unaffected. The same `rng` state always gives the same result.
    """
    if image.ndim < 3:
        raise ValueError(f"corrupt expects a C x H x W image, got shape {tuple(image.shape)}")
    if ops is None:
        names = list(TEST_SPLIT_OPS)
        k = int(rng.integers(1, min(max_ops, len(names)) + 1))
        chosen = set(rng.choice(len(names), size=k, replace=False).tolist())
        ops = [name for i, name in enumerate(names) if i in chosen]
    else:
        unknown = [name for name in ops if name not in CORRUPTIONS]
        if unknown:
            raise ValueError(f"unknown corruption(s) {unknown}; valid: {', '.join(CORRUPTIONS)}")
    # A torch generator derived from the numpy rng: per-pixel noise without the global RNG.
    gen = torch.Generator().manual_seed(int(rng.integers(0, 2**63 - 1)))

    x = image.as_subclass(torch.Tensor)
    was_uint8 = x.dtype == torch.uint8
    x = TF.to_dtype(x, torch.float32, scale=True) if was_uint8 else x.clone()
    for name in ops:
        x = CORRUPTIONS[name](x, rng, gen, float(severity))
    x = x.clamp(0.0, 1.0)
    if was_uint8:
        x = (x * 255.0).round().to(torch.uint8)
    else:
        x = x.to(image.dtype)
    return tv_tensors.wrap(x, like=image) if isinstance(image, tv_tensors.Image) else x


class CorruptedDataset(Dataset):
    """A dataset whose item i is item i of `base`, corrupted the same way in every run.

    `base` is a dataset yielding `(image, label)` with *un-normalised* images (uint8, or float
    in [0, 1]), or a pair of tensors `(images N x C x H x W, labels N)`. Item i is corrupted with
    `numpy.random.default_rng([seed, i])`, so it depends on nothing but (seed, i). `transform`
    (e.g. the eval pipeline: ToDtype + Normalize) is applied after the corruption.

    The dataset attributes the trainer reads (`classes`, `targets`, `in_chans`, `sample_id`,
    `skipped`) are taken from `base` when it has them.
    """

    def __init__(
        self,
        base: Dataset | tuple[torch.Tensor, torch.Tensor],
        seed: int,
        severity: float = 1.0,
        transform: Callable | None = None,
        classes: list[str] | None = None,
    ):
        self.seed = int(seed)
        self.severity = float(severity)
        self.transform = transform
        if isinstance(base, (tuple, list)):
            images, labels = base
            self._images = torch.as_tensor(images)
            self._labels = [int(v) for v in torch.as_tensor(labels).tolist()]
            if len(self._images) != len(self._labels):
                raise ValueError(f"{len(self._images)} images but {len(self._labels)} labels")
            self.base = None
            self.targets = list(self._labels)
            self.in_chans = int(self._images.shape[1])
            n_classes = max(self._labels, default=-1) + 1
            self.classes = list(classes) if classes is not None else [str(c) for c in range(n_classes)]
            self.skipped: list[str] = []
        else:
            self.base = base
            self.targets = list(getattr(base, "targets", []))
            self.in_chans = getattr(base, "in_chans", None)
            self.classes = list(classes) if classes is not None else list(getattr(base, "classes", []))
            self.skipped = list(getattr(base, "skipped", []))

    def __len__(self) -> int:
        return len(self._labels) if self.base is None else len(self.base)

    def _raw(self, index: int) -> tuple[torch.Tensor, int]:
        if self.base is None:
            return self._images[index], self._labels[index]
        return self.base[index]

    def __getitem__(self, index: int):
        image, label = self._raw(index)
        rng = np.random.default_rng([self.seed, int(index)])
        image = corrupt(tv_tensors.Image(image), rng, self.severity)
        if self.transform is not None:
            image = self.transform(image)
        return image.as_subclass(torch.Tensor), label

    def sample_id(self, index: int) -> str:
        if self.base is not None and hasattr(self.base, "sample_id"):
            return self.base.sample_id(index)
        return f"corrupted-{index:05d}"


class Corrupt(v2.Transform):
    """The corruptions as a training augmentation (`data.augment: [{name: Corrupt, ...}]`), so
    a model trains on what the corrupted test set will show it, whatever the data source.

    With probability `p`, 1..`max_ops` distinct ops drawn from `ops` (default: every op in
    `CORRUPTIONS`) are applied in the table's order at `severity`. The draw comes from torch's
    global RNG, which podium's loader seeds per sample (seed, epoch, index), so augmentation is
    reproducible and independent of the number of workers. Images only: a sample that carries a
    mask or key points is refused when a geometric op is possible (use the v2 geometric
    transforms there, which move them along).
    """

    def __init__(self, ops: Sequence[str] | None = None, severity: float = 1.0, p: float = 1.0, max_ops: int = 3):
        super().__init__()
        self.ops = list(ops) if ops is not None else list(CORRUPTIONS)
        unknown = [name for name in self.ops if name not in CORRUPTIONS]
        if unknown or not self.ops:
            raise ValueError(f"unknown corruption(s) {unknown or self.ops}; valid: {', '.join(CORRUPTIONS)}")
        if not 0.0 <= p <= 1.0 or severity < 0 or max_ops < 1:
            raise ValueError(f"need 0 <= p <= 1, severity >= 0 and max_ops >= 1; got p={p}, "
                             f"severity={severity}, max_ops={max_ops}")
        self.severity, self.p, self.max_ops = float(severity), float(p), int(max_ops)

    def make_params(self, flat_inputs: list) -> dict:
        carried = [type(x).__name__ for x in flat_inputs
                   if isinstance(x, (tv_tensors.Mask, tv_tensors.KeyPoints, tv_tensors.BoundingBoxes))]
        if carried and GEOMETRIC_OPS.intersection(self.ops):
            raise TypeError(f"Corrupt with geometric ops {sorted(GEOMETRIC_OPS.intersection(self.ops))} "
                            f"would move the image away from its {carried[0]}; give `ops` without them.")
        seed = int(torch.randint(0, 2**62, (1,)).item())
        if float(torch.rand(1)) >= self.p:
            return {"ops": []}
        rng = np.random.default_rng(seed)
        k = int(rng.integers(1, min(self.max_ops, len(self.ops)) + 1))
        chosen = set(rng.choice(len(self.ops), size=k, replace=False).tolist())
        ops = [name for name in CORRUPTIONS if name in {self.ops[i] for i in chosen}]
        return {"ops": ops, "seed": seed}

    def transform(self, inpt, params: dict):
        if not params["ops"] or not isinstance(inpt, tv_tensors.Image) and type(inpt) is not torch.Tensor:
            return inpt  # masks and points pass unchanged (only photometric ops reach them)
        return corrupt(inpt, np.random.default_rng(params["seed"] + 1), self.severity, ops=params["ops"])
