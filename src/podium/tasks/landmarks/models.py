"""Landmark models, registered under kind "model".

- ``heatmap_unet``: a U-Net (Ronneberger et al. 2015) from segmentation-models-pytorch over any
  timm encoder, one heatmap (logits) per landmark; an optional learnable per-landmark sigma
  (Payer et al. 2019, "Integrating spatial configuration into heatmap regression based CNNs for
  landmark localization", Medical Image Analysis).
- ``coord_regressor``: a timm backbone regressing the 2K coordinates directly (the baseline that
  heatmaps beat; Tompson et al. 2015, Nibali et al. 2018).
- ``patch_refiner``: the second stage of coarse-to-fine localisation (e.g. Zhong et al. 2019,
  "An Attention-Guided Deep Regression Model for Landmark Detection in Cephalograms", MICCAI):
  a small U-Net on full-resolution patches cut around the first-stage estimates (`crop_patches`).

Every factory is ``factory(cfg, *, num_landmarks, in_chans)``. Every model has
`set_grad_checkpointing(enable)`, an `output_stride` attribute (input pixels per output pixel),
and a `sigma` attribute (a `LearnableSigma`, or None). `forward` returns a dict:
heatmap models {"heatmaps": (B, K, H / stride, W / stride) logits} plus "sigma": (K,) when the
sigma is learnable (returned from forward so that DDP sees the parameter used); the regressor
{"points": (B, K, 2)} in input pixels.

Weights are never downloaded: `encoder_weights` / `weights` name a LOCAL state-dict file.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from podium.common.unet import (
    UNetRunner,
    build_unet,
    check_timm_name,
    load_local_weights,
)
from podium.engine.registry import register
from podium.errors import UserError
from podium.tasks.landmarks.heatmaps import LearnableSigma

# --------------------------------------------------------------------------------------------
# Config schemas
# --------------------------------------------------------------------------------------------


@dataclass
class HeatmapUNetConfig:
    name: str = "heatmap_unet"
    encoder: str = "resnet18"  # any timm model with features_only support ("tu-" is implied)
    encoder_weights: str | None = None  # LOCAL state dict for the encoder (timm key names)
    decoder_channels: list[int] = field(default_factory=lambda: [256, 128, 64, 32, 16])
    encoder_depth: int = 5
    output_stride: int = 1  # 1, 2, 4, ... < 2**encoder_depth: the last decoder stages are dropped
    learnable_sigma: bool = False
    init_sigma: float = 2.0  # in heatmap pixels


@dataclass
class CoordRegressorConfig:
    name: str = "coord_regressor"
    arch: str = "resnet18"  # any timm model
    weights: str | None = None  # LOCAL state dict (the classifier is left at random init)
    drop_rate: float = 0.0


@dataclass
class PatchRefinerConfig:
    name: str = "patch_refiner"
    encoder: str = "resnet10t"
    encoder_weights: str | None = None
    decoder_channels: list[int] = field(default_factory=lambda: [64, 32, 16])
    encoder_depth: int = 3  # patch sides must be divisible by 2**encoder_depth
    patch_size: int = 64  # the crop side the task cuts around each first-stage estimate
    shared: bool = True  # one network for all landmarks (+ K one-hot identity channels)
    learnable_sigma: bool = False
    init_sigma: float = 2.0


# --------------------------------------------------------------------------------------------
# Heatmap U-Net
# --------------------------------------------------------------------------------------------


class HeatmapUNet(nn.Module):
    """x (B, C, H, W) -> {"heatmaps": (B, K, H / s, W / s) logits[, "sigma": (K,)]}."""

    def __init__(self, in_chans: int, num_landmarks: int, encoder: str = "resnet18",
                 encoder_weights: str | None = None, decoder_channels=(256, 128, 64, 32, 16),
                 encoder_depth: int = 5, output_stride: int = 1, learnable_sigma: bool = False,
                 init_sigma: float = 2.0):
        super().__init__()
        unet = build_unet("encoder", encoder, in_chans, num_landmarks, encoder_depth,
                           list(decoder_channels), output_stride)
        if encoder_weights:
            load_local_weights(unet.encoder.model, encoder_weights, "encoder_weights", in_chans)
        self.net = UNetRunner(unet)
        self.output_stride = int(output_stride)
        self.num_landmarks = num_landmarks
        self.sigma = LearnableSigma(num_landmarks, init_sigma) if learnable_sigma else None

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.net.set_grad_checkpointing(enable)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        out = {"heatmaps": self.net(x)}
        if self.sigma is not None:
            out["sigma"] = self.sigma()
        return out


@register("model", "heatmap_unet", schema=HeatmapUNetConfig,
          help="U-Net heatmaps over any timm encoder (model.encoder=NAME).")
def heatmap_unet(cfg, *, num_landmarks: int, in_chans: int) -> nn.Module:
    return HeatmapUNet(in_chans, num_landmarks, cfg.encoder, cfg.encoder_weights, list(cfg.decoder_channels),
                       cfg.encoder_depth, cfg.output_stride, cfg.learnable_sigma, cfg.init_sigma)


# --------------------------------------------------------------------------------------------
# Direct coordinate regression
# --------------------------------------------------------------------------------------------


class CoordRegressor(nn.Module):
    """x (B, C, H, W) -> {"points": (B, K, 2)} in input pixels.

    The 2K backbone outputs pass through a sigmoid and are scaled to the image extent:
    x = sigmoid * W - 0.5, y = sigmoid * H - 0.5, i.e. (-0.5, W - 0.5) in the pixel-centre
    convention (a zero output predicts the image centre).
    """

    output_stride = 1
    sigma = None

    def __init__(self, backbone: nn.Module, num_landmarks: int):
        super().__init__()
        self.backbone = backbone
        self.num_landmarks = num_landmarks

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        h, w = x.shape[-2:]
        unit = torch.sigmoid(self.backbone(x).float()).reshape(x.shape[0], self.num_landmarks, 2)
        scale = torch.tensor([w, h], dtype=unit.dtype, device=unit.device)
        return {"points": unit * scale - 0.5}


@register("model", "coord_regressor", schema=CoordRegressorConfig,
          help="Direct coordinate regression with a timm backbone (baseline).")
def coord_regressor(cfg, *, num_landmarks: int, in_chans: int) -> nn.Module:
    import timm

    arch = check_timm_name("arch", cfg.arch)
    backbone = timm.create_model(arch, pretrained=False, num_classes=2 * num_landmarks,
                                 in_chans=in_chans, drop_rate=cfg.drop_rate)
    if cfg.weights:
        load_local_weights(backbone, cfg.weights, "weights", in_chans)
    return CoordRegressor(backbone, num_landmarks)


# --------------------------------------------------------------------------------------------
# Patch refiner (coarse-to-fine second stage)
# --------------------------------------------------------------------------------------------


def crop_patches(images: Tensor, centers: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Cut a size x size patch around every landmark estimate, zero outside the image.

    images (B, C, H, W); centers (B, K, 2) (x, y) in image pixels (any float; rounded to the
    nearest pixel, which becomes patch pixel (size // 2, size // 2)). Returns patches
    (B * K, C, size, size), ordered b * K + k, and integer-valued offsets (B, K, 2) float with
    x_image = x_patch + offset_x (likewise y). Differentiable w.r.t. the images, not the centres.
    """
    b, c, h, w = images.shape
    k = centers.shape[1]
    centre = torch.nan_to_num(centers.detach().float()).clamp(-1e6, 1e6)
    offsets = torch.floor(centre + 0.5) - size // 2  # (B, K, 2)
    steps = torch.arange(size, device=images.device)
    cols = offsets[..., 0, None].long() + steps  # (B, K, P)
    rows = offsets[..., 1, None].long() + steps
    inside = ((rows >= 0) & (rows < h))[..., :, None] & ((cols >= 0) & (cols < w))[..., None, :]
    batch = torch.arange(b, device=images.device)[:, None, None, None]
    # advanced indices separated by a slice go first: (B, K, P, P, C)
    picked = images[batch, :, rows.clamp(0, h - 1)[..., :, None], cols.clamp(0, w - 1)[..., None, :]]
    patches = picked * inside[..., None].to(images.dtype)
    return patches.permute(0, 1, 4, 2, 3).reshape(b * k, c, size, size), offsets


