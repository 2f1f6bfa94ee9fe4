"""E2E-VarNet: end-to-end variational network for multi-coil MRI, registered as model "varnet".

Sriram et al. 2020, "End-to-End Variational Networks for Accelerated MRI Reconstruction"
(MICCAI). Facts pinned by reference.md ("E2E-VarNet"):
- a sensitivity model estimates coil maps S from the auto-calibration (centre) columns only:
  inverse FFT, coils folded into the batch, a normalised U-Net, divided by the RSS over coils;
- each cascade updates k-space
      k <- k - dc_weight * mask * (k - k_ref) - F(S * unet(sum_c conj(S_c) * F^-1(k_c)))
  with dc_weight a learned scalar starting at 1;
- the output is the RSS image of the final k-space, not cropped (the task crops).
Parameter counts (pools 4, sens_pools 4): 12/18/8 = 29,936,966 and 20/18/8 = 49,571,678
(cascades / chans / sens_chans), pinned by the tests.

Shapes: masked k-space (B, coils, H, W, 2); mask (B, 1, 1, W, 1), float 0/1 or bool;
num_low_frequencies (B,) (or an int), None or 0 meaning "find the centre block in the mask":
the whole sampled run through column W // 2 (`centre_detection: contiguous`), or fastMRI's
symmetric count, 2 x min(run left of W // 2, run from W // 2) (`symmetric`: 32 columns on an SNU
mask whose run is 33 because an equispaced line touches the block).

Two map sets (`model.map_sets: 2`, soft-SENSE; Uecker et al. 2014, "ESPIRiT", MRM 71:990, eq. 13):
when the head is wider than the phase field of view, one coil map per coil cannot explain the
fold-over bands (two tissue points alias onto one pixel with different coil weights). ESPIRiT's
answer, which sets the classical bar (sigpy_recon.py), is a second set of maps and one image per
set: k_c = F(sum_s S_sc x_s). Here the sensitivity U-Net outputs two complex maps per coil,
- normalised JOINTLY: sum over sets and coils of |S_sc|^2 = 1 per pixel. The per-pixel normal
  operator sum_c conj(S_sc) S_s'c is then a 2 x 2 positive matrix with trace 1, so its
  eigenvalues lie in [0, 1]: the encoding x -> F(sum_s S_s x_s) has norm <= 1, as with one
  unit-RSS set, and the learned step sizes and the image scale keep their meaning. ESPIRiT instead gives each set unit
  norm and zeroes it where its eigenvalue is below `crop`; a network cannot threshold that
  crisply, and unit norm per set would force a full-energy second set inside the head, where it
  only carries noise — joint normalisation lets the network fade it out there;
- maps are (B, sets, coils, H, W, 2) (sigpy's (sets, coils, H, W) order); images (B, sets, H, W,
  2); each cascade's U-Net sees the sets as channels (2 x sets real channels);
- the output stays the RSS over coils of the final k-space (what the task and the targets are,
  and it needs no map at inference); for k-space explained by maps whose sets are orthonormal
  over coils it equals the RSS over the set images (pinned by the tests).
With `map_sets: 1` (the default) the model is exactly E2E-VarNet: same parameters, same outputs.

Weights: `model.weights=FILE` loads a local state dict, podium's or the fastMRI repository's
VarNet (`fastmri.models.VarNet`, or a Lightning checkpoint of its VarNetModule): the keys are
renamed (`fastmri_varnet_state_dict`); with `centre_detection: symmetric` the model then
computes what fastMRI's does.

    >>> import torch
    >>> from podium.tasks.reconstruction.models.varnet import VarNet
    >>> model = VarNet(num_cascades=2, chans=4, pools=2, sens_chans=2, sens_pools=2)
    >>> mask = torch.zeros(1, 1, 1, 24, 1); mask[..., ::3, :] = 1; mask[..., 10:14, :] = 1
    >>> model(torch.randn(1, 3, 32, 24, 2) * mask, mask).shape
    torch.Size([1, 32, 24])
    >>> two = VarNet(num_cascades=2, chans=4, pools=2, sens_chans=2, sens_pools=2, map_sets=2)
    >>> two.sens_maps(torch.randn(1, 3, 32, 24, 2) * mask, mask).shape   # (B, sets, coils, H, W, 2)
    torch.Size([1, 2, 3, 32, 24, 2])
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from podium.engine.registry import register
from podium.errors import UserError
from podium.tasks.reconstruction.fft import (
    complex_abs_sq,
    complex_conj,
    complex_mul,
    fft2c,
    ifft2c,
    rss_complex,
)
from podium.tasks.reconstruction.models.lska import LSKABlock, lska_kernel_sizes
from podium.tasks.reconstruction.models.unet import (
    AttentionFactory,
    NormUnet,
    check_attention_levels,
)

LowFrequencies = Tensor | int | None


@dataclass
class VarNetConfig:
    name: str = "varnet"
    cascades: int = 12
    chans: int = 18  # first-level width of each cascade's U-Net
    sens_chans: int = 8  # first-level width of the sensitivity U-Net
    pools: int = 4
    sens_pools: int = 4
    lska_kernel: int = 0  # 0 = off; else one of 7, 11, 23, 35, 41, 53 (models/lska.py)
    lska_levels: str = "bottleneck"  # "bottleneck" | "all" conv blocks of the cascade U-Nets
    # calibration width when the data gives none: contiguous (the sampled run through the
    # centre) | symmetric (fastMRI's 2 x min(left, right) run)
    centre_detection: str = "contiguous"
    weights: Optional[str] = None  # a LOCAL state dict: podium's or fastMRI's VarNet keys
    map_sets: int = 1  # coil-map sets: 1 (E2E-VarNet) | 2 (soft-SENSE, for a head wider than the FOV)


CENTRE_DETECTIONS = ("contiguous", "symmetric")
MAP_SETS = (1, 2)


def check_map_sets(map_sets) -> int:
    if isinstance(map_sets, bool) or map_sets not in MAP_SETS:
        raise UserError(f"model.map_sets = {map_sets!r}; expected 1 (one coil map per coil, E2E-VarNet) or 2 "
                        "(two ESPIRiT-style sets, soft-SENSE, for a head wider than the phase field of view)")
    return int(map_sets)


# --------------------------------------------------------------------------------------------
# Pieces shared with FI-VarNet
# --------------------------------------------------------------------------------------------


def sens_expand(image: Tensor, sens_maps: Tensor) -> Tensor:
    """Coil k-space of a coil-combined image: F(S_c * x). (B, 1, H, W, 2) -> (B, C, H, W, 2).

    Map sets (maps (B, S, C, H, W, 2), image (B, S, H, W, 2)): k_c = F(sum_s S_sc x_s)."""
    if sens_maps.ndim == 6:
        return fft2c(complex_mul(image.unsqueeze(2), sens_maps).sum(dim=1))
    return fft2c(complex_mul(image, sens_maps))


def sens_reduce(kspace: Tensor, sens_maps: Tensor) -> Tensor:
    """Coil-combined image of coil k-space: sum_c conj(S_c) F^-1(k_c) -> (B, 1, H, W, 2).

    Map sets (maps (B, S, C, H, W, 2)): x_s = sum_c conj(S_sc) F^-1(k_c) -> (B, S, H, W, 2)."""
    if sens_maps.ndim == 6:
        return complex_mul(ifft2c(kspace).unsqueeze(1), complex_conj(sens_maps)).sum(dim=2)
    return complex_mul(ifft2c(kspace), complex_conj(sens_maps)).sum(dim=1, keepdim=True)


def lska_attention(kernel: int, levels: str) -> AttentionFactory | None:
    """The U-Net attention factory for a config's `lska_kernel` (0: none)."""
    check_attention_levels(levels)
    if kernel == 0:
        return None
    lska_kernel_sizes(kernel)  # a wrong size fails here, at build time, naming the key
    return partial(LSKABlock, kernel=kernel)


