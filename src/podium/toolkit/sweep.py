"""Hyperparameter sweeps on Optuna: TPE (or a grid), median pruning on each validation, RDB storage.

    podium sweep experiment=digits sweep.trials=16 \
        'sweep.space={optim.lr: {type: float, low: 1e-4, high: 1e-2, log: true}, model.width: {type: int, low: 8, high: 32}}'
    podium sweep --resume runs/20260101-120000-digits-sweep        # run the trials still missing
    podium train experiment=digits optim.lr=1e-3,3e-4 -m            # Hydra multirun = a grid sweep

Optuna (Akiba et al., "Optuna: A Next-generation Hyperparameter Optimization Framework", KDD 2019)
does the searching and the bookkeeping; podium only turns a trial into a run. The study lives in
an RDB storage: SQLite at `<sweep>/study.db` by default, or `sweep.storage=postgresql://...` with
`sweep.study=NAME`, where workers on several machines join one study (`load_if_exists`): each
worker keeps taking trials until the study holds `sweep.trials` finished ones. A trial is a run
folder `<sweep>/trials/trial-NNNN` and an MLflow run nested under the sweep's own run. Trials send
heartbeats, so the trial of a worker that died is marked failed and run again by whoever comes next.

Each validation reports the monitored metric to Optuna through the trainer's VALIDATION_HOOKS;
the median pruner (Optuna's MedianPruner) stops a trial whose value is worse than the median of
earlier trials at the same validation; a trial that diverges counts as pruned too.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import time
import warnings
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf

from podium.common.redact import redact_text
from podium.errors import UserError

SPEC_KEYS = {"float": {"type", "low", "high", "log", "step"}, "int": {"type", "low", "high", "log", "step"},
             "categorical": {"type", "choices"}}
DIRECTIONS = {"max": "maximize", "maximize": "maximize", "min": "minimize", "minimize": "minimize"}
STATE_FILE = "sweep.yaml"  # what --resume needs: the overrides, the study, the storage (redacted)
_MISSING = object()


class Surplus(Exception):
    """A trial started after the study was full (see run_sweep.objective)."""


def _occupied():
    import optuna

    S = optuna.trial.TrialState
    return (S.COMPLETE, S.PRUNED, S.RUNNING)  # WAITING (enqueued) trials are the queue, not yet taken


# ---------------------------------------------------------------------------------- overrides
def split_multirun(overrides: list[str]) -> tuple[list[str], dict[str, list]]:
    """(plain overrides, {key: values}) from Hydra's sweep syntax: `optim.lr=1e-3,3e-4`,
    `model.width=range(8,33,8)`, `optim.name=choice(adamw,sgd)`; `-m`/`--multirun` dropped."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    plain, grid = [], {}
    parser = OverridesParser.create()
    for item in overrides:
        if item in ("-m", "--multirun"):
            continue
        try:
            parsed = parser.parse_overrides([item])[0]
        except Exception as err:  # Hydra's grammar errors: say which override
            raise UserError(f"cannot parse the override {item!r}: {str(err).splitlines()[0]}") from None
        if parsed.is_sweep_override():
            grid[parsed.key_or_group] = [_plain(v) for v in parsed.sweep_iterator()]
        else:
            plain.append(item)
    return plain, grid


def _plain(value):
    return OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value


def override(key: str, value) -> str:
    """A Hydra override that sets `key` to `value` exactly."""
    if value is None:
        return f"{key}=null"
    if isinstance(value, bool):
        return f"{key}={str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"{key}={value!r}"
    text = str(value)
    return f"{key}={text}" if re.fullmatch(r"[\w.\-/]+", text) else f"{key}='{text}'"


