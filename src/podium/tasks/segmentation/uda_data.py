"""The datasets of domain adaptation (task=uda): target-camera frames, simulated or real.

- `target_frames`: where the target camera's images are. With `task.target.lens` set, the
  simulated camera is written once by the lens simulator (podium.tasks.segmentation.lens) from
  `task.target.image_dir` (+ `mask_dir`) into a cache folder: images, labels (the dataset's own
  stored values, its ignore value outside the image circle) and field-of-view masks (the circle
  inside the source frame). Without a lens, the folders are used as they are (a real fisheye
  camera: images only, the field of view estimated from the black border or given as files).
- `UnlabelledFrames`: the target's training images without labels — random crops of
  `data.patch_size` and horizontal flips, nothing else (the teacher must see them un-augmented),
  with their field of view, drawn from the generator the engine seeds per (seed, epoch, index).
- `labelled_frames`: labelled frames of another camera scored as a split (the simulated target's
  val, the undistorted source camera's val), preprocessed exactly like the source.

Target labels are read only to score (the `val` and `test_*` splits), never in training.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from podium.errors import UserError
from podium.tasks.segmentation.data import SegImageDataset, fraction_subset
from podium.tasks.segmentation.pipeline import SegDataConfig, channel_stats, normalise, preprocess
from podium.tasks.segmentation.readers import (IMAGE_SUFFIXES, SegRecord, natural_key, pair_folders, read_fov,
                                               read_image)


@dataclasses.dataclass
class Frames:
    """Where one camera's frames are: images, optional labels (scoring only), optional FOV files."""

    name: str
    image_dir: Path
    mask_dir: Path | None
    fov_dir: Path | None


def _folder(value: str | None, key: str) -> Path | None:
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise UserError(f"{key}={value}: not a folder.")
    return path


def target_frames(target: Any, label_ignore_value: int | None, seed: int) -> list[Frames]:
    """The target camera (first) and every extra simulated camera, each as folders on disk."""
    image_dir = _folder(target.image_dir, "task.target.image_dir")
    if image_dir is None:
        raise UserError("task.target.image_dir is required: the target camera's frames (unlabelled for training).")
    mask_dir = _folder(target.mask_dir, "task.target.mask_dir")
    fov_dir = _folder(target.fov_dir, "task.target.fov_dir")
    lenses = ([target.lens] if target.lens is not None else []) + list(target.extra_lenses or [])
    if not lenses:
        return [Frames("target", image_dir, mask_dir, fov_dir)]
    from podium.tasks.segmentation import lens as lens_sim

    cache = Path(target.cache).expanduser() if target.cache else lens_sim.default_lens_cache()
    ignore_value = 255 if label_ignore_value is None else int(label_ignore_value)
    frames = []
    for i, spec in enumerate(lenses):
        key = "task.target.lens" if (i == 0 and target.lens is not None) else f"task.target.extra_lenses[{i - (target.lens is not None)}]"
        camera = lens_sim.resolve_lens(spec, key=key)
        folder = lens_sim.write_fisheye_folder(image_dir, mask_dir, cache, camera, seed=seed,
                                               ignore_value=ignore_value)
        name = spec if isinstance(spec, str) else f"lens{i}"
        frames.append(Frames(name, folder / "images", folder / "labels" if mask_dir else None, folder / "fov"))
    return frames


def image_records(image_dir: Path, fov_dir: Path | None) -> list[SegRecord]:
    """One record per image file (id = stem, natural order), with its FOV file when given."""
    files = sorted((p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=lambda p: natural_key(p.stem))
    if not files:
        raise UserError(f"{image_dir}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}).")
    records = []
    for path in files:
        fov = None
        if fov_dir is not None:
            matches = sorted(fov_dir.glob(f"{path.stem}.*"))
            if not matches:
                raise UserError(f"{path}: no FOV mask {path.stem}.* in {fov_dir}.")
            fov = matches[0]
        records.append(SegRecord(path.stem, path, None, fov))
    return records


def _camera_config(c: SegDataConfig, has_fov_files: bool, scale: float | None = None) -> SegDataConfig:
    """The source's preprocessing for another camera's frames: field of view from files when
    there are, else estimated from the dark border outside the image circle."""
    changes: dict[str, Any] = {"fov": "file" if has_fov_files else ("estimate" if c.fov != "none" else "none")}
    if scale is not None:
        changes["scale"] = scale
    return dataclasses.replace(c, **changes)


class UnlabelledFrames(Dataset):
    """Target training images: (image, fov, index) with a random crop of `patch_size` and a
    horizontal flip, nothing else; decoded and preprocessed once, kept as uint8."""

    def __init__(self, records: Sequence[SegRecord], c: SegDataConfig):
        self.cfg, self.records = c, list(records)
        self.mean, self.std = channel_stats(c.mean, c.channels, "mean"), channel_stats(c.std, c.channels, "std")
        self.patch = (int(c.patch_size[0]), int(c.patch_size[1]))
        self.images, self.fovs = [], []
        for r in self.records:
            image = read_image(r.image_path)
            fov = read_fov(r.fov_path, expected_hw=image.shape[:2], image_path=r.image_path) if r.fov_path else None
            _, raw, fov = preprocess(image, c, fov)
            h, w = fov.shape
            if h < self.patch[0] or w < self.patch[1]:
                raise UserError(f"{r.image_path}: target image is {h} x {w} px after data.scale={c.scale}, smaller "
                                f"than data.patch_size {list(self.patch)}.")
            self.images.append(raw)
            self.fovs.append(torch.from_numpy(np.ascontiguousarray(fov)))

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image, fov = self.images[index], self.fovs[index]
        (ph, pw), (h, w) = self.patch, fov.shape
        top = int(torch.randint(0, h - ph + 1, ()))
        left = int(torch.randint(0, w - pw + 1, ()))
        image, fov = image[:, top:top + ph, left:left + pw], fov[top:top + ph, left:left + pw]
        if torch.rand(()) < 0.5:
            image, fov = image.flip(-1), fov.flip(-1)
        return {"image": normalise(image, self.mean, self.std).contiguous(), "fov": fov.contiguous(),
                "index": torch.tensor(index, dtype=torch.int64)}


def unlabelled_frames(frames: Frames, c: SegDataConfig, fraction: float, split_seed: int) -> UnlabelledFrames:
    records = image_records(frames.image_dir, frames.fov_dir)
    if fraction < 1:
        records = fraction_subset(records, fraction, split_seed)
    return UnlabelledFrames(records, _camera_config(c, frames.fov_dir is not None))


def labelled_frames(frames: Frames, c: SegDataConfig, class_names: Sequence[str], values: Mapping[int, int],
                    max_images: int = 0, scale: float | None = None) -> SegImageDataset:
    """Whole labelled frames of another camera for scoring, preprocessed like the source."""
    if frames.mask_dir is None:
        raise ValueError("labelled_frames needs a mask folder")
    records = pair_folders(frames.image_dir, frames.mask_dir, "{stem}.*", "{stem}.*", frames.fov_dir, None)
    if max_images > 0:
        records = records[:max_images]
    return SegImageDataset(records, _camera_config(c, frames.fov_dir is not None, scale), class_names, values)
