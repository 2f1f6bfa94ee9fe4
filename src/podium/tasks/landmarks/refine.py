"""Coarse-to-fine landmark detection: a heatmap U-Net on a downsampled copy of the input finds
every landmark roughly; a small patch network refines each estimate on a crop of the
full-resolution input around it.

A whole 1935 x 2400 cephalogram does not fit a small GPU (nor a CPU budget), while 0.1 mm pixels
are what the last millimetre needs: the two stages share the work (the approach of the
cascaded / two-stage entries of the ISBI 2015 challenge and of Payer et al.'s spatial
configuration net followed by local refinement).

    podium train experiment=isbi2015_quick model=coarse_to_fine data.image_size=[1024,832]

Training: the first stage learns from the downsampled image; the refiner learns from crops
centred on the ground truth plus a random jitter (the jitter teaches the refiner to look anywhere
in its patch) and, for a share `train_from_estimates` of them, from crops centred on the first
stage's own (detached) estimates — the crops it will see at inference, including the stage's
typical misses (the "train on what you will be given" rule of cascaded detectors; a crop whose
truth falls outside it is ignored by the loss, so the useless estimates of the first epochs
cost nothing). Inference: crops centred on the first stage's decoded estimates.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from podium.engine.registry import register
from podium.errors import UserError
from podium.tasks.landmarks import heatmaps as hm
from podium.tasks.landmarks.models import (
    HeatmapUNetConfig, PatchRefinerConfig, crop_patches, heatmap_unet, patch_refiner,
)


@dataclass
class CoarseToFineConfig:
    name: str = "coarse_to_fine"
    coarse_factor: int = 4  # the first stage sees the input downsampled by this factor
    stage1: HeatmapUNetConfig = field(default_factory=HeatmapUNetConfig)
    refiner: PatchRefinerConfig = field(default_factory=PatchRefinerConfig)
    train_jitter: float = 12.0  # input pixels: training crops are centred on the truth +- this
    train_landmarks_per_image: int = 6  # patches per image in training (0: every landmark)
    # share of training crops centred on the first stage's detached estimate (+- estimate_jitter)
    # instead of the jittered truth
    train_from_estimates: float = 0.0
    estimate_jitter: float = 4.0
    decode_window: int = 11
    # Inference: the refiner's logits get a Gaussian log-prior centred on the first-stage estimate
    # (input pixels; 0 disables). Without it the refiner sometimes jumps to a look-alike structure
    # elsewhere in its patch: on the ISBI validation images (15, carved from training) MRE went
    # 1.62 (first stage alone) -> 1.61 (refiner, no prior) -> 1.38 mm (refiner, prior sigma 8 px
    # of the 1024 x 832 input); 6 px gave 1.38, 4 px 1.42, 16 px 1.46, 32 px 1.56.
    prior_sigma: float = 8.0


class CoarseToFine(nn.Module):
    """forward(x) -> {"points": (B, K, 2) input pixels, "coarse_points": ...};
    forward(x, points, visible) (training) -> first-stage heatmaps (and their learnable "sigma"
    when the first stage has one) and patch heatmaps with their targets, for the task's loss."""

    output_stride = 1
    sigma = None

    def __init__(self, stage1: nn.Module, refiner: nn.Module, num_landmarks: int, cfg: CoarseToFineConfig):
        super().__init__()
        self.stage1, self.refiner = stage1, refiner
        self.num_landmarks = num_landmarks
        self.factor, self.patch_size = cfg.coarse_factor, cfg.refiner.patch_size
        self.jitter, self.per_image, self.window = cfg.train_jitter, cfg.train_landmarks_per_image, cfg.decode_window
        self.prior_sigma = cfg.prior_sigma
        self.from_estimates, self.estimate_jitter = float(cfg.train_from_estimates), float(cfg.estimate_jitter)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.stage1.set_grad_checkpointing(enable)
        self.refiner.set_grad_checkpointing(enable)

    @property
    def coarse_stride(self) -> int:
        return self.factor * self.stage1.output_stride

    def _coarse(self, x: Tensor) -> dict:
        """The first stage's output on the downsampled input: {"heatmaps"[, "sigma"]}."""
        if self.factor == 1:
            return self.stage1(x)
        small = F.interpolate(x, scale_factor=1 / self.factor, mode="bilinear", antialias=True,
                              align_corners=False, recompute_scale_factor=False)
        return self.stage1(small)

    def _refine(self, x: Tensor, centres: Tensor, landmark_index: Tensor | None = None) -> tuple[Tensor, Tensor]:
        patches, offsets = crop_patches(x, centres, self.patch_size)
        return self.refiner(patches, landmark_index)["heatmaps"], offsets

    def forward(self, x: Tensor, points: Tensor | None = None, visible: Tensor | None = None) -> dict:
        first = self._coarse(x)
        coarse = first["heatmaps"]
        if points is None:
            return self._infer(x, coarse)
        b, k, _ = points.shape
        # choose the landmarks to refine in this step, and jitter their crop centres
        if 0 < self.per_image < k:
            chosen = torch.stack([torch.randperm(k, device=x.device)[: self.per_image] for _ in range(b)])
        else:
            chosen = torch.arange(k, device=x.device).expand(b, k)
        truth = torch.gather(points, 1, chosen[..., None].expand(-1, -1, 2))
        seen = torch.gather(visible, 1, chosen)
        centres = truth + (torch.rand_like(truth) * 2 - 1) * self.jitter
        if self.from_estimates > 0:
            with torch.no_grad():
                rough = self._decode_coarse(coarse.detach())
            rough = torch.gather(rough, 1, chosen[..., None].expand(-1, -1, 2))
            rough = rough + (torch.rand_like(rough) * 2 - 1) * self.estimate_jitter
            use = torch.rand(centres.shape[:2], device=x.device) < self.from_estimates
            centres = torch.where(use[..., None], rough, centres)
        patch_heat, offsets = self._refine(x, centres, chosen.reshape(-1))
        local = truth - offsets
        # a crop that misses its landmark teaches nothing: the loss ignores it
        inside = ((local >= 0) & (local <= self.patch_size - 1)).all(-1)
        out = {"heatmaps": coarse, "heatmap_stride": self.coarse_stride,
               "patch_heatmaps": patch_heat, "patch_points": local.reshape(-1, 1, 2),
               "patch_visible": (seen & inside).reshape(-1, 1)}
        if "sigma" in first:  # the first stage's learnable heatmap width, for its loss
            out["sigma"] = first["sigma"]
        return out

    def _decode_coarse(self, coarse: Tensor) -> Tensor:
        """First-stage heatmaps -> (B, K, 2) estimates in input pixels."""
        return hm.heatmap_to_points(hm.decode_local_soft_argmax(coarse.float(), window=self.window),
                                    self.coarse_stride)

    def _infer(self, x: Tensor, coarse: Tensor) -> dict:
        b, k = coarse.shape[:2]
        rough = self._decode_coarse(coarse)
        patch_heat, offsets = self._refine(x, rough)
        logits = patch_heat.float()
        if self.prior_sigma > 0:
            centre = (rough - offsets).reshape(-1, 2)  # the first-stage estimate in patch pixels
            size = logits.shape[-1]
            grid = torch.arange(size, device=x.device, dtype=logits.dtype)
            d2 = (grid[None, None, :] - centre[:, 0, None, None]) ** 2 + (grid[None, :, None] - centre[:, 1, None, None]) ** 2
            logits = logits - (d2 / (2 * self.prior_sigma ** 2))[:, None]
        fine = hm.decode_local_soft_argmax(logits, window=self.window).reshape(b, k, 2)
        return {"points": fine + offsets, "coarse_points": rough, "heatmaps": coarse}


@register("model", "coarse_to_fine", schema=CoarseToFineConfig,
          help="Two-stage landmarks: coarse heatmap U-Net + full-resolution patch refiner.")
def coarse_to_fine(cfg, *, num_landmarks: int, in_chans: int) -> nn.Module:
    if cfg.coarse_factor < 1:
        raise UserError(f"model.coarse_factor must be >= 1, got {cfg.coarse_factor}.")
    if not 0 <= cfg.train_from_estimates <= 1:
        raise UserError(f"model.train_from_estimates must be in [0, 1], got {cfg.train_from_estimates}.")
    if cfg.refiner.patch_size % 2 ** cfg.refiner.encoder_depth:
        raise UserError(f"model.refiner.patch_size={cfg.refiner.patch_size} must be divisible by "
                        f"2**model.refiner.encoder_depth = {2 ** cfg.refiner.encoder_depth}.")
    stage1 = heatmap_unet(cfg.stage1, num_landmarks=num_landmarks, in_chans=in_chans)
    refiner = patch_refiner(cfg.refiner, num_landmarks=num_landmarks, in_chans=in_chans)
    return CoarseToFine(stage1, refiner, num_landmarks, cfg)
