"""MRI reconstruction metrics, computed exactly as the public scorers do.

fastMRI (Zbontar et al. 2018, "fastMRI: An Open Dataset and Benchmarks for Accelerated MRI";
the `evaluate.py` of the fastMRI repository), per volume of magnitude images (slices, H, W):
- SSIM: per slice, scikit-image's `structural_similarity(gt, pred, win_size=7,
  data_range=gt_volume.max())`: a 7 x 7 uniform window, K1 = 0.01, K2 = 0.03, sample
  covariance (cov_norm = 49 / 48), the map computed with `uniform_filter` in "reflect" mode and
  averaged over the interior (a 3-pixel border dropped), i.e. over the windows that fit inside
  the image; then the mean over slices.
- PSNR: 10 log10(data_range^2 / MSE) over the whole volume, data_range = gt_volume.max().
- NMSE: ||gt - pred||^2 / ||gt||^2 over the whole volume.
MONAI's and torchmetrics' SSIM default to an 11 x 11 Gaussian window: a different metric.

SNU FastMRI challenge leaderboard (2025 scorer): for each slice a foreground mask is made from
the target (threshold, then with a 3 x 3 kernel of ones: erode 1, dilate 15, erode 14, OpenCV
semantics), both images are multiplied by it and scored with the same 7 x 7 uniform SSIM,
data_range = the file's `max` attribute, averaged over the whole valid map (windows that are zero
in both images score exactly 1). The leaderboard number is the mean of the acc4 and acc8 means
over all slices. The 2026 scorer (SSIM averaged inside the mask only, plus lesion boxes) is NOT
what is implemented here.

The numpy metrics work in float64. The reference scorers hand float32 arrays to scikit-image,
which then computes in float32; the difference is round-off (3e-8 in SSIM on a 320 x 320
phantom at MRI intensities).

`ssim_torch` is the same SSIM for training: batched, differentiable, on any device; in float64
it equals scikit-image's value (the interior of a "reflect" uniform filter is a "valid" average).

    import numpy as np
    from podium.tasks.reconstruction.metrics import volume_metrics, ssim_snu_volume

    gt = np.random.rand(4, 64, 64)
    pred = gt + 0.05 * np.random.randn(4, 64, 64)
    volume_metrics(gt, pred)  # {'ssim': ..., 'psnr': ..., 'nmse': ...}
    ssim_snu_volume(pred, gt, maxval=gt.max(), anatomy="brain")  # one score per slice
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from podium.errors import UserError

# Foreground thresholds of the SNU 2025 scorer, applied to the fully sampled target image.
SNU_THRESHOLDS: dict[str, float] = {"knee": 2e-5, "brain": 5e-5}

# SNU mask morphology (3 x 3 kernel of ones): one erosion removes isolated specks, then a closing
# (dilate 15, erode 14) fills holes and gaps inside the anatomy.
_SNU_KERNEL = np.ones((3, 3), np.uint8)
_SNU_ERODE_FIRST, _SNU_DILATE, _SNU_ERODE_LAST = 1, 15, 14


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------


def _as_float64(name: str, array) -> np.ndarray:
    array = np.asarray(array)
    if np.iscomplexobj(array):
        raise UserError(
            f"{name}: expected a real magnitude image, got a complex array; "
            "take the magnitude (e.g. root-sum-of-squares over coils) first."
        )
    return array.astype(np.float64, copy=False)


def _check_pair(gt: np.ndarray, pred: np.ndarray, ndim: int, what: str) -> None:
    if gt.ndim != ndim:
        raise UserError(f"{what}: expected a target of {ndim} dimensions, got shape {gt.shape}.")
    if gt.shape != pred.shape:
        raise UserError(
            f"{what}: reconstruction shape {pred.shape} differs from target shape {gt.shape}; "
            "crop the reconstruction to the target size (e.g. 320 x 320 fastMRI knee, "
            "384 x 384 SNU)."
        )


def _check_window(shape: Sequence[int], win_size: int) -> None:
    if win_size < 1 or win_size % 2 == 0:
        raise ValueError(f"win_size must be a positive odd number, got {win_size}")
    if min(shape[-2:]) < win_size:
        raise UserError(
            f"SSIM: images of size {tuple(shape[-2:])} are smaller than the "
            f"{win_size} x {win_size} window."
        )


def _check_data_range(data_range: float, what: str) -> float:
    data_range = float(data_range)
    if not data_range > 0 or not np.isfinite(data_range):
        raise UserError(
            f"{what}: data range (maxval) must be a positive finite number, got {data_range}; "
            "an all-zero target volume cannot be scored."
        )
    return data_range


# --------------------------------------------------------------------------------------------
# fastMRI metrics
# --------------------------------------------------------------------------------------------


def _window_means(image: np.ndarray, win_size: int) -> np.ndarray:
    """Mean over every win_size x win_size window that fits inside `image` ("valid" positions).

    Each window is summed on its own (separable shifted sums), not with the running sum of
    `scipy.ndimage.uniform_filter`: a running sum leaves round-off of ~1e-20 behind after passing
    bright pixels, so background windows would score 1 - 1e-10 instead of exactly 1 as the
    the reference scorer states (and its convolution gives). Otherwise the values agree with
    scipy to ~1e-16.
    """
    rows_out = image.shape[0] - win_size + 1
    cols_out = image.shape[1] - win_size + 1
    row_sums = sum(image[i : i + rows_out] for i in range(win_size))
    window_sums = sum(row_sums[:, j : j + cols_out] for j in range(win_size))
    return window_sums / (win_size * win_size)


def _ssim_valid_map(
    gt: np.ndarray, pred: np.ndarray, data_range: float, win_size: int, k1: float, k2: float
) -> np.ndarray:
    """SSIM at every position where the window fits: skimage's map with its border cropped."""
    num_pixels = win_size * win_size
    cov_norm = num_pixels / (num_pixels - 1)  # unbiased (sample) covariance, skimage's default
    mean_x, mean_y = _window_means(gt, win_size), _window_means(pred, win_size)
    var_x = cov_norm * (_window_means(gt * gt, win_size) - mean_x * mean_x)
    var_y = cov_norm * (_window_means(pred * pred, win_size) - mean_y * mean_y)
    cov_xy = cov_norm * (_window_means(gt * pred, win_size) - mean_x * mean_y)

    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    numerator = (2 * mean_x * mean_y + c1) * (2 * cov_xy + c2)
    denominator = (mean_x**2 + mean_y**2 + c1) * (var_x + var_y + c2)
    return numerator / denominator


