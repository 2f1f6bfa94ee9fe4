"""`podium augment`: materialise an augmented training set, versioned and reproducible.

Teams in image competitions train on offline-augmented sets of 80,000-180,000 images made from a
few thousand originals: the augmentation is paid once, every teammate trains on the same files,
and the set can be shared. podium writes such a set as an image-folder dataset
(`OUT/train/<class>/*.png`, with the source's val and test splits copied unaugmented beside it),
so training takes it with `data=image_folder data.root=OUT`:

    podium augment experiment=digits '+data.augment=[{name: Corrupt, p: 0.8}]' --n 80000 --out aug/
    podium train experiment=digits data=image_folder data.root=aug/ data.image_size=32 ...
    podium augment experiment=digits --n 16 --preview --out preview.png   # a grid, nothing else

Sample k is source image k mod N (every original appears equally often), augmented by the run's
own training pipeline (`data.augment`, e.g. the `Corrupt` transform) with torch seeded from
(seed, k): the same command writes the same bytes with any number of workers. manifest.json
holds the podium version, the seed, the hash of the resolved data config and the augmentation
specs; manifest.csv one row per file: its source sample, class and seed (which, with the specs,
fixes every transform parameter).

Works for tasks whose training samples are (image, class index) and whose run card says
class_probs (classification); images are un-normalised with the card's mean and std.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Dataset

from podium.errors import UserError


def _to_uint8(image: torch.Tensor, mean, std) -> np.ndarray:
    """A normalised C x H x W float image back to H x W (x C) uint8."""
    mean = torch.as_tensor(mean, dtype=image.dtype).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=image.dtype).view(-1, 1, 1)
    pixels = ((image * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)
    array = pixels.permute(1, 2, 0).numpy()
    return array[..., 0] if array.shape[-1] == 1 else array


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(name))


class _Materialise(Dataset):
    """Item k: augment source sample k mod N with torch seeded from (seed, k), write the PNG
    (in the loader's worker, so encoding runs in parallel), return the manifest row."""

    def __init__(self, source: Dataset, n: int, seed: int, out: Path | None, classes, mean, std, split: str,
                 augmented: bool):
        self.source, self.n, self.seed, self.out = source, n, seed, out
        self.classes, self.mean, self.std, self.split, self.augmented = classes, mean, std, split, augmented

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, k: int):
        from PIL import Image

        index = k % len(self.source)
        sample_seed = (self.seed * 1_000_003 + k) % 2**63
        torch.default_generator.manual_seed(sample_seed)
        sample = self.source[index]
        # (image, class) — evaluation splits append the sample's index: (image, class, index)
        image, label = (sample[0], sample[1]) if isinstance(sample, (tuple, list)) and len(sample) >= 2 else (sample, None)
        if not torch.is_tensor(image) or image.ndim != 3 or not isinstance(label, int):
            raise UserError("podium augment materialises image-classification sets: samples of "
                            f"(C x H x W image, class index); the {self.split} split gives {type(image).__name__}.")
        pixels = _to_uint8(image.float(), self.mean, self.std)
        name = self.classes[int(label)]
        source_id = self.source.sample_id(index) if hasattr(self.source, "sample_id") else str(index)
        row = {"file": "", "split": self.split, "source": source_id, "class": name,
               "seed": sample_seed if self.augmented else ""}
        if self.out is not None:
            folder = self.out / self.split / _safe(name)
            folder.mkdir(parents=True, exist_ok=True)
            stem = f"{k:07d}" if self.augmented else _safe(source_id)
            path = folder / f"{stem}.png"
            Image.fromarray(pixels).save(path)
            row["file"] = str(path.relative_to(self.out))
        return row, pixels


def _loader(dataset: Dataset, workers: int) -> DataLoader:
    return DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers,
                      collate_fn=lambda item: item, persistent_workers=False)


def data_config_hash(cfg) -> str:
    text = OmegaConf.to_yaml(OmegaConf.create(OmegaConf.to_container(cfg.data, resolve=True)), sort_keys=True)
    return hashlib.sha256(f"{text}seed={cfg.seed}".encode()).hexdigest()[:16]


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} exists and is not an empty folder; podium augment writes a new "
                        "dataset folder (choose another --out or remove it).")


def materialise(cfg, n: int, out: Path, workers: int = 0, preview: bool = False, progress=None) -> dict:
    """Write `n` augmented training images (and the unaugmented val/test splits) under `out`,
    or with `preview` a grid PNG at `out` of the first `n`. Returns the manifest."""
    import podium
    from podium.engine import registry

    if n < 1:
        raise UserError(f"--n must be at least 1, got {n}.")
    task = registry.build("task", cfg.task.name, cfg)
    datasets = task.build_datasets()
    try:
        card = task.describe()
    except NotImplementedError:
        card = {}
    if card.get("output", {}).get("kind") != "class_probs" or "train" not in datasets:
        raise UserError(f"podium augment materialises image-classification sets; task={cfg.task.name} "
                        "does not train on (image, class) samples.")
    classes, mean, std = card["classes"], card["input"]["mean"], card["input"]["std"]
    if preview:
        return _preview(datasets["train"], n, int(cfg.seed), Path(out), classes, mean, std)
    out = Path(out)
    _check_out(out)
    plan = [("train", datasets["train"], n, True)]
    plan += [(split, ds, len(ds), False) for split, ds in sorted(datasets.items())
             if split == "val" or split.startswith("test")]
    rows: list[dict] = []
    total = sum(count for _, _, count, _ in plan)
    task_id = progress.add_task("augment", total=total) if progress is not None else None
    for split, dataset, count, augmented in plan:
        job = _Materialise(dataset, count, int(cfg.seed), out, classes, mean, std, split, augmented)
        for row, _ in _loader(job, workers):
            rows.append(row)
            if progress is not None:
                progress.advance(task_id)
    manifest = {"podium_version": podium.__version__, "seed": int(cfg.seed), "n": n,
                "sources": {split: len(ds) for split, ds, _, _ in plan},
                "data_config_hash": data_config_hash(cfg), "data": OmegaConf.to_container(cfg.data, resolve=True),
                "augment": OmegaConf.to_container(cfg.data.augment, resolve=True) if "augment" in cfg.data else [],
                "classes": classes, "layout": "train/<class>/*.png (augmented), val/ and test*/ unaugmented",
                "use": f"podium train ... data=image_folder data.root={out}"}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
    with (out / "manifest.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["file", "split", "source", "class", "seed"])
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def _preview(source: Dataset, n: int, seed: int, out: Path, classes, mean, std) -> dict:
    from podium.common.plots import new_figure, save_figure

    if out.suffix.lower() != ".png":
        raise UserError(f"--out {out}: with --preview, --out is the grid's .png file.")
    job = _Materialise(source, min(n, 64), seed, None, classes, mean, std, "train", True)
    items = [job[k] for k in range(len(job))]
    cols = min(8, len(items))
    rows = -(-len(items) // cols)
    fig = new_figure((1.6 * cols, 1.8 * rows))
    for i, (row, pixels) in enumerate(items):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(pixels, cmap="gray" if pixels.ndim == 2 else None, vmin=0, vmax=255)
        ax.set_title(f"{row['class']} ({row['source']})", fontsize=6)
        ax.axis("off")
    save_figure(fig, out)
    return {"preview": str(out), "n": len(items)}
