"""Serving a reconstruction run: undersampled k-space in, the image out.

A request carries one slice of undersampled multi-coil k-space as a `.npy` (complex, (coils, H,
W); unsampled columns zero) or a `.npz` holding `kspace` (and optionally `mask`, (W,) 0/1).
Preprocessing is `podium predict`'s: the mask is the file's or the columns that hold data, the
k-space is scaled by the zero-filled image's maximum (`make_sample`), and the answer is scaled
back. The graph (`KspaceToImage`) derives the mask and the calibration width from the scaled
k-space itself, so it takes one tensor, (B, coils, H, W, 2) float32.

The FFTs have no ONNX opset-17 export: the graph is served with PyTorch (`podium serve` switches
to it) and exported as TorchScript; slices of different sizes cannot share a batch, so requests
are served one at a time.

    curl -F image=@slice.npy http://127.0.0.1:8000/predict   # {"image_npy_base64", "preview_png_base64", ...}
"""

from __future__ import annotations

import base64
import io
import zipfile

import numpy as np
import torch
from torch import Tensor, nn

from podium.errors import UserError
from podium.tasks.reconstruction import masks as mk
from podium.tasks.reconstruction.data import center_block_width, make_sample
from podium.tasks.reconstruction.task import readout_flip_average


def decode_kspace(data: bytes) -> dict:
    """.npy / .npz bytes -> {"kspace": complex64 (C, H, W), "mask": bool (W,) or None}."""
    try:
        loaded = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"request: not a .npy / .npz k-space file ({e}); send complex (coils, H, W) k-space "
                        f"as .npy, or a .npz with 'kspace' (and optionally 'mask').") from None
    mask = None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            if "kspace" not in loaded.files:
                raise UserError(f"request: the .npz has {loaded.files}; expected a 'kspace' array.")
            kspace = loaded["kspace"]
            mask = loaded["mask"] if "mask" in loaded.files else None
    else:
        kspace = loaded
    if not np.iscomplexobj(kspace) or kspace.ndim not in (2, 3):
        raise UserError(f"request: k-space is {kspace.dtype} of shape {kspace.shape}; expected complex "
                        f"(coils, H, W) (or (H, W) for one coil).")
    kspace = np.asarray(kspace if kspace.ndim == 3 else kspace[None], dtype=np.complex64)
    if not np.isfinite(kspace).all():
        raise UserError("request: k-space holds NaN or Inf values.")
    if mask is not None:
        mask = np.asarray(mask).reshape(-1)
        if mask.shape[0] != kspace.shape[-1] or not np.isin(mask, (0, 1)).all():
            raise UserError(f"request: mask must be {kspace.shape[-1]} values of 0 / 1 (one per column), "
                            f"got shape {mask.shape}.")
        mask = mask.astype(bool)
    return {"kspace": kspace, "mask": mask}


def preprocess(decoded: dict) -> tuple[Tensor, dict]:
    """-> masked, scaled k-space (C, H, W, 2) float32 and {"scale"} (as `podium predict`)."""
    kspace, mask = decoded["kspace"], decoded["mask"]
    if mask is None:
        mask = np.abs(kspace).sum(axis=(0, 1)) > 0
    if mask.all() or not mask.any():
        raise UserError("request: k-space must be undersampled (some columns zero, some not).")
    acceleration = int(round(len(mask) / max(1, mask.sum())))
    sampled = mk.SampledMask(mask, center_block_width(mask), acceleration)
    sample = make_sample(kspace, sampled, None, max_value=None, recon_size=kspace.shape[-2:], fg_threshold=0.0,
                         volume=0, slice_index=0, index=0, anatomy=0)
    return sample["masked_kspace"], {"scale": float(sample["scale"])}


class KspaceToImage(nn.Module):
    """(B, coils, H, W, 2) masked k-space -> (B, H, W) image. The mask is the columns holding
    data; the calibration width is the sampled run through the centre column (0 when that column
    is not sampled), as `podium predict` passes it."""

    def __init__(self, model: nn.Module, readout_flip: bool = False):
        super().__init__()
        from podium.tasks.reconstruction.predict import symmetric_centre

        self.model, self.readout_flip = model, readout_flip
        self.symmetric = symmetric_centre(model)

    def forward(self, masked_kspace: Tensor) -> Tensor:
        sampled = masked_kspace.abs().sum(dim=(1, 2, 4)) > 0  # (B, W)
        centre = sampled.shape[1] // 2
        right = torch.cumprod(sampled[:, centre:].to(torch.int64), dim=1).sum(dim=1)
        left = torch.cumprod(sampled[:, :centre].flip(1).to(torch.int64), dim=1).sum(dim=1)
        width = 2 * torch.minimum(left, right) if self.symmetric else left + right  # model.centre_detection
        low = torch.where(sampled[:, centre], width, torch.zeros_like(left))
        mask = sampled.to(masked_kspace.dtype)[:, None, None, :, None]
        return readout_flip_average(self.model, masked_kspace, mask, low, self.readout_flip).float()


def spec(output_note: str) -> dict:
    return {"task": "reconstruction", "batchable": False, "onnx": False,
            "onnx_reason": "torch.fft has no ONNX opset-17 export",
            "input": {"name": "kspace", "kind": "kspace", "channels": 1, "dtype": "float32",
                      "layout": "(batch, coils, H, W, 2): real and imaginary parts",
                      "request": ".npy complex (coils, H, W), or .npz with 'kspace' [+ 'mask' (W,)]"},
            "preprocess": [
                {"op": "mask", "from": "the file's 'mask', else the columns holding data"},
                {"op": "scale", "by": "1 / max of the zero-filled RSS image (cropped to H, W)"},
                {"op": "view_as_real"}],
            "output": {"name": "image", "kind": "image", "shape": ["batch", "H", "W"],
                       "units": "the input's: the graph's output times the scale",
                       "note": output_note}}


def postprocess(output: Tensor, meta: dict) -> dict:
    image = np.asarray(output, dtype=np.float32) * np.float32(meta["scale"])
    raw = io.BytesIO()
    np.save(raw, image)
    from PIL import Image

    peak = float(image.max()) or 1.0
    preview = io.BytesIO()
    Image.fromarray(np.clip(image / peak * 255.0, 0, 255).round().astype(np.uint8)).save(preview, "PNG")
    return {"height": int(image.shape[0]), "width": int(image.shape[1]), "max": peak,
            "image_npy_base64": base64.b64encode(raw.getvalue()).decode(),
            "preview_png_base64": base64.b64encode(preview.getvalue()).decode()}