def _checked_slice_pair(gt, pred, data_range, win_size, what):
    gt, pred = _as_float64(what, gt), _as_float64(what, pred)
    _check_pair(gt, pred, 2, what)
    _check_window(gt.shape, win_size)
    return gt, pred, _check_data_range(data_range, what)


def ssim_map(
    gt: np.ndarray,
    pred: np.ndarray,
    data_range: float,
    win_size: int = 7,
    k1: float = 0.01,
    k2: float = 0.03,
) -> np.ndarray:
    """The full-size SSIM map of two 2-D images, as scikit-image's `full=True` returns it.

    skimage filters in scipy's "reflect" mode (edge pixel repeated: numpy's "symmetric" pad),
    so the map has the image's size; its border of width (win_size - 1) // 2 is outside the
    scored region (see `ssim_slice`).
    """
    gt, pred, data_range = _checked_slice_pair(gt, pred, data_range, win_size, "ssim_map")
    pad = (win_size - 1) // 2
    gt, pred = np.pad(gt, pad, mode="symmetric"), np.pad(pred, pad, mode="symmetric")
    return _ssim_valid_map(gt, pred, data_range, win_size, k1, k2)


def ssim_slice(gt: np.ndarray, pred: np.ndarray, data_range: float, win_size: int = 7) -> float:
    """Mean SSIM of one 2-D slice over the valid interior of the map (skimage's `crop(S, pad)`),
    7 x 7 uniform window, K1 0.01, K2 0.03."""
    gt, pred, data_range = _checked_slice_pair(gt, pred, data_range, win_size, "ssim_slice")
    return float(_ssim_valid_map(gt, pred, data_range, win_size, 0.01, 0.03).mean())


def ssim_fastmri(gt: np.ndarray, pred: np.ndarray, maxval: float | None = None) -> float:
    """fastMRI SSIM of one volume (slices, H, W): mean of per-slice SSIMs, data_range =
    `maxval` or the maximum of the whole target VOLUME (not of each slice)."""
    gt, pred = _as_float64("ssim_fastmri", gt), _as_float64("ssim_fastmri", pred)
    _check_pair(gt, pred, 3, "ssim_fastmri")
    data_range = gt.max() if maxval is None else maxval
    return float(np.mean([ssim_slice(g, p, data_range) for g, p in zip(gt, pred)]))