# ---------------------------------------------------------------------------------- the space
def check_space(cfg, base: list[str]) -> dict[str, dict]:
    """The search space as plain dicts; UserError naming `sweep.space.<key>` for a bad entry (an
    unknown type, low > high, a key the config lacks, a bound the config refuses)."""
    from podium.config import HYDRA_GROUPS, compose, group_options

    space = OmegaConf.to_container(cfg.sweep.space) if len(cfg.sweep.space) else {}
    grid = OmegaConf.to_container(cfg.sweep.grid) if len(cfg.sweep.grid) else {}
    if not space and not grid:
        raise UserError("sweep.space is empty: give it at least one key, e.g. "
                        "'sweep.space={optim.lr: {type: float, low: 1e-4, high: 1e-2, log: true}}' "
                        "(or comma lists such as optim.lr=1e-3,3e-4 for a grid).")
    if space and grid:
        raise UserError("give either sweep.space (TPE) or comma lists / sweep.grid (a grid), not both.")
    specs = {k: {"type": "categorical", "choices": list(v)} for k, v in grid.items()} if grid else space
    for key, spec in specs.items():
        where = f"sweep.{'grid' if grid else 'space'}.{key}"
        _check_spec(where, spec)
        if key in HYDRA_GROUPS:
            if spec["type"] != "categorical" or not set(map(str, spec["choices"])) <= set(group_options(key)):
                raise UserError(f"{where}: the config group {key} takes categorical choices among "
                                f"{', '.join(group_options(key))}.")
            continue
        if OmegaConf.select(cfg, key, default=_MISSING) is _MISSING:
            raise UserError(f"{where}: {key!r} is not a key of the config (see `podium train --cfg`).")
        values = spec["choices"] if spec["type"] == "categorical" else [spec["low"], spec["high"]]
        for value in values:  # the config's own checks (types, ranges) on every bound and choice
            try:
                compose([*base, override(key, value)])
            except UserError as err:
                raise UserError(f"{where}: {key}={value!r} is refused by the config: {err}") from None
    return specs


def _check_spec(where: str, spec) -> None:
    if not isinstance(spec, dict):
        raise UserError(f"{where} must be a mapping such as {{type: float, low: 1e-4, high: 1e-2}}, got {spec!r}.")
    kind = spec.get("type")
    if kind not in SPEC_KEYS:
        raise UserError(f"{where}.type={kind!r} is not valid. Valid types: {', '.join(SPEC_KEYS)}.")
    unknown = set(spec) - SPEC_KEYS[kind]
    if unknown:
        raise UserError(f"{where}: unknown field(s) {', '.join(sorted(unknown))} for type {kind}; "
                        f"valid: {', '.join(sorted(SPEC_KEYS[kind]))}.")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices or not all(
                c is None or isinstance(c, (bool, int, float, str)) for c in choices):
            raise UserError(f"{where}.choices must be a non-empty list of numbers, strings or booleans.")
        return
    number = int if kind == "int" else (int, float)
    for bound in ("low", "high"):
        value = spec.get(bound)
        if isinstance(value, bool) or not isinstance(value, number):
            raise UserError(f"{where}.{bound} must be {'an integer' if kind == 'int' else 'a number'}, got {value!r}.")
    if spec["low"] > spec["high"]:
        raise UserError(f"{where}: low={spec['low']} > high={spec['high']}.")
    if spec.get("log") and spec["low"] <= 0:
        raise UserError(f"{where}: log=true needs low > 0, got {spec['low']}.")
    if spec.get("log") and spec.get("step") is not None:
        raise UserError(f"{where}: step and log=true cannot be combined (Optuna samples either on a grid or a log scale).")


def suggest(trial, specs: dict[str, dict]) -> dict[str, Any]:
    params = {}
    for key, spec in specs.items():
        if spec["type"] == "categorical":
            params[key] = trial.suggest_categorical(key, spec["choices"])
        elif spec["type"] == "int":
            params[key] = trial.suggest_int(key, spec["low"], spec["high"], step=spec.get("step") or 1,
                                            log=bool(spec.get("log")))
        else:
            params[key] = trial.suggest_float(key, float(spec["low"]), float(spec["high"]), step=spec.get("step"),
                                              log=bool(spec.get("log")))
    return params


