"""The segmentation task: patch training, whole-image sliding-window evaluation, metrics inside
the field of view, probability maps saved for ensembles.

    podium train experiment=drive_unet
    podium eval runs/<run> --split test
    podium predict runs/<run> ../shared/data/drive/training/images/21_training.tif --out masks.csv

Training sees random patches (foreground-oversampled, see data.py); the loss is weighted by the
field of view, so pixels outside the camera aperture never count. With `model.recon_head=true`
the auxiliary decoder reconstructs the (normalised) input inside the field of view with an L1
loss weighted by `task.recon_loss_weight` (multi-task learning). Evaluation predicts every whole
image with Gaussian-blended sliding windows (+ optional flip TTA) and scores it against the
full-resolution label inside the field of view: per-image Dice/IoU/sensitivity/specificity at
`task.threshold`, and AUC-ROC / AUPR over the pixels of the whole split pooled.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import default_collate

from podium.engine import registry
from podium.engine.registry import register
from podium.errors import UserError
from podium.tasks.base import StepContext, Task
from podium.tasks.segmentation import inference
from podium.tasks.segmentation import metrics as seg_metrics


@dataclass
class SegmentationTaskConfig:
    name: str = "segmentation"
    window: list[int] = field(default_factory=lambda: [256, 256])  # sliding-window size (H, W)
    overlap: float = 0.5  # fraction of the window shared by neighbours
    blend: str = "gaussian"  # gaussian | constant
    sw_batch_size: int = 4  # windows per forward pass
    tta_flips: list[str] = field(default_factory=list)  # e.g. [h, v, hv]
    threshold: float = 0.5  # binary tasks: foreground probability -> mask
    recon_loss_weight: float = 0.1  # weight of the auxiliary reconstruction loss (model.recon_head)
    monitor: str = "dice"  # metric for the best checkpoint (dice, auc_roc, aupr, miou, ...)
    overlays: int = 4  # overlay plots per split
    save_probabilities: bool = True  # predictions/<split>_probabilities.npz for ensembles
    # [W, H]: predict also writes <out stem>_submission.csv, RLE per image and class (rle.py)
    submission_size: list[int] = field(default_factory=list)


def collate_images(items: list[dict]) -> dict:
    """Stack when every image has the same size (patches, DRIVE); keep lists otherwise."""
    shapes = {tuple(item["image"].shape) for item in items}
    if len(shapes) == 1:
        return default_collate(items)
    return {key: [item[key] for item in items] for key in items[0]}


@register("task", "segmentation", schema=SegmentationTaskConfig,
          help="Semantic segmentation (Dice, IoU, AUC-ROC / AUPR inside the field of view).")
class SegmentationTask(Task):
    monitor_mode = "max"

    def __init__(self, cfg):
        super().__init__(cfg)
        t = cfg.task
        self.monitor = f"val/{t.monitor}"
        if t.monitor in ("loss",):
            self.monitor_mode = "min"
        inference.check_flips(t.tta_flips)
        if not 0.0 < t.threshold < 1.0:
            raise UserError(f"task.threshold={t.threshold}: expected a probability in (0, 1).")
        if t.recon_loss_weight < 0:
            raise UserError(f"task.recon_loss_weight={t.recon_loss_weight}: expected >= 0.")
        self._datasets = None
        self.loss_fn = None

    # ---- building
    def build_datasets(self):
        datasets = super().build_datasets()
        if "val" not in datasets:
            raise UserError(f"data.val_count={self.cfg.data.val_count} leaves no validation split; give "
                            "data.val_count >= 1 (only task=uda brings its own validation images).")
        return datasets

    @property
    def train_set(self):
        return self.build_datasets()["train"]

    @property
    def num_classes(self) -> int:
        if self.card is not None:  # restored from run.json: no training data needed
            return int(self.card["num_classes"])
        return int(self.train_set.num_classes)

    @property
    def class_names(self) -> list[str]:
        if self.card is not None:
            return list(self.card["classes"])
        return list(self.train_set.class_names)

    def model_kwargs(self) -> dict:
        """What the model needs beyond cfg.model: from the run card, or from the training data."""
        if self.card is not None:
            return dict(self.card["model_kwargs"])
        return {"num_classes": self.num_classes, "in_chans": int(self.train_set.in_chans)}

    def describe(self) -> dict:
        from podium.engine.runcard import card_header
        from podium.common.images import channel_stats
        from podium.tasks.segmentation.pipeline import _common_config

        c, t = _common_config(self.cfg.data), self.cfg.task
        binary = self.num_classes == 2
        return {**card_header(self), "model_kwargs": self.model_kwargs(),
                "classes": self.class_names, "num_classes": self.num_classes,
                "ignore_index": int(self.train_set.ignore_index),
                "input": {"channels": int(c.channels), "decode": "RGB", "resize_factor": float(c.scale),
                          "pixel_scale": 1 / 255,
                          "clahe": {"mode": c.clahe, "clip_limit": float(c.clahe_clip), "tiles": int(c.clahe_tiles)},
                          "field_of_view": {"mode": c.fov, "red_threshold": int(c.fov_threshold)},
                          "mean": channel_stats(c.mean, c.channels, "mean"),
                          "std": channel_stats(c.std, c.channels, "std"),
                          "window": [int(x) for x in t.window], "overlap": float(t.overlap), "blend": t.blend,
                          "tta_flips": [str(f) for f in t.tta_flips], "layout": "NCHW"},
                "output": {"kind": "mask_probs", "shape": ["batch", self.num_classes, "H", "W"],
                           "threshold": float(t.threshold),
                           "meaning": ("per-pixel softmax probabilities over `classes` at the scaled image size; "
                                       + (f"foreground where classes[1] >= threshold ({float(t.threshold)})"
                                          if binary else "the mask is the argmax")
                                       + ", background outside the field of view; resize the mask to the "
                                         "original size with nearest neighbour")}}

    def build_model(self):
        model = registry.build("model", self.cfg.model.name, self.cfg.model, **self.model_kwargs())
        self.window = inference.check_window(self.cfg.task.window, getattr(model, "divisor", 1))
        return model

    def build_loss(self, datasets):
        self.loss_fn = registry.build("loss", self.cfg.loss.name, self.cfg.loss, num_classes=self.num_classes)
        data_ignore = self.train_set.ignore_index
        if getattr(self.loss_fn, "ignore_index", data_ignore) != data_ignore:
            raise UserError(f"loss.ignore_index={self.loss_fn.ignore_index} differs from data.ignore_index="
                            f"{data_ignore}: the pixels the data marks as ignored would count in the loss.")

    def collate_fn(self):
        return collate_images

    # ---- training
    def training_step(self, model, batch, ctx: StepContext):
        out = model(batch["image"])
        weight = batch["fov"].float()
        seg = self.loss_fn(out["logits"], batch["mask"], weight)
        w = float(self.cfg.task.recon_loss_weight)
        if "recon" not in out or w == 0:
            return {"loss": seg}
        # L1 of the reconstruction, per pixel over channels, inside the field of view
        diff = (out["recon"].float() - batch["image"].float()).abs().mean(1)
        recon = (diff * weight).sum() / weight.sum().clamp_min(1.0)
        return {"loss": seg + w * recon, "seg_loss": seg.detach(), "recon_loss": recon.detach()}

    # ---- evaluation
    def probabilities(self, model, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) normalised images -> (B, K, H, W) class probabilities."""
        t = self.cfg.task
        window = getattr(self, "window", None) or inference.check_window(t.window, 1)
        return inference.predict_probabilities(model, images, window, t.overlap, t.tta_flips,
                                               t.sw_batch_size, t.blend)

    def _record(self, probs: torch.Tensor, target: torch.Tensor, index: int) -> dict:
        # Scored on exactly what predictions/<split>/ saves, so a saved set re-scored by
        # `score_predictions` gives metrics.json: binary maps in float32 (float16's 3 digits would
        # tie pixels and move the pooled AUC), multi-class softmax in float16 (scored by argmax;
        # C x H x W per image would otherwise double the files).
        record = {"index": int(index), "target": target.cpu().numpy().astype(np.int64)}
        if self.num_classes == 2:
            record["prob"] = probs[1].float().cpu().numpy().astype(np.float32)
        else:
            half = probs.half()
            record["pred"] = half.argmax(0).cpu().numpy().astype(np.uint8)
            if self.cfg.task.save_probabilities:  # (C, H, W) per image: kept only when saved
                record["probs"] = half.cpu().numpy()
        return record

    @torch.no_grad()
    def evaluation_step(self, model, batch, ctx: StepContext) -> list[dict]:
        images, masks, indices = batch["image"], batch["mask"], batch["index"]
        if torch.is_tensor(images):
            probs = self.probabilities(model, images)
            return [self._record(probs[i], masks[i], indices[i]) for i in range(len(probs))]
        return [self._record(self.probabilities(model, img.unsqueeze(0).to(ctx.device))[0], mask, idx)
                for img, mask, idx in zip(images, masks, indices)]

    def aggregate(self, records, split):
        if not records:
            raise UserError(f"the {split} split produced no images.")
        records = sorted(records, key=lambda r: r["index"])
        return seg_metrics.segmentation_metrics(records, num_classes=self.num_classes,
                                                threshold=self.cfg.task.threshold,
                                                ignore_index=self.train_set.ignore_index,
                                                class_names=self.class_names)

    # ---- outputs
    def _split_set(self, split):
        return self.build_datasets()[split]

    def _ids(self, records, split) -> list[str]:
        dataset = self._split_set(split)
        return [dataset.records[r["index"]].id for r in records]

    def save_predictions(self, records, split, out_dir: Path):
        out_dir.mkdir(parents=True, exist_ok=True)
        records = sorted(records, key=lambda r: r["index"])
        ids = self._ids(records, split)
        paths = []
        table = seg_metrics.per_image_table(records, num_classes=self.num_classes,
                                            threshold=self.cfg.task.threshold,
                                            ignore_index=self.train_set.ignore_index,
                                            class_names=self.class_names)
        path = out_dir / f"{split}_per_image.csv"
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["id", *table[0].keys()])
            writer.writeheader()
            for id_, row in zip(ids, table):
                writer.writerow({"id": id_, **{k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()}})
        paths.append(path)
        if self.cfg.task.save_probabilities:
            key = "prob" if self.num_classes == 2 else "pred"
            path = out_dir / f"{split}_probabilities.npz"
            # float16 keeps 3 significant digits: enough to average for ensembles, 2x smaller
            arrays = {id_: (r[key].astype(np.float16) if key == "prob" else r[key]) for id_, r in zip(ids, records)}
            np.savez_compressed(path, **arrays)
            paths.append(path)
            paths.append(self._write_contract(records, ids, split, out_dir / split))
        return paths

    def _write_contract(self, records, ids, split, folder: Path) -> Path:
        from podium.engine.predictions import write_predictions

        binary = self.num_classes == 2
        probs = [r["prob"].astype(np.float32) if binary else r["probs"] for r in records]
        # uint8 holds the class ids and the usual ignore label 255 in an eighth of int64's bytes
        small = all(0 <= r["target"].min() and r["target"].max() < 256 for r in records)
        targets = [r["target"].astype(np.uint8 if small else np.int32) for r in records]
        return write_predictions(
            folder, "mask_probs", ids, {"probs": probs}, truth={"target": targets}, split=split,
            task="segmentation", classes=self.class_names, ignore_index=int(self.train_set.ignore_index),
            threshold=float(self.cfg.task.threshold),
            meaning=("probs: per image, the foreground probability (H, W)" if binary else
                     "probs: per image, the softmax probabilities (C, H, W) over classes")
                    + " at the size the image is scored at (data.scale applied), float32 (binary) or float16"
                    " (multi-class); target: the label map")

    def score_predictions(self, predictions, split):
        """Dice / IoU / AUC... of a saved mask_probs set (this run's, an ensemble's)."""
        if predictions.kind != "mask_probs" or list(predictions.manifest.get("classes") or []) != list(self.class_names):
            raise UserError(f"{predictions.folder}: expected mask_probs over classes {self.class_names}, got "
                            f"{predictions.kind} over {predictions.manifest.get('classes')}.")
        records = []
        for row in range(len(predictions.ids)):
            probs = np.asarray(predictions.arrays["probs"][row], dtype=np.float32)
            record = {"index": row, "target": np.asarray(predictions.arrays["target"][row]).astype(np.int64)}
            if self.num_classes == 2:
                record["prob"] = probs
            else:
                record["pred"] = probs.argmax(0).astype(np.uint8)
            records.append(record)
        return seg_metrics.segmentation_metrics(records, num_classes=self.num_classes,
                                                threshold=self.cfg.task.threshold,
                                                ignore_index=int(predictions.manifest["ignore_index"]),
                                                class_names=self.class_names)

    # ---- cross-validation (podium.engine.folds): plain k-fold by image; the preprocessed
    # arrays are shared, nothing is decoded again
    def cv_keys(self, dataset):
        return [{"id": r.id} for r in dataset.records]

    def cv_subset(self, parts, picks, train):
        from podium.tasks.segmentation.data import SegImageDataset, SegPatchDataset

        first = parts[0]
        records = [parts[p].records[i] for p, i in picks]
        prepared = [parts[p].prepared[i] for p, i in picks]
        if train:
            return SegPatchDataset(records, first.cfg, first.class_names, first.values, prepared, seed=self.cfg.seed)
        return SegImageDataset(records, first.cfg, first.class_names, first.values, prepared)

    def sample_image(self, split, sample_id):
        """The sample's picture for `podium diff` / `podium audit` grids: RGB uint8 at the
        model's scale, before CLAHE (the preprocessed arrays: nothing is decoded again). An id
        not in `split` (out-of-fold sets pool train and val) is looked up in the other splits."""
        found = self.locate_sample(
            split, sample_id, lambda ds: [r.id for r in ds.records] if hasattr(ds, "display_image") else None)
        return None if found is None else found[0].display_image(found[1])

    def visualize(self, records, split, out_dir: Path):
        from podium.tasks.segmentation import plots

        records = sorted(records, key=lambda r: r["index"])
        dataset = self._split_set(split)
        ignore = self.train_set.ignore_index
        paths = []
        if self.num_classes == 2:
            paths.append(plots.plot_curves(records, out_dir / f"curves_{split}.png", ignore_index=ignore,
                                           threshold=self.cfg.task.threshold, title=split))
        for r, id_ in list(zip(records, self._ids(records, split)))[: self.cfg.task.overlays]:
            pred = (r["prob"] >= self.cfg.task.threshold) if "prob" in r else r["pred"]
            valid = r["target"] != ignore
            paths.append(plots.plot_overlay(dataset.display_image(r["index"]), r["target"], pred, valid,
                                            out_dir / f"overlay_{split}_{Path(id_).stem}.png",
                                            num_classes=self.num_classes))
        return paths

    def predict(self, model, inputs, out_file: Path, ctx: StepContext):
        """Per input image: a mask PNG at the image's own size (0/255 for binary tasks, class ids
        otherwise; outside the field of view is background), the foreground probabilities at
        the network's (scaled) size as .npy (binary), an overlay PNG; and a summary table in
        `out_file` (CSV, or JSON by suffix) with the class fractions inside the field of view.
        With `task.submission_size=[W, H]` also `<out stem>_submission.csv`: the competition's
        RLE rows (rle.py) of the same masks resized to W x H by nearest neighbour, ids = stems."""
        from PIL import Image
        from rich.progress import track

        from podium.tasks.segmentation import plots, rle
        from podium.tasks.segmentation.pipeline import prepare_image
        from podium.tasks.segmentation.preprocess import resize_image, resize_mask
        from podium.tasks.segmentation.readers import read_image

        out_file = Path(out_file)
        out_dir = out_file.parent / f"{out_file.stem}_masks"
        # task.submission_size=[W, H]: the competition CSV too (runs saved before the key have none)
        size = self.cfg.task.get("submission_size") or []
        submission_size = rle.check_size(size, "task.submission_size") if len(size) else None
        submission = []
        out_dir.mkdir(parents=True, exist_ok=True)
        names = self.class_names
        rows = []
        for path in track(inputs, description="predicting", transient=True):
            rgb = read_image(path)
            tensor, fov = prepare_image(rgb, self.cfg.data)
            probs = self.probabilities(model, tensor.unsqueeze(0).to(ctx.device))[0].cpu()
            fov = fov.numpy().astype(bool)
            pred = self.probabilities_to_mask(probs, fov)
            stem = Path(path).stem
            if submission_size is not None:  # from `pred` at the network's size, resized by nearest
                submission += rle.submission_rows(stem, pred, names, submission_size)
            if self.num_classes == 2:
                np.save(out_dir / f"{stem}_prob.npy", probs[1].numpy().astype(np.float32))
            plots.plot_overlay(resize_image(rgb, fov.shape), None, pred, fov, out_dir / f"{stem}_overlay.png",
                               num_classes=self.num_classes)
            full = resize_mask(pred, rgb.shape[:2])  # nearest: a label map is never interpolated
            Image.fromarray(self.mask_png_values(full)).save(out_dir / f"{stem}.png")
            counts = np.bincount(pred[fov].ravel().astype(np.int64), minlength=self.num_classes)
            rows.append({"id": str(path), "mask": str(out_dir / f"{stem}.png"), "height": int(full.shape[0]),
                         "width": int(full.shape[1]),
                         **{f"fraction_{n}": round(float(c) / max(1, int(fov.sum())), 6) for n, c in zip(names, counts)}})
        if out_file.suffix == ".json":
            out_file.write_text(json.dumps({"classes": names, "predictions": rows}, indent=2))
        else:
            with out_file.open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(rows[0].keys()) if rows else ["id"])
                writer.writeheader()
                writer.writerows(rows)
        if submission_size is not None:
            rle.write_submission(submission, out_file.parent / f"{out_file.stem}_submission.csv")
        return out_file

    def probabilities_to_mask(self, probs, fov: np.ndarray) -> np.ndarray:
        """(K, H, W) probabilities -> (H, W) uint8 class ids, background outside the FOV."""
        probs = np.asarray(probs)
        if self.num_classes == 2:
            pred = (probs[1] >= self.cfg.task.threshold).astype(np.uint8)
        else:
            pred = probs.argmax(0).astype(np.uint8)
        pred[~fov] = 0
        return pred

    def mask_png_values(self, pred: np.ndarray) -> np.ndarray:
        """Binary masks are written 0/255 (viewable, DRIVE's convention); others as class ids."""
        return (pred * 255).astype(np.uint8) if self.num_classes == 2 else pred.astype(np.uint8)

    def example_input(self):
        h, w = self.cfg.task.window
        if self.card is not None:  # a batch of the card's input shape: no data needed
            return torch.zeros(1, int(self.card["input"]["channels"]), int(h), int(w))
        image = self.build_datasets()["val"][0]["image"]
        return image.new_zeros(1, image.shape[0], int(h), int(w))

    # ---- test-time augmentation (tta=flips|d4|scales): each window's maps are mapped back, so
    # it composes with the sliding window and with task.tta_flips (which flips whole images)
    def tta_outputs(self):
        return {"logits": "mask_logits", "recon": "maps"}

    # ---- serving: the image padded to the window canvas, probabilities inside the graph
    # With task.window at least the image's (scaled) size, MONAI's sliding window is a single
    # window on the image padded by (diff // 2, diff - diff // 2) zeros: the server pads the same
    # way, and the graph applies the same flips, so served masks equal `podium predict`'s.
    def serving_module(self, model):
        return SegmentationProbabilities(model, self.cfg.task.tta_flips)

    def serving_spec(self) -> dict:
        from podium.tasks.segmentation.pipeline import _common_config

        c = _common_config(self.cfg.data)
        h, w = (int(s) for s in self.cfg.task.window)
        return {"task": "segmentation",
                "decode": {"channels": 3, "mode": "RGB"},
                "input": {"name": "image", "channels": int(c.channels), "height": h, "width": w,
                          "dtype": "float32", "layout": "NCHW"},
                "preprocess": [
                    {"op": "decode", "mode": "RGB"},
                    {"op": "resize", "scale": float(c.scale), "interpolation": "area (down) / bilinear (up)"},
                    {"op": "clahe", "mode": c.clahe, "clip_limit": float(c.clahe_clip), "tiles": int(c.clahe_tiles)},
                    {"op": "field_of_view", "mode": "estimate" if c.fov != "none" else "none",
                     "red_threshold": int(c.fov_threshold)},
                    {"op": "channels", "count": int(c.channels)},
                    {"op": "scale", "factor": 1 / 255},
                    {"op": "normalize", "mean": [float(m) for m in c.mean], "std": [float(s) for s in c.std]},
                    {"op": "pad", "size": [h, w], "value": 0.0, "where": "centred: (diff // 2, diff - diff // 2)"}],
                "output": {"name": "probabilities", "kind": "segmentation", "shape": ["batch", self.num_classes, h, w],
                           "classes": self.class_names, "threshold": float(self.cfg.task.threshold),
                           "mask": "crop the padding, threshold (binary) or argmax, background outside the "
                                   "field of view, resize to the original size with nearest neighbour"}}

    def serving_preprocess(self, image):
        from podium.tasks.segmentation.pipeline import prepare_image

        tensor, fov = prepare_image(image, self.cfg.data)
        h, w = tensor.shape[-2:]
        wh, ww = (int(s) for s in self.cfg.task.window)
        if h > wh or w > ww:
            raise UserError(f"image is {h} x {w} after preprocessing; the served model takes at most "
                            f"{wh} x {ww} (task.window): send a smaller image or export with a larger window.")
        top, left = (wh - h) // 2, (ww - w) // 2
        padded = torch.nn.functional.pad(tensor, (left, ww - w - left, top, wh - h - top))
        return padded, {"fov": fov.numpy().astype(bool), "box": (top, left, h, w),
                        "original": (int(image.shape[-2]), int(image.shape[-1]))}

    def serving_postprocess(self, output, meta):
        import base64
        import io

        from PIL import Image

        from podium.tasks.segmentation.preprocess import resize_mask

        top, left, h, w = meta["box"]
        probs = np.asarray(output, dtype=np.float32)[:, top:top + h, left:left + w]
        pred = self.probabilities_to_mask(probs, meta["fov"])
        full = resize_mask(pred, meta["original"])
        buffer = io.BytesIO()
        Image.fromarray(self.mask_png_values(full)).save(buffer, "PNG")
        fov = meta["fov"]
        counts = np.bincount(pred[fov].ravel().astype(np.int64), minlength=self.num_classes)
        names = self.class_names
        return {"mask_png_base64": base64.b64encode(buffer.getvalue()).decode(),
                "height": int(full.shape[0]), "width": int(full.shape[1]), "classes": names,
                "mask_values": "0 / 255" if self.num_classes == 2 else "class ids",
                "fractions": {n: round(float(c) / max(1, int(fov.sum())), 6) for n, c in zip(names, counts)}}


class SegmentationProbabilities(torch.nn.Module):
    """image batch -> (B, K, H, W) softmax probabilities averaged over the task's flips, as
    `podium eval` computes them for a single window."""

    def __init__(self, model, flips):
        super().__init__()
        self.model = model
        self.flip_dims = [inference.FLIP_DIMS[f] for f in flips]

    def forward(self, image):
        probs = torch.softmax(self.model(image)["logits"].float(), dim=1)
        for dims in self.flip_dims:
            probs = probs + torch.softmax(self.model(image.flip(dims))["logits"].float(), dim=1).flip(dims)
        return probs / (1 + len(self.flip_dims))
