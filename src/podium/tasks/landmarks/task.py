"""The landmark-detection task: heatmap regression (or direct coordinates) on letterboxed
images, every metric in millimetres of the original image.

    podium train experiment=isbi2015_quick
    podium eval runs/<run> --split test1
    podium predict runs/<run> ../shared/data/isbi2015_ceph/images/151.jpg --out points.csv

Predictions are decoded with a local soft-argmax (sub-pixel), mapped from heatmap to input
pixels (output stride) and from input to original pixels (the recorded letterbox), and only
then compared with the ground truth — the step one public evaluator got wrong by assuming
0.078 mm pixels. Optional test-time augmentation shifts the input by whole pixels and maps
each prediction back before averaging; horizontal flips are off (landmarks are not symmetric).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from podium.engine import registry
from podium.engine.registry import register
from podium.errors import UserError
from podium.tasks.base import StepContext, Task
from podium.tasks.landmarks import heatmaps as hm
from podium.tasks.landmarks import metrics as lm_metrics
from podium.tasks.landmarks.geometry import clip_to_original, points_to_original
from podium.tasks.landmarks.refine import CoarseToFine


@dataclass
class LandmarkTaskConfig:
    name: str = "landmarks"
    sigma: float = 2.0  # heatmap Gaussian sigma in heatmap pixels (when the model's sigma is fixed)
    decode: str = "local_soft_argmax"  # local_soft_argmax | argmax
    decode_window: int = 11  # ~6 sigma + 1: a smaller window biases the estimate toward the argmax pixel
    tta_shifts: list[int] = field(default_factory=list)  # e.g. [-2, 2]: shift TTA in input pixels
    tta_scales: list[float] = field(default_factory=list)  # e.g. [0.9, 1.1]: scale TTA
    overlays: int = 4  # overlay plots per split
    refine_loss_weight: float = 1.0  # coarse_to_fine models: weight of the patch refiner's loss


@register("task", "landmarks", schema=LandmarkTaskConfig,
          help="Anatomical landmark detection (MRE / SDR in mm).")
class LandmarkTask(Task):
    monitor = "val/mre_mm"
    monitor_mode = "min"

    def __init__(self, cfg):
        super().__init__(cfg)
        self._datasets = None
        self.loss_fn = None
        if cfg.task.decode not in ("local_soft_argmax", "argmax"):
            raise UserError(f"task.decode={cfg.task.decode!r}: expected local_soft_argmax or argmax.")

    # ---- building
    @property
    def train_set(self):
        return self.build_datasets()["train"]

    @property
    def landmark_names(self) -> list[str]:
        if self.card is not None:  # restored from run.json: no training data needed
            return list(self.card["landmarks"])
        return list(self.train_set.landmark_names)

    def model_kwargs(self) -> dict:
        """What the model needs beyond cfg.model: from the run card, or from the training data."""
        if self.card is not None:
            return dict(self.card["model_kwargs"])
        return {"num_landmarks": int(self.train_set.num_landmarks), "in_chans": int(self.train_set.in_chans)}

    def build_model(self):
        return registry.build("model", self.cfg.model.name, self.cfg.model, **self.model_kwargs())

    def describe(self) -> dict:
        from podium.common.images import channel_stats
        from podium.engine.runcard import card_header
        from podium.tasks.landmarks.data import _common_config

        c, t = _common_config(self.cfg.data), self.cfg.task
        names = self.landmark_names
        h, w = (int(x) for x in c.image_size)
        return {**card_header(self), "model_kwargs": self.model_kwargs(),
                "landmarks": names, "num_landmarks": len(names),
                "input": {"channels": int(c.channels), "size": [h, w],
                          "letterbox": {"size": [h, w], "align": "top-left", "pad": 0,
                                        "scale": "min(height / orig_h, width / orig_w)",
                                        "interpolation": "bilinear, antialiased"},
                          "pixel_scale": 1 / 255, "mean": channel_stats(c.mean, c.channels, "mean"),
                          "std": channel_stats(c.std, c.channels, "std"), "layout": "NCHW"},
                "output": {"kind": "points", "shape": ["batch", len(names), 2],
                           "spacing_mm": float(self.cfg.data.get("spacing", 1.0)),
                           "decode": str(t.decode), "tta_shifts": [int(x) for x in t.tta_shifts],
                           "tta_scales": [float(x) for x in t.tta_scales],
                           "meaning": "(x, y) of each landmark in `landmarks` order, in input pixels with pixel "
                                      "centres at integers; original pixels = (p + 0.5) / scale - 0.5 (undo the "
                                      "letterbox), millimetres = original pixels x spacing_mm"}}

    def build_loss(self, datasets):
        self.loss_fn = registry.build("loss", self.cfg.loss.name, self.cfg.loss,
                                      num_landmarks=datasets["train"].num_landmarks)
        # coarse-to-fine: the same loss on single-landmark patches
        self.patch_loss_fn = registry.build("loss", self.cfg.loss.name, self.cfg.loss, num_landmarks=1)

    # ---- shared forward: input-pixel predictions from any model
    def _stride(self, model) -> int:
        return int(getattr(getattr(model, "module", model), "output_stride", 1))

    def _points_once(self, model, images: torch.Tensor) -> torch.Tensor:
        out = model(images)
        if "points" in out:
            return out["points"].float()
        logits = out["heatmaps"].float()
        if self.cfg.task.decode == "argmax":
            points = hm.decode_argmax(logits)
        else:
            # heatmap_mse regresses the heat itself (not logits): weight by heat, not softmax
            as_logits = getattr(self.loss_fn or self._inference_loss(), "decodes_logits", True)
            points = hm.decode_local_soft_argmax(logits, window=self.cfg.task.decode_window, logits=as_logits)
        return hm.heatmap_to_points(points, self._stride(model))

    def _inference_loss(self):
        """The run's loss, built from the card when inference skipped `build_loss` (no data):
        only it knows whether the heatmaps are logits or heat."""
        if self.card is None:
            return None
        self.loss_fn = registry.build("loss", self.cfg.loss.name, self.cfg.loss,
                                      num_landmarks=int(self.card["num_landmarks"]))
        return self.loss_fn

    def predict_points(self, model, images: torch.Tensor) -> torch.Tensor:
        """(B, K, 2) points in input pixels, averaged over the configured shift and scale TTA;
        each prediction is mapped back to the untransformed input before averaging."""
        preds = [self._points_once(model, images)]
        for s in self.cfg.task.tta_shifts:
            if s:
                shifted = torch.roll(images, shifts=(s, s), dims=(2, 3))
                preds.append(self._points_once(model, shifted) - s)
        for scale in self.cfg.task.tta_scales:
            if scale != 1.0:
                resized = F.interpolate(images, scale_factor=scale, mode="bilinear", align_corners=False,
                                        antialias=scale < 1, recompute_scale_factor=False)
                # pixel-centre convention: x_scaled = (x + 0.5) * scale - 0.5
                preds.append((self._points_once(model, resized) + 0.5) / scale - 0.5)
        return torch.stack(preds).mean(0)

    # ---- training
    def training_step(self, model, batch, ctx: StepContext):
        two_stage = isinstance(getattr(model, "module", model), CoarseToFine)
        out = model(batch["image"], batch["points"], batch["visible"]) if two_stage else model(batch["image"])
        if "points" in out:
            return {"loss": self.loss_fn(out["points"], batch["points"], batch["visible"])}
        sigma = out["sigma"] if "sigma" in out else self.cfg.task.sigma
        stride = out.get("heatmap_stride", self._stride(model))
        target = hm.points_to_heatmap(batch["points"], stride)
        loss = self.loss_fn(out["heatmaps"], target, batch["visible"], sigma)
        logs = {"loss": loss}
        if "patch_heatmaps" in out:  # coarse-to-fine: the refiner's loss on its patches
            refine = self.patch_loss_fn(out["patch_heatmaps"], out["patch_points"], out["patch_visible"],
                                        self.cfg.task.sigma)
            logs = {"loss": loss + self.cfg.task.refine_loss_weight * refine,
                    "coarse_loss": loss.detach(), "refine_loss": refine.detach()}
        if "mid_patch_heatmaps" in out:  # the optional middle stage: the same loss at its scale
            mid = self.patch_loss_fn(out["mid_patch_heatmaps"], out["mid_patch_points"], out["mid_patch_visible"],
                                     self.cfg.task.sigma)
            logs["loss"] = logs["loss"] + self.cfg.task.refine_loss_weight * mid
            logs["mid_refine_loss"] = mid.detach()
        if torch.is_tensor(sigma):
            logs["sigma_mean"] = sigma.detach().mean()
        return logs

    # ---- evaluation
    @torch.no_grad()
    def evaluation_step(self, model, batch, ctx: StepContext) -> list[dict]:
        pred = self.predict_points(model, batch["image"])
        letterbox = batch["letterbox"].to(pred.device)
        pred_orig = clip_to_original(points_to_original(pred.double(), letterbox), letterbox).cpu().numpy()
        target_orig = points_to_original(batch["points"].double(), letterbox).cpu().numpy()
        visible = batch["visible"].cpu().numpy()
        spacing = batch["spacing"].cpu().numpy()
        index = batch["index"].cpu().numpy()
        return [{"index": int(index[i]), "pred": pred_orig[i], "target": np.where(visible[i][:, None], target_orig[i], np.nan),
                 "spacing": spacing[i]} for i in range(len(index))]

    @staticmethod
    def _stacked(records) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(pred, target, spacing) over the records, as the metric functions take them."""
        return tuple(np.stack([r[key] for r in records]) for key in ("pred", "target", "spacing"))

    def _errors(self, records) -> np.ndarray:
        return lm_metrics.radial_errors_mm(*self._stacked(records))

    def aggregate(self, records, split):
        if not records:
            raise UserError(f"the {split} split produced no images.")
        records = sorted(records, key=lambda r: r["index"])
        return lm_metrics.landmark_metrics(self._errors(records), names=self.landmark_names)

    # ---- outputs
    def _split_set(self, split):
        return self.build_datasets()[split]

    def save_predictions(self, records, split, out_dir: Path):
        out_dir.mkdir(parents=True, exist_ok=True)
        records = sorted(records, key=lambda r: r["index"])
        dataset = self._split_set(split)
        names = self.landmark_names
        path = out_dir / f"{split}.csv"
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["id", *[f"{n}_{a}" for n in names for a in ("x", "y")],
                             *[f"{n}_err_mm" for n in names]])
            errors = self._errors(records)
            for r, err in zip(records, errors):
                writer.writerow([dataset.records[r["index"]].id, *[f"{v:.2f}" for v in r["pred"].reshape(-1)],
                                 *[f"{e:.3f}" for e in err]])
        # per landmark: MRE, SD, SDRs and the mean signed offset (systematic error vs scatter)
        rows = lm_metrics.per_landmark_table(errors, names, offsets=lm_metrics.mean_offsets_mm(*self._stacked(records)))
        table = out_dir / f"per_landmark_{split}.csv"
        with table.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()} for row in rows)
        from podium.engine.predictions import write_predictions

        pred, target, spacing = self._stacked(records)
        manifest = write_predictions(
            out_dir / split, "points", [dataset.records[r["index"]].id for r in records], {"points": pred},
            truth={"target": target, "spacing": spacing}, split=split, task="landmarks", landmarks=names,
            meaning="points[row, k]: (x, y) of landmarks[k] in original-image pixels (pixel centres at integers); "
                    "target: the ground truth, NaN where not annotated; spacing: (x, y) mm per pixel")
        return [path, table, manifest]

    def score_predictions(self, predictions, split):
        """MRE / SDR of a saved points set (this run's, an ensemble's) from its own arrays."""
        if predictions.kind != "points" or list(predictions.manifest.get("landmarks") or []) != self.landmark_names:
            raise UserError(f"{predictions.folder}: expected points of landmarks {self.landmark_names}, got "
                            f"{predictions.kind} of {predictions.manifest.get('landmarks')}.")
        arrays = [np.asarray(predictions.arrays[k]) for k in ("points", "target", "spacing")]
        return lm_metrics.landmark_metrics(lm_metrics.radial_errors_mm(*arrays), names=self.landmark_names)

    # ---- cross-validation (podium.engine.folds): no label to stratify on; plain k-fold by image
    def cv_keys(self, dataset):
        return [{"id": r.id} for r in dataset.records]

    def cv_subset(self, parts, picks, train):
        from podium.common.structured import as_config
        from podium.tasks.landmarks.augment import LandmarkAugmentConfig
        from podium.tasks.landmarks.data import LandmarkDataset, _common_config

        c, first = _common_config(self.cfg.data), parts[0]
        augment = as_config(self.cfg.data.augment, LandmarkAugmentConfig, "data.augment")
        return LandmarkDataset([parts[p].records[i] for p, i in picks], first.landmark_names, first.image_size,
                               first.in_chans, first.cache, augment=augment, train=train, mean=c.mean, std=c.std)

    def sample_image(self, split, sample_id):
        """The sample's picture for `podium diff` grids: the original image file, uint8 (H, W)
        or (H, W, 3), because saved points are in original-image pixels (so a diff can draw them
        on it). An id not in `split` (out-of-fold sets pool train and val) is looked up in the
        other splits; the asked split comes first (the generated splits reuse file names)."""
        from podium.common.images import load_image

        found = self.locate_sample(split, sample_id,
                                   lambda ds: [r.id for r in ds.records] if hasattr(ds, "records") else None)
        if found is None:
            return None
        dataset, index = found
        image = load_image(dataset.records[index].image_path, dataset.in_chans).numpy()
        return image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)

    def visualize(self, records, split, out_dir: Path):
        records = sorted(records, key=lambda r: r["index"])
        errors = self._errors(records)
        names = self.landmark_names
        paths = [lm_metrics.plot_cumulative_error(errors, out_dir / f"cumulative_error_{split}.png", label=split),
                 lm_metrics.plot_per_landmark(errors, names, out_dir / f"per_landmark_{split}.png")]
        dataset = self._split_set(split)
        from podium.common.images import load_image

        for r in records[: self.cfg.task.overlays]:
            rec = dataset.records[r["index"]]
            image = load_image(rec.image_path, 1)[0].numpy()
            paths.append(lm_metrics.plot_overlay(image, r["pred"], r["target"],
                                                 out_dir / f"overlay_{split}_{Path(rec.id).stem}.png",
                                                 names=names, spacing=r["spacing"]))
        return paths

    def predict(self, model, inputs, out_file: Path, ctx: StepContext):
        from rich.progress import track

        from podium.common.images import load_image
        from podium.tasks.landmarks.data import prepare_image

        names = self.landmark_names
        spacing = float(self.cfg.data.spacing)
        out_file = Path(out_file)
        out_file.parent.mkdir(parents=True, exist_ok=True)
        overlay_dir = out_file.parent / f"{out_file.stem}_overlays"
        rows = []
        for path in track(inputs, description="predicting", transient=True):
            image, letterbox = prepare_image(path, self.cfg.data)
            with torch.no_grad():
                pred = self.predict_points(model, image.unsqueeze(0).to(ctx.device))
            points = letterbox.clip(points_to_original(pred.double().cpu(), letterbox.as_tensor().unsqueeze(0))[0].numpy())
            rows.append({"id": str(path), "points_px": points.round(2).tolist(),
                         "points_mm": (points * spacing).round(3).tolist(), "spacing_mm": spacing})
            original = load_image(path, 1)[0].numpy()
            lm_metrics.plot_overlay(original, points, None, overlay_dir / f"{Path(path).stem}.png", names=names)
        if out_file.suffix == ".json":
            out_file.write_text(json.dumps({"landmarks": names, "predictions": rows}, indent=2))
        else:
            with out_file.open("w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["id", *[f"{n}_{a}_px" for n in names for a in ("x", "y")],
                                 *[f"{n}_{a}_mm" for n in names for a in ("x", "y")]])
                for r in rows:
                    writer.writerow([r["id"], *np.ravel(r["points_px"]), *np.ravel(r["points_mm"])])
        return out_file

    def example_input(self):
        if self.card is not None:  # a batch of the card's input shape: no data needed
            h, w = self.card["input"]["size"]
            return torch.zeros(1, int(self.card["input"]["channels"]), int(h), int(w))
        return self.build_datasets()["val"][0]["image"].unsqueeze(0)

    # ---- test-time augmentation (tta=flips|d4|scales): heatmaps and points mapped back to the
    # input frame before averaging; it composes with task.tta_shifts / tta_scales. Landmark
    # names are never swapped: a flipped cephalogram is not a mirror-symmetric anatomy.
    def tta_outputs(self):
        return {"heatmaps": "maps", "points": "points", "coarse_points": "points", "mid_points": "points",
                "sigma": "invariant"}

    # ---- serving: points decoded inside the graph, mapped back through the letterbox after
    def serving_module(self, model):
        return LandmarkPointsOutput(self, model)

    def serving_spec(self) -> dict:
        c = self.cfg.data
        channels = int(c.channels)
        mean = list(c.mean) * (channels if len(c.mean) == 1 else 1)
        std = list(c.std) * (channels if len(c.std) == 1 else 1)
        return {"task": "landmarks",
                "input": {"name": "image", "channels": channels, "height": int(c.image_size[0]),
                          "width": int(c.image_size[1]), "dtype": "float32", "layout": "NCHW"},
                "preprocess": [
                    {"op": "decode", "mode": "L" if channels == 1 else "RGB"},
                    {"op": "letterbox", "size": [int(c.image_size[0]), int(c.image_size[1])],
                     "align": "top-left", "pad": 0, "interpolation": "bilinear, antialiased",
                     "scale": "min(height / orig_h, width / orig_w)"},
                    {"op": "scale", "factor": 1 / 255},
                    {"op": "normalize", "mean": [float(m) for m in mean], "std": [float(s) for s in std]}],
                "output": {"name": "points", "kind": "landmarks", "shape": ["batch", len(self.landmark_names), 2],
                           "units": "input pixels (x, y), pixel centres at integers",
                           "to_original": "(p - pad + 0.5) / scale - 0.5",
                           "names": self.landmark_names,
                           "spacing_mm": float(getattr(c, "spacing", 1.0))}}

    def serving_preprocess(self, image):
        from podium.tasks.landmarks.data import prepare_decoded

        tensor, letterbox = prepare_decoded(image, self.cfg.data)
        return tensor, {"letterbox": letterbox}

    def serving_postprocess(self, output, meta):
        points = meta["letterbox"].clip(meta["letterbox"].inverse(np.asarray(output, dtype=np.float64)))
        spacing = float(getattr(self.cfg.data, "spacing", 1.0))
        return {"landmarks": [{"name": n, "x_px": round(float(x), 2), "y_px": round(float(y), 2),
                               "x_mm": round(float(x) * spacing, 3), "y_mm": round(float(y) * spacing, 3)}
                              for n, (x, y) in zip(self.landmark_names, points)],
                "spacing_mm": spacing}


class LandmarkPointsOutput(torch.nn.Module):
    """image batch -> (B, K, 2) points in input pixels, decoded as `podium eval` decodes them
    (without test-time augmentation), so the exported graph answers in coordinates."""

    def __init__(self, task: "LandmarkTask", model):
        super().__init__()
        self.task, self.model = task, model

    def forward(self, image):
        return self.task._points_once(self.model, image)