# ---------------------------------------------------------------------------------- the study
def metric_and_direction(cfg) -> tuple[str, str]:
    from podium.engine import registry

    task = registry.build("task", cfg.task.name, cfg)
    monitor = cfg.trainer.monitor or task.monitor
    mode = cfg.trainer.monitor_mode or task.monitor_mode
    metric = cfg.sweep.metric or monitor
    if cfg.sweep.direction is not None:
        if cfg.sweep.direction not in DIRECTIONS:
            raise UserError(f"sweep.direction={cfg.sweep.direction!r} is not valid. Valid: maximize, minimize.")
        return metric, DIRECTIONS[cfg.sweep.direction]
    if metric != monitor:
        raise UserError(f"sweep.metric={metric} is not the monitored metric ({monitor}): "
                        "say whether to maximize or minimize it with sweep.direction=.")
    return metric, DIRECTIONS[mode]


_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][\w+.\-]*://[^\s/@:]*):[^\s/@]*@")


def without_password(url: str) -> str:
    """`postgresql://user:secret@host/db` -> `postgresql://user@host/db`: what podium writes down.
    The user name stays (a resume needs it); libpq finds the password in PGPASSWORD or ~/.pgpass."""
    return _PASSWORD.sub(lambda m: m.group("head") + "@", url)


def open_storage(url: str):
    """An RDB storage with heartbeats (a dead worker's trial is failed, then retried elsewhere).
    Two workers creating the tables of a new PostgreSQL database at once can collide; retry."""
    import optuna

    for attempt in range(5):
        try:
            with warnings.catch_warnings():  # ExperimentalWarning on heartbeat_interval
                warnings.simplefilter("ignore")
                return optuna.storages.RDBStorage(url, heartbeat_interval=10, grace_period=40)
        except Exception as err:  # noqa: BLE001 - sqlalchemy's IntegrityError/ProgrammingError on a race
            if attempt == 4 or "postgres" not in url:
                raise UserError(f"sweep.storage={redact_text(url)} cannot be opened: "
                                f"{str(err).splitlines()[0]}") from None
            time.sleep(0.5 + attempt)


def counts(study) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


def _seed(cfg, shared: bool, existing: int) -> int:
    """The sampler's seed. One worker on its own SQLite is reproducible (the seed, shifted by the
    trials already there so a resume draws new points); workers of a shared study mix in a
    random token, or they would all draw the same first points."""
    base = cfg.sweep.seed if cfg.sweep.seed is not None else cfg.seed
    token = secrets.randbits(31) if shared else 0
    return (base + 100_003 * existing + token) % (2**31)


def make_study(cfg, storage, study_name: str, direction: str, specs: dict, grid: bool):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # podium prints its own line per trial
    existing = 0
    try:
        existing = len(optuna.load_study(study_name=study_name, storage=storage).trials)
    except KeyError:
        pass
    seed = _seed(cfg, shared=bool(cfg.sweep.storage), existing=existing)
    if grid:
        sampler = optuna.samplers.GridSampler({k: s["choices"] for k, s in specs.items()}, seed=seed)
    else:
        sampler = optuna.samplers.TPESampler(seed=seed, constant_liar=bool(cfg.sweep.storage))
    if cfg.sweep.pruner == "median":
        pruner = optuna.pruners.MedianPruner(n_startup_trials=cfg.sweep.startup_trials,
                                             n_warmup_steps=cfg.sweep.warmup_validations)
    elif cfg.sweep.pruner == "none":
        pruner = optuna.pruners.NopPruner()
    else:
        raise UserError(f"sweep.pruner={cfg.sweep.pruner!r} is not valid. Valid: median, none.")
    study = optuna.create_study(study_name=study_name, storage=storage, sampler=sampler, pruner=pruner,
                                direction=direction, load_if_exists=True)
    if study.direction.name.lower() != direction:
        raise UserError(f"study {study_name!r} in sweep.storage was made to {study.direction.name.lower()}, "
                        f"this sweep would {direction}; use another sweep.study.")
    for params in OmegaConf.to_container(cfg.sweep.enqueue) if len(cfg.sweep.enqueue) else []:
        if not isinstance(params, dict) or set(params) - set(specs):
            raise UserError(f"sweep.enqueue entries are {{key: value}} over the space's keys "
                            f"({', '.join(specs)}), got {params!r}.")
        study.enqueue_trial(params, skip_if_exists=True)
    return study


