"""Test-time augmentation (TTA): one mechanism for every task family.

The model sees several views of each batch (flips, quarter turns, rescales); each view's outputs
are mapped back to the original frame (masks and heatmaps turned and resized back, points
moved back) and merged: probabilities by their mean or normalised geometric mean, maps and
points by their mean. `TTAModel` returns the same structure as the model it wraps (class logits
come back as log-probabilities: softmax(log p) = p), so a family's evaluation, prediction and
serving code runs unchanged on it. A family says what each raw output is with the
`Task.tta_outputs()` hook; a family that returns None (reconstruction) refuses TTA.

    podium eval runs/<run> tta=d4                       # the 8 elements of the dihedral group
    podium eval runs/<run> tta=flips tta_merge=geometric
    podium eval runs/<run> tta=scales tta_scales=[0.8,1.0,1.2]
    podium predict runs/<run> images/ --out p.csv -o tta=d4
    podium train experiment=digits tta=d4               # the final test evaluation and exports use it

    from podium.engine.tta import TTAModel, view_set
    tta = TTAModel(model, view_set("d4"), "class_logits", merge="mean")
    probs = tta(images).softmax(1)                      # mean of the 8 views' probabilities

Per-epoch validation during training never uses TTA (`Trainer.eval_model(tta=False)`): it would
multiply its cost by the number of views for a model-selection signal that needs none.

Views are applied as resize -> horizontal flip -> quarter turns (counter-clockwise, torch.rot90
over (H, W)) and inverted in the opposite order. Turns are written as transpose + flip, which
TorchScript and ONNX export like any flip. Resizes use bilinear interpolation without
antialiasing (ONNX Resize has antialiasing only from opset 18; the default 17 is kept) and
round the scaled sides to a multiple of the model's `divisor` (U-Nets need multiples of 32).
Pixel centres sit at integers: x_scaled = (x + 0.5) * W_scaled / W - 0.5, the convention the
landmark and segmentation code use. Reference: the D4 / multi-scale TTA of ttach
(github.com/qubvel/ttach), written here because ttach maps neither points nor dict outputs.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from podium.errors import UserError

VIEW_SETS = ("none", "flips", "d4", "scales")
MERGES = ("mean", "geometric")
#: what `Task.tta_outputs()` may call a raw output
KINDS = ("class_logits",  # (B, K) logits: merged as probabilities, returned as log-probabilities
         "mask_logits",  # (B, K, H, W) logits (K = 1: sigmoid): mapped back, merged as probabilities
         "maps",  # (B, C, h, w) any spatial map (heatmaps, reconstructions): mapped back, averaged
         "points",  # (B, K, 2) (x, y) in input pixels: mapped back, averaged
         "invariant")  # anything the views do not move (a learnt sigma): averaged
DEFAULT_SCALES = (0.8, 1.0, 1.2)
_TINY = torch.finfo(torch.float32).tiny  # log(0) would be -inf: clamp probabilities first


def _rot90(x: Tensor, k: int) -> Tensor:
    """torch.rot90(x, k, (-2, -1)) as transposes and flips (exportable to ONNX)."""
    k %= 4
    if k == 1:
        return x.flip(-1).transpose(-2, -1)
    if k == 2:
        return x.flip(-2).flip(-1)
    if k == 3:
        return x.transpose(-2, -1).flip(-1)
    return x


def _static(size) -> int:
    """A size that is a constant of the traced graph (channels; H and W of a fixed-size export),
    read without the tracer's warning that it will be a constant."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return int(size)


def _round_to(value: float, divisor: int) -> int:
    return max(divisor, int(round(value / divisor)) * divisor)