def run_cascade(cascade: Callable[..., Tensor], checkpointed: bool, *args: Tensor) -> Tensor:
    """Call a cascade, recomputing its activations in backward when `checkpointed`: memory
    then grows with one cascade instead of all of them, for about a third more compute."""
    if checkpointed:
        return checkpoint(cascade, *args, use_reentrant=False)
    return cascade(*args)


def check_positive(cfg, keys: tuple[str, ...], minimum: int = 1) -> None:
    for key in keys:
        value = getattr(cfg, key)
        if not isinstance(value, int) or value < minimum:
            raise UserError(f"model.{key} = {value!r}; expected an integer >= {minimum}")


def centre_columns(
    mask: Tensor, num_low_frequencies: LowFrequencies = None, symmetric: bool = False
) -> Tensor:
    """(B, 1, 1, W, 1) 0/1 mask of the auto-calibration columns of each batch item.

    A given width n puts the block at columns [(W - n + 1) // 2, ... + n), the fastMRI mask
    functions' placement. Without one (None, or 0 for an item), the block is the run of sampled
    columns containing column W // 2 (at least that column), or with `symmetric` fastMRI's
    `get_pad_and_num_low_freqs`: n = max(2 min(left, right), 1) placed as a given width."""
    sampled = mask[:, 0, 0, :, 0] != 0  # (B, W)
    width = sampled.shape[-1]
    centre = width // 2
    # Length of the unbroken sampled run from the centre rightwards / from centre-1 leftwards.
    right = torch.cumprod(sampled[:, centre:].to(torch.int64), dim=1).sum(dim=1)
    left = torch.cumprod(sampled[:, :centre].flip(1).to(torch.int64), dim=1).sum(dim=1)
    if symmetric:
        detected = (2 * torch.minimum(left, right)).clamp_min(1)
        start = torch.div(width - detected + 1, 2, rounding_mode="floor")
        stop = start + detected
    else:
        start = torch.where(right > 0, centre - left, torch.full_like(left, centre))
        stop = centre + right.clamp_min(1)

    if num_low_frequencies is not None:
        given = torch.as_tensor(num_low_frequencies, device=mask.device).to(torch.int64)
        given = given.reshape(-1)
        given_start = torch.div(width - given + 1, 2, rounding_mode="floor")
        start = torch.where(given > 0, given_start, start)
        stop = torch.where(given > 0, given_start + given, stop)

    columns = torch.arange(width, device=mask.device)
    keep = (columns >= start[:, None]) & (columns < stop[:, None])
    return keep.reshape(-1, 1, 1, width, 1)