# ---------------------------------------------------------------------------------- one trial
def pruning_hook(trial, metric: str):
    """The trainer's validation hook: report `metric`, stop the trial when the pruner says so."""
    import optuna

    def hook(trainer, row: dict) -> None:
        if metric not in row:
            raise UserError(f"sweep.metric={metric!r} is not among the validation metrics: "
                            f"{', '.join(sorted(k for k in row if k.startswith('val/')))}.")
        # the validation's ordinal, not the optimizer step: trials with another batch size
        # are compared at the same point of training
        number, value = len(trainer.state.history), float(row[metric])
        trial.report(value, number)
        if trial.should_prune():
            raise optuna.TrialPruned(f"{metric}={value:.4g} at validation {number} is below the median")

    return hook


def nest_mlflow_run(parent, run_dir: Path, trial, status: str | None = None) -> None:
    """Make the trial's MLflow run a child of the sweep's run (MLflow's mlflow.parentRunId tag)."""
    if parent is None or not parent.active:
        return
    try:
        state = json.loads((run_dir / "tracking.json").read_text())
        if state.get("tracking_uri") != redact_text(parent.tracking_uri):
            return  # logged to another store: nothing to nest under
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=parent.tracking_uri)
        client.set_tag(state["run_id"], "mlflow.parentRunId", parent.run_id)
        client.set_tag(state["run_id"], "podium.trial", str(trial.number))
        if status:  # the trainer's tracker closed it FAILED; a pruned trial was stopped on purpose
            client.set_tag(state["run_id"], "podium.trial_state", status)
            if status == "PRUNED":
                client.set_terminated(state["run_id"], status="KILLED")
    except (OSError, ValueError, KeyError):
        return  # the trial never reached its tracker (tracking=none, or an early failure)
    except Exception as exc:  # noqa: BLE001 - tracking must never stop a sweep
        parent._disable("nesting a trial's MLflow run failed", exc)


# ---------------------------------------------------------------------------------- the sweep
def _sweep_dir(cfg) -> Path:
    from podium.engine.runs import new_run_dir

    if cfg.sweep.dir:
        return Path(cfg.sweep.dir)
    return new_run_dir(cfg.run.root, None, f"{cfg.name}-sweep")


def _state(sweep_dir: Path) -> dict:
    path = Path(sweep_dir) / STATE_FILE
    if not path.is_file():
        raise UserError(f"{sweep_dir} is not a sweep folder (no {STATE_FILE} inside).")
    return yaml.safe_load(path.read_text())


def resume_overrides(sweep_dir: Path, extra: list[str]) -> list[str]:
    """The sweep's own overrides plus the few a resume may change (sweep.trials, sweep.storage)."""
    state = _state(sweep_dir)
    for item in extra:
        if not item.startswith(("sweep.trials=", "sweep.storage=")):
            raise UserError(f"--resume continues the study as it was; only sweep.trials= and sweep.storage= "
                            f"may change, got {item!r}.")
    stored = state["overrides"]
    # a password was dropped when the state was written: libpq takes it from PGPASSWORD / ~/.pgpass,
    # or give the full URL again with sweep.storage=
    keep = [o for o in stored if not any(o.startswith(e.split("=", 1)[0] + "=") for e in extra)]
    return [*keep, *extra]