class PatchRefiner(nn.Module):
    """patches (B*K, C, P, P) -> {"heatmaps": (B*K, 1, P, P) logits[, "sigma": (K,)]}.

    Patch n belongs to landmark n % K (the order of `crop_patches`) unless `landmark_index`
    (B*K,) says otherwise. shared=True: one U-Net whose input gets K extra channels, a one-hot
    map of the landmark's identity; shared=False: one U-Net per landmark (nn.ModuleList).
    Heatmap coordinates are patch pixels (stride 1): x_image = x_patch + offset_x.
    """

    output_stride = 1

    def __init__(self, nets: list[nn.Module], num_landmarks: int, shared: bool,
                 learnable_sigma: bool = False, init_sigma: float = 2.0):
        super().__init__()
        self.nets = nn.ModuleList(nets)
        self.num_landmarks = num_landmarks
        self.shared = shared
        self.sigma = LearnableSigma(num_landmarks, init_sigma) if learnable_sigma else None

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for net in self.nets:
            net.set_grad_checkpointing(enable)

    def forward(self, patches: Tensor, landmark_index: Tensor | None = None) -> dict[str, Tensor]:
        n, _, p, q = patches.shape
        k = self.num_landmarks
        if landmark_index is None:
            if n % k:
                raise ValueError(f"{n} patches is not a multiple of {k} landmarks; pass landmark_index")
            landmark_index = torch.arange(n, device=patches.device) % k
        if self.shared:
            identity = F.one_hot(landmark_index, k).to(patches.dtype)[:, :, None, None].expand(n, k, p, q)
            heatmaps = self.nets[0](torch.cat([patches, identity], dim=1))
        else:
            heatmaps = patches.new_zeros(n, 1, p, q)
            for i, net in enumerate(self.nets):
                rows = torch.nonzero(landmark_index == i).squeeze(1)
                if rows.numel():
                    heatmaps = heatmaps.index_copy(0, rows, net(patches[rows]).to(heatmaps.dtype))
        out = {"heatmaps": heatmaps}
        if self.sigma is not None:
            out["sigma"] = self.sigma()
        return out


@register("model", "patch_refiner", schema=PatchRefinerConfig,
          help="Second stage of coarse_to_fine (takes patches, not images): use model=coarse_to_fine.")
def patch_refiner(cfg, *, num_landmarks: int, in_chans: int) -> nn.Module:
    if cfg.patch_size % 2**cfg.encoder_depth:
        raise UserError(f"model.patch_size={cfg.patch_size} must be divisible by "
                        f"2**encoder_depth = {2**cfg.encoder_depth}.")
    copies = 1 if cfg.shared else num_landmarks
    net_chans = in_chans + num_landmarks if cfg.shared else in_chans
    nets = []
    for _ in range(copies):
        unet = build_unet("encoder", cfg.encoder, net_chans, 1, cfg.encoder_depth,
                           list(cfg.decoder_channels), 1)
        if cfg.encoder_weights:
            load_local_weights(unet.encoder.model, cfg.encoder_weights, "encoder_weights", in_chans)
        nets.append(UNetRunner(unet))
    return PatchRefiner(nets, num_landmarks, cfg.shared, cfg.learnable_sigma, cfg.init_sigma)
