"""Structured schemas for the engine's config groups.

The engine's groups (trainer, optim, sched, tracking, run) have one fixed schema each. The task's
groups (task, data, model, loss) are validated against the schema of the registered object their
`name` selects (see `podium.config`). Field comments are the documentation users read with
`podium train --cfg`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class EMAConfig:
    enabled: bool = False
    decay: float = 0.999
    # decay_t = min(decay, (1 + t) / (10 + t)) at update t (the TF / timm warm-up): without it
    # the random initial weights keep decay**t of the average — 26 % after 270 steps at 0.995,
    # which made an ISBI landmark run's EMA validate at 20 mm while its live weights were at 1.5
    warmup: bool = True
    evaluate_with_ema: bool = True  # validate and save "best" with the EMA weights


@dataclass
class EarlyStoppingConfig:
    patience: int = 0  # validations without improvement before stopping; 0 disables
    min_delta: float = 0.0


@dataclass
class TrainerConfig:
    accelerator: str = "auto"  # auto | cpu | cuda | mps
    devices: Any = 1  # number of devices (processes), or "auto"
    num_nodes: int = 1
    strategy: str = "auto"  # auto | ddp | fsdp (Lightning Fabric strategy names)
    precision: str = "auto"  # auto (bf16/fp16 mixed on GPU, 32 on CPU) | 32-true | bf16-mixed | 16-mixed
    max_epochs: int = 10
    max_steps: int = 0  # > 0: train by optimizer steps (max_epochs is ignored; validation stays per epoch unless val_every_n_steps is set)
    val_every_n_epochs: int = 1
    val_every_n_steps: int = 0  # > 0: validate every N optimizer steps instead of per epoch
    accumulate_grad_batches: int = 1
    grad_clip_norm: float = 0.0  # 0 disables clipping
    gradient_checkpointing: bool = False  # asks the model to recompute activations
    # convolution weights in NHWC (torch.channels_last): oneDNN / cuDNN pick faster kernels for
    # 2-D convolutions (landmark coarse-to-fine step 1.38x faster on this 2-core CPU, VarNet 1.10x; see
    # benchmarks/channels_last.py); models without 4-D weights are unaffected
    channels_last: bool = False
    ema: EMAConfig = field(default_factory=EMAConfig)
    monitor: Optional[str] = None  # metric for best checkpoint / early stopping; default: the task's
    monitor_mode: Optional[str] = None  # max | min; default: the task's
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    checkpoint_every_n_steps: int = 0  # mid-epoch resumable checkpoints; 0 disables
    checkpoint_every_minutes: float = 10.0  # time-based mid-epoch checkpoints; 0 disables
    checkpoint_every_n_epochs: int = 0  # > 0: also keep checkpoints/epoch-NNNN.pt (run.keep_last / keep_best)
    log_every_n_steps: int = 10
    progress_bar: bool = True
    batch_size: int = 32  # per device
    eval_batch_size: int = 0  # 0: same as batch_size
    num_workers: int = -1  # -1: chosen from the CPU count
    persistent_workers: bool = True
    # torch intra-op threads on CPU. -1: the cores the loader workers leave free (right when the
    # workers are busy: small models on cheap data); 0: every core (right when a step's compute
    # dwarfs its loading, e.g. cached landmark images: 4.3 vs 2.4 samples/s on 2 cores with one
    # worker); N: exactly N. OMP_NUM_THREADS in the environment wins over all of these.
    cpu_threads: int = -1
    prefetch_factor: int = 2
    data_wait_warn: float = 0.2  # warn when data wait exceeds this share of step time
    deterministic: bool = False  # torch.use_deterministic_algorithms (slower on GPU)


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | sgd | nadam
    lr: float = 1e-3
    weight_decay: float = 0.01
    momentum: float = 0.9  # sgd
    nesterov: bool = False  # sgd
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw, nadam
    eps: float = 1e-8


@dataclass
class SchedConfig:
    name: str = "cosine"  # none | cosine | poly | exponential | step
    warmup_steps: int = 0  # linear warmup in optimizer steps (added to warmup_epochs)
    warmup_epochs: float = 0.0
    min_lr_ratio: float = 0.0  # cosine / poly: final lr = lr * min_lr_ratio
    power: float = 1.0  # poly: lr factor (1 - t)^power
    gamma: float = 0.1  # exponential / step: decay factor per interval (per step_size for step)
    step_size: int = 30  # step: decay every step_size intervals
    interval: str = "epoch"  # exponential / step: count intervals in epochs or steps


@dataclass
class TrackingConfig:
    backend: str = "mlflow"  # mlflow | none
    uri: Optional[str] = None  # default: sqlite:///<run.root>/mlflow.db ; http://HOST:PORT for a team server
    experiment: Optional[str] = None  # default: the experiment name
    timeout_s: float = 5.0  # connection check to a tracking server


@dataclass
class RunConfig:
    root: str = "runs"
    name: Optional[str] = None  # default: <timestamp>-<experiment>
    dir: Optional[str] = None  # explicit run folder (overrides root/name)
    # durability (podium.engine.mirror, podium.engine.disk): copy checkpoints, metrics, plots to
    # MIRROR/<run name>/ (a folder or fsspec URL) from a background thread; resume=MIRROR/<run name>
    mirror: Optional[str] = None
    mirror_timeout_s: float = 300.0  # at the end of a run, wait at most this long for the mirror
    min_free_mb: float = 256.0  # disk guard: free space left beside a checkpoint, else prune / skip
    keep_last: int = 3  # numbered checkpoints (trainer.checkpoint_every_n_epochs) kept: most recent
    keep_best: int = 1  # ... and best by trainer.monitor; both <= 0 keeps all


@dataclass
class CVConfig:
    """k-fold cross-validation (`podium cv`, podium.engine.folds): the train and val splits
    are pooled, one fold is held out as "val", the rest trains; test splits stay as they are."""

    folds: int = 0  # 0: off; >= 2: the number of folds `podium cv` makes
    fold: Optional[int] = None  # the fold this run holds out as val (0 .. folds-1); null: no CV
    group_by: Optional[str] = None  # keep samples sharing this column in one fold (patient, volume...)
    splits: Optional[str] = None  # a splits.json to reuse (written by `podium cv`); null: made from seed
    seed: int = 0  # shuffles the folds; independent of the run seed


@dataclass
class SweepConfig:
    """Hyperparameter search with Optuna (`podium sweep`, podium.toolkit.sweep); ignored by train."""

    # {dotted.key: {type: float|int|categorical, low, high, log, step, choices}}
    space: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, Any] = field(default_factory=dict)  # {dotted.key: [values]}: GridSampler (train -m)
    enqueue: list[Any] = field(default_factory=list)  # [{dotted.key: value}]: trials tried first (a baseline)
    trials: int = 20  # finished (complete + pruned) trials the study should hold, all workers together
    metric: Optional[str] = None  # default: trainer.monitor, else the task's monitor
    direction: Optional[str] = None  # maximize | minimize; default from the monitor's mode
    storage: Optional[str] = None  # default sqlite:///<sweep dir>/study.db; postgresql://... for many machines
    study: Optional[str] = None  # study name, the key workers join on; default: the sweep folder's name
    dir: Optional[str] = None  # sweep folder; default <run.root>/<timestamp>-<name>-sweep
    seed: Optional[int] = None  # TPE sampler seed; default: the run seed
    pruner: str = "median"  # median | none: MedianPruner on each validation's metric
    startup_trials: int = 5  # finished trials before pruning starts
    warmup_validations: int = 0  # validations of a trial before it may be pruned


ENGINE_GROUPS = {
    "trainer": TrainerConfig,
    "optim": OptimConfig,
    "sched": SchedConfig,
    "tracking": TrackingConfig,
    "run": RunConfig,
    "cv": CVConfig,
    "sweep": SweepConfig,
}

# Top-level scalar keys beside the groups.
TOP_LEVEL_KEYS = {"seed": int, "name": str, "resume": str,
                  # test-time augmentation (podium.engine.tta): choices checked in podium.config
                  "tta": str, "tta_merge": str, "tta_scales": list}
TASK_GROUPS = ("task", "data", "model", "loss")
