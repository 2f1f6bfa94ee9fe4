"""Segmentation models, registered under kind "model".

- ``seg_unet``: a U-Net (Ronneberger et al. 2015, MICCAI) from segmentation-models-pytorch over
  any timm encoder, random init or a LOCAL encoder weights file (timm key names — what
  `podium pretrain` writes, or an ImageNet state dict saved beforehand); optionally an auxiliary
  reconstruction decoder on the same encoder (multi-task learning, e.g. the reconstruction
  branch of "Multi-task learning for retinal vessel segmentation", and the MTL heads of
  fundus-lesion pipelines).
- ``segformer``: SegFormer (Xie et al. 2021, NeurIPS) from segmentation-models-pytorch, MiT
  encoders mit_b0 .. mit_b5, random init or a LOCAL encoder weights file; the logits are
  upsampled from 1/4 to the input size inside the model. NVIDIA Source Code License for the
  MiT encoder code: non-commercial use only (see SEGFORMER_LICENCE below).

Both have ``param_groups_split()`` -> (encoder parameters, the rest) for recipes that train the
decoder and head at a higher learning rate than the encoder (10x in DAFormer / MIC).

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

    def param_groups_split(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(encoder parameters, everything else): UDA recipes train the rest at 10x the lr."""
        return split_parameters(self, self.unet.encoder)

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


def split_parameters(model: nn.Module, encoder: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(the parameters of `encoder`, every other parameter of `model`), each parameter once."""
    inside = {id(p) for p in encoder.parameters()}
    params = list(model.parameters())  # nn.Module.parameters() yields a shared tensor once
    return [p for p in params if id(p) in inside], [p for p in params if id(p) not in inside]


# ---- SegFormer (Xie et al. 2021, "SegFormer: Simple and Efficient Design for Semantic
# Segmentation with Transformers", NeurIPS): a Mix Transformer (MiT) encoder and an all-MLP decoder
# at 1/4 of the input, through smp.Segformer. It is the encoder of the UDA recipes DAFormer, HRDA
# and MIC. smp's MiT encoder is NVIDIA's SegFormer code (segmentation_models_pytorch/encoders/
# mix_transformer.py: "Licensed under the NVIDIA Source Code License"), whose section 3.3 limits
# the work and derivative works to non-commercial use, "for research or evaluation purposes only".

MIT_ENCODERS = tuple(f"mit_b{i}" for i in range(6))
SEGFORMER_LICENCE = ("MiT encoders are NVIDIA's SegFormer code under the NVIDIA Source Code License: "
                     "non-commercial use only (research or evaluation purposes).")


@dataclass
class SegFormerConfig:
    name: str = "segformer"
    encoder: str = "mit_b0"  # mit_b0 .. mit_b5 (3.7M .. 82M encoder parameters)
    encoder_weights: str | None = None  # LOCAL state dict (NVIDIA's mit_b*.pth key names, or smp's)
    decoder_channels: int = 256  # width of the all-MLP decoder: 256 for b0/b1, 768 for b2-b5 in the paper
    drop_path_rate: float = 0.1  # stochastic depth of the encoder, 0 -> rate at its last block


class SegFormer(nn.Module):
    """x (B, C, H, W) -> {"logits": (B, K, H, W)}: smp's SegFormer predicts at (H/4, W/4); the
    logits are upsampled bilinearly (align_corners=False, as the reference implementation does)
    to the input size inside the model, so the sliding window and the losses see full-size maps."""

    def __init__(self, in_chans: int, num_classes: int, encoder: str = "mit_b0",
                 encoder_weights: str | None = None, decoder_channels: int = 256, drop_path_rate: float = 0.1):
        super().__init__()
        import segmentation_models_pytorch as smp

        self.net = smp.Segformer(encoder, encoder_depth=5, encoder_weights=None,  # nothing downloads
                                 decoder_segmentation_channels=decoder_channels, in_channels=in_chans,
                                 classes=num_classes, upsampling=1)
        self.net.encoder.reset_drop_path(drop_path_rate)
        if encoder_weights:
            # smp's MiT encoder overrides load_state_dict without `strict`: load through a plain
            # container (its "encoder." key prefix is stripped when names are compared)
            load_local_weights(nn.ModuleDict({"encoder": self.net.encoder}), encoder_weights, "encoder_weights",
                               in_chans)
        self.num_classes = num_classes
        self.divisor = 32  # four patch embeddings of strides 4, 2, 2, 2
        self._checkpoint = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each transformer block in the backward pass instead of keeping its
        activations (the attention maps dominate the memory at high resolution)."""
        self._checkpoint = enable

    def param_groups_split(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(encoder parameters, decoder + head): UDA recipes train the rest at 10x the lr."""
        return split_parameters(self, self.net.encoder)

    def _encode(self, x: Tensor) -> list[Tensor]:
        encoder = self.net.encoder
        if not (self._checkpoint and self.training and torch.is_grad_enabled()):
            return encoder(x)
        from torch.utils.checkpoint import checkpoint

        # smp's MixVisionTransformerEncoder.forward (depth 5), each block checkpointed; the
        # empty stride-2 entry is smp's placeholder, which the decoder skips
        b, _, h, w = x.shape
        features = [x, x.new_empty(b, 0, h // 2, w // 2)]
        for stage in range(1, 5):
            x = getattr(encoder, f"patch_embed{stage}")(x)
            for block in getattr(encoder, f"block{stage}"):
                x = checkpoint(block, x, use_reentrant=False)
            x = getattr(encoder, f"norm{stage}")(x).contiguous()
            features.append(x)
        return features

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        h, w = x.shape[-2:]
        if not torch.jit.is_tracing() and (h % self.divisor or w % self.divisor):  # export traces fixed sizes
            raise ValueError(f"input {h}x{w} is not divisible by {self.divisor} (SegFormer's total stride)")
        logits = self.net.segmentation_head(self.net.decoder(self._encode(x)))
        return {"logits": nn.functional.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)}


@register("model", "segformer", schema=SegFormerConfig,
          help="SegFormer (Xie et al. 2021): MiT encoder mit_b0..mit_b5 + all-MLP decoder (smp). Licence: "
               + SEGFORMER_LICENCE)
def segformer(cfg, *, num_classes: int, in_chans: int) -> nn.Module:
    if cfg.encoder not in MIT_ENCODERS:
        raise UserError(f"model.encoder={cfg.encoder!r}: SegFormer takes a MiT encoder, one of "
                        f"{', '.join(MIT_ENCODERS)}.")
    if cfg.decoder_channels < 1:
        raise UserError(f"model.decoder_channels={cfg.decoder_channels}: expected a positive width.")
    if not 0.0 <= cfg.drop_path_rate < 1.0:
        raise UserError(f"model.drop_path_rate={cfg.drop_path_rate}: expected a rate in [0, 1).")
    return SegFormer(in_chans, num_classes, cfg.encoder, cfg.encoder_weights, int(cfg.decoder_channels),
                     float(cfg.drop_path_rate))
