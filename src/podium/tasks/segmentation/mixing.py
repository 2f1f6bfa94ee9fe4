"""Batch operations of self-training domain adaptation for segmentation: ClassMix, confidence-
weighted pseudo-labels, DACS's strong colour augmentation, MIC's block masks and a colour
transfer. Plain tensor functions, called inside the training
step on batched tensors on the training device; every random draw comes from an explicit CPU
`torch.Generator`, so a step is reproducible whatever the device. (The EMA teacher itself is
podium.engine.ema.EMATeacher.)

References:
- DACS: Tranheden et al., "DACS: Domain Adaptation via Cross-domain Mixed Sampling", WACV 2021
  (vikolss/DACS) — ClassMix of a source image onto a target image, pseudo-label weight = share
  of confident pixels, strong colour jitter + blur of the mixed image.
- ClassMix: Olsson et al., WACV 2021 — half of the classes present (rounded up) are pasted.
- DAFormer: Hoyer et al., CVPR 2022 (lhoyer/DAFormer) — same mixing, threshold 0.968, EMA 0.999.
- MIC: Hoyer et al., "MIC: Masked Image Consistency", CVPR 2023 (lhoyer/MIC) — 64 px blocks,
  mask ratio 0.7.
- Colour transfer: Reinhard et al., "Color Transfer between Images", IEEE CG&A 2001 (here per
  RGB channel in [0, 1] space rather than in l-alpha-beta).

Differences from the official code, on purpose:
- the pseudo-label weight is one per IMAGE over its valid pixels, with a strict `>` (DACS and
  DAFormer compute one scalar for the whole batch with `>=`);
- DACS/DAFormer's `color_jitter_p = 0.2` is a skip threshold (jitter when uniform > 0.2, i.e. 80 %
  of the time); here `jitter_p` is the probability of jittering, default 0.8 = the same behaviour.

    import torch
    from podium.tasks.segmentation.mixing import *
    MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    g = torch.Generator().manual_seed(0)
    src_img, tgt_img = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64)
    src_labels, tgt_valid = torch.randint(0, 5, (2, 64, 64)), torch.ones(2, 64, 64, dtype=torch.bool)
    teacher_logits = torch.randn(2, 5, 64, 64)                # the EMA teacher on tgt_img
    m = classmix_masks(src_labels, g)                         # (B, H, W) bool
    labels, conf, w = pseudo_labels(teacher_logits, tgt_valid)
    x = strong_colour(mix(m, src_img, tgt_img), MEAN, STD, g)
    y, pixel_w = mixed_targets(m, src_labels, labels, w, tgt_valid)
    masked = tgt_img * mic_mask(tgt_img.shape, generator=g)   # MIC: the student sees this
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.transforms.v2 import functional as F


def _uniform(generator: torch.Generator | None, n: int = 1) -> list[float]:
    return torch.rand(n, generator=generator).tolist()


def _stats(values: Sequence[float] | Tensor, like: Tensor) -> Tensor:
    """mean / std as a (1, C, 1, 1) tensor on `like`'s device and dtype."""
    return torch.as_tensor(values, dtype=like.dtype, device=like.device).reshape(1, -1, 1, 1)


