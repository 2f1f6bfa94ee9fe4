"""Self-supervised pretraining of a segmentation encoder on unlabelled images: MoCo v2 (He et al.
2020, "Momentum Contrast for Unsupervised Visual Representation Learning", CVPR; Chen et al.
2020, arXiv:2003.04297) or SimCLR (Chen et al. 2020, ICML, arXiv:2002.05709).

    podium pretrain experiment=moco_synthetic                       # seconds on a CPU
    podium pretrain experiment=drive_moco trainer.max_epochs=200    # DRIVE images, a GPU
    podium train experiment=... model.encoder_weights=RUN/encoder.pt

The model (what the optimizer trains) is the query encoder: a timm backbone (pooled features)
and MoCo v2's MLP head (Linear, ReLU, Linear to 128-d), L2-normalised. With `task.method=moco`
an auxiliary module holds the momentum key encoder and the queue of negative keys (buffers, so
they are checkpointed and resumed with the run): the key encoder's parameters follow
theta_k <- m theta_k + (1 - m) theta_q after every optimizer step; the keys of a step are gathered
from every DDP rank and enqueued (the oldest are overwritten); the loss is InfoNCE over the
positive key and the queue, at temperature loss.temperature. With `task.method=simclr` there is
no queue: NT-Xent over the 2N views of the batch gathered from every rank (with gradients).

Shuffled BN. MoCo's keys must not see the batch statistics of their own queries, or the network
finds the positive through them. With several processes (DDP) the key batch is shuffled across
ranks before the key encoder and unshuffled after (the paper's shuffling BN). On one process that
is impossible; podium then does what the official one-GPU demo (MoCo's colab notebook) does:
every BatchNorm2d of both encoders becomes a SplitBatchNorm that normalises `model.bn_splits`
groups of the batch separately, and the key batch is shuffled inside the batch, so a key and its
query fall into different groups. `task.shuffle_bn=false` turns both shuffles off.

Validation ranks, for every val image, its second view among the second views of all val images,
by the query encoder alone (`val/top1`), and reports the matching InfoNCE (`val/loss`, monitored);
both are independent of the queue, so `podium eval` and MoCo / SimCLR runs compare.

After training `podium pretrain` writes RUN/encoder.pt: the backbone's state dict with timm key
names (SplitBatchNorm keeps BatchNorm2d's keys), which `model.encoder_weights` loads into the
U-Net's encoder (podium.common.unet.load_local_weights).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from podium.engine import registry
from podium.engine.ema import lerp_towards
from podium.engine.parallel import concat_all_gather, gather_with_grad, unwrap
from podium.engine.parallel import world_size as _world
from podium.engine.registry import register
from podium.errors import UserError
from podium.tasks.base import StepContext, Task
from podium.tasks.segmentation import pretrain_data  # noqa: F401  (registers unlabelled_images)

METHODS = ("moco", "simclr")


# ---- configs ------------------------------------------------------------------------------


@dataclass
class PretrainTaskConfig:
    name: str = "moco"
    method: str = "moco"  # moco (momentum encoder + queue, InfoNCE) | simclr (NT-Xent over the batch)
    queue_size: int = 4096  # moco: negative keys kept (paper 65536; one-GPU demo 4096)
    momentum: float = 0.99  # moco: key encoder momentum (paper 0.999; one-GPU demo 0.99)
    shuffle_bn: bool = True  # shuffle keys across ranks (DDP) or inside the batch with SplitBatchNorm
    monitor: str = "loss"  # loss (min) | top1 (max): validation metric for the best checkpoint
    export_checkpoint: str = "last"  # last | best: which weights go to RUN/encoder.pt


@dataclass
class ContrastiveEncoderConfig:
    name: str = "moco_encoder"
    backbone: str = "resnet18"  # any timm model; use the U-Net's model.encoder to reuse the weights
    weights: str | None = None  # LOCAL state dict to start from (timm key names)
    proj_dim: int = 128  # output of the MLP head
    proj_hidden: int = 0  # hidden width of the MLP head; 0 = the backbone's feature width (MoCo v2)
    bn_splits: int = 8  # SplitBatchNorm groups on one process (the demo's 8); 1 = plain BatchNorm


@dataclass
class ContrastiveLossConfig:
    name: str = "contrastive"
    temperature: float = 0.2  # MoCo v2 0.2; one-GPU demo 0.1; SimCLR 0.1-0.5


# ---- losses -------------------------------------------------------------------------------


def info_nce(q: Tensor, k: Tensor, queue: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """MoCo's InfoNCE. q, k (N, D) normalised, queue (D, K) normalised negatives -> (loss, logits
    (N, 1 + K)); column 0 holds the positive."""
    with torch.autocast(q.device.type, enabled=False):  # logits / 0.1 in bf16 lose the ranking
        q, k = q.float(), k.float()
        positive = (q * k).sum(1, keepdim=True)
        logits = torch.cat([positive, q @ queue.float()], 1) / temperature
        return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device)), logits


def nt_xent(z1: Tensor, z2: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """SimCLR's NT-Xent. z1, z2 (B, D) normalised views of the local batch; with DDP the
    candidates are the 2N views of every rank (gathered with gradients) and the anchors the 2B
    local ones. Each anchor's positive is its other view; the anchor itself is excluded.
    Returns (mean loss over the local anchors, top-1 accuracy of the positive)."""
    with torch.autocast(z1.device.type, enabled=False):
        z1, z2 = z1.float(), z2.float()
        b = len(z1)
        all1, all2 = gather_with_grad(z1), gather_with_grad(z2)
        n = len(all1)
        rank = dist.get_rank() if _world() > 1 else 0
        idx = torch.arange(b, device=z1.device) + rank * b
        logits = torch.cat([z1, z2]) @ torch.cat([all1, all2]).T / temperature  # (2B, 2N)
        own = torch.cat([idx, idx + n])
        logits = logits.masked_fill(F.one_hot(own, 2 * n).bool(), float("-inf"))
        target = torch.cat([idx + n, idx])
        top1 = (logits.argmax(1) == target).float().mean()
        return F.cross_entropy(logits, target), top1


class ContrastiveLoss(nn.Module):
    """(a, b[, queue]) -> (loss, top-1 accuracy): InfoNCE of queries a against keys b and the
    queue (moco), or NT-Xent of the two views a, b (simclr)."""

    def __init__(self, method: str, temperature: float):
        super().__init__()
        self.method, self.temperature = method, temperature

    def forward(self, a: Tensor, b: Tensor, queue: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if self.method == "simclr":
            return nt_xent(a, b, self.temperature)
        loss, logits = info_nce(a, b, queue, self.temperature)
        return loss, (logits.argmax(1) == 0).float().mean()


@register("loss", "contrastive", schema=ContrastiveLossConfig,
          help="InfoNCE over the queue (task.method=moco) or NT-Xent over the batch (simclr).")
def contrastive(cfg, *, method: str = "moco", **_) -> nn.Module:
    if not cfg.temperature > 0:
        raise UserError(f"loss.temperature={cfg.temperature}: expected > 0.")
    return ContrastiveLoss(method, float(cfg.temperature))


# ---- model --------------------------------------------------------------------------------


class SplitBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d that, in training, normalises `num_splits` groups of the batch separately
    (sample n in group n % num_splits) — MoCo's one-GPU stand-in for shuffled BN across GPUs.
    Running statistics are the mean over the groups; evaluation is plain BatchNorm2d. A batch
    that does not divide evenly falls back to whole-batch statistics."""

    def __init__(self, num_features: int, num_splits: int, **kwargs):
        super().__init__(num_features, **kwargs)
        self.num_splits = num_splits

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        g = self.num_splits
        if not self.training or g == 1 or n % g or (n // g) * h * w < 2:
            return super().forward(x)
        mean, var = self.running_mean.repeat(g), self.running_var.repeat(g)
        out = F.batch_norm(x.reshape(n // g, c * g, h, w), mean, var, self.weight.repeat(g),
                           self.bias.repeat(g), True, self.momentum or 0.1, self.eps).view(n, c, h, w)
        self.running_mean.copy_(mean.view(g, c).mean(0))
        self.running_var.copy_(var.view(g, c).mean(0))
        self.num_batches_tracked.add_(1)
        return out


def convert_split_bn(module: nn.Module, num_splits: int) -> nn.Module:
    """Replace every nn.BatchNorm2d (exactly that class) by a SplitBatchNorm with its state."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d and child.affine and child.track_running_stats:
            split = SplitBatchNorm(child.num_features, num_splits, eps=child.eps, momentum=child.momentum)
            split.load_state_dict(child.state_dict())
            setattr(module, name, split)
        else:
            convert_split_bn(child, num_splits)
    return module


class ContrastiveEncoder(nn.Module):
    """x (B, C, H, W) -> L2-normalised projection (B, proj_dim). `backbone` is the timm model
    (pooled features, no classifier) whose state dict becomes encoder.pt."""

    def __init__(self, backbone: nn.Module, proj_dim: int = 128, proj_hidden: int = 0):
        super().__init__()
        self.backbone = backbone
        width = backbone.num_features
        hidden = proj_hidden or width
        self.projector = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, proj_dim))
        self.out_dim = proj_dim

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if hasattr(self.backbone, "set_grad_checkpointing"):  # timm models (trainer.gradient_checkpointing)
            self.backbone.set_grad_checkpointing(enable)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.projector(self.backbone(x)), dim=1)


@register("model", "moco_encoder", schema=ContrastiveEncoderConfig,
          help="timm backbone + MLP projection head (128-d) for MoCo / SimCLR pretraining.")
def moco_encoder(cfg, *, in_chans: int, **_) -> nn.Module:
    import timm

    from podium.common.unet import check_timm_name, load_local_weights

    name = check_timm_name("backbone", cfg.backbone)
    if cfg.proj_dim < 1 or cfg.proj_hidden < 0 or cfg.bn_splits < 1:
        raise UserError(f"model.proj_dim={cfg.proj_dim} (>= 1), model.proj_hidden={cfg.proj_hidden} (>= 0) "
                        f"and model.bn_splits={cfg.bn_splits} (>= 1) are out of range.")
    backbone = timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_chans)
    if cfg.weights:
        load_local_weights(backbone, cfg.weights, "weights", in_chans)
    if cfg.bn_splits > 1:
        convert_split_bn(backbone, cfg.bn_splits)
    return ContrastiveEncoder(backbone, cfg.proj_dim, cfg.proj_hidden)


# ---- momentum encoder and queue -----------------------------------------------------------


class MomentumQueue(nn.Module):
    """MoCo's auxiliary state: the key encoder (a copy of the query encoder, never trained by the
    optimizer) and the queue of keys (D, K) with its write pointer, as buffers."""

    def __init__(self, encoder: nn.Module, queue_size: int, momentum: float):
        super().__init__()
        self.key_encoder = copy.deepcopy(encoder)
        for p in self.key_encoder.parameters():
            p.requires_grad_(False)
        self.momentum = momentum
        dim = encoder.out_dim
        # random unit vectors until real keys replace them, as in the official code
        self.register_buffer("queue", F.normalize(torch.randn(dim, queue_size), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        self.register_buffer("filled", torch.zeros(1, dtype=torch.long))  # real keys held

    @torch.no_grad()
    def momentum_update(self, query_encoder: nn.Module) -> None:
        """theta_k <- m theta_k + (1 - m) theta_q, parameters only (MoCo leaves buffers alone)."""
        lerp_towards(self.key_encoder, query_encoder, self.momentum)

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        """Write keys (N, D) after the pointer, wrapping around; only the last K of a larger N."""
        size = self.queue.shape[1]
        keys = keys.detach()[-size:].to(self.queue.dtype)
        ptr = int(self.queue_ptr)
        idx = (ptr + torch.arange(len(keys), device=self.queue.device)) % size
        self.queue[:, idx] = keys.T
        self.queue_ptr[0] = (ptr + len(keys)) % size
        self.filled[0] = min(size, int(self.filled) + len(keys))


# ---- the task -----------------------------------------------------------------------------


@register("task", "moco", schema=PretrainTaskConfig,
          help="Self-supervised encoder pretraining, MoCo v2 or SimCLR (podium pretrain).")
class ContrastivePretrainTask(Task):
    def __init__(self, cfg):
        super().__init__(cfg)
        t = cfg.task
        if t.method not in METHODS:
            raise UserError(f"task.method={t.method!r}: expected one of {', '.join(METHODS)}.")
        if t.monitor not in ("loss", "top1"):
            raise UserError(f"task.monitor={t.monitor!r}: expected loss or top1.")
        if t.export_checkpoint not in ("last", "best"):
            raise UserError(f"task.export_checkpoint={t.export_checkpoint!r}: expected last or best.")
        if t.method == "moco" and (t.queue_size < 1 or not 0 <= t.momentum < 1):
            raise UserError(f"task.queue_size={t.queue_size} (>= 1) and task.momentum={t.momentum} "
                            "(in [0, 1)) are out of range.")
        if cfg.loss.name != "contrastive":
            raise UserError(f"task=moco needs loss.name=contrastive (InfoNCE / NT-Xent; experiment=drive_moco "
                            f"sets it), got loss.name={cfg.loss.name!r}.")
        self.monitor = f"val/{t.monitor}"
        self.monitor_mode = "min" if t.monitor == "loss" else "max"
        self._datasets = None
        self.temperature = float(cfg.loss.temperature)

    def build_datasets(self):
        datasets = super().build_datasets()
        if getattr(datasets["train"], "views", None) != 2:
            raise UserError(f"task=moco needs two-view items (data=unlabelled_images); "
                            f"data.name={self.cfg.data.name!r} gives labelled items.")
        return datasets

    def build_model(self):
        model = registry.build("model", self.cfg.model.name, self.cfg.model,
                               in_chans=int(self.cfg.data.get("channels", 3)))
        if not isinstance(model, ContrastiveEncoder):
            raise UserError(f"task=moco needs model=moco_encoder, got model.name={self.cfg.model.name!r}.")
        return model

    def describe(self) -> dict:
        """A pretraining run's product is the encoder (RUN/encoder.pt), not predictions."""
        from podium.engine.runcard import card_header

        return {**card_header(self), "model_kwargs": {"in_chans": int(self.cfg.data.get("channels", 3))},
                "method": str(self.cfg.task.method),
                "input": {"channels": int(self.cfg.data.get("channels", 3)),
                          "size": [int(x) for x in self.cfg.data.get("crop_size", [])] or None,
                          "mean": [float(x) for x in self.cfg.data.get("mean", [])],
                          "std": [float(x) for x in self.cfg.data.get("std", [])]},
                "output": {"kind": "embedding", "meaning": "L2-normalised projection of each image, for "
                           "contrastive pretraining; load RUN/encoder.pt into a segmentation model"}}

    def build_loss(self, datasets):
        self.loss_fn = registry.build("loss", self.cfg.loss.name, self.cfg.loss, method=self.cfg.task.method)
        self.temperature = self.loss_fn.temperature

    def build_aux_modules(self, model):
        t = self.cfg.task
        return {"moco": MomentumQueue(model, t.queue_size, t.momentum)} if t.method == "moco" else {}

    # ---- training
    def _shuffle_generator(self, ctx: StepContext) -> torch.Generator:
        # the same permutation on every rank, from (seed, step) alone: no broadcast needed, and a
        # resumed run shuffles as the uninterrupted one did
        return torch.Generator().manual_seed((self.cfg.seed * 1_000_003 + ctx.step) % 2**63)

    @torch.no_grad()
    def keys(self, encoder: nn.Module, images: Tensor, ctx: StepContext) -> tuple[Tensor, Tensor]:
        """(keys of every rank's batch in rank order, this rank's keys), with shuffled BN."""
        encoder.train()
        if not self.cfg.task.shuffle_bn:
            local = encoder(images)
            return concat_all_gather(local), local
        b, world = len(images), _world()
        rank = dist.get_rank() if world > 1 else 0
        everyone = concat_all_gather(images)  # (world * B, ...): shuffle across ranks (paper)
        perm = torch.randperm(len(everyone), generator=self._shuffle_generator(ctx)).to(images.device)
        shuffled_keys = concat_all_gather(encoder(everyone[perm[rank * b:(rank + 1) * b]]))
        all_keys = torch.empty_like(shuffled_keys)
        all_keys[perm] = shuffled_keys  # unshuffle
        return all_keys, all_keys[rank * b:(rank + 1) * b]

    def training_step(self, model, batch, ctx: StepContext):
        view1, view2 = batch["view1"], batch["view2"]
        if self.cfg.task.method == "simclr":
            loss, top1 = self.loss_fn(model(view1), model(view2))
            return {"loss": loss, "top1": top1.detach()}
        state: MomentumQueue = ctx.aux["moco"]
        q = model(view1)
        all_keys, k = self.keys(state.key_encoder, view2, ctx)
        # clone: the queue is written below, after autograd saved it for the backward pass
        loss, top1 = self.loss_fn(q, k, state.queue.clone())
        state.enqueue(all_keys)
        return {"loss": loss, "top1": top1}

    def on_optimizer_step(self, model, ctx: StepContext) -> None:
        if "moco" in ctx.aux:
            ctx.aux["moco"].momentum_update(unwrap(model))

    # ---- evaluation
    @torch.no_grad()
    def evaluation_step(self, model, batch, ctx: StepContext) -> list[dict]:
        z1 = model(batch["view1"]).float().cpu().numpy()
        z2 = model(batch["view2"]).float().cpu().numpy()
        index = batch["index"].cpu().numpy()
        return [{"index": int(index[i]), "z1": z1[i], "z2": z2[i]} for i in range(len(index))]

    def aggregate(self, records, split):
        if len(records) < 2:
            raise UserError(f"the {split} split has {len(records)} image(s); ranking views needs >= 2.")
        records = sorted(records, key=lambda r: r["index"])
        z1 = torch.from_numpy(np.stack([r["z1"] for r in records]))
        z2 = torch.from_numpy(np.stack([r["z2"] for r in records]))
        logits = z1 @ z2.T / self.temperature
        target = torch.arange(len(records))
        loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
        top1 = 0.5 * ((logits.argmax(1) == target).float().mean() + (logits.argmax(0) == target).float().mean())
        return {"loss": float(loss), "top1": float(top1)}

    def predict(self, model, inputs, out_file, ctx):
        raise UserError("a pretraining run predicts nothing: load its RUN/encoder.pt into a segmentation "
                        "model with model.encoder_weights=RUN/encoder.pt and train that.")


# ---- export -------------------------------------------------------------------------------


def encoder_state_dict(model_state: dict) -> dict:
    """The backbone's tensors of a ContrastiveEncoder state dict, with timm key names."""
    state = {k.removeprefix("backbone."): v for k, v in model_state.items() if k.startswith("backbone.")}
    if not state:
        raise UserError("the checkpoint holds no backbone.* tensors: not a podium pretrain run.")
    return state


def export_encoder(run_dir: Path, checkpoint: str = "last") -> Path:
    """Write RUN_DIR/encoder.pt (timm key names) from checkpoints/<checkpoint>.pt."""
    from podium.engine.checkpoint import atomic_save, load_checkpoint

    run_dir = Path(run_dir)
    data = load_checkpoint(run_dir / "checkpoints" / f"{checkpoint}.pt")
    path = run_dir / "encoder.pt"
    atomic_save(encoder_state_dict(data["model"]), path)
    return path
