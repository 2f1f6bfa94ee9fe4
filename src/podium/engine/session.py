"""What `podium train / eval / predict` do, between the CLI and the Trainer.

A session builds Lightning Fabric from the config, launches the processes (DDP on CPU with gloo,
or under torchrun, which Fabric detects), makes the run folder on rank 0 and hands it to every
rank, then runs the Trainer. The task is looked up by name in the registry, so the engine never
imports a task.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path

from omegaconf import OmegaConf, open_dict
from rich.console import Console
from rich.table import Table

from podium.engine import registry, runcard
from podium.engine.runs import new_run_dir, write_json
from podium.errors import UserError


def make_fabric(tc, console: Console, devices=None):
    from lightning.fabric import Fabric

    from podium.engine.trainer import resolve_accelerator, resolve_precision

    accelerator = resolve_accelerator(tc.accelerator)
    num_nodes = tc.num_nodes
    if devices is None:
        from podium.engine.elastic import torchrun_layout

        devices, num_nodes = torchrun_layout(tc, console) or (tc.devices, tc.num_nodes)
    strategy = tc.strategy
    many = (isinstance(devices, int) and devices > 1) or num_nodes > 1 or "WORLD_SIZE" in os.environ
    if strategy == "auto" and many:
        strategy = "ddp"
    precision = resolve_precision(tc.precision, accelerator, console)
    return Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes,
                  strategy=strategy, precision=precision)


def metrics_table(metrics: dict, title: str) -> Table:
    """Rows are splits, columns are metric names — transposed when there are many metrics
    (per-class entries stay in the JSON)."""
    splits: dict[str, dict] = {}
    for key, value in metrics.items():
        split, _, name = key.partition("/")
        if "/" in name or not isinstance(value, (int, float)):
            continue
        splits.setdefault(split, {})[name] = value
    names: list[str] = []
    for row in splits.values():
        names += [n for n in row if n not in names]
    table = Table(title=title)
    if len(names) > 6:  # many metrics (per-group ones): one row per metric, one column per split
        table.add_column("metric")
        for split in splits:
            table.add_column(split, justify="right")
        for n in names:
            table.add_row(n, *[f"{row[n]:.4f}" if n in row else "" for row in splits.values()])
        return table
    table.add_column("split")
    for name in names:
        table.add_column(name, justify="right")
    for split, row in splits.items():
        table.add_row(split, *[f"{row[n]:.4f}" if n in row else "" for n in names])
    return table


def _writable_run_dir(run_dir: Path) -> None:
    """Make the run folder, or raise UserError naming it (a file in the way, a read-only or
    full disk) before anything is written."""
    from podium.engine.checkpoint import disk_error

    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"run.dir={run_dir} is a file, not a folder; choose a folder for the run.")
    try:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".podium-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        if isinstance(err, (FileExistsError, NotADirectoryError)):
            raise UserError(f"run folder {run_dir} cannot be made: a file is in the way ({err}).") from None
        raise (disk_error(err, run_dir, "run folder") or err) from None


def _write_run_files(run_dir: Path, cfg, fabric, resumed_at: dict | None) -> None:
    """config.yaml (the truth about this run) and environment.json; on resume the original
    environment stays and this session's is appended under "resumes"."""
    import json

    from podium.engine.checkpoint import disk_error
    from podium.engine.reproducibility import environment_info, write_environment

    devices = [str(fabric.device)] * fabric.world_size
    try:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        env_file = run_dir / "environment.json"
        if resumed_at is None or not env_file.is_file():
            write_environment(env_file, devices)
            return
        try:
            env = json.loads(env_file.read_text())
        except ValueError:
            env = {}
        env.setdefault("resumes", []).append({**environment_info(devices), **resumed_at})
        write_json(env_file, env)
    except OSError as err:
        raise (disk_error(err, run_dir, "run folder") or err) from None


def _move_credentials_to_environment(cfg, console: Console | None) -> None:
    """A tracking URI with `user:password@` never reaches config.yaml (which is copied, shared
    and logged as an artifact): the credentials go to MLflow's own variables for this process,
    MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, and the stored URI keeps the host
    only. A resume against that server takes the same variables (or the URI again)."""
    from podium.common.redact import split_credentials

    uri = cfg.tracking.uri
    if not uri:
        return
    bare, user, password = split_credentials(uri)
    if user is None and password is None:
        return
    if user:
        os.environ["MLFLOW_TRACKING_USERNAME"] = user
    if password:
        os.environ["MLFLOW_TRACKING_PASSWORD"] = password
    with open_dict(cfg):
        cfg.tracking.uri = bare
    if console is not None:
        console.print(f"tracking.uri credentials moved to MLFLOW_TRACKING_USERNAME/PASSWORD; "
                      f"config.yaml stores {bare}", highlight=False)