def run_sweep(overrides: list[str], console, resume: Path | None = None) -> dict:
    """Run trials until the study holds sweep.trials finished ones; write plots and sweep.json."""
    import optuna

    from podium.config import compose
    from podium.engine import session, trainer as trainer_module
    from podium.engine.runs import write_json
    from podium.engine.tracking import Tracker
    from podium.errors import TrainingDiverged
    from podium.toolkit.sweep_plots import write_plots

    if resume is not None:
        overrides = resume_overrides(Path(resume), overrides)
    plain, grid = split_multirun(overrides)
    for item in plain:
        if item.lstrip("+~").startswith(("run.dir=", "run.name=", "resume=")):
            raise UserError(f"{item}: a sweep makes one run folder per trial under its own folder; "
                            "choose that folder with sweep.dir= instead.")
    cfg = compose(plain)
    if grid:  # Hydra's comma lists: a grid over them (added here: the lists are no config syntax)
        cfg.sweep.grid = {**OmegaConf.to_container(cfg.sweep.grid), **grid}
    grid = OmegaConf.to_container(cfg.sweep.grid)
    if cfg.sweep.trials < 1:
        raise UserError(f"sweep.trials={cfg.sweep.trials} is out of range: it must be >= 1.")
    if str(cfg.trainer.devices) not in ("1", "auto") or cfg.trainer.num_nodes != 1:
        raise UserError("a sweep trains each trial in one process (trainer.devices=1); start more "
                        "workers on the same sweep.storage to use more devices.")
    sweep_dir = Path(resume) if resume is not None else _sweep_dir(cfg)
    if resume is None and (sweep_dir / STATE_FILE).exists():
        raise UserError(f"sweep.dir={sweep_dir} already holds a sweep; continue it with "
                        f"`podium sweep --resume {sweep_dir}` or choose another sweep.dir.")
    if cfg.sweep.storage and not cfg.sweep.study:
        raise UserError("sweep.storage is shared between workers: name the study with sweep.study=NAME "
                        "(the same on every worker).")
    trial_base = [o for o in plain if not o.lstrip("+~").startswith("sweep.")]
    specs = check_space(cfg, trial_base)
    metric, direction = metric_and_direction(cfg)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    study_name = cfg.sweep.study or sweep_dir.name
    storage_url = cfg.sweep.storage or "sqlite:///" + (sweep_dir.resolve() / "study.db").as_posix()
    saved = [o for o in overrides if o not in ("-m", "--multirun") and not o.startswith(("sweep.dir=", "sweep.study="))]
    (sweep_dir / STATE_FILE).write_text(yaml.safe_dump({
        "overrides": [without_password(o) for o in saved] + [f"sweep.dir={sweep_dir}", f"sweep.study={study_name}"],
        "study": study_name, "storage": without_password(storage_url)}, sort_keys=False))
    storage = open_storage(storage_url)
    study = make_study(cfg, storage, study_name, direction, specs, grid=bool(grid))
    target = math.prod(len(v) for v in grid.values()) if grid else cfg.sweep.trials

    parent = Tracker(cfg.tracking, run_dir=sweep_dir, runs_root=Path(cfg.run.root), experiment=cfg.name,
                     run_name=sweep_dir.name, console=console)
    parent.log_params({"sweep": {"study": study_name, "metric": metric, "direction": direction,
                                 "trials": target, "space": json.dumps(specs), "storage": without_password(storage_url)}})
    worker = f"{os.uname().nodename}:{os.getpid()}"
    ran: list[int] = []

    def objective(trial):
        # Two workers may both see one missing trial and start one; the one with the higher
        # number steps back (state FAIL, user attr "surplus"), so the study holds exactly `target`.
        ahead = [t for t in study.get_trials(deepcopy=False, states=_occupied()) if t.number < trial.number]
        if len(ahead) >= target:
            trial.set_user_attr("surplus", True)
            raise Surplus(f"the study already holds its {target} trials (another worker took the last one)")
        params = suggest(trial, specs)
        run_dir = sweep_dir / "trials" / f"trial-{trial.number:04d}"
        trial.set_user_attr("run_dir", str(run_dir.resolve()))
        trial.set_user_attr("worker", worker)
        ran.append(trial.number)
        shown = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
        console.print(f"[bold]trial {trial.number}[/] ({len(ran)} here, study target {target}): {shown}",
                      highlight=False)
        trial_cfg = compose([*trial_base, *(override(k, v) for k, v in params.items()), f"run.dir={run_dir}"])
        hook = pruning_hook(trial, metric)
        trainer_module.VALIDATION_HOOKS.append(hook)
        status = "FAILED"
        try:
            _, metrics = session.train(trial_cfg, console)
            status = None
        except optuna.TrialPruned as err:
            status = "PRUNED"
            console.print(f"trial {trial.number} pruned: {err}", highlight=False)
            raise
        except TrainingDiverged as err:  # a learning rate too high is an answer, not a failure
            status = "PRUNED"
            trial.set_user_attr("diverged", str(err)[:500])
            console.print(f"trial {trial.number} diverged: pruned", highlight=False)
            raise optuna.TrialPruned(f"diverged: {err}") from None
        finally:
            trainer_module.VALIDATION_HOOKS.remove(hook)
            nest_mlflow_run(parent, run_dir, trial, status)
        if metric not in metrics:
            raise UserError(f"sweep.metric={metric!r} is not among the run's final metrics: "
                            f"{', '.join(sorted(metrics))}.")
        value = float(metrics[metric])
        parent.log_metrics({"trial_value": value}, step=trial.number)
        return value

    status = "FAILED"
    try:
        while True:
            with warnings.catch_warnings():  # ExperimentalWarning: stable since Optuna 2.9, still labelled so
                warnings.simplefilter("ignore")
                optuna.storages.fail_stale_trials(study)  # a dead worker's RUNNING trial: failed, run again
            if len(study.get_trials(deepcopy=False, states=_occupied())) >= target:
                break
            study.optimize(objective, n_trials=1, catch=(Surplus,))
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if status != "FINISHED":
            parent.finish(status)
    summary = summarise(study, metric, direction, storage_url, ran)
    summary["plots"] = write_plots(study, sweep_dir / "plots")
    write_json(sweep_dir / "sweep.json", summary)
    if summary["best"]:
        parent.log_metrics({"best_value": summary["best"]["value"]}, step=len(study.trials))
    parent.log_artifact(sweep_dir / "sweep.json")
    parent.log_artifact(sweep_dir / "plots", "plots")
    parent.finish("FINISHED")
    summary["dir"] = str(sweep_dir)
    return summary


