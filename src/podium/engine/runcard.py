"""The run card: `run.json` in a run folder, what `Task.describe()` says about the trained model.

It holds what the training data taught the run and the config alone cannot tell: class or
landmark names and their count (the head size), input channels, normalisation, input size or
window, what the output means. With it and config.yaml, `load_model`, `podium predict`, `podium
export` and `podium serve` build the model from the run folder alone; without it the training
dataset is rebuilt to learn the head size, which fails when the data is not on disk.

    python -c "from podium.engine.runcard import load_model; print(load_model('runs/x')[2])"

A run from before run cards has no run.json: its model is still rebuilt from the training data,
and a failure says so.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch

from podium.errors import UserError

CARD_FILE = "run.json"
CARD_FORMAT = 1  # bumped when a key changes meaning; readers refuse a newer format


def card_header(task) -> dict:
    """The keys every card starts with."""
    return {"format": CARD_FORMAT, "task": str(task.cfg.task.name), "model": str(task.cfg.model.name)}


def write_card(run_dir: Path, task) -> Path | None:
    """`task.describe()` -> RUN/run.json (atomic); None when the task does not describe itself."""
    from podium.engine.checkpoint import disk_error
    from podium.engine.runs import write_json

    try:
        card = task.describe()
    except NotImplementedError:
        return None
    json.dumps(card)  # a task's bug (a tensor, a numpy float) fails here, not in a reader later
    path = Path(run_dir) / CARD_FILE
    try:
        write_json(path, card)
    except OSError as err:
        raise (disk_error(err, path, "run card") or err) from None
    return path


def read_card(run_dir: Path) -> dict | None:
    """The run card, or None for a run from before run cards; UserError for an unusable file."""
    path = Path(run_dir) / CARD_FILE
    if not path.is_file():
        return None
    try:
        card = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path} is not valid JSON ({err}); it is written by `podium train` "
                        "(Task.describe()). Restore it, or delete it to rebuild the model from the training data.") from None
    if not isinstance(card, dict) or not {"task", "model", "model_kwargs"} <= set(card):
        raise UserError(f"{path}: expected a run card (a JSON object with task, model, model_kwargs); "
                        "delete it to rebuild the model from the training data.")
    if int(card.get("format", 1)) > CARD_FORMAT:
        raise UserError(f"{path} has card format {card['format']}; this podium reads up to {CARD_FORMAT}: "
                        "upgrade podium.")
    return card


def apply_card(task, run_dir: Path) -> dict | None:
    """Give `task` its run's card (checked against the config); None when the run has none."""
    card = read_card(run_dir)
    if card is None:
        return None
    cfg = task.cfg
    if card["task"] != cfg.task.name or card["model"] != cfg.model.name:
        raise UserError(f"{Path(run_dir) / CARD_FILE} describes task={card['task']} model={card['model']}, "
                        f"but the config asks for task={cfg.task.name} model={cfg.model.name}: "
                        "a run's task and model cannot be overridden.")
    task.use_card(card)
    return card


def task_for_run(run_dir: Path, overrides: list[str] | None = None):
    """The run's task built from its own config (no weights, no data read), with its run card
    applied when it has one: what serving, the toolkit and scoring of saved sets start from."""
    from podium.engine import registry
    from podium.engine.runconfig import load_run_config

    cfg = load_run_config(Path(run_dir), list(overrides or []))
    task = registry.build("task", cfg.task.name, cfg)
    apply_card(task, run_dir)
    return task


@contextmanager
def rebuilding_from_data(run_dir: Path):
    """Around building a card-less run's model: a data error says why the data was needed."""
    try:
        yield
    except UserError as err:
        raise UserError(f"{run_dir} has no {CARD_FILE} (it was trained before run cards), so its model is "
                        f"rebuilt from the training data, which failed: {err}") from None


def checkpoint_path(run_dir: Path, checkpoint: str) -> Path:
    """The checkpoint file a command names: best / last (or another name under checkpoints/) ->
    RUN/checkpoints/<name>.pt; a path ending in .pt is itself. One helper for predict, eval,
    export and serve, so all refuse a missing or misnamed checkpoint with the same message,
    naming the checkpoints the run has, before anything slow runs."""
    checkpoint = str(checkpoint)
    if checkpoint.endswith(".pt"):
        path = Path(checkpoint)
        if not path.is_file():
            raise UserError(f"checkpoint file {path} does not exist.")
        return path
    run_dir = Path(run_dir)
    path = run_dir / "checkpoints" / f"{checkpoint}.pt"
    if "/" not in checkpoint and path.is_file():
        return path
    names = sorted(p.stem for p in (run_dir / "checkpoints").glob("*.pt"))
    raise UserError(f"{run_dir} has no checkpoint {checkpoint!r}: checkpoints/{checkpoint}.pt does not exist; "
                    f"choose one of: {', '.join(names) or 'none found'}, or give a path to a .pt file.")


def _ema_weights(ema_state: dict) -> dict:
    """An AveragedModel's state ('module.<name>', 'n_averaged') -> the averaged model's own."""
    return {k[len("module."):]: v for k, v in ema_state.items() if k.startswith("module.")}


def load_model(run_dir: Path, checkpoint: str = "best", overrides: list[str] | None = None,
               map_location: str | torch.device = "cpu"):
    """(task, model, card) of a finished run, built from RUN/run.json and RUN/config.yaml alone:
    the model in eval mode with the checkpoint's weights, its EMA weights when the run evaluates
    with them (as `podium eval` scores it). The checkpoint's hash is verified and a checkpoint of
    another model is a UserError. `card` is None for a run from before run cards, whose model is
    rebuilt from the training data."""
    from podium.engine import checkpoint as ckpt
    from podium.engine import registry
    from podium.engine.runconfig import load_run_config

    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir, list(overrides or []))
    path = checkpoint_path(run_dir, checkpoint)
    data = ckpt.load_checkpoint(path, map_location=map_location)  # before the slow build
    if not isinstance(data, dict) or "model" not in data:
        raise UserError(f"checkpoint {path} holds no model weights (not a podium checkpoint).")
    task = registry.build("task", cfg.task.name, cfg)
    card = apply_card(task, run_dir)
    if card is None:
        with rebuilding_from_data(run_dir):
            model = task.build_model()
    else:
        model = task.build_model()
    expected = f"task={cfg.task.name} model={cfg.model.name}"
    ckpt.load_model_state(model, data["model"], path, data, expected)
    ema = cfg.trainer.get("ema") or {}
    if ema.get("enabled") and ema.get("evaluate_with_ema", True) and data.get("ema"):
        ckpt.load_model_state(model, _ema_weights(data["ema"]), path, data, expected + " (EMA weights)")
    return task, model.to(map_location).eval(), card