def classmix_masks(labels: Tensor, generator: torch.Generator | None, ignore_index: int = 255) -> Tensor:
    """(B, H, W) int64 source labels -> (B, H, W) bool paste masks: per image, of the k classes
    present (ignore_index excluded) n = (k + k % 2) // 2 are drawn without replacement (DACS),
    True where the label is one of them. An image with no labelled pixel gets an empty mask."""
    masks = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    for i, label in enumerate(labels):
        classes = torch.unique(label)
        classes = classes[classes != ignore_index]
        k = int(classes.numel())
        if k == 0:
            continue
        pick = torch.randperm(k, generator=generator)[: (k + k % 2) // 2]
        masks[i] = torch.isin(label, classes[pick.to(classes.device)])
    return masks


def mix(mask: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """where(mask, a, b); a (B, H, W) mask is broadcast over the channels of (B, C, H, W) images."""
    if mask.dim() == a.dim() - 1:
        mask = mask.unsqueeze(1)
    return torch.where(mask, a, b)


def pseudo_labels(logits: Tensor, valid: Tensor | None, threshold: float = 0.968, ignore_index: int = 255
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """Teacher logits (B, K, H, W) -> (labels (B, H, W) int64 argmax, ignore_index where not
    valid; confidence (B, H, W) max softmax probability; weight (B,) = share of the image's valid
    pixels whose confidence is strictly above `threshold`, 0 for an image without valid pixels).
    `valid` (B, H, W) bool, e.g. the fisheye circle; None = every pixel."""
    with torch.no_grad():
        confidence, labels = torch.softmax(logits.detach().float(), dim=1).max(dim=1)
        if valid is None:
            valid = torch.ones_like(labels, dtype=torch.bool)
        valid = valid.to(torch.bool)
        labels = torch.where(valid, labels, torch.full_like(labels, ignore_index))
        confident = ((confidence > threshold) & valid).flatten(1).sum(1).float()
        count = valid.flatten(1).sum(1).float()
        weight = torch.where(count > 0, confident / count.clamp_min(1), torch.zeros_like(count))
    return labels, confidence, weight


def mixed_targets(mask: Tensor, source_labels: Tensor, pseudo: Tensor, pseudo_weight: Tensor,
                  target_valid: Tensor | None, ignore_index: int = 255) -> tuple[Tensor, Tensor]:
    """ClassMix labels and per-pixel loss weights (B, H, W): pasted pixels (mask True) take the
    source label with weight 1; the others the pseudo-label with the image's `pseudo_weight`
    (B,); unpasted pixels outside `target_valid` (out of the fisheye circle) are ignore_index with
    weight 0."""
    labels = torch.where(mask, source_labels, pseudo)
    image_weight = pseudo_weight.to(device=mask.device, dtype=torch.float32).reshape(-1, 1, 1).expand(mask.shape)
    weight = torch.where(mask, torch.ones_like(image_weight), image_weight)
    if target_valid is not None:
        outside = ~mask & ~target_valid.to(device=mask.device, dtype=torch.bool)
        labels = torch.where(outside, torch.full_like(labels, ignore_index), labels)
        weight = torch.where(outside, torch.zeros_like(weight), weight)
    return labels, weight


def blur_kernel(size: int) -> int:
    """DAFormer's kernel side for an image side: ceil(0.1 * size), rounded DOWN to odd (>= 1)."""
    k = math.ceil(0.1 * size)
    return max(1, k if k % 2 else k - 1)


def strong_colour(images: Tensor, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor,
                  generator: torch.Generator | None, jitter: float = 0.2, jitter_p: float = 0.8,
                  blur_p: float = 0.5) -> Tensor:
    """DACS / DAFormer's strong augmentation of normalised (B, C, H, W) images, per sample: with
    probability `jitter_p` a colour jitter (brightness, contrast, saturation factors uniform in
    [1 - jitter, 1 + jitter], hue shift uniform in [-jitter, jitter] — DAFormer passes s = 0.2 to
    kornia's ColorJitter for all four, kornia's hue being on torchvision's [-0.5, 0.5] scale —
    applied in a random order), then with probability `blur_p` a Gaussian blur (sigma uniform in
    [0.15, 1.15], kernel per axis ceil(0.1 * side) made odd). Works on [0, 1] values (the jitter
    clamps to [0, 1], as torchvision does) and returns normalised images of the same shape and
    dtype. Saturation and hue are skipped for grey (1-channel) images."""
    m, s = _stats(mean, images), _stats(std, images)
    x = images * s + m  # not clamped: a sample left alone comes back unchanged
    out = []
    for i in range(images.shape[0]):
        # A fixed number of draws per sample, whatever is applied: the stream never shifts.
        u_jit, u_blur, b, c, sat, hue, sigma = _uniform(generator, 7)
        order = torch.randperm(4, generator=generator).tolist()
        img = x[i]
        if u_jit < jitter_p and jitter > 0:
            ops = [
                lambda t: F.adjust_brightness(t, 1 + jitter * (2 * b - 1)),
                lambda t: F.adjust_contrast(t, 1 + jitter * (2 * c - 1)),
                lambda t: F.adjust_saturation(t, 1 + jitter * (2 * sat - 1)),
                lambda t: F.adjust_hue(t, min(jitter, 0.5) * (2 * hue - 1)),
            ]
            for k in order:
                if k < 2 or img.shape[0] == 3:
                    img = ops[k](img)
        if u_blur < blur_p:
            sig = 0.15 + sigma
            kernel = [blur_kernel(img.shape[-1]), blur_kernel(img.shape[-2])]  # torchvision: (x, y)
            if max(kernel) > 1:
                img = F.gaussian_blur(img, kernel_size=kernel, sigma=[sig, sig])
        out.append(img)
    return ((torch.stack(out) - m) / s).to(images.dtype)


def mic_mask(shape: tuple[int, int, int, int], block: int = 64, ratio: float = 0.7,
             generator: torch.Generator | None = None, device: torch.device | str | None = None) -> Tensor:
    """MIC's block mask for (B, C, H, W) images: (B, 1, H, W) float, 1 = kept. Per image a
    (ceil(H / block), ceil(W / block)) grid of blocks, each kept when uniform > ratio (so masked
    with probability `ratio`), repeated to block size and cropped to H x W."""
    b, _, h, w = shape
    grid = torch.rand((b, 1, math.ceil(h / block), math.ceil(w / block)), generator=generator) > ratio
    full = grid.repeat_interleave(block, dim=2).repeat_interleave(block, dim=3)[:, :, :h, :w]
    return full.to(device=device, dtype=torch.float32)


def colour_transfer(source: Tensor, target: Tensor, target_valid: Tensor | None,
                    mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor, p: float,
                    generator: torch.Generator | None) -> Tensor:
    """Photometric adaptation of normalised source images (B, C, H, W) to the target domain
    (Reinhard et al. 2001, per RGB channel): per source sample, with probability p, each channel's
    mean and std over the whole source image (in [0, 1] space) are matched to those of a randomly
    chosen target image over its VALID pixels (`target_valid` (Bt, H', W') bool; the black outside
    a fisheye circle must not count; None = all pixels). Values are not clamped, so the matched
    statistics hold exactly. Returns normalised images; a target without valid pixels, or p
    missed, leaves the sample unchanged."""
    m, s = _stats(mean, source), _stats(std, source)
    src = source * s + m
    tgt = target.to(source.dtype) * s + m
    nt = target.shape[0]
    if target_valid is None:
        target_valid = torch.ones((nt, *target.shape[-2:]), dtype=torch.bool, device=target.device)
    out = src.clone()
    for i in range(source.shape[0]):
        u = _uniform(generator)[0]
        j = int(torch.randint(nt, (1,), generator=generator))
        valid = target_valid[j].to(device=target.device, dtype=torch.bool)
        n = int(valid.sum())
        if u >= p or n == 0:
            continue
        pix = tgt[j][:, valid]  # (C, n)
        t_mean, t_std = pix.mean(1), pix.std(1, unbiased=False)
        s_mean = src[i].mean(dim=(1, 2))
        s_std = src[i].std(dim=(1, 2), unbiased=False)
        # A flat source channel has no contrast to scale: it is only shifted to the target mean.
        scale = torch.where(s_std > 1e-6, t_std / s_std.clamp_min(1e-6), torch.ones_like(s_std))
        out[i] = (src[i] - s_mean[:, None, None]) * scale[:, None, None] + t_mean[:, None, None]
    return (out - m) / s
