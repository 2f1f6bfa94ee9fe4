"""The image-classification task: the Trainer's hooks for (image, label) data.

    podium train experiment=digits
    podium eval runs/<run> --split test_corrupted
    podium predict runs/<run> images/ --out predictions.csv

Evaluation records keep each sample's id, label and class probabilities, so the saved
`predictions/<split>.csv` files can be averaged by ensembles and cross-validation later.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from podium.engine import registry
from podium.engine.registry import register
from podium.errors import UserError
from podium.tasks.base import StepContext, Task
from podium.tasks.classification import data as cls_data
from podium.tasks.classification import metrics as cls_metrics


@dataclass
class ClassificationTaskConfig:
    name: str = "classification"
    misclassified_grid: int = 36  # images in the misclassified plot per split


@register("task", "classification", schema=ClassificationTaskConfig,
          help="Single-label image classification (macro-F1).")
class ClassificationTask(Task):
    monitor = "val/macro_f1"
    monitor_mode = "max"

    def __init__(self, cfg):
        super().__init__(cfg)
        self._datasets = None
        self.loss_fn = None

    # ---- building
    def build_datasets(self):
        """The registered datasets; every evaluation split yields (image, label, index) so each
        record knows its sample id, whatever order ranks gather them in."""
        if self._datasets is None:
            datasets = super().build_datasets()
            self._datasets = {name: ds if name == "train" else WithSampleIndex(ds) for name, ds in datasets.items()}
        return self._datasets

    @property
    def classes(self) -> list[str]:
        if self.card is not None:  # restored from run.json: no training data needed
            return list(self.card["classes"])
        return list(self.build_datasets()["train"].classes)

    def model_kwargs(self) -> dict:
        """What the model needs beyond cfg.model: from the run card, or from the training data."""
        if self.card is not None:
            return dict(self.card["model_kwargs"])
        train = self.build_datasets()["train"]
        return {"num_classes": len(train.classes), "in_chans": int(train.in_chans)}

    def build_model(self):
        return registry.build("model", self.cfg.model.name, self.cfg.model, **self.model_kwargs())

    def describe(self) -> dict:
        from podium.engine.runcard import card_header

        c = cls_data._as_config(self.cfg.data, cls_data.ImageDataConfig)
        mean, std = cls_data._check_common(c)
        classes = self.classes
        return {**card_header(self), "model_kwargs": self.model_kwargs(),
                "classes": classes, "num_classes": len(classes),
                "input": {"channels": int(c.channels), "size": [int(c.image_size)] * 2,
                          "resize": "square, bilinear, antialiased (no crop, no letterbox)",
                          "pixel_scale": 1 / 255, "mean": mean, "std": std, "layout": "NCHW"},
                "output": {"kind": "class_probs", "shape": ["batch", len(classes)],
                           "meaning": "softmax probabilities over `classes` (column i is classes[i]); "
                                      "the label is the argmax"}}

    def build_loss(self, datasets):
        train = datasets["train"]
        counts = np.bincount(np.asarray(train.targets, dtype=np.int64), minlength=len(train.classes)).tolist()
        self.loss_fn = registry.build("loss", self.cfg.loss.name, self.cfg.loss,
                                      num_classes=len(train.classes), class_counts=counts)

    # ---- training
    def training_step(self, model, batch, ctx: StepContext):
        images, labels = batch
        logits = model(images)
        return {"loss": self.loss_fn(logits, labels)}

    # ---- evaluation
    @torch.no_grad()
    def evaluation_step(self, model, batch, ctx: StepContext) -> list[dict]:
        images, labels, indices = batch if len(batch) == 3 else (*batch, None)
        probs = F.softmax(model(images).float(), dim=1).cpu().numpy()
        labels = labels.cpu().numpy()
        records = []
        for i in range(len(labels)):
            records.append({"label": int(labels[i]), "probs": probs[i].astype(np.float32),
                            "index": None if indices is None else int(indices[i]),
                            "image": images[i].float().cpu().numpy() if probs[i].argmax() != labels[i] else None})
        return records

    def collate_fn(self):
        return None

    def aggregate(self, records, split):
        if not records:
            raise UserError(f"the {split} split produced no samples.")
        y_true = np.array([r["label"] for r in records])
        probs = np.stack([r["probs"] for r in records])
        metrics = cls_metrics.classification_metrics(y_true, probs, self.classes)
        datasets = self.build_datasets()
        if split == "val" and datasets["train"].skipped:  # data.on_error=skip: say what was dropped
            metrics["train_skipped_images"] = float(len(datasets["train"].skipped))
        if datasets.get(split) is not None and getattr(datasets[split], "skipped", None):
            metrics["skipped_images"] = float(len(datasets[split].skipped))
        return metrics

    def score_predictions(self, predictions, split):
        """Metrics of a saved class_probs set (this run's, an ensemble's) from its own arrays."""
        if predictions.kind != "class_probs" or list(predictions.manifest.get("classes") or []) != self.classes:
            raise UserError(f"{predictions.folder}: expected class_probs over classes {self.classes}, got "
                            f"{predictions.kind} over {predictions.manifest.get('classes')}.")
        return cls_metrics.classification_metrics(np.asarray(predictions.arrays["labels"]),
                                                  np.asarray(predictions.arrays["probs"]), self.classes)

    # ---- cross-validation (podium.engine.folds): stratified on the label; a CSV's other
    # columns (patient, site...) are grouping columns for cv.group_by
    def cv_keys(self, dataset):
        base = getattr(dataset, "dataset", dataset)  # WithSampleIndex wraps the evaluation splits
        extra = self._csv_columns() if self.cfg.data.name == "csv" else {}
        return [{**extra.get(base.sample_id(i), {}), "id": base.sample_id(i), "label": int(base.targets[i])}
                for i in range(len(base))]

    def _csv_columns(self) -> dict[str, dict]:
        """{path cell (the sample id): the row's other columns} of the train and val CSVs."""
        c = self.cfg.data
        out: dict[str, dict] = {}
        for table in (c.train_csv, c.val_csv):
            with Path(table).expanduser().open(newline="", encoding="utf-8-sig") as f:
                for row in csv.DictReader(f):
                    key = (row.get(c.path_column) or "").strip()
                    out[key] = {k: v for k, v in row.items() if k not in (c.path_column, c.label_column) and k}
        return out

    def cv_subset(self, parts, picks, train):
        import copy

        from podium.engine.folds import PickedSamples

        transform = cls_data.build_transform(self.cfg.data, train=train)
        views = []
        for part in parts:
            view = copy.copy(getattr(part, "dataset", part))  # shares the images / file list
            view.transform = transform
            views.append(view)
        subset = PickedSamples(views, picks)
        subset.skipped = [s for v in views for s in v.skipped] if train else []
        return subset if train else WithSampleIndex(subset)

    # ---- outputs
    def save_predictions(self, records, split, out_dir: Path):
        from podium.engine.predictions import write_predictions

        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{split}.csv"
        classes = self.classes
        if all(r.get("index") is not None for r in records):  # dataset order, whatever the ranks
            records = sorted(records, key=lambda r: r["index"])
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["index", "label", "pred", *[f"prob_{c}" for c in classes]])
            for i, r in enumerate(records):
                writer.writerow([i if r.get("index") is None else r["index"], classes[r["label"]],
                                 classes[int(r["probs"].argmax())], *[f"{p:.6f}" for p in r["probs"]]])
        paths = [path]
        dataset = self.build_datasets().get(split)
        if records and dataset is not None and all(r.get("index") is not None for r in records):
            ids = [dataset.sample_id(r["index"]) for r in records]
            paths.append(write_predictions(
                out_dir / split, "class_probs", ids, {"probs": np.stack([r["probs"] for r in records])},
                truth={"labels": np.array([r["label"] for r in records], dtype=np.int64)},
                split=split, task="classification", classes=classes,
                meaning="probs[row, i]: softmax probability of classes[i] for the sample index.csv names; "
                        "labels: the true class index"))
        return paths

    def visualize(self, records, split, out_dir: Path):
        y_true = np.array([r["label"] for r in records])
        y_pred = np.array([int(r["probs"].argmax()) for r in records])
        paths = [cls_metrics.plot_confusion_matrix(y_true, y_pred, self.classes, out_dir / f"confusion_{split}.png")]
        wrong = [r for r in records if r["image"] is not None][: self.cfg.task.misclassified_grid]
        images = np.stack([r["image"] for r in wrong]) if wrong else np.zeros((0, 1, 8, 8), np.float32)
        paths.append(cls_metrics.plot_misclassified(
            images, np.array([r["label"] for r in wrong], dtype=int),
            np.array([int(r["probs"].argmax()) for r in wrong], dtype=int), self.classes,
            out_dir / f"misclassified_{split}.png", max_images=self.cfg.task.misclassified_grid))
        return paths

    def predict(self, model, inputs, out_file: Path, ctx: StepContext):
        from rich.progress import track

        classes = self.classes
        out_file = Path(out_file)
        out_file.parent.mkdir(parents=True, exist_ok=True)
        batch_size = self.cfg.trainer.eval_batch_size or self.cfg.trainer.batch_size
        rows = []
        for start in track(range(0, len(inputs), batch_size), description="predicting",
                           transient=True):
            chunk = inputs[start:start + batch_size]
            images = torch.stack([cls_data.read_image_for_predict(p, self.cfg.data) for p in chunk])
            with torch.no_grad():
                probs = F.softmax(model(images.to(ctx.device)).float(), dim=1).cpu().numpy()
            for path, p in zip(chunk, probs):
                rows.append([str(path), classes[int(p.argmax())], *[f"{x:.6f}" for x in p]])
        with out_file.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["id", "label", *[f"prob_{c}" for c in classes]])
            writer.writerows(rows)
        return out_file

    def example_input(self):
        if self.card is not None:  # a batch of the card's input shape: no data needed
            size = self.card["input"]["size"]
            return torch.zeros(1, int(self.card["input"]["channels"]), int(size[0]), int(size[1]))
        image = self.build_datasets()["val"][0][0]
        return image.unsqueeze(0)

    def sample_image(self, split, sample_id):
        """The stored pixels of a sample (in-memory sets, image files; never the training
        augmentation), or for other sets (the corrupted test split) the evaluated image with its
        normalisation undone, for `podium diff` / `podium audit` grids."""
        found = self.locate_sample(
            split, sample_id, lambda ds: [ds.sample_id(i) for i in range(len(ds))] if hasattr(ds, "sample_id") else None)
        if found is None:
            return None
        ds, index = found
        base = getattr(ds, "dataset", ds)  # WithSampleIndex wraps the evaluation splits
        if isinstance(base, cls_data.TensorImageDataset):
            return base.images[index].permute(1, 2, 0).numpy()
        if isinstance(base, cls_data.ImageFileDataset):
            return cls_data.load_image(base.files[index], base.in_chans).permute(1, 2, 0).numpy()
        mean, std = cls_data._check_common(cls_data._as_config(self.cfg.data, cls_data.ImageDataConfig))
        image = base[index][0].float() * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
        return image.clamp(0, 1).permute(1, 2, 0).numpy()

    # ---- test-time augmentation: a class does not move with the image (D4, flips, scales)
    def tta_outputs(self):
        return "class_logits"

    # ---- serving: the eval transform of the data config, softmax inside the exported graph
    def serving_module(self, model):
        return SoftmaxOutput(model)

    def serving_spec(self) -> dict:
        c = cls_data._as_config(self.cfg.data, cls_data.ImageDataConfig)
        mean, std = cls_data._check_common(c)
        return {"task": "classification",
                "input": {"name": "image", "channels": c.channels, "height": c.image_size,
                          "width": c.image_size, "dtype": "float32", "layout": "NCHW"},
                "preprocess": [
                    {"op": "decode", "mode": "L" if c.channels == 1 else "RGB", "alpha": "composite on white"},
                    {"op": "resize", "size": [c.image_size, c.image_size], "interpolation": "bilinear",
                     "antialias": True},
                    {"op": "scale", "factor": 1 / 255},
                    {"op": "normalize", "mean": list(mean), "std": list(std)}],
                "output": {"name": "probabilities", "kind": "class_probabilities", "classes": self.classes}}

    def serving_preprocess(self, image):
        channels = int(self.cfg.data.channels)
        if image.ndim != 3 or image.shape[0] != channels:
            raise UserError(f"image has shape {tuple(image.shape)}; the model expects {channels} channel(s) "
                            f"as (C, H, W) with C = {channels}.")
        transform = cls_data.build_transform(self.cfg.data, train=False)
        from torchvision import tv_tensors

        return transform(tv_tensors.Image(image)).as_subclass(torch.Tensor), {}

    def serving_postprocess(self, output, meta):
        probs = [float(p) for p in output]
        classes = self.classes
        return {"label": classes[int(np.argmax(probs))], "probabilities": dict(zip(classes, probs))}


class WithSampleIndex(torch.utils.data.Dataset):
    """An evaluation split whose items are (image, label, index); every other attribute
    (classes, targets, skipped, sample_id...) is the wrapped dataset's."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        image, label = self.dataset[index]
        return image, label, index

    def __getattr__(self, name):
        if name == "dataset":  # not set yet (unpickling in a loader worker): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)


class SoftmaxOutput(torch.nn.Module):
    """logits -> class probabilities, so an exported model answers what `podium predict` writes."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, image):
        return F.softmax(self.model(image).float(), dim=1)