@dataclass(frozen=True)
class View:
    """One test-time view: resize by `scale`, then flip horizontally (`hflip`), then turn
    `quarter_turns` times counter-clockwise. A vertical flip is hflip + 2 turns."""

    quarter_turns: int = 0
    hflip: bool = False
    scale: float = 1.0

    @property
    def name(self) -> str:
        parts = [f"rot{90 * (self.quarter_turns % 4)}"] if self.quarter_turns % 4 else []
        parts += ["hflip"] if self.hflip else []
        parts += [f"x{self.scale:g}"] if self.scale != 1.0 else []
        return "+".join(parts) or "identity"

    def scaled_size(self, size: Sequence[int], divisor: int = 1) -> tuple[int, int]:
        """(H, W) of the input after the resize (before the turns)."""
        h, w = _static(size[0]), _static(size[1])
        if self.scale == 1.0:
            return h, w
        return _round_to(h * self.scale, divisor), _round_to(w * self.scale, divisor)

    def apply(self, images: Tensor, divisor: int = 1) -> Tensor:
        """(B, C, H, W) -> the view (B, C, H', W'); H' and W' swap with an odd number of turns."""
        if self.scale != 1.0:  # sizes read only here: flips and turns trace without constants
            size = self.scaled_size(images.shape[-2:], divisor)
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        if self.hflip:
            images = images.flip(-1)
        return _rot90(images, self.quarter_turns)

    def invert_map(self, maps: Tensor, size: Sequence[int] | None = None) -> Tensor:
        """Maps (B, C, h, w) computed on the view -> the original frame, resized to `size`
        (the map's size for the unaugmented input: the image size over the output stride;
        None: no resize, right for an unscaled view)."""
        maps = _rot90(maps, -self.quarter_turns)
        if self.hflip:
            maps = maps.flip(-1)
        if size is not None:
            size = (_static(size[0]), _static(size[1]))
            if (_static(maps.shape[-2]), _static(maps.shape[-1])) != size:
                maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
        return maps

    def map_points(self, points: Tensor, size: Sequence[int], divisor: int = 1) -> Tensor:
        """Points (..., 2) as (x, y) in the pixels of an image of `size` (H, W) -> in the view's."""
        h, w = _static(size[0]), _static(size[1])
        sh, sw = self.scaled_size(size, divisor)
        x = (points[..., 0] + 0.5) * (sw / w) - 0.5
        y = (points[..., 1] + 0.5) * (sh / h) - 0.5
        if self.hflip:
            x = (sw - 1) - x
        for _ in range(self.quarter_turns % 4):  # one counter-clockwise turn of an (sh, sw) frame
            x, y, sh, sw = y, (sw - 1) - x, sw, sh
        return torch.stack([x, y], dim=-1)

    def invert_points(self, points: Tensor, size: Sequence[int], divisor: int = 1) -> Tensor:
        """Points (..., 2) in the view's input pixels -> in the pixels of the original `size`."""
        h, w = _static(size[0]), _static(size[1])
        sh, sw = self.scaled_size(size, divisor)
        turns = self.quarter_turns % 4
        fh, fw = (sw, sh) if turns % 2 else (sh, sw)  # the view's frame
        x, y = points[..., 0], points[..., 1]
        for _ in range(turns):  # one clockwise turn of an (fh, fw) frame
            x, y, fh, fw = (fh - 1) - y, x, fw, fh
        if self.hflip:
            x = (sw - 1) - x
        x = (x + 0.5) * (w / sw) - 0.5
        y = (y + 0.5) * (h / sh) - 0.5
        return torch.stack([x, y], dim=-1)


def view_set(name: str, scales: Sequence[float] = DEFAULT_SCALES) -> list[View]:
    """The named views: none (identity), flips (identity, horizontal, vertical), d4 (the 4 turns
    with and without a horizontal flip), scales (one view per factor in `scales`)."""
    if name == "none":
        return [View()]
    if name == "flips":
        return [View(), View(hflip=True), View(quarter_turns=2, hflip=True)]
    if name == "d4":
        return [View(quarter_turns=k, hflip=f) for f in (False, True) for k in range(4)]
    if name == "scales":
        factors = [float(s) for s in scales]
        if not factors or any(not s > 0 for s in factors):
            raise UserError(f"tta_scales={factors}: expected one or more positive factors, e.g. [0.8, 1.0, 1.2].")
        return [View(scale=s) for s in factors]
    raise UserError(f"tta={name!r} is not valid. Valid choices: {', '.join(VIEW_SETS)}.")


