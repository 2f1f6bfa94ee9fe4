"""The normalised U-Net of E2E-VarNet, the regulariser of every reconstruction cascade.

Sriram et al. 2020, "End-to-End Variational Networks for Accelerated MRI Reconstruction"
(MICCAI), which reuses the fastMRI U-Net (Zbontar et al. 2018; Ronneberger et al. 2015):
- blocks of 2 x (3x3 conv without bias -> InstanceNorm -> LeakyReLU 0.2), no dropout;
- 2x2 average pooling down (as in the fastMRI U-Net that the reference weights and parameter
  counts come from), 2x2 stride-2 transposed conv (no bias) -> InstanceNorm -> LeakyReLU up;
- a final 1x1 conv (with bias) to the output channels.
Convs feeding an InstanceNorm carry no bias: the norm would subtract it anyway.

`NormUnet` wraps it for complex images (B, C, H, W, 2): real and imaginary parts become the
channel groups [re_0..re_C-1, im_0..im_C-1], each group is normalised by its per-sample mean and
std, H and W are zero-padded up to a multiple of 16 (or 2**num_pools if larger), and everything
is undone on the way out — so the network sees unit-scale inputs whatever the k-space scaling.

An optional attention factory (channels -> nn.Module, e.g. an LSKA block) is inserted after the
bottleneck block (`attention_levels="bottleneck"`) or after every conv block ("all").

    >>> import torch
    >>> from podium.tasks.reconstruction.models.unet import NormUnet
    >>> NormUnet(chans=8, num_pools=2)(torch.randn(2, 1, 30, 21, 2)).shape
    torch.Size([2, 1, 30, 21, 2])
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from podium.errors import UserError

AttentionFactory = Callable[[int], nn.Module]  # channels -> module keeping (B, C, H, W)
ATTENTION_LEVELS = ("bottleneck", "all")


def conv_block(in_chans: int, out_chans: int) -> nn.Sequential:
    """2 x (3x3 conv, no bias -> InstanceNorm -> LeakyReLU 0.2)."""
    layers: list[nn.Module] = []
    for channels_in in (in_chans, out_chans):
        layers += [
            nn.Conv2d(channels_in, out_chans, kernel_size=3, padding=1, bias=False),
            nn.InstanceNorm2d(out_chans),
            nn.LeakyReLU(0.2, inplace=True),
        ]
    return nn.Sequential(*layers)


def up_block(in_chans: int, out_chans: int) -> nn.Sequential:
    """2x2 stride-2 transposed conv (no bias) -> InstanceNorm -> LeakyReLU 0.2."""
    return nn.Sequential(
        nn.ConvTranspose2d(in_chans, out_chans, kernel_size=2, stride=2, bias=False),
        nn.InstanceNorm2d(out_chans),
        nn.LeakyReLU(0.2, inplace=True),
    )


def check_attention_levels(levels: str) -> str:
    if levels not in ATTENTION_LEVELS:
        raise UserError(
            f"model.lska_levels = {levels!r}; expected one of {', '.join(ATTENTION_LEVELS)}"
        )
    return levels


class Unet(nn.Module):
    """Plain U-Net on real (B, in_chans, H, W) -> (B, out_chans, H, W)."""

    def __init__(
        self,
        in_chans: int,
        out_chans: int,
        chans: int = 32,
        num_pools: int = 4,
        attention: AttentionFactory | None = None,
        attention_levels: str = "bottleneck",
    ):
        super().__init__()
        check_attention_levels(attention_levels)

        def attend(channels: int, is_bottleneck: bool = False) -> nn.Module:
            wanted = attention is not None and (is_bottleneck or attention_levels == "all")
            return attention(channels) if wanted else nn.Identity()

        widths = [chans * 2**level for level in range(num_pools)]  # encoder output widths
        self.down = nn.ModuleList()
        self.down_attention = nn.ModuleList()
        for level, width in enumerate(widths):
            self.down.append(conv_block(in_chans if level == 0 else widths[level - 1], width))
            self.down_attention.append(attend(width))
        bottom = widths[-1] * 2 if widths else chans
        self.bottleneck = conv_block(widths[-1] if widths else in_chans, bottom)
        self.bottleneck_attention = attend(bottom, is_bottleneck=True)

        self.upsample = nn.ModuleList()
        self.up = nn.ModuleList()
        self.up_attention = nn.ModuleList()
        below = bottom
        for width in reversed(widths):
            self.upsample.append(up_block(below, width))
            self.up.append(conv_block(2 * width, width))  # after concatenating the skip
            self.up_attention.append(attend(width))
            below = width
        self.head = nn.Conv2d(below, out_chans, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        skips = []
        for block, attention in zip(self.down, self.down_attention):
            x = attention(block(x))
            skips.append(x)
            x = F.avg_pool2d(x, kernel_size=2, stride=2)
        x = self.bottleneck_attention(self.bottleneck(x))
        for upsample, block, attention in zip(self.upsample, self.up, self.up_attention):
            skip = skips.pop()
            x = upsample(x)
            # An odd size lost a row/column to pooling; pad it back so the skip concatenates.
            x = F.pad(x, (0, skip.shape[-1] - x.shape[-1], 0, skip.shape[-2] - x.shape[-2]))
            x = attention(block(torch.cat([x, skip], dim=1)))
        return self.head(x)


class ChannelNormUnet(nn.Module):
    """U-Net on real (B, C, H, W) with per-sample normalisation of `norm_groups` equal channel
    groups (mean/std over each group's channels and pixels) and zero padding of H and W up to a
    multiple of max(16, 2**num_pools); both undone on the output."""

    def __init__(
        self,
        in_chans: int,
        out_chans: int,
        chans: int,
        num_pools: int,
        norm_groups: int = 1,
        attention: AttentionFactory | None = None,
        attention_levels: str = "bottleneck",
    ):
        super().__init__()
        if in_chans % norm_groups or out_chans % norm_groups:
            raise ValueError(
                f"in_chans {in_chans} and out_chans {out_chans} must split into "
                f"{norm_groups} normalisation groups"
            )
        self.norm_groups = norm_groups
        self.multiple = max(16, 2**num_pools)
        self.unet = Unet(in_chans, out_chans, chans, num_pools, attention, attention_levels)

    def forward(self, x: Tensor) -> Tensor:
        batch, _, height, width = x.shape
        grouped = x.reshape(batch, self.norm_groups, -1)
        mean = grouped.mean(dim=2, keepdim=True)
        # Unbiased std as in the reference; the floor only matters for an all-zero input
        # (e.g. an empty padded slice), which would otherwise turn into NaN.
        std = grouped.std(dim=2, keepdim=True).clamp_min(1e-12)
        x = ((grouped - mean) / std).reshape_as(x)

        pad_h, pad_w = -height % self.multiple, -width % self.multiple
        top, left = pad_h // 2, pad_w // 2
        x = F.pad(x, (left, pad_w - left, top, pad_h - top))
        x = self.unet(x)[..., top : top + height, left : left + width]

        out = x.reshape(batch, self.norm_groups, -1) * std + mean
        return out.reshape(batch, -1, height, width)


class NormUnet(ChannelNormUnet):
    """`ChannelNormUnet` for complex images: (B, in_chans // 2, H, W, 2) ->
    (B, out_chans // 2, H, W, 2), real and imaginary parts normalised as two groups."""

    def __init__(
        self,
        chans: int,
        num_pools: int,
        in_chans: int = 2,
        out_chans: int = 2,
        attention: AttentionFactory | None = None,
        attention_levels: str = "bottleneck",
    ):
        super().__init__(
            in_chans, out_chans, chans, num_pools, 2, attention, attention_levels
        )

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != 2:
            raise ValueError(f"NormUnet expects (B, C, H, W, 2), got {tuple(x.shape)}")
        batch, coils, height, width, _ = x.shape
        # (B, C, H, W, 2) -> (B, 2C, H, W) with all real parts first, then all imaginary parts
        channels = x.permute(0, 4, 1, 2, 3).reshape(batch, 2 * coils, height, width)
        out = super().forward(channels)
        return out.reshape(batch, 2, -1, height, width).permute(0, 2, 3, 4, 1).contiguous()
