"""Segmentation models, registered under kind "model".

- ``seg_unet``: a U-Net (Ronneberger et al. 2015, MICCAI) from segmentation-models-pytorch over
  any timm encoder, random init or a LOCAL encoder weights file (timm key names — what
  `podium pretrain` writes, or an ImageNet state dict saved beforehand); optionally an auxiliary
  reconstruction decoder on the same encoder (multi-task learning, e.g. the reconstruction
  branch of "Multi-task learning for retinal vessel segmentation", and the MTL heads of
  fundus-lesion pipelines).

The reconstruction decoder works from the deepest encoder feature only, without skip
connections: with skips, a decoder copies the input through the first skip and the auxiliary
task teaches the encoder nothing. It upsamples by 2 per stage back to the input size.

Every factory is ``factory(cfg, *, num_classes, in_chans)``; ``forward(x)`` returns
{"logits": (B, num_classes, H, W)} plus "recon": (B, in_chans, H, W) when the head is on.
H and W must be divisible by 2**encoder_depth (the sliding-window inference guarantees it).

    podium train experiment=drive_unet model.encoder=resnet34 model.recon_head=true
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from podium.common.unet import build_unet, load_local_weights
from podium.engine.registry import register
from podium.errors import UserError


@dataclass
class SegUNetConfig:
    name: str = "seg_unet"
    encoder: str = "resnet18"  # any timm model with features_only support
    encoder_weights: str | None = None  # LOCAL state dict (e.g. RUN/encoder.pt from podium pretrain)
    decoder_channels: list[int] = field(default_factory=lambda: [256, 128, 64, 32, 16])
    encoder_depth: int = 5
    recon_head: bool = False  # auxiliary reconstruction decoder (task.recon_loss_weight weighs it)
    recon_channels: int = 64  # width of the reconstruction decoder (halved per stage, >= 16)


class ReconstructionDecoder(nn.Module):
    """Deepest encoder feature (B, C, H / 2**d, W / 2**d) -> image (B, out_chans, H, W)."""

    def __init__(self, in_channels: int, out_chans: int, depth: int, width: int):
        super().__init__()
        stages, chans = [], in_channels
        for i in range(depth):
            nxt = max(16, width >> i)
            stages.append(nn.Sequential(
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                nn.Conv2d(chans, nxt, 3, padding=1, bias=False), nn.BatchNorm2d(nxt), nn.ReLU(inplace=True)))
            chans = nxt
        self.stages = nn.Sequential(*stages)
        self.head = nn.Conv2d(chans, out_chans, 3, padding=1)

    def forward(self, deepest: Tensor) -> Tensor:
        return self.head(self.stages(deepest))


class SegmentationUNet(nn.Module):
    """x (B, C, H, W) -> {"logits": (B, K, H, W)[, "recon": (B, C, H, W)]}."""

    def __init__(self, in_chans: int, num_classes: int, encoder: str = "resnet18",
                 encoder_weights: str | None = None, decoder_channels=(256, 128, 64, 32, 16),
                 encoder_depth: int = 5, recon_head: bool = False, recon_channels: int = 64):
        super().__init__()
        self.unet = build_unet("encoder", encoder, in_chans, num_classes, encoder_depth,
                               list(decoder_channels), 1)
        if encoder_weights:
            load_local_weights(self.unet.encoder.model, encoder_weights, "encoder_weights", in_chans)
        self.recon = (ReconstructionDecoder(self.unet.encoder.out_channels[-1], in_chans, encoder_depth,
                                            recon_channels) if recon_head else None)
        self.num_classes = num_classes
        self.divisor = 2**encoder_depth  # input sides must be multiples of this

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        timm_model = getattr(self.unet.encoder, "model", None)
        if hasattr(timm_model, "set_grad_checkpointing"):
            timm_model.set_grad_checkpointing(enable)

    def encoder_state_dict(self) -> dict:
        """The encoder's tensors with timm key names (loadable by `model.encoder_weights`)."""
        return self.unet.encoder.model.state_dict()

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        h, w = x.shape[-2:]
        if not torch.jit.is_tracing() and (h % self.divisor or w % self.divisor):  # export traces fixed sizes
            raise ValueError(f"input {h}x{w} is not divisible by {self.divisor} (2**encoder_depth)")
        features = self.unet.encoder(x)
        out = {"logits": self.unet.segmentation_head(self.unet.decoder(features))}
        if self.recon is not None:
            out["recon"] = self.recon(features[-1])
        return out


@register("model", "seg_unet", schema=SegUNetConfig,
          help="Segmentation U-Net over any timm encoder, optional reconstruction head (multi-task).")
def seg_unet(cfg, *, num_classes: int, in_chans: int) -> nn.Module:
    if cfg.recon_channels < 1:
        raise UserError(f"model.recon_channels={cfg.recon_channels}: expected a positive width.")
    return SegmentationUNet(in_chans, num_classes, cfg.encoder, cfg.encoder_weights, list(cfg.decoder_channels),
                            cfg.encoder_depth, cfg.recon_head, cfg.recon_channels)