def nmse(gt: np.ndarray, pred: np.ndarray) -> float:
    """Normalised mean squared error ||gt - pred||^2 / ||gt||^2 over the whole array."""
    gt, pred = _as_float64("nmse", gt), _as_float64("nmse", pred)
    _check_pair(gt, pred, gt.ndim, "nmse")
    return float(np.sum((gt - pred) ** 2) / np.sum(gt**2))


def psnr(gt: np.ndarray, pred: np.ndarray, maxval: float | None = None) -> float:
    """PSNR in dB over the whole volume, data_range = `maxval` or gt.max(); inf when equal."""
    gt, pred = _as_float64("psnr", gt), _as_float64("psnr", pred)
    _check_pair(gt, pred, gt.ndim, "psnr")
    data_range = _check_data_range(gt.max() if maxval is None else maxval, "psnr")
    mse = np.mean((gt - pred) ** 2)
    if mse == 0:
        return float("inf")
    return float(10 * np.log10(data_range**2 / mse))


def volume_metrics(gt_vol: np.ndarray, pred_vol: np.ndarray, maxval: float | None = None) -> dict:
    """fastMRI's three metrics of one volume: {"ssim", "psnr", "nmse"}."""
    return {
        "ssim": ssim_fastmri(gt_vol, pred_vol, maxval),
        "psnr": psnr(gt_vol, pred_vol, maxval),
        "nmse": nmse(gt_vol, pred_vol),
    }


# --------------------------------------------------------------------------------------------
# SNU FastMRI challenge leaderboard (2025 scorer)
# --------------------------------------------------------------------------------------------


def snu_foreground_mask(target_slice: np.ndarray, threshold: float) -> np.ndarray:
    """The scorer's foreground mask of one target slice, as float64 0/1 of the same shape.

    OpenCV is used on purpose: its morphology treats pixels beyond the border as neutral
    (erosion does not eat in from the image edge, dilation adds nothing from it), and the
    official scorer's result depends on exactly that. uint8 gives the same binary result as the
    scorer's float mask, faster.
    """
    target_slice = _as_float64("snu_foreground_mask", target_slice)
    if target_slice.ndim != 2:
        raise UserError(
            f"snu_foreground_mask: expected a 2-D slice, got shape {target_slice.shape}."
        )
    mask = (target_slice > threshold).astype(np.uint8)
    mask = cv2.erode(mask, _SNU_KERNEL, iterations=_SNU_ERODE_FIRST)
    mask = cv2.dilate(mask, _SNU_KERNEL, iterations=_SNU_DILATE)
    mask = cv2.erode(mask, _SNU_KERNEL, iterations=_SNU_ERODE_LAST)
    return mask.astype(np.float64)


def _snu_threshold(anatomy: str) -> float:
    if anatomy not in SNU_THRESHOLDS:
        raise UserError(
            f"SNU SSIM: unknown anatomy {anatomy!r}. Valid choices: "
            f"{', '.join(sorted(SNU_THRESHOLDS))} (the file name prefix, e.g. brain_test1.h5)."
        )
    return SNU_THRESHOLDS[anatomy]


def ssim_snu_slice(recon: np.ndarray, target: np.ndarray, maxval: float, threshold: float) -> float:
    """SNU 2025 SSIM of one slice: both images masked by the target's foreground mask, then the
    7 x 7 uniform SSIM with data_range = `maxval`, averaged over the whole valid map (background
    windows, zero in both images, score exactly 1 and so count in the mean)."""
    recon, target = _as_float64("ssim_snu_slice", recon), _as_float64("ssim_snu_slice", target)
    _check_pair(target, recon, 2, "ssim_snu_slice")
    mask = snu_foreground_mask(target, threshold)
    return ssim_slice(target * mask, recon * mask, maxval)


def ssim_snu_volume(
    recon_vol: np.ndarray, target_vol: np.ndarray, maxval: float, anatomy: str
) -> list[float]:
    """Per-slice SNU scores of one file; `maxval` is the file's `max` attribute and `anatomy`
    ("brain" | "knee") picks the threshold. The leaderboard averages these over all slices of
    all files, so a file's weight is its number of slices."""
    threshold = _snu_threshold(anatomy)
    recon_vol = _as_float64("ssim_snu_volume", recon_vol)
    target_vol = _as_float64("ssim_snu_volume", target_vol)
    _check_pair(target_vol, recon_vol, 3, "ssim_snu_volume")
    return [ssim_snu_slice(r, t, maxval, threshold) for r, t in zip(recon_vol, target_vol)]