def _inner(model: nn.Module) -> nn.Module:
    """The plain module under Fabric's / DDP's / AveragedModel's `.module` wrappers."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def _encoder_strides(model: nn.Module) -> list[int]:
    """The reductions of the U-Net encoders inside `model` (segmentation-models-pytorch encoders
    say `output_stride`, 2**depth): a rescaled input keeps its sides multiples of them."""
    modules = model.named_modules() if isinstance(model, nn.Module) else []
    return [int(m.output_stride) for name, m in modules
            if name.endswith("encoder") and isinstance(getattr(m, "output_stride", None), int)]


class TTAModel(nn.Module):
    """`model` run on every view; outputs mapped back and merged into the model's own structure.

    `outputs`: what the model returns (a family's `Task.tta_outputs()`): one kind for a tensor
    output, or {key: kind} for a dict output (keys not named are refused: an unmapped mask must
    not be averaged by mistake); non-tensor values are taken from the first view.
    """

    def __init__(self, model: nn.Module, views: Sequence[View], outputs: str | dict[str, str],
                 merge: str = "mean", divisor: int | None = None):
        super().__init__()
        if merge not in MERGES:
            raise UserError(f"tta_merge={merge!r} is not valid. Valid choices: {', '.join(MERGES)}.")
        kinds = [outputs] if isinstance(outputs, str) else list(dict(outputs).values())
        unknown = [k for k in kinds if k not in KINDS]
        if unknown:
            raise ValueError(f"tta_outputs() names unknown kind(s) {unknown}; valid: {', '.join(KINDS)}")
        self.model, self.views, self.outputs, self.merge = model, list(views), outputs, merge
        inner = _inner(model)
        # the task reads these from the model it is handed (landmarks decode with the stride)
        self.output_stride = getattr(inner, "output_stride", 1)
        if divisor is None:  # a resized side must still suit the encoder and the output stride
            divisor = math.lcm(int(getattr(inner, "divisor", 1) or 1), int(self.output_stride or 1),
                               *_encoder_strides(inner))
        self.divisor = int(divisor)

    def _to_original(self, view: View, kind: str, value: Tensor, in_size, view_size) -> Tensor:
        """One view's output -> the original frame, as probabilities for the *_logits kinds."""
        if kind == "class_logits":
            return torch.softmax(value.float(), dim=1)
        if kind == "invariant":
            return value.float()
        if kind == "points":
            return view.invert_points(value.float(), in_size, self.divisor)
        target = None
        if view.scale != 1.0:  # a map of the view: its size relative to the view's input gives its size
            turns = view.quarter_turns % 2
            vh, vw = (view_size[1], view_size[0]) if turns else (view_size[0], view_size[1])
            mh, mw = (value.shape[-1], value.shape[-2]) if turns else (value.shape[-2], value.shape[-1])
            target = (round(_static(in_size[0]) * _static(mh) / _static(vh)),
                      round(_static(in_size[1]) * _static(mw) / _static(vw)))
        if kind == "mask_logits":
            binary = _static(value.shape[1]) == 1
            value = torch.sigmoid(value.float()) if binary else torch.softmax(value.float(), dim=1)
        return view.invert_map(value.float(), target)

    def _summand(self, kind: str, value: Tensor) -> Tensor:
        """What is summed over the views: probabilities, or their logs for the geometric mean."""
        if kind not in ("class_logits", "mask_logits") or self.merge == "mean":
            return value
        if kind == "mask_logits" and _static(value.shape[1]) == 1:  # log(p / (1 - p))
            return torch.logit(value.clamp(_TINY, 1 - 1e-7))
        return value.clamp_min(_TINY).log()

    def _merged(self, kind: str, total: Tensor, count: int) -> Tensor:
        mean = total / count
        if kind not in ("class_logits", "mask_logits"):
            return mean
        binary = kind == "mask_logits" and _static(mean.shape[1]) == 1
        if self.merge == "mean":
            return torch.logit(mean.clamp(_TINY, 1 - 1e-7)) if binary else mean.clamp_min(_TINY).log()
        # normalised geometric mean: softmax of the mean log-probability (binary: of (p, 1 - p),
        # which is the sigmoid of the mean logit)
        return mean if binary else torch.log_softmax(mean, dim=1)

    def merge_views(self, kind: str, values: list[Tensor]) -> Tensor:
        """Outputs already in the original frame (probabilities for the *_logits kinds) -> merged."""
        return self._merged(kind, sum(self._summand(kind, v) for v in values), len(values))

    def forward(self, images: Tensor) -> Any:
        in_size = tuple(images.shape[-2:])
        first, totals = None, {}
        for view in self.views:  # summed view by view: one view's outputs in memory at a time
            x = view.apply(images, self.divisor)
            out = self.model(x)
            if first is None:
                first = out
                if not isinstance(out, dict) and not isinstance(self.outputs, str):
                    raise ValueError("the model returns a tensor but tta_outputs() describes a dict")
            parts = {None: (self.outputs, out)} if not isinstance(out, dict) else self._described(out)
            for key, (kind, value) in parts.items():
                value = self._summand(kind, self._to_original(view, kind, value, in_size, tuple(x.shape[-2:])))
                totals[key] = value if key not in totals else totals[key] + value
        if not isinstance(first, dict):
            return self._merged(self.outputs, totals[None], len(self.views))
        kinds = dict(self.outputs)
        return {key: self._merged(kinds[key], totals[key], len(self.views)) if key in totals else value
                for key, value in first.items()}

    def _described(self, out: dict) -> dict:
        """{key: (kind, tensor)} of a dict output; non-tensor values are left to the first view."""
        kinds = {} if isinstance(self.outputs, str) else dict(self.outputs)
        parts = {}
        for key, value in out.items():
            if not torch.is_tensor(value):
                continue
            if key not in kinds:
                raise ValueError(f"tta_outputs() does not say what the model's output {key!r} is "
                                 f"(named: {', '.join(kinds) or 'none'})")
            parts[key] = (kinds[key], value)
        return parts


# ---- from the config ------------------------------------------------------------------------


def settings(cfg) -> tuple[str, str, list[float]]:
    """(tta, tta_merge, tta_scales) of a config; a run from before TTA has none of them."""
    name = cfg.get("tta") or "none"
    merge = cfg.get("tta_merge") or "mean"
    scales = cfg.get("tta_scales")
    if scales is None:
        scales = DEFAULT_SCALES
    scales = [scales] if isinstance(scales, (int, float)) else list(scales)
    if str(name) not in VIEW_SETS:
        raise UserError(f"tta={name!r} is not valid. Valid choices: {', '.join(VIEW_SETS)}.")
    if str(merge) not in MERGES:
        raise UserError(f"tta_merge={merge!r} is not valid. Valid choices: {', '.join(MERGES)}.")
    return str(name), str(merge), [float(s) for s in scales]


def check(cfg, task) -> None:
    """UserError when the config asks for TTA the task cannot do (before any work starts)."""
    name, _, scales = settings(cfg)
    view_set(name, scales)
    if name != "none" and task.tta_outputs() is None:
        reason = getattr(task, "tta_unsupported_reason", "") or "it does not describe its outputs for TTA"
        raise UserError(f"tta={name}: the {type(task).__name__} has no test-time augmentation ({reason}). "
                        f"Use tta=none.")


def wrap(model: nn.Module, cfg, task) -> nn.Module:
    """`model` wrapped in the config's TTA, or `model` itself for tta=none."""
    name, merge, scales = settings(cfg)
    if name == "none":
        return model
    check(cfg, task)
    return TTAModel(model, view_set(name, scales), task.tta_outputs(), merge)


def describe(cfg) -> dict:
    """What an export or a report records about the TTA in use."""
    name, merge, scales = settings(cfg)
    views = [v.name for v in view_set(name, scales)]
    return {"views": name, "merge": merge, "view_names": views}