class SensitivityModel(nn.Module):
    """Coil sensitivity maps (B, C, H, W, 2) from the centre of the masked k-space, normalised to
    unit RSS over coils; with map_sets 2, maps (B, 2, C, H, W, 2) with unit RSS over sets and
    coils together (the module docstring says why)."""

    def __init__(self, chans: int = 8, num_pools: int = 4, symmetric_centre: bool = False, map_sets: int = 1):
        super().__init__()
        self.map_sets = check_map_sets(map_sets)
        self.norm_unet = NormUnet(chans, num_pools, out_chans=2 * self.map_sets)
        self.symmetric_centre = symmetric_centre

    def forward(
        self, masked_kspace: Tensor, mask: Tensor, num_low_frequencies: LowFrequencies = None
    ) -> Tensor:
        centre = centre_columns(mask, num_low_frequencies, self.symmetric_centre).to(masked_kspace.dtype)
        images = ifft2c(masked_kspace * centre)
        batch, coils, height, width, _ = images.shape
        # Every coil goes through the same U-Net, so the model works for any coil count.
        maps = self.norm_unet(images.reshape(batch * coils, 1, height, width, 2))
        if self.map_sets > 1:  # (B * C, S, H, W, 2) -> (B, S, C, H, W, 2), one norm over sets and coils
            maps = maps.reshape(batch, coils, self.map_sets, height, width, 2).transpose(1, 2)
            norm = complex_abs_sq(maps).sum(dim=(1, 2)).sqrt().clamp_min(1e-12)
            return maps / norm[:, None, None, :, :, None]
        maps = maps.reshape(batch, coils, height, width, 2)
        norm = rss_complex(maps, dim=1).clamp_min(1e-12)  # floor: a pixel with no signal
        return maps / norm[:, None, :, :, None]