def snu_leaderboard_score(scores_acc4: Sequence[float], scores_acc8: Sequence[float]) -> float:
    """The printed leaderboard number: mean of (mean over acc4 slices, mean over acc8 slices)."""
    if len(scores_acc4) == 0 or len(scores_acc8) == 0:
        raise UserError(
            "snu_leaderboard_score: both the acc4 and the acc8 slice scores are needed; "
            f"got {len(scores_acc4)} and {len(scores_acc8)}."
        )
    return float((np.mean(scores_acc4) + np.mean(scores_acc8)) / 2)


# --------------------------------------------------------------------------------------------
# Differentiable SSIM (torch)
# --------------------------------------------------------------------------------------------


def _as_batch(name: str, image: torch.Tensor) -> torch.Tensor:
    """(B, H, W) or (B, 1, H, W) -> (B, 1, H, W)."""
    if image.ndim == 3:
        return image.unsqueeze(1)
    if image.ndim == 4 and image.shape[1] == 1:
        return image
    raise ValueError(f"{name}: expected shape (B, H, W) or (B, 1, H, W), got {tuple(image.shape)}")


def ssim_torch(
    pred: torch.Tensor,
    target: torch.Tensor,
    data_range: torch.Tensor | float,
    win_size: int = 7,
    k1: float = 0.01,
    k2: float = 0.03,
    reduction: str = "mean",
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Batched, differentiable 7 x 7 uniform SSIM (skimage / fastMRI definition).

    pred, target: (B, H, W) or (B, 1, H, W). data_range: (B,) tensor (each sample's volume
    maximum) or one number. mask: optional (B, H, W) / (B, 1, H, W) weights that multiply both
    images first (SNU style). The map covers only windows that fit inside the image, i.e.
    skimage's cropped interior, so the mean is skimage's value.

    reduction: "mean" -> scalar (mean over the batch of per-image means), "none" -> (B,),
    "map" -> the SSIM map, (B, H - win + 1, W - win + 1) (with the channel dim if the input had
    one). No value checks here (they would synchronise with the GPU): data_range must be > 0.

    float16 / bfloat16 inputs (autocast) are computed, and returned, in float32: at MRI
    intensities (~1e-4) their squares underflow half precision and the variances
    E[x^2] - E[x]^2 cancel catastrophically.
    """
    if reduction not in ("mean", "none", "map"):
        raise ValueError(f"reduction must be 'mean', 'none' or 'map', got {reduction!r}")
    if win_size < 1 or win_size % 2 == 0:
        raise ValueError(f"win_size must be a positive odd number, got {win_size}")
    had_channel = pred.ndim == 4
    x, y = _as_batch("pred", pred), _as_batch("target", target)
    if x.shape != y.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    if min(x.shape[-2:]) < win_size:
        raise ValueError(f"images {tuple(x.shape[-2:])} are smaller than the window {win_size}")
    if x.dtype in (torch.float16, torch.bfloat16) or y.dtype in (torch.float16, torch.bfloat16):
        x, y = x.float(), y.float()
    if mask is not None:
        mask = _as_batch("mask", mask).to(x.dtype)
        x, y = x * mask, y * mask

    data_range = torch.as_tensor(data_range, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2

    # A stride-1 average pool without padding is the uniform window over every position where
    # it fits: exactly the interior of skimage's "reflect" filter. One pool over the five
    # stacked statistics instead of five convolutions.
    stats = torch.cat([x, y, x * x, y * y, x * y], dim=1)
    mean_x, mean_y, mean_xx, mean_yy, mean_xy = F.avg_pool2d(stats, win_size, stride=1).unbind(1)
    num_pixels = win_size * win_size
    cov_norm = num_pixels / (num_pixels - 1)
    var_x = cov_norm * (mean_xx - mean_x * mean_x)
    var_y = cov_norm * (mean_yy - mean_y * mean_y)
    cov_xy = cov_norm * (mean_xy - mean_x * mean_y)

    c1, c2 = c1.squeeze(1), c2.squeeze(1)  # (B, 1, 1) against the (B, h, w) statistics
    numerator = (2 * mean_x * mean_y + c1) * (2 * cov_xy + c2)
    denominator = (mean_x**2 + mean_y**2 + c1) * (var_x + var_y + c2)
    ssim = numerator / denominator

    if reduction == "map":
        return ssim.unsqueeze(1) if had_channel else ssim
    per_image = ssim.flatten(1).mean(dim=1)
    return per_image if reduction == "none" else per_image.mean()
