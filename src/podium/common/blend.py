"""Mixup-style blending with a second image, as a training transform for every data source.

Test scans in document competitions sometimes carry a second page showing through the paper, a
watermark, or two photographs superimposed. `Blend` reproduces that: with probability `p` the
image becomes `(1 - a) * image + a * other`, where `other` is an earlier image of the training
stream and `a` is drawn from `alpha`. Unlike mixup (Zhang et al., ICLR 2018, "mixup: Beyond
Empirical Risk Minimization") the label stays the first image's, so `alpha` is capped below 0.5:
the first image must stay the dominant one.

    data.augment: [{name: Blend, p: 0.3, alpha: [0.1, 0.35]}]

A transform sees one sample, not the dataset, so the second image comes from a small reservoir of
the images this process has transformed before (Vitter's reservoir sampling, algorithm R): any
data source works (digits, folders, CSVs, `podium augment`), each DataLoader worker keeping its
own. Images of another size than the current one are resized to it. All draws come from torch's
global RNG, which podium's loader seeds per sample: a run is reproducible for a given number of
workers (the reservoir's content depends on the order a worker sees its samples).

    >>> import torch
    >>> blend = Blend(p=1.0, alpha=(0.2, 0.2))
    >>> first = blend(torch.zeros(1, 4, 4))          # the reservoir is empty: returned unchanged
    >>> mixed = blend(torch.ones(1, 4, 4))           # blended with the first image
    >>> round(float(mixed.mean()), 3)
    0.8
"""

from __future__ import annotations

from typing import Sequence

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF


class Blend(v2.Transform):
    """Blend an image with an earlier one of the stream (the label stays the first image's)."""

    def __init__(self, p: float = 0.5, alpha: Sequence[float] = (0.1, 0.35), pool_size: int = 64):
        super().__init__()
        low, high = (float(alpha), float(alpha)) if isinstance(alpha, (int, float)) else map(float, alpha)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"Blend p must be in [0, 1], got {p}")
        if not 0.0 <= low <= high < 0.5:
            raise ValueError(f"Blend alpha must be [low, high] with 0 <= low <= high < 0.5 (the label stays "
                             f"the first image's), got {list(alpha) if not isinstance(alpha, (int, float)) else alpha}")
        if pool_size < 1:
            raise ValueError(f"Blend pool_size must be >= 1, got {pool_size}")
        self.p, self.low, self.high, self.pool_size = float(p), low, high, int(pool_size)
        self._pool: list[torch.Tensor] = []
        self._seen = 0

    def make_params(self, flat_inputs: list) -> dict:
        carried = [type(x).__name__ for x in flat_inputs
                   if isinstance(x, (tv_tensors.Mask, tv_tensors.KeyPoints, tv_tensors.BoundingBoxes))]
        if carried:
            raise TypeError(f"Blend mixes two images but only one {carried[0]}: use it for image-level labels.")
        draw = torch.rand(3)
        return {"apply": bool(draw[0] < self.p), "pick": float(draw[1]),
                "alpha": self.low + (self.high - self.low) * float(draw[2])}

    def transform(self, inpt, params: dict):
        if not isinstance(inpt, tv_tensors.Image) and type(inpt) is not torch.Tensor:
            return inpt
        image = inpt.as_subclass(torch.Tensor)
        out = image
        if params["apply"] and self._pool:
            other = self._pool[min(int(params["pick"] * len(self._pool)), len(self._pool) - 1)]
            out = self._mix(image, other, params["alpha"])
        self._remember(image)
        return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.Image) else out

    @staticmethod
    def _mix(image: torch.Tensor, other: torch.Tensor, a: float) -> torch.Tensor:
        if other.shape[-2:] != image.shape[-2:]:
            other = TF.resize(other, list(image.shape[-2:]), antialias=True)
        if other.shape[0] != image.shape[0]:  # grey with colour: repeat or average the channels
            other = other.mean(0, keepdim=True).expand_as(image) if image.shape[0] != 1 else other.mean(0, keepdim=True)
        mixed = (1.0 - a) * image.float() + a * other.float()
        if image.dtype == torch.uint8:
            return mixed.round().clamp(0, 255).to(torch.uint8)
        return mixed.to(image.dtype)

    def _remember(self, image: torch.Tensor) -> None:
        """Reservoir sampling: every image seen so far has the same chance to be in the pool."""
        self._seen += 1
        if len(self._pool) < self.pool_size:
            self._pool.append(image.detach().clone())
            return
        slot = int(torch.randint(0, self._seen, (1,)))
        if slot < self.pool_size:
            self._pool[slot] = image.detach().clone()