class VarNetBlock(nn.Module):
    """One cascade: soft data consistency plus a learned refinement, all in k-space."""

    def __init__(self, regularizer: nn.Module):
        super().__init__()
        self.regularizer = regularizer  # (B, sets, H, W, 2) image -> same
        self.dc_weight = nn.Parameter(torch.ones(1))

    def forward(
        self, kspace: Tensor, ref_kspace: Tensor, mask: Tensor, sens_maps: Tensor
    ) -> Tensor:
        soft_dc = self.dc_weight * mask * (kspace - ref_kspace)
        refinement = sens_expand(self.regularizer(sens_reduce(kspace, sens_maps)), sens_maps)
        return kspace - soft_dc - refinement


def check_inputs(masked_kspace: Tensor, mask: Tensor) -> None:
    if masked_kspace.ndim != 5 or masked_kspace.shape[-1] != 2:
        raise ValueError(
            f"masked_kspace must be (B, coils, H, W, 2), got {tuple(masked_kspace.shape)}"
        )
    if mask.ndim != 5 or mask.shape[-2] != masked_kspace.shape[-2]:
        raise ValueError(
            f"mask must be (B, 1, 1, W, 1) with W = {masked_kspace.shape[-2]}, "
            f"got {tuple(mask.shape)}"
        )


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


class KSpaceNetwork(nn.Module):
    """A network whose last step is multi-coil k-space: `predicted_kspace` returns it, `forward`
    its root-sum-of-squares image."""

    def forward(
        self, masked_kspace: Tensor, mask: Tensor, num_low_frequencies: LowFrequencies = None
    ) -> Tensor:
        """(B, coils, H, W, 2) k-space, (B, 1, 1, W, 1) mask -> (B, H, W) RSS image."""
        return rss_complex(ifft2c(self.predicted_kspace(masked_kspace, mask, num_low_frequencies)), dim=1)

    def predicted_kspace(
        self, masked_kspace: Tensor, mask: Tensor, num_low_frequencies: LowFrequencies = None
    ) -> Tensor:
        """The last cascade's multi-coil k-space (B, coils, H, W, 2): what self-supervised
        adaptation compares with held-out measurements. The mask may also be a per-point
        (B, 1, H, W, 1) mask (the calibration columns must then be given or fully kept)."""
        raise NotImplementedError


class VarNet(KSpaceNetwork):
    def __init__(
        self,
        num_cascades: int = 12,
        chans: int = 18,
        pools: int = 4,
        sens_chans: int = 8,
        sens_pools: int = 4,
        lska_kernel: int = 0,
        lska_levels: str = "bottleneck",
        centre_detection: str = "contiguous",
        map_sets: int = 1,
    ):
        super().__init__()
        self.map_sets = check_map_sets(map_sets)
        if centre_detection not in CENTRE_DETECTIONS:
            raise UserError(f"model.centre_detection = {centre_detection!r}; expected one of "
                            f"{', '.join(CENTRE_DETECTIONS)}")
        attention = lska_attention(lska_kernel, lska_levels)
        self.notation = f"{num_cascades}/{chans}/{sens_chans}"  # cascades/chans/sens_chans
        self.centre_detection = centre_detection  # the data reads it for file masks too
        self.sens_net = SensitivityModel(sens_chans, sens_pools, centre_detection == "symmetric", self.map_sets)
        channels = 2 * self.map_sets  # the set images are the regulariser's complex channels
        self.cascades = nn.ModuleList(
            VarNetBlock(NormUnet(chans, pools, channels, channels, attention, attention_levels=lska_levels))
            for _ in range(num_cascades)
        )
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def sens_maps(
        self, masked_kspace: Tensor, mask: Tensor, num_low_frequencies: LowFrequencies = None
    ) -> Tensor:
        """The estimated coil sensitivities (B, coils, H, W, 2); (B, sets, coils, H, W, 2) with map_sets 2."""
        return self.sens_net(masked_kspace, mask, num_low_frequencies)

    def predicted_kspace(
        self, masked_kspace: Tensor, mask: Tensor, num_low_frequencies: LowFrequencies = None
    ) -> Tensor:
        check_inputs(masked_kspace, mask)
        mask = mask.to(masked_kspace.dtype)
        sens_maps = self.sens_maps(masked_kspace, mask, num_low_frequencies)
        checkpointed = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        kspace = masked_kspace
        for cascade in self.cascades:
            kspace = run_cascade(cascade, checkpointed, kspace, masked_kspace, mask, sens_maps)
        return kspace