def train(cfg, console: Console, resume_dir: Path | None = None,
          resume_checkpoint: str = "last") -> tuple[Path, dict]:
    """Train a new run, or resume `resume_dir` from its `resume_checkpoint` (last, or best when
    the user accepts it because last.pt is damaged). Everything that can fail on a resume
    (the checkpoint's hash, its fit to the model, the limits) is checked before config.yaml,
    environment.json or the MLflow run are touched."""
    from podium.engine import checkpoint as ckpt
    from podium.engine.resume import check_limits
    from podium.engine.tracking import Tracker
    from podium.engine.trainer import Trainer, plot_history

    fabric = make_fabric(cfg.trainer, console)
    fabric.launch()
    is_main = fabric.global_rank == 0
    if resume_dir is None:  # torchrun restarted the group: continue this job's run (engine/elastic.py)
        from podium.engine.elastic import resume_dir_after_restart

        resume_dir = resume_dir_after_restart(fabric, cfg, console)
    if resume_dir is not None:
        run_dir = Path(resume_dir)
    else:
        run_dir = Path(cfg.run.dir) if cfg.run.dir else new_run_dir(cfg.run.root, cfg.run.name, cfg.name)
        if cfg.run.dir and (run_dir / "checkpoints" / "last.pt").exists():
            raise UserError(f"run.dir={run_dir} already holds a run; continue it with "
                            f"`podium train resume={run_dir}` or choose another run.dir.")
    run_dir = Path(fabric.broadcast(str(run_dir), src=0))
    resume_from, resume_data = None, None
    if resume_dir is not None:
        if resume_checkpoint not in ("last", "best"):
            raise UserError(f"resume_checkpoint={resume_checkpoint!r}: expected last or best.")
        resume_from = run_dir / "checkpoints" / f"{resume_checkpoint}.pt"
        if not resume_from.is_file():
            raise UserError(f"{run_dir} has no checkpoints/{resume_from.name} to resume from.")
        resume_data = ckpt.load_checkpoint(resume_from, map_location=fabric.device)  # verifies the hash
        check_limits(run_dir, cfg, resume_data.get("state", {}))
    with open_dict(cfg):
        cfg.run.dir, cfg.resume = str(run_dir), None
    _move_credentials_to_environment(cfg, console if is_main else None)
    from podium.engine import mirror as mirror_lib

    # run.mirror: a bad URI exits 2 here, before the run folder is made
    mirror = mirror_lib.start(cfg, run_dir, console) if is_main else None
    if is_main:
        _writable_run_dir(run_dir)
        ckpt.cleanup_temp_files(run_dir / "checkpoints")
    task = registry.build("task", cfg.task.name, cfg)
    trainer = Trainer(cfg, task, run_dir, fabric, console=console)
    trainer.mirror = mirror
    trainer.setup()
    if resume_from is not None:
        trainer.load(resume_from, resume_data)  # a checkpoint of another model fails here, harmlessly
        resume_data = None
        if is_main:
            console.print(f"resumed from {resume_from} at epoch {trainer.state.epoch}, step {trainer.state.step}")
    if is_main:
        _write_run_files(run_dir, cfg, fabric, None if resume_from is None else
                         {"resumed_at_step": trainer.state.step, "resumed_from": resume_from.name})
        runcard.write_card(run_dir, task)  # run.json: predict / export / serve need no data
        if mirror is not None:
            mirror.submit(run_dir / "config.yaml", run_dir / "environment.json", run_dir / "run.json")
        console.print(f"run folder: {run_dir}")
    tracker = Tracker(cfg.tracking, run_dir=run_dir, runs_root=Path(cfg.run.root), experiment=cfg.name,
                      run_name=run_dir.name, enabled=is_main, console=console)
    trainer.tracker = tracker
    if is_main and resume_from is None:
        tracker.log_params(OmegaConf.to_container(cfg, resolve=True))
    status = "FAILED"
    try:
        trainer.fit()
        metrics = trainer.final_evaluation()
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if status != "FINISHED":
            tracker.finish(status)
            if mirror is not None:  # what was written before the failure (e.g. Ctrl-C's last.pt)
                mirror.submit_tree()
                mirror.close()
    if is_main:
        write_json(run_dir / "metrics.json", metrics)
        plot_history(trainer.state.history, run_dir / "plots" / "history.png")
        tracker.log_metrics(metrics, step=trainer.state.step)
        for name in ("config.yaml", "metrics.json", "history.csv", "environment.json"):
            if (run_dir / name).exists():
                tracker.log_artifact(run_dir / name)
        if (run_dir / "plots").is_dir():
            tracker.log_artifact(run_dir / "plots", "plots")
        tracker.finish("FINISHED")
        if mirror is not None:  # metrics.json, plots, predictions: the whole folder, then the bounded drain
            mirror.submit_tree()
            mirror.close()
    return run_dir, metrics


