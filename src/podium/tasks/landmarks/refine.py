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

An optional middle stage (`mid_factor`, e.g. 2) sits between the two: a patch U-Net on crops of
the input downsampled by that factor, trained the same way at its own scale; the refiner's
crops then start from its answers, in training and at inference.
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
    # Optional middle stage (0: off): a second patch U-Net, on crops of the input downsampled by
    # mid_factor (1 < mid_factor < coarse_factor) around the first-stage estimates; the
    # full-resolution refiner then starts from its estimates. Why: the refiner pulls its answer
    # ~25 % of the way back to its crop centre (ISBI validation, crops centred on the truth + 8
    # px keep 0.25 of the displacement), so a better centre should give a better answer. Measured
    # (isbi2015_c2f + mid_factor=2): val 1.302 -> 1.286 mm, Test1 1.590 -> 1.561 mm, for 27 % more
    # training time; a second seed gave 1.344 / 1.650. Within seed noise, hence off. Jitters
    # scale with the factor.
    mid_factor: int = 0
    mid: PatchRefinerConfig = field(default_factory=PatchRefinerConfig)
    mid_prior_sigma: float = 16.0  # input pixels, as prior_sigma


class CoarseToFine(nn.Module):
    """forward(x) -> {"points": (B, K, 2) input pixels, "coarse_points": ...};
    forward(x, points, visible) (training) -> first-stage heatmaps (and their learnable "sigma"
    when the first stage has one) and patch heatmaps with their targets, for the task's loss."""

    output_stride = 1
    sigma = None

    def __init__(self, stage1: nn.Module, refiner: nn.Module, num_landmarks: int, cfg: CoarseToFineConfig,
                 mid: nn.Module | None = None):
        super().__init__()
        self.stage1, self.refiner, self.mid = stage1, refiner, mid
        self.mid_factor, self.mid_patch = int(cfg.mid_factor), cfg.mid.patch_size
        self.mid_prior_sigma = float(cfg.mid_prior_sigma)
        self.num_landmarks = num_landmarks
        self.factor, self.patch_size = cfg.coarse_factor, cfg.refiner.patch_size
        self.jitter, self.per_image, self.window = cfg.train_jitter, cfg.train_landmarks_per_image, cfg.decode_window
        self.prior_sigma = cfg.prior_sigma
        self.from_estimates, self.estimate_jitter = float(cfg.train_from_estimates), float(cfg.estimate_jitter)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.stage1.set_grad_checkpointing(enable)
        self.refiner.set_grad_checkpointing(enable)
        if self.mid is not None:
            self.mid.set_grad_checkpointing(enable)

    @property
    def coarse_stride(self) -> int:
        return self.factor * self.stage1.output_stride

    @staticmethod
    def _downsample(x: Tensor, factor: int) -> Tensor:
        if factor == 1:
            return x
        return F.interpolate(x, scale_factor=1 / factor, mode="bilinear", antialias=True,
                             align_corners=False, recompute_scale_factor=False)

    def _coarse(self, x: Tensor) -> dict:
        """The first stage's output on the downsampled input: {"heatmaps"[, "sigma"]}."""
        return self.stage1(self._downsample(x, self.factor))

    def _refine(self, x: Tensor, centres: Tensor, landmark_index: Tensor | None = None) -> tuple[Tensor, Tensor]:
        patches, offsets = crop_patches(x, centres, self.patch_size)
        return self.refiner(patches, landmark_index)["heatmaps"], offsets

    def _refine_mid(self, small: Tensor, centres: Tensor, landmark_index: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The middle stage on `small` (the input downsampled by mid_factor) around `centres`
        (input pixels): heatmaps and offsets in small-image pixels."""
        f = self.mid_factor
        patches, offsets = crop_patches(small, (centres + 0.5) / f - 0.5, self.mid_patch)
        return self.mid(patches, landmark_index)["heatmaps"], offsets

    def _decode_patch(self, logits: Tensor, centre: Tensor, prior_sigma: float) -> Tensor:
        """Patch logits (N, 1, P, P) -> (N, 1, 2) patch pixels, with an optional Gaussian
        log-prior (sigma in patch pixels) around `centre` (N, 2) patch pixels."""
        logits = logits.float()
        if prior_sigma > 0:
            grid = torch.arange(logits.shape[-1], device=logits.device, dtype=logits.dtype)
            d2 = (grid[None, None, :] - centre[:, 0, None, None]) ** 2 + (grid[None, :, None] - centre[:, 1, None, None]) ** 2
            logits = logits - (d2 / (2 * prior_sigma ** 2))[:, None]
        return hm.decode_local_soft_argmax(logits, window=self.window)

    def _mid_estimates(self, heat: Tensor, offsets: Tensor, centres: Tensor) -> Tensor:
        """The middle stage's answer in input pixels, decoded as at inference (prior around the
        crop's centre)."""
        f = self.mid_factor
        centre_small = (centres + 0.5) / f - 0.5
        local = self._decode_patch(heat, (centre_small - offsets).reshape(-1, 2), self.mid_prior_sigma / f)
        return (local.reshape(centres.shape) + offsets + 0.5) * f - 0.5

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
        estimates = None
        if self.from_estimates > 0:
            with torch.no_grad():
                estimates = torch.gather(self._decode_coarse(coarse.detach()), 1, chosen[..., None].expand(-1, -1, 2))
        out = {"heatmaps": coarse, "heatmap_stride": self.coarse_stride}
        if self.mid is not None:  # the middle stage learns like the refiner, at its own scale
            f = self.mid_factor
            centres = self._crop_centres(truth, estimates, f)
            heat, offsets = self._refine_mid(self._downsample(x, f), centres, chosen.reshape(-1))
            local = (truth + 0.5) / f - 0.5 - offsets
            inside = ((local >= 0) & (local <= self.mid_patch - 1)).all(-1)
            out.update(mid_patch_heatmaps=heat, mid_patch_points=local.reshape(-1, 1, 2),
                       mid_patch_visible=(seen & inside).reshape(-1, 1))
            if estimates is not None:  # the refiner's crops start where the middle stage answered
                with torch.no_grad():
                    estimates = self._mid_estimates(heat.detach(), offsets, centres)
        centres = self._crop_centres(truth, estimates, 1)
        patch_heat, offsets = self._refine(x, centres, chosen.reshape(-1))
        local = truth - offsets
        # a crop that misses its landmark teaches nothing: the loss ignores it
        inside = ((local >= 0) & (local <= self.patch_size - 1)).all(-1)
        out.update(patch_heatmaps=patch_heat, patch_points=local.reshape(-1, 1, 2),
                   patch_visible=(seen & inside).reshape(-1, 1))
        if "sigma" in first:  # the first stage's learnable heatmap width, for its loss
            out["sigma"] = first["sigma"]
        return out

    def _crop_centres(self, truth: Tensor, estimates: Tensor | None, scale: int) -> Tensor:
        """Training crop centres (input pixels): the truth +- train_jitter or, for a share
        train_from_estimates, the previous stage's estimate +- estimate_jitter; jitters in pixels
        of the stage's own image (input pixels x scale)."""
        centres = truth + (torch.rand_like(truth) * 2 - 1) * self.jitter * scale
        if estimates is None:
            return centres
        rough = estimates + (torch.rand_like(estimates) * 2 - 1) * self.estimate_jitter * scale
        use = torch.rand(centres.shape[:2], device=centres.device) < self.from_estimates
        return torch.where(use[..., None], rough, centres)

    def _decode_coarse(self, coarse: Tensor) -> Tensor:
        """First-stage heatmaps -> (B, K, 2) estimates in input pixels."""
        return hm.heatmap_to_points(hm.decode_local_soft_argmax(coarse.float(), window=self.window),
                                    self.coarse_stride)

    def _infer(self, x: Tensor, coarse: Tensor) -> dict:
        b, k = coarse.shape[:2]
        rough = self._decode_coarse(coarse)
        out = {"coarse_points": rough, "heatmaps": coarse}
        centres = rough
        if self.mid is not None:
            heat, offsets = self._refine_mid(self._downsample(x, self.mid_factor), rough)
            centres = out["mid_points"] = self._mid_estimates(heat, offsets, rough)
        patch_heat, offsets = self._refine(x, centres)
        fine = self._decode_patch(patch_heat, (centres - offsets).reshape(-1, 2), self.prior_sigma)
        out["points"] = fine.reshape(b, k, 2) + offsets
        return out


@register("model", "coarse_to_fine", schema=CoarseToFineConfig,
          help="Two-stage landmarks: coarse heatmap U-Net + full-resolution patch refiner.")
def coarse_to_fine(cfg, *, num_landmarks: int, in_chans: int) -> nn.Module:
    if cfg.coarse_factor < 1:
        raise UserError(f"model.coarse_factor must be >= 1, got {cfg.coarse_factor}.")
    if not 0 <= cfg.train_from_estimates <= 1:
        raise UserError(f"model.train_from_estimates must be in [0, 1], got {cfg.train_from_estimates}.")
    for key in ("refiner", "mid"):
        part = cfg[key]
        if part.patch_size % 2 ** part.encoder_depth:
            raise UserError(f"model.{key}.patch_size={part.patch_size} must be divisible by "
                            f"2**model.{key}.encoder_depth = {2 ** part.encoder_depth}.")
    if cfg.mid_factor and not 1 < cfg.mid_factor < cfg.coarse_factor:
        raise UserError(f"model.mid_factor={cfg.mid_factor}: expected 0 (no middle stage) or a factor "
                        f"between 1 and model.coarse_factor={cfg.coarse_factor}, exclusive.")
    stage1 = heatmap_unet(cfg.stage1, num_landmarks=num_landmarks, in_chans=in_chans)
    refiner = patch_refiner(cfg.refiner, num_landmarks=num_landmarks, in_chans=in_chans)
    mid = patch_refiner(cfg.mid, num_landmarks=num_landmarks, in_chans=in_chans) if cfg.mid_factor else None
    return CoarseToFine(stage1, refiner, num_landmarks, cfg, mid)
