"""What may change when a run is resumed: `podium train resume=RUN [KEY=VALUE …]`.

A resumed run continues the weights, optimizer and schedule saved in `checkpoints/last.pt`, so
an override can only be honoured when it does not contradict that state. Three kinds of key:

- limits (`trainer.max_epochs`, `trainer.max_steps`): "train 10 more epochs" extends the run;
  the learning-rate schedule is rebuilt over the new length and continues from the saved step.
  A limit below what the run has already done is refused.
- operational keys (loader workers, logging, checkpoint cadence, early-stopping patience, where
  the data lives): they change how the run proceeds, not what it is, and take effect.
- everything else (optim.lr, the model, the loss, augmentation, seed, …) would be silently
  ignored by the restored state, or would make the run a different experiment than its
  config.yaml says: refused with exit 2, naming each key, so config.yaml always tells the truth.

    podium train resume=runs/x trainer.max_epochs=20     # train on to epoch 20
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from podium.errors import UserError

LIMIT_KEYS = ("trainer.max_epochs", "trainer.max_steps")
OPERATIONAL_KEYS = (
    "trainer.num_workers", "trainer.persistent_workers", "trainer.prefetch_factor", "trainer.cpu_threads",
    "trainer.progress_bar", "trainer.log_every_n_steps", "trainer.data_wait_warn", "trainer.eval_batch_size",
    "trainer.checkpoint_every_n_steps", "trainer.checkpoint_every_minutes",
    "trainer.early_stopping.patience",
    # durability (podium.engine.mirror / disk): where copies go and how much disk is kept free
    "trainer.checkpoint_every_n_epochs", "run.mirror", "run.mirror_timeout_s", "run.min_free_mb",
    "run.keep_last", "run.keep_best",
)
# data moved to another disk: the same files under another folder
RELOCATION_SUFFIXES = (".root", ".cache_dir")


def _flat(cfg: DictConfig) -> dict:
    out: dict = {}

    def walk(node, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            out[prefix[:-1]] = node

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return out


def may_change(key: str) -> bool:
    return (key in LIMIT_KEYS or key in OPERATIONAL_KEYS
            or (key.startswith("data.") and key.endswith(RELOCATION_SUFFIXES)))


def changed_keys(stored: DictConfig, requested: DictConfig) -> dict[str, tuple]:
    """{key: (stored value, requested value)} for every key the overrides changed. A tracking
    URI given again with its credentials (config.yaml stores it without) is the same URI."""
    from podium.common.redact import split_credentials

    before, after = _flat(stored), _flat(requested)
    for flat in (before, after):
        if flat.get("tracking.uri"):
            flat["tracking.uri"] = split_credentials(flat["tracking.uri"])[0]
    return {k: (before.get(k), after.get(k)) for k in sorted(set(before) | set(after))
            if before.get(k) != after.get(k)}


def check_resume_overrides(run_dir: Path, stored: DictConfig, requested: DictConfig) -> dict[str, tuple]:
    """Refuse overrides that a resume cannot honour; return the accepted changes."""
    changes = changed_keys(stored, requested)
    refused = {k: v for k, v in changes.items() if not may_change(k)}
    if refused:
        listed = "; ".join(f"{k} (run: {a!r}, asked: {b!r})" for k, (a, b) in refused.items())
        raise UserError(
            f"cannot change on resume of {run_dir}: {listed}. The saved optimizer, schedule and weights "
            f"continue the run as it was configured. Start a new run for another setting (models with a "
            f"model.weights key can start from these weights: model.weights={Path(run_dir) / 'checkpoints' / 'best.pt'}). "
            f"On resume you may change: {', '.join(LIMIT_KEYS + OPERATIONAL_KEYS)} and data paths "
            f"(data.*root, data.cache_dir).")
    return changes


def check_limits(run_dir: Path, cfg: DictConfig, state: dict) -> None:
    """A limit below the progress already made cannot be honoured."""
    tc, epoch, step = cfg.trainer, int(state.get("epoch", 0)), int(state.get("step", 0))
    if tc.max_steps > 0 and tc.max_steps < step:
        raise UserError(f"trainer.max_steps={tc.max_steps} but {run_dir} has already done {step} optimizer "
                        f"steps; give at least {step} to continue.")
    if tc.max_steps <= 0 and tc.max_epochs < epoch:
        raise UserError(f"trainer.max_epochs={tc.max_epochs} but {run_dir} has already done {epoch} epochs; "
                        f"give at least {epoch} to continue.")