# fastMRI's U-Net names -> podium's (models/unet.py): its ConvBlock is conv, norm, act, dropout,
# conv, ... (convs at 0 and 4; podium's at 0 and 3), and its last up block is a Sequential of
# the ConvBlock and the 1 x 1 head.
_CONV = {"0": "0", "4": "3"}


def _podium_unet_key(rest: str) -> str:
    if m := re.fullmatch(r"down_sample_layers\.(\d+)\.layers\.([04])\.(\w+)", rest):
        return f"down.{m[1]}.{_CONV[m[2]]}.{m[3]}"
    if m := re.fullmatch(r"conv\.layers\.([04])\.(\w+)", rest):
        return f"bottleneck.{_CONV[m[1]]}.{m[2]}"
    if m := re.fullmatch(r"up_transpose_conv\.(\d+)\.layers\.0\.(\w+)", rest):
        return f"upsample.{m[1]}.0.{m[2]}"
    if m := re.fullmatch(r"up_conv\.(\d+)\.(?:0\.)?layers\.([04])\.(\w+)", rest):
        return f"up.{m[1]}.{_CONV[m[2]]}.{m[3]}"
    if m := re.fullmatch(r"up_conv\.\d+\.1\.(\w+)", rest):
        return f"head.{m[1]}"
    return rest


def is_fastmri_state_dict(state: dict) -> bool:
    """Whether a VarNet state dict (`varnet.`-prefixed or not) uses the fastMRI repository's key names."""
    return any("down_sample_layers" in k or ".model.unet." in k for k in state)


def fastmri_varnet_state_dict(state: dict) -> dict:
    """A fastMRI VarNet state dict (or its Lightning module's, keys `varnet.*`) with podium's
    key names; a podium state dict is returned unchanged."""
    state = {k[len("varnet."):] if k.startswith("varnet.") else k: v for k, v in state.items()}
    if not is_fastmri_state_dict(state):
        return state
    renamed = {}
    for key, value in state.items():
        key = re.sub(r"^cascades\.(\d+)\.model\.", r"cascades.\1.regularizer.", key)
        prefix, sep, rest = key.partition(".unet.")
        renamed[prefix + sep + _podium_unet_key(rest) if sep else key] = value
    return renamed


def load_weights(model: nn.Module, path: str) -> None:
    from podium.common.weights import load_state_dict_file

    raw = load_state_dict_file(Path(path))
    state = fastmri_varnet_state_dict(raw)
    wanted = getattr(model, "map_sets", 1)
    head = state.get("sens_net.norm_unet.unet.head.weight")
    file_sets = head.shape[0] // 2 if head is not None else wanted
    if file_sets != wanted:  # named before the shape mismatch, which would not say why
        origin = "fastMRI's VarNet weights" if is_fastmri_state_dict(raw) else "weights"
        raise UserError(f"model.map_sets = {wanted}, but the {origin} in model.weights={path} have {file_sets} "
                        f"coil-map set(s): set model.map_sets={file_sets} to load them (a two-map VarNet "
                        "must be trained, e.g. experiment=varnet_sim2real_two_maps)")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()
        raise UserError(f"model.weights={path}: the weights do not fit this VarNet ({model.notation} "
                        f"cascades/chans/sens_chans): {' '.join(first[1:3]).strip()[:400]} — set model.cascades, "
                        "chans, sens_chans, pools and sens_pools as in the file.") from None


@register("model", "varnet", schema=VarNetConfig)
def varnet(cfg, **context) -> VarNet:
    """E2E-VarNet (Sriram et al. 2020), optional LSKA in the cascade U-Nets, one or two coil-map sets."""
    check_positive(cfg, ("chans", "sens_chans"))
    check_positive(cfg, ("cascades", "pools", "sens_pools"), minimum=0)
    model = VarNet(
        num_cascades=cfg.cascades,
        chans=cfg.chans,
        pools=cfg.pools,
        sens_chans=cfg.sens_chans,
        sens_pools=cfg.sens_pools,
        lska_kernel=cfg.lska_kernel,
        lska_levels=cfg.lska_levels,
        centre_detection=cfg.get("centre_detection", "contiguous"),
        map_sets=cfg.get("map_sets", 1),
    )
    if cfg.get("weights"):
        load_weights(model, cfg.weights)
    return model
