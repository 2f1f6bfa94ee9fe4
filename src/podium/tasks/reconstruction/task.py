"""The reconstruction task: undersampled multi-coil k-space in, magnitude image out, scored
exactly as fastMRI's evaluate.py (and, optionally, the SNU leaderboard) does.

    podium train experiment=varnet_demo
    podium eval runs/<run> --split test_real
    podium predict runs/<run> scan.h5 --out recon.h5

Metrics are computed per volume and acceleration — SSIM per slice with the volume's maximum as
data range, averaged over the volume's slices; PSNR and NMSE over the whole volume — then
averaged over volumes, overall and per (acceleration x anatomy) group (`ssim_acc4_brain`).
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


@dataclass
class ReconTaskConfig:
    name: str = "reconstruction"
    snu_metrics: bool = False  # also report the SNU leaderboard SSIM (foreground-masked)
    keep_images: bool = True  # keep reconstructions in memory for plots and saved predictions
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

    # ---- building
    def dataset_context(self):
        # mask-augmentation schedules ramp over the run's epochs
        return {"max_epochs": int(self.cfg.trainer.max_epochs) if "trainer" in self.cfg else 1}

    def build_model(self):
        return registry.build("model", self.cfg.model.name, self.cfg.model)

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
        return {"loss": loss}

    # ---- evaluation
    @torch.no_grad()
    def evaluation_step(self, model, batch, ctx: StepContext) -> list[dict]:
        pred = self.reconstruct(model, batch).float().cpu().numpy().astype(np.float64)
        target = batch["target"].cpu().numpy().astype(np.float64)
        fg = batch["fg_mask"].cpu().numpy()
        records = []
        for i in range(len(pred)):
            maxval = float(batch["max_value"][i])
            rec = {"volume": int(batch["volume"][i]), "slice": int(batch["slice"][i]),
                   "acceleration": int(batch["acceleration"][i]), "anatomy": int(batch["anatomy"][i]),
                   "index": int(batch["index"][i]), "max_value": maxval, "scale": float(batch["scale"][i]),
                   "ssim": rm.ssim_fastmri(target[i][None], pred[i][None], maxval=maxval),
                   "sse": float(((target[i] - pred[i]) ** 2).sum()), "energy": float((target[i] ** 2).sum()),
                   "pixels": int(target[i].size)}
            if self.cfg.task.snu_metrics:
                rec["ssim_snu"] = rm.ssim_fastmri((target[i] * fg[i])[None], (pred[i] * fg[i])[None], maxval=maxval)
            if self.cfg.task.keep_images:
                rec["pred"], rec["target"] = pred[i].astype(np.float32), target[i].astype(np.float32)
            records.append(rec)
        return records

    def aggregate(self, records, split):
        if not records:
            raise UserError(f"the {split} split produced no slices.")
        per_volume = defaultdict(list)
        for r in records:
            per_volume[(r["volume"], r["acceleration"], r["anatomy"])].append(r)
        rows = []
        for (vol, acc, anat), recs in sorted(per_volume.items()):
            sse, energy = sum(r["sse"] for r in recs), sum(r["energy"] for r in recs)
            pixels, maxval = sum(r["pixels"] for r in recs), recs[0]["max_value"]
            row = {"group": group_name(acc, anat), "ssim": float(np.mean([r["ssim"] for r in recs])),
                   "nmse": sse / max(energy, 1e-30), "psnr": float(10 * np.log10(maxval**2 / max(sse / pixels, 1e-30)))}
            if self.cfg.task.snu_metrics:
                row["ssim_snu"] = float(np.mean([r["ssim_snu"] for r in recs]))
            rows.append(row)
        keys = [k for k in rows[0] if k != "group"]
        metrics = {k: float(np.mean([r[k] for r in rows])) for k in keys}
        groups = sorted({r["group"] for r in rows})
        if len(groups) > 1 or self.cfg.task.snu_metrics:
            for g in groups:
                for k in keys:
                    metrics[f"{k}_{g}"] = float(np.mean([r[k] for r in rows if r["group"] == g]))
        if self.cfg.task.snu_metrics:
            # the leaderboard's printed score: the mean of the acc4 and acc8 scores
            accs = sorted({int(g.split("_")[0][3:]) for g in groups})
            metrics["ssim_snu_leaderboard"] = float(np.mean(
                [np.mean([r["ssim_snu"] for r in rows if r["group"].startswith(f"acc{a}_")]) for a in accs]))
        return metrics

    # ---- outputs
    def _volume_name(self, split, volume):
        return Path(self.build_datasets()[split].volume_names[volume]).stem

    def save_predictions(self, records, split, out_dir: Path):
        """One HDF5 file per (volume, acceleration) with key `reconstruction` (slices, h, w) in
        the data's own units — the fastMRI / SNU submission format."""
        import h5py

        if not records or "pred" not in records[0]:
            return []
        out_dir = Path(out_dir) / split
        out_dir.mkdir(parents=True, exist_ok=True)
        by_volume = defaultdict(list)
        for r in records:
            by_volume[(r["volume"], r["acceleration"])].append(r)
        paths = []
        for (vol, acc), recs in sorted(by_volume.items()):
            recs = sorted(recs, key=lambda r: r["slice"])
            path = out_dir / f"{self._volume_name(split, vol)}_acc{acc}.h5"
            with h5py.File(path, "w") as f:
                f.create_dataset("reconstruction", data=np.stack([r["pred"] * r["scale"] for r in recs]))
                f.attrs["acceleration"] = acc
            paths.append(path)
        return paths

    def visualize(self, records, split, out_dir: Path):
        if not records or "pred" not in records[0]:
            return []
        ranked = sorted(records, key=lambda r: r["ssim"])
        n = min(self.cfg.task.plots, len(ranked))
        picks = [("worst", r) for r in ranked[:n]] + [("best", r) for r in ranked[::-1][:n] if r not in ranked[:n]]
        paths = []
        for tag, r in picks:
            title = (f"{self._volume_name(split, r['volume'])} slice {r['slice']} "
                     f"{group_name(r['acceleration'], r['anatomy'])}: SSIM {r['ssim']:.4f}")
            paths.append(plots.plot_reconstruction(
                r["target"], r["pred"], Path(out_dir) / f"{split}_{tag}_{r['index']}.png", title=title,
                data_range=r["max_value"]))
        return paths

    def predict(self, model, inputs, out_file: Path, ctx: StepContext):
        """Reconstruct undersampled k-space files (fastMRI .h5, .mat, .npy, BART .cfl): the mask
        is read from the file or taken as the columns that hold data."""
        from podium.tasks.reconstruction.predict import predict_files

        return predict_files(self, model, inputs, Path(out_file), ctx.device)

    def example_input(self):
        sample = self.build_datasets()["val"][0]
        return (sample["masked_kspace"][None], sample["mask"][None], sample["num_low_frequencies"][None])

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
