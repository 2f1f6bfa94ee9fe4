"""Whole-image inference for segmentation: sliding windows with Gaussian blending (MONAI's
`sliding_window_inference`) and flip test-time augmentation.

Windows overlap by `overlap` (a fraction of the window); each window's softmax probabilities
are weighted by a Gaussian centred on the window (sigma = 0.125 of its side, nnU-Net's choice:
predictions near a window's border see less context and count less) and the weighted sum is
normalised. Images smaller than the window are padded with zeros (the normalised mean colour)
and cropped back. Flip TTA predicts on flipped copies, flips each back and averages the
probabilities, so `podium eval`, `podium predict` and ensembles all average probabilities.

    probs = predict_probabilities(model, image_batch, window=(256, 256), overlap=0.5,
                                  flips=["h", "v"])   # (B, K, H, W), rows sum to 1
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from podium.errors import UserError

FLIP_DIMS = {"h": (3,), "v": (2,), "hv": (2, 3)}


def check_window(window: Sequence[int], divisor: int, key: str = "task.window") -> tuple[int, int]:
    if len(window) != 2 or any(int(s) <= 0 for s in window):
        raise UserError(f"{key}={list(window)}: expected [height, width], positive.")
    h, w = (int(s) for s in window)
    if h % divisor or w % divisor:
        raise UserError(f"{key}={[h, w]}: both sides must be multiples of {divisor} "
                        f"(the encoder downsamples 2**encoder_depth times).")
    return h, w


def check_flips(flips: Sequence[str], key: str = "task.tta_flips") -> list[str]:
    unknown = [f for f in flips if f not in FLIP_DIMS]
    if unknown:
        raise UserError(f"{key}: unknown flip(s) {unknown}; valid: {', '.join(FLIP_DIMS)}.")
    return list(flips)


def softmax_predictor(model: nn.Module) -> Callable[[Tensor], Tensor]:
    """A predictor for windows: logits of the model's "logits" output -> float32 probabilities."""

    def predict(windows: Tensor) -> Tensor:
        out = model(windows)
        logits = out["logits"] if isinstance(out, dict) else out
        return torch.softmax(logits.float(), dim=1)

    return predict


@torch.no_grad()
def sliding_window_probabilities(predictor: Callable[[Tensor], Tensor], images: Tensor,
                                 window: Sequence[int], overlap: float = 0.5, batch_size: int = 4,
                                 blend: str = "gaussian") -> Tensor:
    """images (B, C, H, W) -> probabilities (B, K, H, W), windows blended."""
    from monai.inferers import sliding_window_inference

    if not 0.0 <= overlap < 1.0:
        raise UserError(f"task.overlap={overlap}: expected a fraction in [0, 1).")
    if blend not in ("gaussian", "constant"):
        raise UserError(f"task.blend={blend!r}: expected gaussian or constant.")
    probs = sliding_window_inference(images, roi_size=list(window), sw_batch_size=batch_size,
                                     predictor=predictor, overlap=overlap, mode=blend, sigma_scale=0.125,
                                     padding_mode="constant", cval=0.0)
    return probs.as_tensor() if hasattr(probs, "as_tensor") else probs  # MONAI may return a MetaTensor


@torch.no_grad()
def predict_probabilities(model: nn.Module, images: Tensor, window: Sequence[int], overlap: float = 0.5,
                          flips: Sequence[str] = (), batch_size: int = 4, blend: str = "gaussian") -> Tensor:
    """Sliding-window probabilities averaged over the identity and every flip in `flips`.

    A side shorter than the window is padded once, before flipping, by (diff // 2, diff - diff // 2)
    zeros (MONAI's split): padding each flipped copy would put an odd padding on the other side,
    shifting the image by a pixel between passes; and the served graph (one padded canvas,
    flipped inside) then computes exactly this."""
    h, w = images.shape[-2:]
    pad_h, pad_w = max(int(window[0]) - h, 0), max(int(window[1]) - w, 0)
    top, left = pad_h // 2, pad_w // 2
    if pad_h or pad_w:
        images = torch.nn.functional.pad(images, (left, pad_w - left, top, pad_h - top))
    predictor = softmax_predictor(model)
    total = sliding_window_probabilities(predictor, images, window, overlap, batch_size, blend)
    for flip in flips:
        dims = FLIP_DIMS[flip]
        flipped = sliding_window_probabilities(predictor, images.flip(dims), window, overlap, batch_size, blend)
        total = total + flipped.flip(dims)
    return (total / (1 + len(flips)))[..., top:top + h, left:left + w]
