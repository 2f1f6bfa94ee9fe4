"""`podium predict` for reconstruction: undersampled k-space files in, one HDF5 out.

Inputs: fastMRI-format `.h5` (every slice; the file's `mask` if it has one), or a raw k-space
file (`.mat`, `.npy`, BART `.cfl`) holding one undersampled slice. With `task.adapt.steps > 0`
each slice is reconstructed by a copy of the network fine-tuned on that slice's own measurements
(zero-shot self-supervised adaptation, adapt.py). Without a stored mask, the
sampled columns are the ones that hold data. The output file has one dataset per input,
`reconstruction/<file name>` (slices, H, W) in the input's units, and a PNG preview beside it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from podium.errors import UserError
from podium.tasks.reconstruction import masks as mk
from podium.tasks.reconstruction import rawfiles, readers
from podium.tasks.reconstruction.adapt import adapt_to_scan
from podium.tasks.reconstruction.data import center_block_width, make_sample


def _slices(path: Path):
    """Yield (kspace (C, H, W), mask (W,) bool or None) for every slice of an input file."""
    if path.suffix == ".h5":
        info = readers.read_volume_info(path)
        for s in range(info.num_slices):
            data = readers.read_slice(path, s)
            yield data["kspace"], (None if data.get("mask") is None else np.asarray(data["mask"], bool))
    else:
        base = path.with_suffix("") if path.suffix in (".cfl", ".hdr") else path
        yield rawfiles.read_kspace_file(base if path.suffix in (".cfl", ".hdr") else path), None


def symmetric_centre(model) -> bool:
    """Whether the (possibly wrapped) model counts calibration columns as fastMRI does."""
    while hasattr(model, "module") and not hasattr(model, "centre_detection"):
        model = model.module
    return getattr(model, "centre_detection", "contiguous") == "symmetric"


def sampled_columns(kspace: np.ndarray) -> np.ndarray:
    return np.abs(kspace).sum(axis=(0, 1)) > 0


def predict_files(task, model, inputs: list[Path], out_file: Path, device: torch.device) -> Path:
    import h5py
    from rich.progress import track

    from podium.tasks.reconstruction.plots import plot_reconstruction

    out_file = Path(out_file)
    if out_file.suffix != ".h5":
        raise UserError(f"--out {out_file}: reconstruction predictions are written as HDF5 (.h5).")
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_suffix(".h5.tmp")
    with h5py.File(tmp, "w") as f:
        for path in track([Path(p) for p in inputs], description="reconstructing", transient=True):
            recons, zero_filled, adapt_log = [], [], []
            for kspace, mask in _slices(path):
                mask = sampled_columns(kspace) if mask is None else mask
                if mask.all():
                    raise UserError(f"{path}: k-space is fully sampled; predict expects undersampled data.")
                acc = int(round(len(mask) / max(1, mask.sum())))
                sampled = mk.SampledMask(mask, center_block_width(mask, symmetric_centre(model)), acc)
                sample = make_sample(kspace, sampled, None, max_value=None, recon_size=kspace.shape[-2:],
                                     fg_threshold=0.0, volume=0, slice_index=0, index=0, anatomy=0)
                batch = {k: v[None].to(device) for k, v in sample.items()}
                net = model
                if int(task.adapt_cfg.steps) > 0:  # fine-tune a copy on this slice's own data
                    result = adapt_to_scan(getattr(model, "module", model), batch["masked_kspace"], batch["mask"],
                                           batch["num_low_frequencies"], task.adapt_cfg)
                    net = result.model
                    losses = [h["val_loss"] for h in result.history if "val_loss" in h]
                    adapt_log.append((result.best_step, result.steps_run, losses[0], min(losses)))
                with torch.no_grad():
                    recon = task.reconstruct(net, batch)[0].float().cpu().numpy()
                scale = float(sample["scale"])
                recons.append(recon * scale)
                zero_filled.append(sample["target"].numpy() * scale)  # RSS of the masked k-space
            dataset = f.create_dataset(f"reconstruction/{path.name}", data=np.stack(recons).astype(np.float32))
            if adapt_log:  # per slice: which step was kept, and the held-out k-space loss before / after
                best, run, start, end = (np.asarray(v) for v in zip(*adapt_log))
                dataset.attrs.update({"adapt_best_step": best, "adapt_steps_run": run,
                                      "adapt_val_loss_start": start, "adapt_val_loss_best": end})
            mid = len(recons) // 2
            plot_reconstruction(zero_filled[mid], recons[mid], out_file.parent / f"{out_file.stem}_{path.name}.png",
                                title=f"{path.name} (no fully sampled reference)", target_label="zero-filled")
    tmp.replace(out_file)
    return out_file
