"""The one Trainer, on Lightning Fabric, that runs every task family.

A task (podium.engine.task.Task) supplies the hooks; the trainer owns the loop and everything that
must be the same for every family: devices and precision, gradient accumulation and clipping,
EMA weights, schedules by epochs or by steps, validation, best/last checkpoints written
atomically, exact resume (also from the middle of an epoch), NaN guards, Ctrl-C, tracking and the
measurement of the time spent waiting for data.

    podium train experiment=digits trainer.max_epochs=3
    torchrun --nnodes 2 --nproc-per-node 4 ... -m podium train experiment=... trainer.devices=4 trainer.num_nodes=2
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from rich.console import Console

from podium.engine import checkpoint as ckpt
from podium.engine import reproducibility as repro
from podium.engine.ema import ema_update
from podium.engine.loading import default_num_workers, make_loader
from podium.engine.optim import build_optimizer, build_scheduler
from podium.engine.parallel import unwrap as _unwrap
from podium.engine.runs import write_history
from podium.errors import TrainingDiverged, UserError
from podium.engine.task import StepContext, Task


@dataclass
class TrainState:
    """Where the run is; saved in every checkpoint."""

    epoch: int = 0
    step: int = 0  # optimizer steps done
    batch_in_epoch: int = 0  # micro-batches of the primary loader consumed in `epoch`
    best: float | None = None
    best_step: int = -1
    bad_validations: int = 0
    # position of each secondary training loader: [epoch, batches consumed]
    loader_pos: dict[str, list[int]] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    finished: bool = False


def resolve_precision(precision: str, accelerator: str, console: Console) -> str:
    on_gpu = accelerator in ("cuda", "gpu")
    if precision == "auto":
        if on_gpu:
            return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
        return "32-true"
    if not on_gpu and precision not in ("32-true", "32", "64-true"):
        console.print(f"[yellow]trainer.precision={precision} asked on {accelerator}: "
                      "mixed precision on CPU is slow and not what podium tests; using 32-true.")
        return "32-true"
    return precision


def resolve_accelerator(name: str) -> str:
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "cpu"
    if name in ("cuda", "gpu") and not torch.cuda.is_available():
        raise UserError("trainer.accelerator=cuda but no CUDA device is visible to torch "
                        "(run `podium doctor`). Use trainer.accelerator=cpu or auto.")
    return name


def _batch_size(batch) -> int:
    if torch.is_tensor(batch):
        return batch.shape[0] if batch.dim() else 1
    if isinstance(batch, (list, tuple)) and batch:
        return _batch_size(batch[0])
    if isinstance(batch, dict) and batch:
        return _batch_size(next(iter(batch.values())))
    return 0


# Called as hook(trainer, row) after every validation, on every rank. `podium sweep`
# (podium.toolkit.sweep) reports the monitored value to Optuna here and raises
# optuna.TrialPruned to stop a hopeless trial; that ends fit() like any other exception.
VALIDATION_HOOKS: list = []


def _scalar(value) -> float:
    return float(value.detach().float().mean().item()) if torch.is_tensor(value) else float(value)


class Trainer:
    def __init__(self, cfg, task: Task, run_dir: Path, fabric, console: Console | None = None,
                 tracker=None):
        self.cfg, self.task, self.run_dir, self.fabric = cfg, task, Path(run_dir), fabric
        self.tc = cfg.trainer
        self.is_main = fabric.global_rank == 0
        self.console = console or Console(stderr=True)
        self.tracker = tracker
        self.state = TrainState()
        self.monitor = self.tc.monitor or task.monitor
        self.monitor_mode = self.tc.monitor_mode or task.monitor_mode
        if self.monitor_mode not in ("min", "max"):
            raise UserError(f"trainer.monitor_mode={self.monitor_mode!r}: expected 'min' or 'max'.")
        from podium.engine import tta

        tta.check(cfg, task)  # a tta= the task cannot do fails now, not at the final evaluation
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.saved: dict[str, str] = {}  # checkpoint name -> "epoch E, step S" written by this process
        self.evaluated_checkpoint = "best"  # what final_evaluation scored: "best" or "last weights"
        self.mirror = None  # podium.engine.mirror.Mirror on rank 0 when run.mirror is set (session.train)

    # ------------------------------------------------------------------ set-up
    def _make_loader(self, dataset, train: bool = True, batch_size: int | None = None):
        tc = self.tc
        if batch_size is None:
            batch_size = tc.batch_size if train else (tc.eval_batch_size or tc.batch_size)
        if len(dataset) == 0:
            raise UserError(f"the {'training' if train else 'evaluation'} dataset is empty; "
                            "check the data paths in the data config.")
        return make_loader(
            dataset, train=train, batch_size=batch_size, seed=self.cfg.seed,
            num_workers=tc.num_workers, collate_fn=self.task.collate_fn(),
            persistent_workers=tc.persistent_workers, prefetch_factor=tc.prefetch_factor,
            rank=self.fabric.global_rank, world_size=self.fabric.world_size,
        )

    def _limit_cpu_threads(self) -> None:
        """On CPU, by default leave the cores the loader workers use: torch's intra-op threads
        spin while they wait, and one thread too many on a busy core made training 4x slower
        (measured: digits on 2 cores, 1 worker, 230 vs 51 samples/s). When the workers mostly
        idle (heavy model, cached data) that reservation halves the compute instead, so
        `trainer.cpu_threads` can ask for every core (0) or an exact count."""
        requested = self.tc.cpu_threads
        if requested < -1:
            raise UserError(f"trainer.cpu_threads must be -1 (auto), 0 (every core) or a positive count, got {requested}.")
        if self.fabric.device.type != "cpu" or "OMP_NUM_THREADS" in os.environ:
            return
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        per_process = max(1, cpus // self.fabric.world_size)
        if requested >= 0:
            torch.set_num_threads(requested or per_process)
            return
        workers = self.tc.num_workers if self.tc.num_workers >= 0 else default_num_workers(self.fabric.world_size)
        threads = max(1, per_process - workers)
        if torch.get_num_threads() > threads:
            torch.set_num_threads(threads)

    def setup(self, training: bool = True, data: bool = True) -> None:
        """Build model, data and (for training) loaders, optimizer and schedule.
        `training=False` (eval, predict) skips what only training needs; `data=False` (predict
        from a run card) also skips the datasets and the loss."""
        cfg, task, fabric = self.cfg, self.task, self.fabric
        self._limit_cpu_threads()
        repro.seed_everything(cfg.seed, self.tc.deterministic)
        model = task.build_model()
        if self.tc.gradient_checkpointing:
            if hasattr(model, "set_grad_checkpointing"):
                model.set_grad_checkpointing(True)
            else:
                self.console.print(f"[yellow]trainer.gradient_checkpointing: {type(model).__name__} "
                                   "has no set_grad_checkpointing(); training without it.")
        if self.tc.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.datasets = task.build_datasets() if data or training else {}
        for split in ("train", "val") if data or training else ():
            if split not in self.datasets:
                raise UserError(f"the dataset has no '{split}' split.")
        cv_cfg = OmegaConf.select(cfg, "cv")
        if self.datasets and cv_cfg is not None and cv_cfg.fold is not None:
            from podium.engine.folds import apply_fold

            # val becomes the held-out fold: the val predictions saved are out-of-fold
            self.datasets = apply_fold(task, self.datasets, cv_cfg)
        if training:
            self.train_loaders = task.train_loaders(self.datasets, self._make_loader)
            self.primary = next(iter(self.train_loaders))
            self.val_loader = self._make_loader(self.datasets["val"], train=False)
            self.trainable = any(p.requires_grad for p in model.parameters())
            if self.trainable:
                optimizer = build_optimizer(task.parameter_groups(model), cfg.optim)
                self.model, self.optimizer = fabric.setup(model, optimizer)
            else:
                # a parameter-free model (a classical baseline, e.g. model=cs_l1wavelet): nothing
                # to optimise; an optimizer over an empty placeholder keeps the checkpoint format
                # and fit() only validates once (see _fit_without_parameters)
                self.model = fabric.setup(model)
                self.optimizer = build_optimizer([torch.nn.Parameter(torch.zeros(0))], cfg.optim)
        else:
            self.model = fabric.setup(model)
        self.aux = {name: m.to(fabric.device) for name, m in task.build_aux_modules(_unwrap(self.model)).items()}
        self.ema = None
        if self.tc.ema.enabled:
            from torch.optim.swa_utils import AveragedModel

            self.ema = AveragedModel(_unwrap(self.model), multi_avg_fn=ema_update(self.tc.ema.decay, self.tc.ema.warmup),
                                     use_buffers=True)
        if self.datasets:
            task.build_loss(self.datasets)
        self.total_steps = 0
        if not training:
            return
        accum = max(1, self.tc.accumulate_grad_batches)
        self.steps_per_epoch = max(1, math.ceil(len(self.train_loaders[self.primary]) / accum))
        self.total_steps = self.tc.max_steps or self.tc.max_epochs * self.steps_per_epoch
        self.scheduler = build_scheduler(self.optimizer, cfg.sched, self.total_steps, self.steps_per_epoch)

    def ctx(self) -> StepContext:
        return StepContext(self.fabric, self.state.step, self.state.epoch, self.total_steps, self.aux,
                           self.run_dir)

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint_state(self, rng_state: dict) -> dict:
        precision = self.fabric.strategy.precision
        return {
            "model": _unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "precision": precision.state_dict() if hasattr(precision, "state_dict") else {},
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "aux": {name: m.state_dict() for name, m in self.aux.items()},
            "state": asdict(self.state),
            "rng": repro.rng_state_for_checkpoint(rng_state),
            "config": OmegaConf.to_container(self.cfg, resolve=True),
        }

    def save(self, name: str, rng_state: dict | None = None) -> None:
        """Write a checkpoint, never one with non-finite weights: a blow-up on an epoch's last
        step leaves a finite loss but weights of 1e38 or NaN, and writing them over last.pt
        would lose the last good state."""
        bad = self._non_finite_weights()
        if bad:
            raise TrainingDiverged(
                f"the weights became non-finite ({bad}) at epoch {self.state.epoch}, step "
                f"{self.state.step}; {name} was not written. {self.kept_checkpoints()} "
                "Lower optim.lr, set trainer.grad_clip_norm, or use trainer.precision=32-true.")
        if self.is_main:
            from podium.engine import disk

            state = self._checkpoint_state(rng_state or repro.capture_rng_state())
            # disk guard: prune numbered checkpoints or skip this one rather than fill the disk
            if not disk.make_room(self.ckpt_dir, name, disk.expected_size(self.ckpt_dir, name, state),
                                  OmegaConf.select(self.cfg, "run.min_free_mb", default=0.0), self.console):
                return
            ckpt.atomic_save(state, self.ckpt_dir / name)
            self.saved[name] = f"epoch {self.state.epoch}, step {self.state.step}"
            if self.mirror is not None:
                self.mirror.submit(self.ckpt_dir / name)

    def _non_finite_weights(self) -> str:
        """Names of the first few model / EMA tensors holding NaN or Inf ('' when all finite)."""
        modules = {"": _unwrap(self.model)}
        if self.ema is not None:
            modules["ema."] = self.ema.module
        bad = [prefix + key for prefix, module in modules.items()
               for key, value in module.state_dict().items()
               if torch.is_floating_point(value) and not bool(torch.isfinite(value).all())]
        return ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")

    def kept_checkpoints(self) -> str:
        """Exactly which checkpoints are on disk and untouched, for divergence messages."""
        parts = []
        for name in ("last.pt", "best.pt"):
            path = self.ckpt_dir / name
            if path.is_file():
                when = self.saved.get(name, "written before this session")
                parts.append(f"{path} ({when})")
        if not parts:
            return f"No checkpoint was written before that: {self.ckpt_dir} holds none."
        return "Kept untouched: " + "; ".join(parts) + "."

    def load(self, path: Path, data: dict | None = None) -> None:
        data = data if data is not None else ckpt.load_checkpoint(path, map_location=self.fabric.device)
        ckpt.load_model_state(_unwrap(self.model), data["model"], path, data,
                              f"task={self.cfg.task.name} model={self.cfg.model.name}"
                              if "task" in self.cfg and "model" in self.cfg else "")
        self.optimizer.load_state_dict(data["optimizer"])
        self.scheduler.load_state_dict(data["scheduler"])
        precision = self.fabric.strategy.precision
        if data.get("precision") and hasattr(precision, "load_state_dict"):
            precision.load_state_dict(data["precision"])
        if self.ema is not None and data.get("ema") is not None:
            ckpt.load_model_state(self.ema, data["ema"], path, data, "EMA weights")
        for name, module in self.aux.items():
            module.load_state_dict(data["aux"][name])
        self.state = TrainState(**data["state"])
        repro.restore_rng_state(repro.rng_state_from_checkpoint(data["rng"]))

    # ------------------------------------------------------------------ evaluation
    def eval_model(self, tta: bool = True):
        """The model evaluation runs: the EMA weights when they are evaluated, wrapped in the
        config's test-time augmentation (`tta=...`, podium.engine.tta) unless `tta` is False.
        `podium eval`, `podium predict`, the final evaluation after training, export and serving
        use TTA; per-epoch validation does not (`validate` asks for tta=False)."""
        model = self.ema.module if self.ema is not None and self.tc.ema.evaluate_with_ema else self.model
        if not tta:
            return model
        from podium.engine import tta as tta_lib

        return tta_lib.wrap(model, self.cfg, self.task)

    def evaluate_loader(self, loader, split: str, model=None) -> tuple[dict, list[dict]]:
        model = model or self.eval_model()
        was_training = model.training
        model.eval()
        records: list[dict] = []
        ctx = self.ctx()
        with torch.no_grad():
            for batch in loader:
                records.extend(self.task.evaluation_step(model, self.fabric.to_device(batch), ctx))
        if was_training:
            model.train()
        if self.fabric.world_size > 1:
            gathered: list[list[dict]] = [None] * self.fabric.world_size  # type: ignore[list-item]
            torch.distributed.all_gather_object(gathered, records)
            records = [r for part in gathered for r in part]
        metrics = self.task.aggregate(records, split)
        return {f"{split}/{k}": v for k, v in metrics.items()}, records

    def _improved(self, value: float) -> bool:
        best, delta = self.state.best, self.tc.early_stopping.min_delta
        if best is None:
            return True
        return value > best + delta if self.monitor_mode == "max" else value < best - delta

    def validate(self, train_metrics: dict, rng_state: dict) -> bool:
        """Validate, log, keep best; return True when early stopping says stop."""
        metrics, _ = self.evaluate_loader(self.val_loader, "val", model=self.eval_model(tta=False))
        row = {"epoch": self.state.epoch, "step": self.state.step,
               "lr": self.optimizer.param_groups[0]["lr"], **train_metrics, **metrics}
        self.state.history.append(row)
        if self.monitor not in metrics:
            raise UserError(f"trainer.monitor={self.monitor!r} is not among the validation metrics: "
                            f"{', '.join(sorted(metrics))}.")
        value = metrics[self.monitor]
        if not math.isfinite(value):
            raise TrainingDiverged(
                f"the validation metric {self.monitor} became {value} at epoch {self.state.epoch}, step "
                f"{self.state.step}; no checkpoint was written for it. {self.kept_checkpoints()} "
                "Lower optim.lr, set trainer.grad_clip_norm, or use trainer.precision=32-true.")
        if self._improved(value):
            self.state.best, self.state.best_step, self.state.bad_validations = value, self.state.step, 0
            self.save("best.pt", rng_state)
        else:
            self.state.bad_validations += 1
        if self.is_main:
            write_history(self.run_dir / "history.csv", self.state.history)
            if self.mirror is not None:
                self.mirror.submit(self.run_dir / "history.csv")
            if self.tracker:
                self.tracker.log_metrics(row, step=self.state.step)
            # per-class entries (two slashes) stay in history.csv, the line stays readable
            shown = "  ".join(f"{k} {v:.4g}" for k, v in row.items()
                              if k not in ("epoch", "step") and k.count("/") < 2)
            self.console.print(f"epoch {self.state.epoch} step {self.state.step}  {shown}")
            wait = train_metrics.get("train/data_wait", 0.0)
            if wait > self.tc.data_wait_warn:
                self.console.print(
                    f"[yellow]data loading took {wait:.0%} of step time. Try a higher "
                    f"trainer.num_workers (`podium doctor` times the choices), a preprocessing cache, "
                    "or smaller images / cheaper CPU augmentation.")
        for hook in VALIDATION_HOOKS:  # after best.pt and history.csv: a pruned run keeps both
            hook(self, row)
        patience = self.tc.early_stopping.patience
        return patience > 0 and self.state.bad_validations >= patience

    # ------------------------------------------------------------------ training loop
    def _next_secondary(self, name: str, iterators: dict):
        loader = self.train_loaders[name]
        pos = self.state.loader_pos.setdefault(name, [0, 0])
        if name not in iterators:
            loader.sampler.set_epoch(pos[0], start_batch=pos[1])
            iterators[name] = iter(loader)
        try:
            batch = next(iterators[name])
        except StopIteration:
            pos[0], pos[1] = pos[0] + 1, 0
            loader.sampler.set_epoch(pos[0])
            iterators[name] = iter(loader)
            batch = next(iterators[name])
        pos[1] += 1
        return batch

    def _fit_without_parameters(self) -> None:
        """A model with nothing to train: one validation writes history.csv and best.pt, then
        last.pt, so eval, predict and the final evaluation see a run like any other."""
        if not self.state.finished:
            self.validate({}, repro.capture_rng_state())
            self.state.finished = True
        self.save("last.pt")

    def fit(self, resume_from: Path | None = None) -> None:
        if not getattr(self, "trainable", True):
            if resume_from is not None:
                self.load(resume_from)
            return self._fit_without_parameters()
        fabric, tc, st = self.fabric, self.tc, None
        if resume_from is not None:
            self.load(resume_from)
            if self.is_main:
                self.console.print(f"resumed from {resume_from} at epoch {self.state.epoch}, "
                                   f"step {self.state.step}")
        st = self.state
        if st.finished and self._limit_not_reached():
            st.finished = False  # a finished run whose max_epochs / max_steps was raised trains on
        accum = max(1, tc.accumulate_grad_batches)
        primary_loader = self.train_loaders[self.primary]
        self.model.train()
        rng_at_boundary = repro.capture_rng_state()
        loader_pos_at_boundary = {k: list(v) for k, v in st.loader_pos.items()}
        last_ckpt_time = time.monotonic()
        progress = self._progress()
        stop = st.finished
        try:
            with progress:
                while not stop:
                    if tc.max_steps <= 0 and st.epoch >= tc.max_epochs:
                        break
                    primary_loader.sampler.set_epoch(st.epoch, start_batch=st.batch_in_epoch)
                    n_batches = len(primary_loader) + st.batch_in_epoch
                    task_id = progress.add_task(f"epoch {st.epoch}", total=n_batches,
                                                completed=st.batch_in_epoch, info="")
                    secondary_iters: dict = {}
                    sums = {"loss": 0.0, "n": 0, "wait": 0.0, "time": 0.0, "samples": 0}
                    extra_logs: dict[str, float] = {}
                    micro = st.batch_in_epoch
                    t_prev = time.perf_counter()
                    for batch in primary_loader:
                        if len(self.train_loaders) > 1:
                            batch = {self.primary: batch, **{n: self._next_secondary(n, secondary_iters)
                                                              for n in self.train_loaders if n != self.primary}}
                        batch = fabric.to_device(batch)
                        t_data = time.perf_counter()
                        boundary = (micro + 1) % accum == 0 or micro + 1 == n_batches
                        with fabric.no_backward_sync(self.model, enabled=not boundary):
                            out = self.task.training_step(self.model, batch, self.ctx())
                            loss = out["loss"]
                            fabric.backward(loss / accum)
                        self._check_finite(loss)
                        micro += 1
                        if boundary:
                            if tc.grad_clip_norm > 0:
                                fabric.clip_gradients(self.model, self.optimizer, max_norm=tc.grad_clip_norm)
                            self.optimizer.step()
                            self.optimizer.zero_grad(set_to_none=True)
                            self.scheduler.step()
                            if self.ema is not None:
                                self.ema.update_parameters(_unwrap(self.model))
                            st.step += 1
                            st.batch_in_epoch = micro
                            self.task.on_optimizer_step(self.model, self.ctx())
                            rng_at_boundary = repro.capture_rng_state()
                            loader_pos_at_boundary = {k: list(v) for k, v in st.loader_pos.items()}
                        t_end = time.perf_counter()
                        sums["loss"] += float(loss.detach())
                        sums["n"] += 1
                        sums["wait"] += t_data - t_prev
                        sums["time"] += t_end - t_prev
                        sums["samples"] += _batch_size(batch) * fabric.world_size
                        for k, v in out.items():
                            if k != "loss":
                                extra_logs[f"train/{k}"] = _scalar(v)
                        t_prev = t_end
                        if micro % max(1, tc.log_every_n_steps) == 0 or micro == n_batches:
                            progress.update(task_id, completed=micro, info=self._info(sums))
                        if not boundary:
                            continue
                        if self._periodic_checkpoint_due(last_ckpt_time):
                            self.save("last.pt", rng_at_boundary)
                            last_ckpt_time = time.monotonic()
                            t_prev = time.perf_counter()  # a save is not data wait
                        done_steps = tc.max_steps > 0 and st.step >= tc.max_steps
                        if tc.val_every_n_steps > 0 and (st.step % tc.val_every_n_steps == 0 or done_steps):
                            stop = self.validate(self._train_metrics(sums, extra_logs), rng_at_boundary)
                            t_prev = time.perf_counter()
                        if done_steps:
                            if tc.val_every_n_steps <= 0:  # a run by steps still ends validated
                                self.validate(self._train_metrics(sums, extra_logs), rng_at_boundary)
                            stop = True
                        if stop:
                            break
                    progress.remove_task(task_id)
                    epoch_done = st.batch_in_epoch >= n_batches or micro >= n_batches
                    if epoch_done:
                        st.epoch += 1
                        st.batch_in_epoch = 0
                        if (tc.val_every_n_steps <= 0 and not stop
                                and st.epoch % max(1, tc.val_every_n_epochs) == 0):
                            stop = self.validate(self._train_metrics(sums, extra_logs), repro.capture_rng_state())
                        if tc.max_steps <= 0 and st.epoch >= tc.max_epochs:
                            stop = True
                    st.finished = stop
                    if epoch_done and tc.checkpoint_every_n_epochs > 0 and st.epoch % tc.checkpoint_every_n_epochs == 0:
                        self._save_numbered(repro.capture_rng_state())
                    self.save("last.pt", repro.capture_rng_state() if epoch_done else rng_at_boundary)
                    last_ckpt_time = time.monotonic()
        except KeyboardInterrupt:
            # Weights are those of the last optimizer step; resume restarts from there, with the
            # loaders' positions and RNG as they were at that step.
            st.loader_pos = loader_pos_at_boundary
            self.save("last.pt", rng_at_boundary)
            if self.is_main:
                self.console.print(f"[yellow]interrupted: resumable checkpoint saved to "
                                   f"{self.ckpt_dir / 'last.pt'}; continue with "
                                   f"`podium train resume={self.run_dir}`")
            raise

    def _limit_not_reached(self) -> bool:
        tc, st = self.tc, self.state
        return st.step < tc.max_steps if tc.max_steps > 0 else st.epoch < tc.max_epochs

    def _save_numbered(self, rng_state: dict) -> None:
        """checkpoints/epoch-NNNN.pt, then the retention policy (run.keep_last / run.keep_best,
        podium.engine.disk) prunes the numbered ones it does not keep."""
        from podium.engine import disk

        self.save(disk.numbered_name(self.state.epoch), rng_state)
        if not self.is_main:
            return
        scores = {int(row["epoch"]): float(row[self.monitor]) for row in self.state.history
                  if self.monitor in row and "epoch" in row}
        removed = disk.apply_policy(self.ckpt_dir, int(OmegaConf.select(self.cfg, "run.keep_last", default=0)),
                                    int(OmegaConf.select(self.cfg, "run.keep_best", default=0)), scores,
                                    self.monitor_mode)
        if self.mirror is not None and removed:  # the policy holds on the far side too
            self.mirror.forget(*removed)

    def _periodic_checkpoint_due(self, last_time: float) -> bool:
        tc = self.tc
        by_steps = tc.checkpoint_every_n_steps > 0 and self.state.step % tc.checkpoint_every_n_steps == 0
        by_time = tc.checkpoint_every_minutes > 0 and time.monotonic() - last_time > 60 * tc.checkpoint_every_minutes
        return by_steps or by_time

    def _check_finite(self, loss: torch.Tensor) -> None:
        finite = torch.isfinite(loss.detach()).all()
        if self.fabric.world_size > 1:
            finite = self.fabric.all_reduce(finite.float(), reduce_op="min") > 0
        if not bool(finite):
            raise TrainingDiverged(
                f"the training loss became {float(loss.detach())} at epoch {self.state.epoch}, "
                f"step {self.state.step}. {self.kept_checkpoints()} "
                "Lower optim.lr, set trainer.grad_clip_norm, or use trainer.precision=32-true.")

    def _train_metrics(self, sums: dict, extra: dict) -> dict:
        n = max(1, sums["n"])
        loss = sums["loss"] / n
        if self.fabric.world_size > 1:
            loss = float(self.fabric.all_reduce(torch.tensor(loss, device=self.fabric.device), reduce_op="mean"))
        return {
            "train/loss": loss,
            "train/data_wait": sums["wait"] / max(1e-9, sums["time"]),
            "train/samples_per_s": sums["samples"] / max(1e-9, sums["time"]),
            **extra,
        }

    @staticmethod
    def _info(sums: dict) -> str:
        n = max(1, sums["n"])
        return (f"loss {sums['loss'] / n:.4f}  {sums['samples'] / max(1e-9, sums['time']):.0f} samples/s  "
                f"data wait {sums['wait'] / max(1e-9, sums['time']):.0%}")

    def _progress(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        enabled = self.is_main and self.tc.progress_bar
        return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TextColumn("{task.fields[info]}"),
                        console=self.console, disable=not enabled, transient=True)

    # ------------------------------------------------------------------ final evaluation
    def final_evaluation(self, splits: list[str] | None = None) -> dict:
        """Evaluate the best checkpoint on val and every test split; write metrics, plots,
        predictions. Returns the flat metrics."""
        best = self.ckpt_dir / "best.pt"
        if best.is_file():
            data = ckpt.load_checkpoint(best, map_location=self.fabric.device)
            ckpt.load_model_state(_unwrap(self.model), data["model"], best, data)
            if self.ema is not None and data.get("ema") is not None:
                ckpt.load_model_state(self.ema, data["ema"], best, data, "EMA weights")
            self.evaluated_checkpoint = "best"
        else:
            # e.g. deleted by hand before a resume: say so rather than call these weights "best"
            self.evaluated_checkpoint = "last weights"
            if self.is_main:
                self.console.print(f"[yellow]{best} does not exist: the final evaluation scores the last "
                                   "weights, not the best checkpoint.")
        return evaluate_splits(self, splits)


def evaluate_splits(trainer: Trainer, splits: list[str] | None = None, out_dir: Path | None = None) -> dict:
    """Evaluate `splits` and write predictions and plots under `out_dir` (the run folder for the
    training-time evaluation; `podium eval` gives its own folder so it never overwrites the
    predictions that ensembles read)."""
    out_dir = Path(out_dir) if out_dir is not None else trainer.run_dir
    splits = splits or ["val"] + sorted(s for s in trainer.datasets if s.startswith("test"))
    results: dict[str, Any] = {}
    for split in splits:
        if split not in trainer.datasets:
            raise UserError(f"split {split!r} does not exist; splits: {', '.join(trainer.datasets)}.")
        loader = trainer._make_loader(trainer.datasets[split], train=False)
        metrics, records = trainer.evaluate_loader(loader, split)
        results.update(metrics)
        if trainer.is_main:
            trainer.task.save_predictions(records, split, out_dir / "predictions")
            trainer.task.visualize(records, split, out_dir / "plots")
    return results


def plot_history(history: list[dict], path: Path) -> Path | None:
    """Training curves: every logged metric against the optimizer step."""
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in history[-1] if k not in ("epoch", "step") and isinstance(history[-1][k], (int, float))]
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    steps = [r["step"] for r in history]
    for ax, key in zip(axes.flat, keys):
        ax.plot(steps, [r.get(key, float("nan")) for r in history], marker="o", ms=3)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step")
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
