"""U-Nets over timm encoders (segmentation-models-pytorch) and local encoder weights, shared by
the families that need a dense decoder (landmark heatmaps, segmentation masks).

Ronneberger et al. 2015, "U-Net: Convolutional Networks for Biomedical Image Segmentation".
Weights are never downloaded: `load_local_weights` reads a LOCAL state dict (timm key names, a
podium checkpoint, or the encoder file `podium pretrain` writes) and keeps what matches.

    from podium.common.unet import build_unet, UNetRunner
    net = UNetRunner(build_unet("encoder", "resnet18", in_chans=3, classes=2, encoder_depth=5,
                                decoder_channels=[256, 128, 64, 32, 16], output_stride=1))
"""

from __future__ import annotations

import difflib
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from podium.common.weights import load_state_dict_file
from podium.errors import UserError

# --------------------------------------------------------------------------------------------


def check_timm_name(key: str, name: str) -> str:
    import timm

    name = name.removeprefix("tu-")
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5)
        raise UserError(f"model.{key}={name!r} is not a timm model. Close names: "
                        f"{', '.join(close) or 'none'}; see timm.list_models().")
    return name


def _load_file(key: str, path: str) -> dict:
    if not Path(path).is_file():
        raise UserError(f"model.{key}={path}: file does not exist.")
    return load_state_dict_file(Path(path), f"model.{key}")


def _normalise(key: str) -> str:
    # timm's feature wrappers rename nested modules "stages.0" -> "stages_0"; compare both
    # spellings, after stripping the prefixes of podium / smp / DDP checkpoints.
    prefixes = ("module.", "net.", "unet.", "encoder.model.", "encoder.", "model.", "backbone.")
    while key.startswith(prefixes):
        key = key[len(next(p for p in prefixes if key.startswith(p))):]
    return key.replace("_", ".")


def load_local_weights(module: nn.Module, path: str, key: str, image_chans: int) -> None:
    """Load the tensors of a local state dict that match `module` by name and shape.

    A first conv saved for another number of input channels (3-channel ImageNet weights into a
    grayscale model) is adapted with timm's `adapt_input_conv`; extra non-image input channels
    (the refiner's landmark identity) start at zero. Nothing matching is a UserError; a partial
    match warns.
    """
    from timm.models import adapt_input_conv

    state = _load_file(key, path)
    own = module.state_dict()
    by_norm = {_normalise(k): k for k in own}
    usable = {}
    for k, v in state.items():
        target = by_norm.get(_normalise(k))
        if target is None or not isinstance(v, Tensor):
            continue
        want = own[target].shape
        if v.shape != want and v.ndim == 4 and v.shape[0] == want[0] and v.shape[2:] == want[2:]:
            v = adapt_input_conv(image_chans, v.float())
            if want[1] > image_chans:  # identity channels
                v = torch.cat([v, v.new_zeros(v.shape[0], want[1] - image_chans, *v.shape[2:])], 1)
        if v.shape == want:
            usable[target] = v
    if not usable:
        raise UserError(f"model.{key}={path}: no tensor matches the model (wrong architecture?).")
    missing = [k for k in own if k not in usable and not k.endswith("num_batches_tracked")]
    if missing:
        warnings.warn(f"model.{key}={path}: {len(missing)} of {len(own)} tensors not in the file, "
                      f"left at random init (first: {missing[0]}).", stacklevel=2)
    module.load_state_dict(usable, strict=False)


def build_unet(key: str, encoder: str, in_chans: int, classes: int, encoder_depth: int,
                decoder_channels: list[int], output_stride: int):
    """smp.Unet over timm encoder `encoder`, producing maps `output_stride` times smaller.

    output_stride 2**n is obtained by dropping the last n decoder blocks and putting the
    segmentation head on the block before: the decoder's own loop then stops at the encoder's
    stride-2**n feature map (no full-resolution work is done). The heatmap is then (H / s, W / s)
    for H, W divisible by 2**encoder_depth, and its pixel i is taken to be centred on input
    pixel s * i + (s - 1) / 2 (heatmaps.points_to_heatmap); the network learns that alignment
    from the targets.
    """
    import segmentation_models_pytorch as smp
    from segmentation_models_pytorch.base import SegmentationHead

    name = check_timm_name(key, encoder)
    decoder_channels = [int(c) for c in decoder_channels]
    if len(decoder_channels) != encoder_depth:
        raise UserError(f"model.decoder_channels needs encoder_depth={encoder_depth} entries, "
                        f"got {decoder_channels}.")
    drop = int(output_stride).bit_length() - 1
    if output_stride < 1 or 2**drop != output_stride or drop >= encoder_depth:
        raise UserError(f"model.output_stride={output_stride}: expected a power of 2 below "
                        f"2**encoder_depth = {2**encoder_depth}.")
    try:
        unet = smp.Unet(f"tu-{name}", encoder_weights=None, encoder_depth=encoder_depth,
                        decoder_channels=decoder_channels, in_channels=in_chans, classes=classes)
    except Exception as exc:  # e.g. a timm model without features_only support
        raise UserError(f"model.{key}={name!r} cannot be used as a U-Net encoder: {exc}") from exc
    if drop:
        unet.decoder.blocks = unet.decoder.blocks[: encoder_depth - drop]
        unet.segmentation_head = SegmentationHead(decoder_channels[encoder_depth - drop - 1], classes,
                                                  kernel_size=3)
    return unet


class UNetRunner(nn.Module):
    """A smp U-Net with gradient checkpointing: delegated to the timm encoder when it supports
    it (timm's feature wrappers do), otherwise the decoder is checkpointed as one segment."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet
        self._checkpoint_decoder = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        timm_model = getattr(self.unet.encoder, "model", None)
        if hasattr(timm_model, "set_grad_checkpointing"):
            timm_model.set_grad_checkpointing(enable)
        else:
            self._checkpoint_decoder = enable

    def forward(self, x: Tensor) -> Tensor:
        if not (self._checkpoint_decoder and self.training):
            return self.unet(x)
        features = self.unet.encoder(x)
        out = checkpoint(self.unet.decoder, features, use_reentrant=False)  # smp >= 0.5 call
        return self.unet.segmentation_head(out)
