"""The reconstruction task: undersampled multi-coil k-space in, magnitude image out, scored
exactly as fastMRI's evaluate.py (and, optionally, the SNU leaderboard) does.

    podium train experiment=varnet_demo
    podium eval runs/<run> --split test_real
    podium predict runs/<run> scan.h5 --out recon.h5

Metrics are computed per volume and acceleration — SSIM per slice with the volume's maximum as
data range, averaged over the volume's slices; PSNR and NMSE over the whole volume, in the
data's own units (each slice is scaled by its own zero-filled maximum for the model, so errors
are scaled back before they are summed) with the maximum of the whole target volume as PSNR
data range — then averaged over volumes, overall and per (acceleration x anatomy) group
(`ssim_acc4_brain`). The SNU leaderboard SSIM is averaged over slices, not volumes, as its
scorer does; with the leaderboard's acc4 and acc8 as separate test splits, the second one also
reports their combined score (`ssim_snu_leaderboard_combined`).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from podium.engine import registry
from podium.engine.registry import register
from podium.errors import UserError
from podium.tasks.base import StepContext, Task
from podium.tasks.reconstruction import metrics as rm
from podium.tasks.reconstruction import plots
from podium.tasks.reconstruction.adapt import AdaptConfig, check_adapt_config
from podium.tasks.reconstruction.data import ANATOMIES
from podium.tasks.reconstruction.fft import flip_readout
from podium.tasks.reconstruction.outputs import SliceSpool, write_volumes


@dataclass
class ReconTaskConfig:
    name: str = "reconstruction"
    snu_metrics: bool = False  # also report the SNU leaderboard SSIM (foreground-masked)
    keep_images: bool = True  # write predictions/*.h5 and plots (slices are spooled to disk, see outputs.py)
    plots: int = 2  # best and worst slices plotted per split
    # evaluation, predict and serving: average with the reconstruction of the readout-mirrored
    # scan (same sampled columns; 2x the inference time)
    tta_readout_flip: bool = False
    # `podium predict` only: zero-shot self-supervised fine-tuning on each scan (adapt.py)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)


def crop_to(image: torch.Tensor, size) -> torch.Tensor:
    h, w = image.shape[-2:]
    th, tw = int(size[0]), int(size[1])
    top, left = (h - th) // 2, (w - tw) // 2
    return image[..., top:top + th, left:left + tw]


def readout_flip_average(model, kspace, mask, low, flip: bool) -> torch.Tensor:
    """model(kspace), or with `flip` its mean with the un-mirrored reconstruction of the
    readout-mirrored scan: test-time augmentation that keeps the sampling pattern exactly (a
    phase-direction flip would move the sampled columns). Real slice: +0.002 to +0.006 SSIM."""
    out = model(kspace, mask, low)
    if flip:
        out = (out + model(flip_readout(kspace, mask), mask, low).flip(-2)) / 2
    return out


def group_name(acceleration: int, anatomy: int) -> str:
    return f"acc{acceleration}_{ANATOMIES[anatomy]}"


@register("task", "reconstruction", schema=ReconTaskConfig,
          help="Accelerated multi-coil MRI reconstruction (fastMRI / SNU SSIM).")
class ReconstructionTask(Task):
    monitor = "val/ssim"
    monitor_mode = "max"

    def __init__(self, cfg):
        super().__init__(cfg)
        self._datasets = None
        self.loss_fn = None
        self.adapt_cfg = cfg.task.adapt if "adapt" in cfg.task else AdaptConfig()
        check_adapt_config(self.adapt_cfg)
        run = cfg.get("run") or {}
        self.spool = SliceSpool(run.get("dir"))
        self._written: dict[str, dict] = {}  # split -> {(volume, acc): (h5 path, {slice: position})}
        self._test_snu_scores: dict[str, dict[int, tuple[float, int]]] = {}  # split -> acc -> (sum, n)
        self.masks_augmented = 0  # training masks drawn from the augmentation pool (logged)

    # ---- building
    def dataset_context(self):
        # mask-augmentation schedules ramp over the run's epochs
        # and file masks get the calibration width the model's centre detection would find
        return {"max_epochs": int(self.cfg.trainer.max_epochs) if "trainer" in self.cfg else 1,
                "centre_detection": str((self.cfg.get("model") or {}).get("centre_detection", "contiguous"))}

    def build_model(self):
        return registry.build("model", self.cfg.model.name, self.cfg.model)

    def describe(self) -> dict:
        """The model needs nothing from the data (k-space in, image out at the input's size);
        `example` is one validation slice's shape and sampling, which export traces (any
        (coils, H, W) is served)."""
        from podium.engine.runcard import card_header

        sample = self.build_datasets()["val"][0]
        coils, height, width = (int(n) for n in sample["masked_kspace"].shape[:3])
        columns = sample["mask"].reshape(-1)
        example = {"coils": coils, "height": height, "width": width,
                   "acceleration": max(1, int(round(width / max(1.0, float(columns.sum()))))),
                   "low_frequencies": int(sample["num_low_frequencies"])}
        return {**card_header(self), "model_kwargs": {},
                "input": {"kind": "kspace", "channels": 1, "size": None, "example": example,
                          "layout": "(batch, coils, H, W, 2): real and imaginary parts of undersampled multi-coil k-space",
                          "mask": "the file's sampling mask, else the columns that hold data",
                          "intensity_scale": "1 / max of the zero-filled root-sum-of-squares image",
                          "tta_readout_flip": bool(self.cfg.task.get("tta_readout_flip", False))},
                "output": {"kind": "image", "shape": ["batch", "H", "W"],
                           "meaning": "root-sum-of-squares magnitude image at the k-space's full size, in the "
                                      "input's units (the network's output times the scale)"}}

    def build_loss(self, datasets):
        self.loss_fn = registry.build("loss", self.cfg.loss.name, self.cfg.loss)

    # ---- forward
    def reconstruct(self, model, batch) -> torch.Tensor:
        """(B, h, w) magnitude images at the target's size (the crop is the model's last step);
        in evaluation with `task.tta_readout_flip`, the mean with the readout-mirrored scan's."""
        flip = self.cfg.task.get("tta_readout_flip", False) and not model.training
        out = readout_flip_average(model, batch["masked_kspace"], batch["mask"], batch["num_low_frequencies"], flip)
        return crop_to(out, batch["target"].shape[-2:])

    def training_step(self, model, batch, ctx: StepContext):
        pred = self.reconstruct(model, batch)
        loss = self.loss_fn(pred.float(), batch["target"], batch["max_value"], batch["fg_mask"])
        if "mask_augmented" in batch:
            self.masks_augmented += int(batch["mask_augmented"].sum())
        return {"loss": loss, "masks_augmented": self.masks_augmented}

    # ---- evaluation
    @torch.no_grad()
    def evaluation_step(self, model, batch, ctx: StepContext) -> list[dict]:
        """Scalar records only: errors in the data's own units (x scale^2), the target slice's
        maximum, SSIM (scale-free); with `keep_images` the reconstruction goes to the spool."""
        pred = self.reconstruct(model, batch).float().cpu().numpy().astype(np.float64)
        target = batch["target"].cpu().numpy().astype(np.float64)
        fg = batch["fg_mask"].cpu().numpy()
        rank = int(getattr(ctx.fabric, "global_rank", 0)) if ctx is not None else 0
        records = []
        for i in range(len(pred)):
            maxval, scale = float(batch["max_value"][i]), float(batch["scale"][i])
            rec = {"volume": int(batch["volume"][i]), "slice": int(batch["slice"][i]),
                   "acceleration": int(batch["acceleration"][i]), "anatomy": int(batch["anatomy"][i]),
                   "index": int(batch["index"][i]), "max_value": maxval * scale, "scale": scale,
                   "ssim": rm.ssim_fastmri(target[i][None], pred[i][None], maxval=maxval),
                   "sse": float(((target[i] - pred[i]) ** 2).sum()) * scale**2,
                   "energy": float((target[i] ** 2).sum()) * scale**2,
                   "target_max": float(target[i].max()) * scale, "pixels": int(target[i].size)}
            if self.cfg.task.snu_metrics:
                rec["ssim_snu"] = rm.ssim_fastmri((target[i] * fg[i])[None], (pred[i] * fg[i])[None], maxval=maxval)
            if self.cfg.task.keep_images:
                rec["image_file"] = self.spool.write(pred[i] * scale, rank, rec["volume"], rec["acceleration"],
                                                     rec["slice"])
            records.append(rec)
        return records

    def aggregate(self, records, split):
        self.spool.end_pass()
        if not records:
            raise UserError(f"the {split} split produced no slices.")
        per_volume = defaultdict(list)
        for r in records:
            per_volume[(r["volume"], r["acceleration"], r["anatomy"])].append(r)
        rows = []
        for (vol, acc, anat), recs in sorted(per_volume.items()):
            # fastMRI evaluate.py on the whole volume: NMSE = ||gt - pred||^2 / ||gt||^2,
            # PSNR with data_range = gt.max() of the volume
            sse, energy = sum(r["sse"] for r in recs), sum(r["energy"] for r in recs)
            pixels, maxval = sum(r["pixels"] for r in recs), max(r["target_max"] for r in recs)
            rows.append({"group": group_name(acc, anat), "ssim": float(np.mean([r["ssim"] for r in recs])),
                         "nmse": sse / max(energy, 1e-30),
                         "psnr": float(10 * np.log10(maxval**2 / max(sse / pixels, 1e-30)))})
        keys = [k for k in rows[0] if k != "group"]
        metrics = {k: float(np.mean([r[k] for r in rows])) for k in keys}
        groups = sorted({r["group"] for r in rows})
        if len(groups) > 1 or self.cfg.task.snu_metrics:
            for g in groups:
                for k in keys:
                    metrics[f"{k}_{g}"] = float(np.mean([r[k] for r in rows if r["group"] == g]))
        if self.cfg.task.snu_metrics:
            metrics.update(self._snu_metrics(records, split))
        return metrics

    def _snu_metrics(self, records, split) -> dict:
        """The SNU scorer's means run over all slices of all files (a 36-slice file weighs more
        than a 16-slice one); its printed score is the mean of the acc4 and acc8 means."""
        out = {"ssim_snu": float(np.mean([r["ssim_snu"] for r in records]))}
        for g in sorted({group_name(r["acceleration"], r["anatomy"]) for r in records}):
            out[f"ssim_snu_{g}"] = float(np.mean([r["ssim_snu"] for r in records
                                                  if group_name(r["acceleration"], r["anatomy"]) == g]))
        per_acc: dict[int, tuple[float, int]] = {}
        for r in records:
            total, n = per_acc.get(r["acceleration"], (0.0, 0))
            per_acc[r["acceleration"]] = (total + r["ssim_snu"], n + 1)
        out["ssim_snu_leaderboard"] = float(np.mean([t / n for t, n in per_acc.values()]))
        if split.startswith("test"):
            # leaderboard/acc4 and leaderboard/acc8 are separate splits: once both are scored,
            # report the score the leaderboard prints
            self._test_snu_scores[split] = per_acc
            pooled: dict[int, list[float]] = defaultdict(lambda: [0.0, 0])
            for scores in self._test_snu_scores.values():
                for acc, (total, n) in scores.items():
                    pooled[acc][0] += total
                    pooled[acc][1] += n
            if len(self._test_snu_scores) > 1 and len(pooled) > len(per_acc):
                out["ssim_snu_leaderboard_combined"] = float(np.mean([t / n for t, n in pooled.values()]))
        return out

    # ---- outputs
    def _volume_name(self, split, volume):
        return Path(self.build_datasets()[split].volume_names[volume]).stem

    def save_predictions(self, records, split, out_dir: Path):
        """One HDF5 file per (volume, acceleration) with key `reconstruction` (slices, h, w) in
        the data's own units — the fastMRI / SNU submission format — assembled from the spool
        one volume at a time."""
        if not records or "image_file" not in records[0]:
            return []
        written = write_volumes(records, Path(out_dir) / split, lambda vol: self._volume_name(split, vol))
        self.spool.release([r["image_file"] for r in records])
        self._written[split] = written
        self._write_contract(written, split, Path(out_dir) / split, records)  # not listed: callers expect the volumes
        return [path for path, _ in written.values()]

    def _write_contract(self, written, split, folder: Path, records=None) -> Path:
        """The prediction manifest beside the HDF5 volumes, which it references in place (a
        second copy of every volume would double the largest outputs of the run). With the
        records, the truth too (outputs.write_truth, read back from the dataset): target, SSIM
        data range and foreground per slice, so `score_predictions` scores the set unchanged."""
        from podium.engine.predictions import write_predictions
        from podium.tasks.reconstruction.outputs import TRUTH_KEYS, write_truth

        keys = sorted(written)
        ids = [written[k][0].stem for k in keys]  # <volume>_acc<N>: the file stem
        references = {"reconstruction": {"files": [written[k][0] for k in keys], "key": "reconstruction"}}
        extra = {}
        if records:
            dataset = self.build_datasets()[split]
            truth = write_truth(records, written, folder, lambda index: dataset[index])
            references.update({name: {"files": [truth[k] for k in keys], "key": name, "role": "truth"}
                               for name in TRUTH_KEYS})
            anatomy = {(r["volume"], r["acceleration"]): ANATOMIES[int(r["anatomy"])] for r in records}
            extra["anatomy"] = {i: anatomy[k] for i, k in zip(ids, keys)}
        return write_predictions(
            folder, "volume", ids, {}, references=references,
            split=split, task="reconstruction", acceleration={i: int(k[1]) for i, k in zip(ids, keys)},
            slices={i: [int(s) for s, _ in sorted(written[k][1].items(), key=lambda item: item[1])]
                    for i, k in zip(ids, keys)}, **extra,
            meaning="reconstruction: per volume and acceleration, the (slices, h, w) magnitude images in the "
                    "data's own units (HDF5 key `reconstruction`); slices[id]: the dataset slice of each row; "
                    "truth (truth/<id>.h5): target (slices, h, w) in the same units, max_value the SSIM data "
                    "range of each slice, fg_mask the SNU foreground; anatomy[id] names the group")

    def score_predictions(self, predictions, split):
        """ssim / nmse / psnr (per group, and the SNU SSIM with `task.snu_metrics`) of a saved
        volume set (this run's, an ensemble's) from its reconstructions and truth alone: the
        records `evaluation_step` would make, reduced by `aggregate` (see outputs.slice_records)."""
        from podium.tasks.reconstruction.data import anatomy_id
        from podium.tasks.reconstruction.outputs import slice_records

        return self.aggregate(slice_records(predictions, bool(self.cfg.task.snu_metrics), anatomy_id), split)

    # ---- cross-validation (podium.engine.folds; see cv.py): one key per slice, folds always
    # grouped by volume, so a volume's saved rows (<volume>_acc<N>) come from one fold's model
    def cv_keys(self, dataset):
        from podium.tasks.reconstruction.cv import cv_keys

        return cv_keys(self.cfg, dataset)

    def cv_subset(self, parts, picks, train):
        from podium.tasks.reconstruction.cv import cv_subset

        return cv_subset(self.cfg, parts, picks, train)

    def _images(self, split, record) -> tuple[np.ndarray, np.ndarray]:
        """(target, reconstruction) of one slice in the data's units: the reconstruction from the
        saved predictions (or the spool), the target read again from the dataset."""
        import h5py

        key = (record["volume"], record["acceleration"])
        if key in self._written.get(split, {}):
            path, positions = self._written[split][key]
            with h5py.File(path, "r") as f:
                pred = f["reconstruction"][positions[record["slice"]]]
        else:
            pred = np.load(record["image_file"])
        sample = self.build_datasets()[split][record["index"]]
        return sample["target"].numpy() * float(sample["scale"]), pred

    def visualize(self, records, split, out_dir: Path):
        if not records or "image_file" not in records[0]:
            return []
        ranked = sorted(records, key=lambda r: r["ssim"])
        n = min(self.cfg.task.plots, len(ranked))
        picks = [("worst", r) for r in ranked[:n]] + [("best", r) for r in ranked[::-1][:n] if r not in ranked[:n]]
        paths = []
        for tag, r in picks:
            title = (f"{self._volume_name(split, r['volume'])} slice {r['slice']} "
                     f"{group_name(r['acceleration'], r['anatomy'])}: SSIM {r['ssim']:.4f}")
            target, pred = self._images(split, r)
            paths.append(plots.plot_reconstruction(
                target, pred, Path(out_dir) / f"{split}_{tag}_{r['index']}.png", title=title,
                data_range=r["max_value"]))
        return paths

    def predict(self, model, inputs, out_file: Path, ctx: StepContext):
        """Reconstruct undersampled k-space files (fastMRI .h5, .mat, .npy, BART .cfl): the mask
        is read from the file or taken as the columns that hold data."""
        from podium.tasks.reconstruction.predict import predict_files

        return predict_files(self, model, inputs, Path(out_file), ctx.device)

    def example_input(self):
        """(masked k-space (1, coils, H, W, 2), mask (1, 1, 1, W, 1), low frequencies (1,)): a
        validation slice; from a run card, seeded noise of the card's example shape sampled with
        its centre block and every acceleration-th column (tracing needs a shape, not an image).
        A card without `input.example` (written before it) gets 4 coils, 64 x 64, acceleration 4,
        8 centre columns."""
        if self.card is None:
            sample = self.build_datasets()["val"][0]
            return (sample["masked_kspace"][None], sample["mask"][None], sample["num_low_frequencies"][None])
        from podium.tasks.reconstruction.masks import center_mask

        default = {"coils": 4, "height": 64, "width": 64, "acceleration": 4, "low_frequencies": 8}
        shape = {**default, **(self.card.get("input", {}).get("example") or {})}
        width, low = int(shape["width"]), int(shape["low_frequencies"])
        columns = center_mask(width, low)
        columns[::max(1, int(shape["acceleration"]))] = True
        mask = torch.from_numpy(columns.astype(np.float32)).view(1, 1, 1, -1, 1)
        noise = torch.randn(1, int(shape["coils"]), int(shape["height"]), width, 2,
                            generator=torch.Generator().manual_seed(0))
        return noise * mask, mask, torch.tensor([low])

    # ---- test-time augmentation: none. The input is undersampled multi-coil k-space with its
    # sampling mask, not an image: an image-space flip or turn is a k-space flip plus a phase
    # ramp, and a quarter turn makes the column mask a row mask the model never saw.
    tta_unsupported_reason = "its inputs are undersampled k-space with a column sampling mask, not images"

    def tta_outputs(self):
        return None

    # ---- serving: undersampled k-space in, image out (see serving.py)
    def serving_decode(self, data: bytes):
        from podium.tasks.reconstruction import serving

        return serving.decode_kspace(data)

    def serving_module(self, model):
        from podium.tasks.reconstruction.serving import KspaceToImage

        return KspaceToImage(model, readout_flip=bool(self.cfg.task.get("tta_readout_flip", False)))

    def serving_example(self):
        return self.example_input()[0]

    def serving_spec(self) -> dict:
        from podium.tasks.reconstruction import serving

        return serving.spec("root-sum-of-squares magnitude at the k-space's full size (as podium predict)")

    def serving_preprocess(self, decoded):
        from podium.tasks.reconstruction import serving

        return serving.preprocess(decoded)

    def serving_postprocess(self, output, meta):
        from podium.tasks.reconstruction import serving

        return serving.postprocess(output, meta)
