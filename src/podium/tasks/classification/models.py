"""Classification models: any timm model by name, and a small CNN for CPU demos.

    podium train experiment=digits model=timm model.arch=resnet18
    podium list models

timm models start from random weights (no downloads at run time) or from a local weights file
(`model.weights=PATH`, a state dict in .pt/.pth/.safetensors); a classifier whose shape does not
match the number of classes is left at random init, as timm does when fine-tuning.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from podium.engine.registry import register
from podium.common.weights import load_state_dict_file
from podium.errors import UserError


@dataclass
class SmallCNNConfig:
    name: str = "small_cnn"
    width: int = 32  # channels of the first block; doubled per block
    blocks: int = 3
    drop_rate: float = 0.1
    norm: str = "batch"  # batch | group | none (none/group make DDP equal to one big batch)


@dataclass
class TimmConfig:
    name: str = "timm"
    arch: str = "resnet18"
    weights: Optional[str] = None
    drop_rate: float = 0.0


NORMS = {
    "batch": nn.BatchNorm2d,
    "group": lambda c: nn.GroupNorm(min(8, c), c),
    "none": lambda c: nn.Identity(),
}


class SmallCNN(nn.Module):
    """conv-BN-ReLU pairs with max-pooling, global average pooling, dropout, linear head."""

    def __init__(self, in_chans: int, num_classes: int, width: int = 32, blocks: int = 3,
                 drop_rate: float = 0.1, norm: str = "batch"):
        super().__init__()
        if norm not in NORMS:
            raise UserError(f"model.norm={norm!r}: expected one of {', '.join(NORMS)}.")
        layers, chans = [], in_chans
        for i in range(blocks):
            out = width * 2**i
            layers.append(nn.Sequential(
                nn.Conv2d(chans, out, 3, padding=1, bias=norm == "none"), NORMS[norm](out), nn.ReLU(inplace=True),
                nn.Conv2d(out, out, 3, padding=1, bias=norm == "none"), NORMS[norm](out), nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ))
            chans = out
        self.blocks = nn.ModuleList(layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(drop_rate),
                                  nn.Linear(chans, num_classes))
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            if self.grad_checkpointing and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.head(x)


@register("model", "small_cnn", schema=SmallCNNConfig, help="Small CNN for small images (CPU demos).")
def small_cnn(cfg, *, num_classes: int, in_chans: int) -> nn.Module:
    return SmallCNN(in_chans, num_classes, cfg.width, cfg.blocks, cfg.drop_rate, cfg.norm)


@register("model", "timm", schema=TimmConfig, help="Any timm model: model.arch=NAME (timm.list_models).")
def timm_model(cfg, *, num_classes: int, in_chans: int) -> nn.Module:
    import timm

    if not timm.is_model(cfg.arch):
        close = difflib.get_close_matches(cfg.arch, timm.list_models(), n=5)
        raise UserError(f"model.arch={cfg.arch!r} is not a timm model. Close names: {', '.join(close) or 'none'}; "
                        "see timm.list_models().")
    model = timm.create_model(cfg.arch, pretrained=False, num_classes=num_classes, in_chans=in_chans,
                              drop_rate=cfg.drop_rate)
    if cfg.weights:
        state = load_state_dict_file(Path(cfg.weights))
        own = model.state_dict()
        usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        if not usable:
            raise UserError(f"model.weights={cfg.weights}: no tensor matches {cfg.arch} "
                            "(wrong architecture?).")
        model.load_state_dict(usable, strict=False)
    return model
