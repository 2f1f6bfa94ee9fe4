"""Augmentation pipelines from config: `torchvision.transforms.v2` classes by name.

    build_augmentations([{"name": "RandomRotation", "degrees": 10}], channels=3, image_size=64)

v2 transforms move masks and key points with the image (tv_tensors), and are maintained with
PyTorch; albumentations is unmaintained since July 2025 and its successor is AGPL. Containers
(RandomApply, RandomChoice, RandomOrder, Compose) take nested entries in `transforms`.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, Sequence

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torchvision import tv_tensors
from torchvision.transforms import v2

from podium.errors import UserError


def plain(value: Any) -> Any:
    """OmegaConf containers -> plain dicts/lists (so torchvision gets lists, not ListConfig)."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


# v2 transforms that make no sense inside a config-driven per-image training pipeline: dtype and
# type conversions (the pipeline does its own), batch-level mixing (needs the labels), and ops on
# boxes, key points or videos.
_NOT_AUGMENTATIONS = {
    "Transform", "Lambda", "LinearTransformation", "Normalize", "ToDtype", "ConvertImageDtype",
    "ToImage", "ToPILImage", "ToPureTensor", "ToTensor", "PILToTensor", "CutMix", "MixUp",
    "FiveCrop", "TenCrop", "ClampBoundingBoxes", "ClampKeyPoints", "ConvertBoundingBoxFormat",
    "SanitizeBoundingBoxes", "SanitizeKeyPoints", "SetClampingMode", "RandomIoUCrop",
    "UniformTemporalSubsample",
}  # fmt: skip
# Containers whose `transforms` argument is itself a list of augmentation entries.
_CONTAINERS = {"Compose", "RandomApply", "RandomChoice", "RandomOrder"}


def _podium_transforms() -> dict[str, type]:
    """podium's own v2 transforms, accepted beside torchvision's."""
    from podium.common.blend import Blend
    from podium.common.corruptions import Corrupt

    return {"Corrupt": Corrupt, "Blend": Blend}


def augment_choices() -> list[str]:
    """The torchvision.transforms.v2 class names (and podium's own) accepted in `data.augment`."""
    return sorted(
        [name for name, obj in vars(v2).items()
         if inspect.isclass(obj) and issubclass(obj, v2.Transform) and name not in _NOT_AUGMENTATIONS]
        + list(_podium_transforms())
    )


def _build_augmentation(spec: Any, where: str) -> v2.Transform:
    spec = plain(spec)
    if isinstance(spec, str):  # shorthand: "RandomHorizontalFlip"
        spec = {"name": spec}
    if not isinstance(spec, Mapping) or "name" not in spec:
        raise UserError(
            f"{where} must be a mapping with a 'name' key, e.g. {{name: RandomRotation, degrees: 10}}; "
            f"got {spec!r}."
        )
    kwargs = dict(spec)
    name = kwargs.pop("name")
    choices = augment_choices()
    if name not in choices:
        raise UserError(
            f"{where}: unknown augmentation {name!r}. Valid torchvision.transforms.v2 names: "
            f"{', '.join(choices)}."
        )
    if name in _CONTAINERS and isinstance(kwargs.get("transforms"), list):
        kwargs["transforms"] = [
            _build_augmentation(sub, f"{where}.transforms[{j}]")
            for j, sub in enumerate(kwargs["transforms"])
        ]
    cls = _podium_transforms().get(name) or getattr(v2, name)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        params = ", ".join(p for p in inspect.signature(cls).parameters if p != "self")
        raise UserError(f"{where} ({name}): {e}. {name} accepts: {params}.") from None


def build_augmentations(
    specs: Sequence[Any], channels: int, image_size: int, where: str = "data.augment"
) -> list[v2.Transform]:
    """Build `data.augment` entries into v2 transforms, and try each once on a dummy image.

    The dry run turns what would otherwise fail in the first training batch (an op that needs
    float input, one that changes the channel count or the image size) into a config error
    naming the entry, before any work starts.
    """
    transforms = [_build_augmentation(spec, f"{where}[{i}]") for i, spec in enumerate(specs or [])]
    gen = torch.Generator().manual_seed(0)
    shape = (channels, image_size, image_size)
    x = tv_tensors.Image(torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen))
    with torch.random.fork_rng(devices=[]):  # the dry run must not shift the run's random stream
        for i, t in enumerate(transforms):
            name = type(t).__name__
            try:
                x = t(x)
            except Exception as e:  # noqa: BLE001 - any failure here is a config problem
                raise UserError(
                    f"{where}[{i}] ({name}) cannot be applied to a {channels}-channel uint8 "
                    f"{image_size}x{image_size} image: {e}"
                ) from None
            if not isinstance(x, torch.Tensor) or tuple(x.shape) != (channels, image_size, image_size):
                got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise UserError(
                    f"{where}[{i}] ({name}) turns a ({channels}, {image_size}, {image_size}) image "
                    f"into {got}; augmentations must keep the channel count and data.image_size "
                    f"so that train and eval images match."
                )
    return transforms


