"""FI-VarNet: a variational network whose cascades run on feature images, registered as
model "fivarnet".

Giannakopoulos et al. 2024, "Accelerated MRI reconstructions via variational network and
feature domain learning", Scientific Reports. Written here by hand because no maintained
library ships it (design.md). The cascade state is an N-channel feature image instead of
k-space:
- a 5x5 conv encoder maps the 2-channel coil-combined image (normalised by its per-sample,
  per-channel mean and std) to `feature_dim` channels, a 5x5 conv decoder maps back;
- each feature cascade updates f <- f - dc_weight * E(A^H (M (A D(f)) - y)) - R(f), where
  D decodes to an image, A = F S expands to coil k-space, M is the mask, A^H = sum_c conj(S_c)
  F^-1 reduces back to an image, E re-encodes it and R is a feature-space U-Net;
- the decoded result is expanded to k-space and refined by `image_cascades` ordinary E2E-VarNet
  cascades; the output is the RSS image.
The data-consistency residual is re-encoded with the encoder's LINEAR part (no mean shift, no
bias): a feature image that already agrees with the measured data then gets a zero correction,
which is what makes the term data consistency. (The reference code applies the full affine
encoder; the difference is a constant the U-Net would have to learn to cancel.)
The paper's block attention is left out (too memory-hungry for the GPUs this was used on; the
teams that dropped it found more cascades or deeper U-Nets worth more); LSKA is the optional
attention instead. Notation: (feature_cascades + image_cascades, feature_dim, unet_chans,
sens_chans), e.g. (12+6, 18, 18, 8).

    >>> import torch
    >>> from podium.tasks.reconstruction.models.fivarnet import FIVarNet
    >>> model = FIVarNet(2, 1, feature_dim=4, unet_chans=4, sens_chans=2, pools=2, sens_pools=2)
    >>> mask = torch.zeros(1, 1, 1, 24, 1); mask[..., ::3, :] = 1; mask[..., 10:14, :] = 1
    >>> model(torch.randn(1, 3, 32, 24, 2) * mask, mask).shape
    torch.Size([1, 32, 24])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from podium.engine.registry import register
from podium.errors import UserError
from podium.tasks.reconstruction.models.unet import ChannelNormUnet, NormUnet
from podium.tasks.reconstruction.models.varnet import (
    KSpaceNetwork,
    LowFrequencies,
    SensitivityModel,
    VarNetBlock,
    check_inputs,
    check_positive,
    lska_attention,
    run_cascade,
    sens_expand,
    sens_reduce,
)


@dataclass
class FIVarNetConfig:
    name: str = "fivarnet"
    feature_cascades: int = 12
    image_cascades: int = 6
    feature_dim: int = 18  # channels of the feature image
    unet_chans: int = 18  # first-level width of the feature and image cascade U-Nets
    sens_chans: int = 8
    pools: int = 4
    sens_pools: int = 4
    share_encoder_decoder: bool = True  # one encoder/decoder for all feature cascades
    lska_kernel: int = 0  # 0 = off; else one of 7, 11, 23, 35, 41, 53 (models/lska.py)
    lska_levels: str = "bottleneck"  # "bottleneck" | "all"


def image_to_channels(image: Tensor) -> Tensor:
    """(B, 1, H, W, 2) -> (B, 2, H, W)."""
    return image[:, 0].permute(0, 3, 1, 2)


def channels_to_image(channels: Tensor) -> Tensor:
    """(B, 2, H, W) -> (B, 1, H, W, 2)."""
    return channels.permute(0, 2, 3, 1).unsqueeze(1).contiguous()


def image_statistics(image: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample mean and std of the real and imaginary channels, each (B, 2, 1, 1)."""
    flat = image_to_channels(image).flatten(2)
    mean = flat.mean(dim=2)[..., None, None]
    std = flat.std(dim=2).clamp_min(1e-12)[..., None, None]  # floor: an empty slice
    return mean, std


class FeatureEncoder(nn.Module):
    """Normalised coil-combined image (B, 1, H, W, 2) -> features (B, feature_dim, H, W)."""

    def __init__(self, feature_dim: int):
        super().__init__()
        self.conv = nn.Conv2d(2, feature_dim, kernel_size=5, padding=2)

    def forward(self, image: Tensor, mean: Tensor, std: Tensor) -> Tensor:
        return self.conv((image_to_channels(image) - mean) / std)

    def encode_residual(self, image: Tensor, std: Tensor) -> Tensor:
        """The linear part of `forward`, for differences of images (see the module docstring)."""
        return F.conv2d(image_to_channels(image) / std, self.conv.weight, padding=2)


class FeatureDecoder(nn.Module):
    """Features (B, feature_dim, H, W) -> image (B, 1, H, W, 2) at the input's scale."""

    def __init__(self, feature_dim: int):
        super().__init__()
        self.conv = nn.Conv2d(feature_dim, 2, kernel_size=5, padding=2)

    def forward(self, features: Tensor, mean: Tensor, std: Tensor) -> Tensor:
        return channels_to_image(self.conv(features) * std + mean)


