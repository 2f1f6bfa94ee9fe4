"""Unsupervised domain adaptation of a segmenter to another camera (task=uda): a labelled source
camera, an unlabelled target camera (e.g. a 190-degree fisheye), mIoU on the target.

Every component is a config switch of `task.*`, so one recipe runs source-only, DACS, MIC and
their combinations:

- `geometric`: random fisheye / barrel distortion, affine and elastic warps of the source
  (`lens.random_warp`, labels moved with nearest neighbour, out-of-frame pixels ignored);
  `dual_branch`: each source sample is seen both with and without the warp, so small objects
  (poles, signs) the warp shrinks are still learned at their own size.
- `photometric_p`: the source takes a random target frame's colour statistics (Reinhard-style
  transfer over the target's image circle): a lens's colour cast alone can cost 9 mIoU.
- `mix: classmix` — DACS (Tranheden et al. 2021, "DACS: Domain Adaptation via Cross-domain Mixed
  Sampling", WACV): an EMA teacher (`teacher_alpha` 0.999, warm start min(1 - 1/(t+1), alpha))
  labels the un-augmented target frame; half of the classes of a source frame are pasted on it
  (ClassMix, labels pasted alike); colour jitter and blur on the mixed frame; pixels of a pseudo-
  label count with one weight per frame, the share of its in-circle pixels whose confidence
  exceeds `pseudo_threshold` (0.968); pixels outside the image circle never count.
- `mic_ratio` > 0 — MIC (Hoyer et al. 2023, "MIC: Masked Image Consistency for Context-Enhanced
  Domain Adaptation", CVPR): the student sees the target with random `mic_block` x `mic_block`
  blocks masked (ratio 0.7) and learns the teacher's pseudo-labels of the unmasked frame.
- `rare_class_temperature` > 0 — rare-class sampling of source frames (DAFormer, Hoyer et al.
  2022, CVPR; T = 0.01).
- the encoder at `optim.lr`, the decoder and head at `head_lr_mult` x (10); AdamW with linear
  warmup then poly decay by iteration (`sched=poly`, `trainer.max_steps`).
- `debug_every` N: a PNG every N iterations in RUN/plots/debug/ (source, target, mixed frame,
  pseudo-label with its weight, the student's prediction).

Splits: `train` the source; `target` the unlabelled target frames; `val` the target frames'
labels when there are (scoring only; else the source's carved val); `test_source` the
undistorted source camera (`task.source_test`); `test_<lens>` every extra simulated lens.

    podium train experiment=uda_camvid_fisheye task.mix=classmix task.mic_ratio=0.7
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F

from podium.engine.ema import EMATeacher
from podium.engine.parallel import unwrap
from podium.engine.registry import register
from podium.errors import UserError
from podium.tasks.base import StepContext
from podium.tasks.segmentation.task import SegmentationTask, SegmentationTaskConfig

MIXES = ("none", "classmix")


@dataclass
class UDATargetConfig:
    image_dir: Optional[str] = None  # target frames (unlabelled in training)
    mask_dir: Optional[str] = None  # their labels, read only to score the val split
    fov_dir: Optional[str] = None  # image-circle masks; none: estimated from the black border
    lens: Any = None  # preset name or mapping: simulate the target camera from image_dir / mask_dir
    extra_lenses: list[Any] = field(default_factory=list)  # more simulated cameras, scored as test_<name>
    seed: int = 0  # the simulator's noise seed
    cache: Optional[str] = None  # folder of simulated cameras (default ~/.cache/podium/...)
    max_images: int = 0  # > 0: the first N scored target frames


@dataclass
class UDASourceTestConfig:
    image_dir: Optional[str] = None  # labelled frames of the source camera, scored as test_source
    mask_dir: Optional[str] = None
    max_images: int = 0


@dataclass
class UDAWarpConfig:  # mirrors lens.WarpConfig
    p: float = 0.5
    fisheye_p: float = 0.5
    fov: list[float] = field(default_factory=lambda: [120.0, 200.0])
    barrel: list[float] = field(default_factory=lambda: [-0.3, 0.3])
    rotation: float = 10.0
    scale: list[float] = field(default_factory=lambda: [0.8, 1.25])
    shift: float = 0.1
    elastic_alpha: float = 0.0
    elastic_sigma: float = 8.0


@dataclass
class UDATaskConfig(SegmentationTaskConfig):
    name: str = "uda"
    monitor: str = "miou"
    target: UDATargetConfig = field(default_factory=UDATargetConfig)
    source_test: UDASourceTestConfig = field(default_factory=UDASourceTestConfig)
    geometric: bool = False  # random lens / barrel / affine / elastic warps of the source
    warp: UDAWarpConfig = field(default_factory=UDAWarpConfig)
    dual_branch: bool = False  # the source both warped and plain (needs geometric)
    photometric_p: float = 0.0  # probability of the target's colour statistics on a source frame
    mix: str = "none"  # none | classmix (DACS)
    teacher_alpha: float = 0.999
    pseudo_threshold: float = 0.968
    mix_jitter: float = 0.2  # DACS colour jitter strength of the mixed frame (applied to 80 % of frames)
    mix_blur_p: float = 0.5
    mic_ratio: float = 0.0  # MIC: share of masked blocks (0.7); 0 = off
    mic_block: int = 64
    mic_weight: float = 1.0
    rare_class_temperature: float = 0.0  # > 0: rare-class sampling of the source (0.01)
    head_lr_mult: float = 10.0
    debug_every: int = 0  # > 0: a debug PNG every N iterations


def _range(key: str, value: float, low: float, high: float, closed_high: bool = True) -> None:
    ok = low <= value <= high if closed_high else low <= value < high
    if not ok:
        raise UserError(f"task.{key}={value}: expected a value in [{low}, {high}{']' if closed_high else ')'}.")


@register("task", "uda", schema=UDATaskConfig,
          help="Unsupervised domain adaptation of a segmenter to another camera (DACS, MIC, lens warps).")
class UDASegmentationTask(SegmentationTask):
    def __init__(self, cfg):
        super().__init__(cfg)
        t = cfg.task
        if t.mix not in MIXES:
            raise UserError(f"task.mix={t.mix!r}: expected one of {', '.join(MIXES)}.")
        for key, low, high in (("photometric_p", 0, 1), ("pseudo_threshold", 0, 1), ("mic_ratio", 0, 1),
                               ("mix_blur_p", 0, 1), ("mix_jitter", 0, 1), ("warp.p", 0, 1), ("warp.fisheye_p", 0, 1)):
            _range(key, float(t.warp[key[5:]] if key.startswith("warp.") else t[key]), low, high)
        _range("teacher_alpha", float(t.teacher_alpha), 0, 1, closed_high=False)
        if t.mic_block < 1 or t.mic_weight < 0 or t.head_lr_mult <= 0 or t.rare_class_temperature < 0 or t.debug_every < 0:
            raise UserError("task.mic_block (>= 1), task.mic_weight (>= 0), task.head_lr_mult (> 0), "
                            "task.rare_class_temperature (>= 0) and task.debug_every (>= 0) are out of range: "
                            f"{t.mic_block}, {t.mic_weight}, {t.head_lr_mult}, {t.rare_class_temperature}, {t.debug_every}.")
        from podium.tasks.segmentation.lens import resolve_lens

        for i, spec in enumerate(([t.target.lens] if t.target.lens is not None else []) + list(t.target.extra_lenses)):
            resolve_lens(spec, key="task.target.lens" if i == 0 and t.target.lens is not None
                         else f"task.target.extra_lenses[{i - (t.target.lens is not None)}]")
        if t.dual_branch and not t.geometric:
            raise UserError("task.dual_branch=true needs task.geometric=true (the second branch is the warped one).")
        self._warp = None

    # ---- switches
    @property
    def uses_teacher(self) -> bool:
        t = self.cfg.task
        return t.mix != "none" or t.mic_ratio > 0

    @property
    def uses_target_images(self) -> bool:
        return self.uses_teacher or self.cfg.task.photometric_p > 0

    # ---- data
    def build_datasets(self):
        if self._datasets is not None:
            return self._datasets
        from podium.engine import registry
        from podium.tasks.segmentation import uda_data
        from podium.tasks.segmentation.pipeline import _common_config

        t = self.cfg.task
        source = registry.build("dataset", self.cfg.data.name, self.cfg.data, seed=self.cfg.seed)
        train = source["train"]
        c = _common_config(self.cfg.data)
        if t.rare_class_temperature > 0:
            from podium.tasks.segmentation.rare_class import RareClassPatches

            train = RareClassPatches(train.records, train.cfg, train.class_names, train.values, train.prepared,
                                     seed=self.cfg.seed, temperature=float(t.rare_class_temperature))
        ignore_value = next((k for k, v in train.values.items() if v == train.ignore_index and k != train.ignore_index),
                            train.ignore_index)
        cameras = uda_data.target_frames(t.target, ignore_value, seed=int(t.target.seed))
        out = {"train": train}
        main = cameras[0]
        if self.uses_target_images:
            out["target"] = uda_data.unlabelled_frames(main, c, float(c.fraction), int(c.split_seed))
        if main.mask_dir is not None:
            out["val"] = uda_data.labelled_frames(main, c, train.class_names, train.values, t.target.max_images)
        elif "val" in source:
            out["val"] = source["val"]
        else:
            raise UserError("no validation split: give the target's labels (task.target.mask_dir, read only to "
                            "score) or carve source frames with data.val_count >= 1.")
        if t.source_test.image_dir:
            frames = uda_data.Frames("source", uda_data._folder(t.source_test.image_dir, "task.source_test.image_dir"),
                                     uda_data._folder(t.source_test.mask_dir, "task.source_test.mask_dir"), None)
            if frames.mask_dir is None:
                raise UserError("task.source_test.mask_dir is required with task.source_test.image_dir.")
            out["test_source"] = uda_data.labelled_frames(frames, c, train.class_names, train.values,
                                                          t.source_test.max_images)
        for frames in cameras[1:]:
            if frames.mask_dir is not None:
                out[f"test_{frames.name}"] = uda_data.labelled_frames(frames, c, train.class_names, train.values,
                                                                      t.target.max_images)
        for split, dataset in source.items():
            if split.startswith("test"):
                out[f"{split}_source_carve" if split in out else split] = dataset
        self._datasets = out
        return out

    def train_loaders(self, datasets, make_loader):
        loaders = {"train": make_loader(datasets["train"], train=True)}
        if "target" in datasets:
            loaders["target"] = make_loader(datasets["target"], train=True)
        return loaders

    # ---- model, optimizer, teacher
    def parameter_groups(self, model):
        lr, mult = float(self.cfg.optim.lr), float(self.cfg.task.head_lr_mult)
        split = getattr(unwrap(model), "param_groups_split", None)
        if split is None or mult == 1:
            return super().parameter_groups(model)
        encoder, rest = split()
        groups = [{"params": [p for p in encoder if p.requires_grad], "lr": lr, "name": "encoder"},
                  {"params": [p for p in rest if p.requires_grad], "lr": lr * mult, "name": "head"}]
        return [g for g in groups if g["params"]]

    def build_aux_modules(self, model):
        if not self.uses_teacher:
            return {}
        return {"teacher": EMATeacher(model, alpha=float(self.cfg.task.teacher_alpha), buffers=True)}

    def on_optimizer_step(self, model, ctx: StepContext) -> None:
        if "teacher" in ctx.aux:
            ctx.aux["teacher"].update(unwrap(model), ctx.step)

    # ---- the step
    def _generator(self, ctx: StepContext, batch: dict) -> torch.Generator:
        # from (seed, step, the batch's sample ids) alone: a resumed run draws what the
        # uninterrupted run drew, and accumulated micro-batches draw differently
        salt = int(batch["index"].sum()) if torch.is_tensor(batch.get("index")) else 0
        return torch.Generator().manual_seed((self.cfg.seed * 1_000_003 + ctx.step * 7919 + salt) % 2**63)

    def _warp_config(self):
        if self._warp is None:
            from podium.tasks.segmentation.lens import WarpConfig

            w = self.cfg.task.warp
            self._warp = WarpConfig(p=float(w.p), fisheye_p=float(w.fisheye_p), fov=tuple(w.fov), barrel=tuple(w.barrel),
                                    rotation=float(w.rotation), scale=tuple(w.scale), shift=float(w.shift),
                                    elastic_alpha=float(w.elastic_alpha), elastic_sigma=float(w.elastic_sigma))
        return self._warp

    def _pixel_ce(self, logits, labels, weight):
        """Pixel-weighted cross-entropy averaged over every pixel (ignored ones add 0), as DACS /
        DAFormer weight pseudo-labels: a frame's weight scales its loss instead of cancelling."""
        ce = F.cross_entropy(logits.float(), labels, ignore_index=self.train_set.ignore_index, reduction="none")
        return (ce * weight).mean()

    def training_step(self, model, batch, ctx: StepContext):
        from podium.tasks.segmentation import mixing

        t = self.cfg.task
        if "target" not in batch:  # one loader: the engine hands the source batch itself
            batch = {"train": batch}
        src, tgt = batch["train"], batch.get("target")
        g = self._generator(ctx, src)
        ignore = self.train_set.ignore_index
        mean, std = self.train_set.mean, self.train_set.std
        xs, ys, fs = src["image"], src["mask"], src["fov"]
        ys = torch.where(fs, ys, torch.full_like(ys, ignore))
        if tgt is not None and t.photometric_p > 0:
            xs = mixing.colour_transfer(xs, tgt["image"], tgt["fov"], mean, std, float(t.photometric_p), g)
        plain = (xs, ys)
        if t.geometric:
            from podium.tasks.segmentation.lens import random_warp

            xw, yw, _ = random_warp(xs, ys, None, self._warp_config(), g, ignore_index=ignore)
            xs, ys = (torch.cat([xs, xw]), torch.cat([ys, yw])) if t.dual_branch else (xw, yw)
        logits_s = model(xs)["logits"]
        loss_src = self.loss_fn(logits_s, ys, None)
        logs = {"source_loss": loss_src.detach()}
        loss = loss_src
        if self.uses_teacher:
            teacher = ctx.aux["teacher"]
            teacher.eval()
            xt, ft = tgt["image"], tgt["fov"]
            with torch.no_grad():
                t_logits = teacher(xt)["logits"]  # the un-augmented target frame
            pseudo, _, w_img = mixing.pseudo_labels(t_logits, ft, float(t.pseudo_threshold), ignore)
            logs["pseudo_weight"] = w_img.mean().detach()
            if t.mix == "classmix":
                x_src, y_src = plain if not t.geometric or t.dual_branch else (xs, ys)
                n = min(len(x_src), len(xt))
                paste = mixing.classmix_masks(y_src[:n], g, ignore)
                x_mix = mixing.mix(paste, x_src[:n], xt[:n])
                y_mix, w_mix = mixing.mixed_targets(paste, y_src[:n], pseudo[:n], w_img[:n], ft[:n], ignore)
                x_mix = mixing.strong_colour(x_mix, mean, std, g, jitter=float(t.mix_jitter),
                                             blur_p=float(t.mix_blur_p))
                loss_mix = self._pixel_ce(model(x_mix)["logits"], y_mix, w_mix)
                loss = loss + loss_mix
                logs["mix_loss"] = loss_mix.detach()
                self._debug(ctx, src, tgt, x_mix, y_mix, w_img, logits_s)
            if t.mic_ratio > 0:
                keep = mixing.mic_mask(tuple(xt.shape), int(t.mic_block), float(t.mic_ratio), g, device=xt.device)
                x_masked = mixing.strong_colour(xt, mean, std, g, jitter=float(t.mix_jitter),
                                                blur_p=float(t.mix_blur_p)) * keep
                w_pix = w_img.view(-1, 1, 1).expand_as(pseudo) * (pseudo != ignore)
                loss_mic = self._pixel_ce(model(x_masked)["logits"], pseudo, w_pix)
                loss = loss + float(t.mic_weight) * loss_mic
                logs["mic_loss"] = loss_mic.detach()
        return {"loss": loss, **logs}

    # ---- debug images
    def _debug(self, ctx, src, tgt, x_mix, y_mix, w_img, logits_s) -> None:
        every = int(self.cfg.task.debug_every)
        if every <= 0 or ctx.step % every or ctx.run_dir is None or ctx.fabric.global_rank != 0:
            return
        from podium.tasks.segmentation.plots import plot_uda_debug

        plot_uda_debug(ctx.run_dir / "plots" / "debug" / f"step_{ctx.step:06d}.png",
                       source=src["image"][0], source_label=src["mask"][0], target=tgt["image"][0],
                       mixed=x_mix[0], mixed_label=y_mix[0], weight=float(w_img[0]),
                       prediction=logits_s[0].argmax(0), mean=self.train_set.mean, std=self.train_set.std,
                       num_classes=self.num_classes, ignore_index=self.train_set.ignore_index)
