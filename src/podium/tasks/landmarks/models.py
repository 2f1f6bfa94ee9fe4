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

import difflib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from podium.engine.registry import register
from podium.common.weights import load_state_dict_file
from podium.errors import UserError
from podium.tasks.landmarks.heatmaps import LearnableSigma

# --------------------------------------------------------------------------------------------
# Config schemas
# --------------------------------------------------------------------------------------------


@dataclass
class HeatmapUNetConfig:
    name: str = "heatmap_unet"
    encoder: str = "resnet18"  # any timm model with features_only support ("tu-" is implied)
    encoder_weights: Optional[str] = None  # LOCAL state dict for the encoder (timm key names)
    decoder_channels: list[int] = field(default_factory=lambda: [256, 128, 64, 32, 16])
    encoder_depth: int = 5
    output_stride: int = 1  # 1, 2, 4, ... < 2**encoder_depth: the last decoder stages are dropped
    learnable_sigma: bool = False
    init_sigma: float = 2.0  # in heatmap pixels


@dataclass
class CoordRegressorConfig:
    name: str = "coord_regressor"
    arch: str = "resnet18"  # any timm model
    weights: Optional[str] = None  # LOCAL state dict (the classifier is left at random init)
    drop_rate: float = 0.0


@dataclass
class PatchRefinerConfig:
    name: str = "patch_refiner"
    encoder: str = "resnet10t"
    encoder_weights: Optional[str] = None
    decoder_channels: list[int] = field(default_factory=lambda: [64, 32, 16])
    encoder_depth: int = 3  # patch sides must be divisible by 2**encoder_depth
    patch_size: int = 64  # the crop side the task cuts around each first-stage estimate
    shared: bool = True  # one network for all landmarks (+ K one-hot identity channels)
    learnable_sigma: bool = False
    init_sigma: float = 2.0


# --------------------------------------------------------------------------------------------
# Helpers: timm names, local weights, U-Net construction
# --------------------------------------------------------------------------------------------


def _check_timm_name(key: str, name: str) -> str:
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
    return load_state_dict_file(Path(path))


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


def _build_unet(key: str, encoder: str, in_chans: int, classes: int, encoder_depth: int,
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

    name = _check_timm_name(key, encoder)
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


class _UNetRunner(nn.Module):
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
        unet = _build_unet("encoder", encoder, in_chans, num_landmarks, encoder_depth,
                           list(decoder_channels), output_stride)
        if encoder_weights:
            load_local_weights(unet.encoder.model, encoder_weights, "encoder_weights", in_chans)
        self.net = _UNetRunner(unet)
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

    arch = _check_timm_name("arch", cfg.arch)
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
        unet = _build_unet("encoder", cfg.encoder, net_chans, 1, cfg.encoder_depth,
                           list(cfg.decoder_channels), 1)
        if cfg.encoder_weights:
            load_local_weights(unet.encoder.model, cfg.encoder_weights, "encoder_weights", in_chans)
        nets.append(_UNetRunner(unet))
    return PatchRefiner(nets, num_landmarks, cfg.shared, cfg.learnable_sigma, cfg.init_sigma)