def summarise(study, metric: str, direction: str, storage_url: str, ran: list[int]) -> dict:
    import optuna

    trials = [{"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
               "run_dir": t.user_attrs.get("run_dir"), "worker": t.user_attrs.get("worker"),
               "validations": len(t.intermediate_values),
               "seconds": t.duration.total_seconds() if t.duration else None}
              for t in study.get_trials(deepcopy=False)]
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    best = None
    if complete:
        b = study.best_trial
        best = {"number": b.number, "value": b.value, "params": b.params, "run_dir": b.user_attrs.get("run_dir")}
    return {"study": study.study_name, "storage": without_password(storage_url), "metric": metric,
            "direction": direction, "counts": counts(study), "best": best, "trials_run_here": ran,
            "trials": trials}


def results_table(summary: dict):
    from rich.table import Table

    keys: list[str] = []
    for t in summary["trials"]:
        keys += [k for k in t["params"] if k not in keys]
    reverse = summary["direction"] == "maximize"
    done = [t for t in summary["trials"] if t["state"] == "COMPLETE"]
    rest = [t for t in summary["trials"] if t["state"] != "COMPLETE"]  # pruned: their last reported value
    table = Table(title=f"sweep {summary['study']}: {summary['metric']} ({summary['direction']})")
    for column in ("trial", "state", summary["metric"], *keys):
        table.add_column(column, justify="right" if column != "state" else "left")
    for t in sorted(done, key=lambda t: t["value"], reverse=reverse) + rest:
        cells = [f"{t['params'][k]:.4g}" if isinstance(t["params"].get(k), float) else str(t["params"].get(k, ""))
                 for k in keys]
        table.add_row(str(t["number"]), t["state"].lower(), "" if t["value"] is None else f"{t['value']:.4f}",
                      *cells)
    return table