class FeatureCascade(nn.Module):
    """One feature-space cascade: feature data consistency plus a feature U-Net."""

    def __init__(self, encoder: FeatureEncoder, decoder: FeatureDecoder, regularizer: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.regularizer = regularizer
        self.dc_weight = nn.Parameter(torch.ones(1))

    def forward(
        self,
        features: Tensor,
        ref_kspace: Tensor,
        mask: Tensor,
        sens_maps: Tensor,
        mean: Tensor,
        std: Tensor,
    ) -> Tensor:
        kspace = sens_expand(self.decoder(features, mean, std), sens_maps)
        residual = sens_reduce(mask * (kspace - ref_kspace), sens_maps)
        data_consistency = self.dc_weight * self.encoder.encode_residual(residual, std)
        return features - data_consistency - self.regularizer(features)


class FIVarNet(KSpaceNetwork):
    def __init__(
        self,
        feature_cascades: int = 12,
        image_cascades: int = 6,
        feature_dim: int = 18,
        unet_chans: int = 18,
        sens_chans: int = 8,
        pools: int = 4,
        sens_pools: int = 4,
        share_encoder_decoder: bool = True,
        lska_kernel: int = 0,
        lska_levels: str = "bottleneck",
    ):
        super().__init__()
        attention = lska_attention(lska_kernel, lska_levels)
        self.notation = (
            f"({feature_cascades}+{image_cascades}, {feature_dim}, {unet_chans}, {sens_chans})"
        )
        self.sens_net = SensitivityModel(sens_chans, sens_pools)
        # The outer pair maps the input to features and the last features back; with sharing,
        # every cascade uses it too, otherwise each cascade learns its own.
        self.encoder = FeatureEncoder(feature_dim)
        self.decoder = FeatureDecoder(feature_dim)
        self.feature_cascades = nn.ModuleList(
            FeatureCascade(
                self.encoder if share_encoder_decoder else FeatureEncoder(feature_dim),
                self.decoder if share_encoder_decoder else FeatureDecoder(feature_dim),
                ChannelNormUnet(
                    feature_dim,
                    feature_dim,
                    unet_chans,
                    pools,
                    norm_groups=1,
                    attention=attention,
                    attention_levels=lska_levels,
                ),
            )
            for _ in range(feature_cascades)
        )
        self.image_cascades = nn.ModuleList(
            VarNetBlock(
                NormUnet(unet_chans, pools, attention=attention, attention_levels=lska_levels)
            )
            for _ in range(image_cascades)
        )
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def sens_maps(
        self, masked_kspace: Tensor, mask: Tensor, num_low_frequencies: LowFrequencies = None
    ) -> Tensor:
        """The estimated coil sensitivities (B, coils, H, W, 2)."""
        return self.sens_net(masked_kspace, mask, num_low_frequencies)

    def predicted_kspace(
        self, masked_kspace: Tensor, mask: Tensor, num_low_frequencies: LowFrequencies = None
    ) -> Tensor:
        check_inputs(masked_kspace, mask)
        mask = mask.to(masked_kspace.dtype)
        sens_maps = self.sens_maps(masked_kspace, mask, num_low_frequencies)
        checkpointed = self.grad_checkpointing and self.training and torch.is_grad_enabled()

        image = sens_reduce(masked_kspace, sens_maps)
        mean, std = image_statistics(image)
        features = self.encoder(image, mean, std)
        for cascade in self.feature_cascades:
            features = run_cascade(
                cascade, checkpointed, features, masked_kspace, mask, sens_maps, mean, std
            )

        kspace = sens_expand(self.decoder(features, mean, std), sens_maps)
        for cascade in self.image_cascades:
            kspace = run_cascade(cascade, checkpointed, kspace, masked_kspace, mask, sens_maps)
        return kspace


@register("model", "fivarnet", schema=FIVarNetConfig)
def fivarnet(cfg, **context) -> FIVarNet:
    """FI-VarNet (Giannakopoulos et al. 2024): feature-space cascades, then k-space cascades."""
    check_positive(cfg, ("feature_dim", "unet_chans", "sens_chans"))
    check_positive(cfg, ("feature_cascades", "image_cascades", "pools", "sens_pools"), minimum=0)
    if not isinstance(cfg.share_encoder_decoder, bool):
        raise UserError(
            f"model.share_encoder_decoder = {cfg.share_encoder_decoder!r}; expected true or false"
        )
    return FIVarNet(
        feature_cascades=cfg.feature_cascades,
        image_cascades=cfg.image_cascades,
        feature_dim=cfg.feature_dim,
        unet_chans=cfg.unet_chans,
        sens_chans=cfg.sens_chans,
        pools=cfg.pools,
        sens_pools=cfg.sens_pools,
        share_encoder_decoder=cfg.share_encoder_decoder,
        lska_kernel=cfg.lska_kernel,
        lska_levels=cfg.lska_levels,
    )
