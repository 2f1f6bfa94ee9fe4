"""Large Separable Kernel Attention (LSKA).

Lau, Po & Rehman 2024, "Large Separable Kernel Attention: Rethinking the Large Kernel
Attention Design in CNN", Expert Systems with Applications. VAN's large kernel attention
(Guo et al. 2023) approximates a k x k depthwise kernel with a (2d-1)^2 depthwise kernel, a
dilated depthwise kernel and a 1x1 conv; LSKA splits each 2-D depthwise kernel into a 1-D pair,
so the cost grows linearly with k instead of quadratically:

    1 x k0 dw -> k0 x 1 dw -> 1 x k1 dw (dilation d) -> k1 x 1 dw (dilation d) -> 1x1 conv
    output = u * attn    (u: the input; a gate, not a softmax)

with k0 = 2d - 1 and k1 chosen so the receptive field k0 + (k1 - 1) d equals k (the paper's
table, e.g. k = 23: a 5-tap pair, then a 7-tap pair with dilation 3).

In podium it is the optional attention of the reconstruction U-Nets (`lska_kernel` in the
VarNet / FI-VarNet configs), wrapped residual-style by `LSKABlock` like VAN's attention module.

    >>> import torch
    >>> from podium.tasks.reconstruction.models.lska import LSKABlock
    >>> LSKABlock(channels=8, kernel=23)(torch.randn(1, 8, 32, 32)).shape
    torch.Size([1, 8, 32, 32])
"""

from __future__ import annotations

from torch import Tensor, nn

from podium.errors import UserError

# kernel size k -> (k0, k1, dilation d); k0 = 2d - 1 and k0 + (k1 - 1) * d = k (Lau et al.).
LSKA_KERNELS: dict[int, tuple[int, int, int]] = {
    7: (3, 3, 2),
    11: (3, 5, 2),
    23: (5, 7, 3),
    35: (5, 11, 3),
    41: (5, 13, 3),
    53: (5, 17, 3),
}


def lska_kernel_sizes(kernel: int) -> tuple[int, int, int]:
    """(k0, k1, dilation) for an LSKA kernel size; a size outside the paper's table is a user
    error (the config key is `model.lska_kernel`, 0 meaning no attention)."""
    if kernel not in LSKA_KERNELS:
        valid = ", ".join(str(k) for k in LSKA_KERNELS)
        raise UserError(
            f"model.lska_kernel = {kernel} is not an LSKA kernel size; valid sizes are {valid} "
            "(or 0 to switch LSKA off)"
        )
    return LSKA_KERNELS[kernel]


def _depthwise(channels: int, size: int, vertical: bool, dilation: int = 1) -> nn.Conv2d:
    reach = (size - 1) * dilation // 2  # "same" padding for an odd kernel
    kernel, padding = ((size, 1), (reach, 0)) if vertical else ((1, size), (0, reach))
    return nn.Conv2d(
        channels, channels, kernel, padding=padding, dilation=dilation, groups=channels
    )


class LSKA(nn.Module):
    """The gate itself: (B, C, H, W) -> (B, C, H, W), `x * attn(x)`."""

    def __init__(self, channels: int, kernel: int = 23):
        super().__init__()
        k0, k1, dilation = lska_kernel_sizes(kernel)
        self.kernel = kernel
        self.attention = nn.Sequential(
            _depthwise(channels, k0, vertical=False),
            _depthwise(channels, k0, vertical=True),
            _depthwise(channels, k1, vertical=False, dilation=dilation),
            _depthwise(channels, k1, vertical=True, dilation=dilation),
            nn.Conv2d(channels, channels, kernel_size=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x * self.attention(x)


def lska_parameter_count(channels: int, kernel: int) -> int:
    """Parameters of `LSKA(channels, kernel)`: four 1-D depthwise convs with biases and a 1x1
    conv — linear in the kernel size for a fixed channel count."""
    k0, k1, _ = lska_kernel_sizes(kernel)
    return 2 * channels * (k0 + 1) + 2 * channels * (k1 + 1) + channels * (channels + 1)


class LSKABlock(nn.Module):
    """VAN-style attention module around LSKA: x + proj(lska(gelu(proj(x))))."""

    def __init__(self, channels: int, kernel: int = 23):
        super().__init__()
        self.proj_in = nn.Conv2d(channels, channels, kernel_size=1)
        self.activation = nn.GELU()
        self.gate = LSKA(channels, kernel)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.proj_out(self.gate(self.activation(self.proj_in(x))))