def trainer_for_run(run_dir: Path, overrides: list[str], console: Console, checkpoint: str,
                    with_data: bool = True):
    """A Trainer set up for inference on a finished run (its config, one device, the
    checkpoint's weights and EMA): what eval, predict, export and serve share. `with_data=False`
    builds the model from the run card (run.json) without the datasets, when the run has one."""
    from podium.engine import checkpoint as ckpt
    from podium.engine.runconfig import load_run_config
    from podium.engine.parallel import unwrap as _unwrap
    from podium.engine.trainer import Trainer

    cfg = load_run_config(run_dir, overrides)
    with open_dict(cfg):
        cfg.trainer.devices = 1
        cfg.trainer.num_nodes = 1
        cfg.trainer.strategy = "auto"
    path = runcard.checkpoint_path(Path(run_dir), checkpoint)
    fabric = make_fabric(cfg.trainer, console)
    data = ckpt.load_checkpoint(path, map_location=fabric.device)  # before the slow set-up
    task = registry.build("task", cfg.task.name, cfg)
    card = runcard.apply_card(task, run_dir)
    trainer = Trainer(cfg, task, run_dir, fabric, console=console)
    with runcard.rebuilding_from_data(run_dir) if card is None and not with_data else nullcontext():
        trainer.setup(training=False, data=with_data or card is None)
    if not isinstance(data, dict) or "model" not in data:
        raise UserError(f"checkpoint {path} holds no model weights (not a podium checkpoint).")
    ckpt.load_model_state(_unwrap(trainer.model), data["model"], path, data,
                          f"task={cfg.task.name} model={cfg.model.name}")
    if trainer.ema is not None and data.get("ema") is not None:
        ckpt.load_model_state(trainer.ema, data["ema"], path, data,
                              f"task={cfg.task.name} model={cfg.model.name}, EMA weights")
    return trainer, path


def eval_dir(run_dir: Path, checkpoint_path: Path, overrides: list[str]) -> Path:
    """RUN/eval/<checkpoint>[-<hash of the overrides>]/: `podium eval` writes here, never over
    the training-time predictions/ and plots/ that ensembles and diffs read."""
    import hashlib

    name = checkpoint_path.stem
    if overrides:
        name += "-" + hashlib.sha1("\n".join(overrides).encode()).hexdigest()[:8]
    return Path(run_dir) / "eval" / name


def evaluate(run_dir: Path, overrides: list[str], console: Console, checkpoint: str = "best",
             splits: list[str] | None = None, out: Path | None = None) -> tuple[dict, Path]:
    from podium.engine.trainer import evaluate_splits

    trainer, path = trainer_for_run(run_dir, overrides, console, checkpoint)
    folder = eval_dir(run_dir, path, overrides)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "eval.json", {"checkpoint": str(path), "overrides": list(overrides),
                                      "splits": splits})
    metrics = evaluate_splits(trainer, splits, out_dir=folder)
    out = out or folder / "metrics.json"
    write_json(out, metrics)
    return metrics, out


def predict(run_dir: Path, inputs: list[Path], out: Path, console: Console, checkpoint: str = "best",
            overrides: list[str] | None = None) -> Path:
    trainer, _ = trainer_for_run(run_dir, overrides or [], console, checkpoint, with_data=False)
    files = expand_inputs(inputs)
    model = trainer.eval_model()
    model.eval()
    return trainer.task.predict(model, files, out, trainer.ctx())


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".h5", ".npy", ".mat"}


def expand_inputs(inputs: list[Path]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            files += sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif item.is_file():
            files.append(item)
        else:
            raise UserError(f"input {item} does not exist.")
    if not files:
        raise UserError(f"no input files found in {', '.join(map(str, inputs))}.")
    return files
