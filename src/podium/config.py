"""Compose a run's config with Hydra and validate it against structured schemas.

    cfg = compose(["experiment=digits", "optim.lr=1e-3"])

Hydra's compose API builds the config from the YAML tree shipped in `podium/conf` (and any
folders listed in the PODIUM_CONFIG_PATH environment variable, for a team's own experiments).
Then every group is merged onto its dataclass schema: the engine's groups have fixed schemas
(podium.engine.schema), the task's groups (task, data, model, loss) the schema of the registered
object their `name` selects. A wrong key or type becomes a `UserError` that names the key and
the valid choices — the CLI turns it into exit code 2 without a traceback.
"""

from __future__ import annotations

import os
import re
import typing
from dataclasses import fields, is_dataclass
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from podium.engine import registry
from podium.engine.runconfig import load_run_config  # noqa: F401 - moved to the engine; re-exported
from podium.engine.schema import ENGINE_GROUPS, TASK_GROUPS, TOP_LEVEL_KEYS
from podium.errors import UserError

CONF_DIR = Path(__file__).parent / "conf"
GROUP_KIND = {"task": "task", "data": "dataset", "model": "model", "loss": "loss"}
HYDRA_GROUPS = ("task", "data", "model", "loss", "optim", "sched", "trainer", "tracking", "experiment")

# Values with a closed set of choices, checked before any work starts.
CHOICES = {
    "optim.name": ("adamw", "sgd", "nadam"),
    "sched.name": ("none", "cosine", "poly", "exponential", "step"),
    "sched.interval": ("epoch", "step"),
    "tracking.backend": ("mlflow", "none"),
    "trainer.accelerator": ("auto", "cpu", "cuda", "gpu", "mps"),
    "trainer.precision": ("auto", "32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "64-true"),
    "tta": ("none", "flips", "d4", "scales"),  # podium.engine.tta.VIEW_SETS
    "tta_merge": ("mean", "geometric"),  # podium.engine.tta.MERGES
}

# Numbers with a valid interval, checked beside CHOICES: a batch size of 0 or a negative epoch
# count would otherwise fail deep inside torch or Lightning with a traceback (exit 1) after the
# run folder is made. ">= 0" where 0 means "off" / "same as" in the schema's comments.
RANGES = {
    "trainer.num_nodes": ">= 1",
    "trainer.max_epochs": ">= 0",  # 0: no training, only the final evaluation of the initial model
    "trainer.max_steps": ">= 0",
    "trainer.val_every_n_epochs": ">= 1",
    "trainer.val_every_n_steps": ">= 0",
    "trainer.accumulate_grad_batches": ">= 1",
    "trainer.grad_clip_norm": ">= 0",
    "trainer.checkpoint_every_n_steps": ">= 0",
    "trainer.checkpoint_every_minutes": ">= 0",
    "trainer.log_every_n_steps": ">= 1",
    "trainer.batch_size": ">= 1",
    "trainer.eval_batch_size": ">= 0",
    "trainer.num_workers": ">= -1",
    "trainer.cpu_threads": ">= -1",
    "trainer.prefetch_factor": ">= 1",
    "trainer.data_wait_warn": ">= 0",
    "trainer.ema.decay": "[0, 1)",
    "trainer.early_stopping.patience": ">= 0",
    "trainer.early_stopping.min_delta": ">= 0",
    "optim.lr": "> 0",
    "optim.weight_decay": ">= 0",
    "optim.momentum": "[0, 1)",
    "optim.betas": "[0, 1)",  # each of the two
    "optim.eps": ">= 0",
    "sched.warmup_steps": ">= 0",
    "sched.warmup_epochs": ">= 0",
    "sched.min_lr_ratio": "[0, 1]",
    "sched.gamma": "> 0",
    "sched.step_size": ">= 1",
    "tracking.timeout_s": "> 0",
    "cv.folds": ">= 0",  # 0: off
    "cv.fold": ">= 0",
    "tta_scales": "> 0",  # each factor
}


def _search_path_overrides() -> list[str]:
    extra = [p for p in os.environ.get("PODIUM_CONFIG_PATH", "").split(os.pathsep) if p]
    if not extra:
        return []
    return ["hydra.searchpath=[" + ",".join(f"file://{Path(p).resolve()}" for p in extra) + "]"]


def group_options(group: str) -> list[str]:
    """Option names of a config group (the YAML files in the group folder)."""
    folders = [CONF_DIR / group] + [Path(p) / group for p in os.environ.get("PODIUM_CONFIG_PATH", "").split(os.pathsep) if p]
    return sorted({f.stem for folder in folders if folder.is_dir() for f in folder.glob("*.yaml")})


def _hydra_compose(overrides: list[str]) -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides + _search_path_overrides())


def compose(overrides: list[str]) -> DictConfig:
    """Compose and validate; raises UserError on any problem the user can fix."""
    overrides = list(overrides)
    try:
        cfg = _hydra_compose([_add_or_override(o) for o in overrides])
    except Exception as err:  # Hydra wraps everything in its own exception types
        raise UserError(_explain_hydra_error(err, overrides)) from None
    return validate(cfg)


_DOTTED_ASSIGNMENT = re.compile(r"^[A-Za-z_]\w*(\.\w+)+=")


def _add_or_override(override: str) -> str:
    """`group.key=value` → `++group.key=value`.

    A group's YAML need not spell out every key of its schema, so Hydra may not know a valid key
    yet; forcing the assignment lets the schema, not the YAML, decide what is valid — and a
    misspelled key still fails, in `validate`, with the schema's list of valid keys.
    """
    return "++" + override if _DOTTED_ASSIGNMENT.match(override) else override


def _explain_hydra_error(err: Exception, overrides: list[str]) -> str:
    text = str(err)
    cause = err.__cause__ or err.__context__
    missing = re.search(r"Could not find '([\w/]+)/([^']+)'", text)
    if missing:
        group, option = missing.groups()
        choices = ", ".join(group_options(group)) or "(none)"
        return f"unknown {group} '{option}'. Valid choices for {group}: {choices}."
    if isinstance(cause, (ConfigKeyError, OmegaConfBaseException)) and getattr(cause, "full_key", None):
        key = cause.full_key
        return f"unknown config key '{key}'. {_valid_keys_hint(key, overrides)}"
    bad = re.search(r"Could not override '([^']+)'", text)
    if bad:
        return f"unknown config key '{bad.group(1)}'. {_valid_keys_hint(bad.group(1), overrides)}"
    first_line = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    return f"cannot compose the config from {overrides}: {first_line}"


def _valid_keys_hint(key: str, overrides: list[str]) -> str:
    parent = key.rsplit(".", 1)[0] if "." in key else ""
    selections = [o for o in overrides if "=" in o and o.split("=")[0].lstrip("+~") in HYDRA_GROUPS]
    try:
        base = _hydra_compose(selections)
    except Exception:
        return ""
    node = OmegaConf.select(base, parent) if parent else base
    if isinstance(node, DictConfig):
        return f"Valid keys of {parent or 'the config'}: {', '.join(sorted(node.keys()))}."
    return ""


def _schema_keys(schema) -> list[str]:
    return [f.name for f in fields(schema)] if is_dataclass(schema) else []


def _expected_type(schema, dotted_key: str | None) -> str | None:
    """The declared type of `dotted_key` in a dataclass schema, as users write it ("int")."""
    if not dotted_key:
        return None
    node = schema
    for part in dotted_key.split("."):
        if not is_dataclass(node):
            return None
        hints = typing.get_type_hints(node)
        if part not in hints:
            return None
        node = hints[part]
    return getattr(node, "__name__", None) if isinstance(node, type) else str(node).replace("typing.", "")


def _check_node(group: str, node, schema) -> DictConfig:
    """Merge `node` onto `schema`; turn OmegaConf's errors into messages that name the key."""
    if not isinstance(node, DictConfig):
        raise UserError(f"'{group}' must be a mapping of keys, got {node!r}.")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), node)
    except ConfigKeyError as err:
        key = f"{group}.{err.full_key}" if err.full_key else group
        raise UserError(f"unknown config key '{key}'. Valid keys of {group}: "
                        f"{', '.join(_schema_keys(schema))}.") from None
    except ValidationError as err:
        key = f"{group}.{err.full_key}" if err.full_key else group
        expected = _expected_type(schema, err.full_key) or "the schema's type"
        msg = str(err).splitlines()[0]
        raise UserError(f"wrong type for '{key}': {msg} (expected {expected}).") from None
    return merged


def validate(cfg: DictConfig) -> DictConfig:
    """Return a validated, struct-mode config; raise UserError naming any bad key or value."""
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    allowed = set(ENGINE_GROUPS) | set(TASK_GROUPS) | set(TOP_LEVEL_KEYS)
    for key in cfg.keys():
        if key not in allowed:
            raise UserError(f"unknown config key '{key}'. Valid top-level keys: {', '.join(sorted(allowed))}.")
    out = {}
    for key, typ in TOP_LEVEL_KEYS.items():
        value = cfg.get(key)
        if value is not None and key == "seed" and (not isinstance(value, int) or isinstance(value, bool)):
            raise UserError(f"wrong type for 'seed': expected an integer, got {value!r}.")
        out[key] = value
    if out.get("seed") is None:
        out["seed"] = 0
    for group, schema in ENGINE_GROUPS.items():
        out[group] = _check_node(group, cfg.get(group, OmegaConf.create({})), schema)
    for group in TASK_GROUPS:
        node = cfg.get(group)
        if not isinstance(node, DictConfig) or "name" not in node:
            raise UserError(f"config group '{group}' needs a 'name' (choose with {group}=OPTION; "
                            f"options: {', '.join(group_options(group))}).")
        entry = registry.get(GROUP_KIND[group], node.name)
        out[group] = _check_node(group, node, entry.schema) if entry.schema else node
    result = OmegaConf.create({k: v for k, v in out.items()})
    for dotted, choices in CHOICES.items():
        value = OmegaConf.select(result, dotted)
        if value is not None and str(value) not in choices:
            raise UserError(f"{dotted}={value!r} is not valid. Valid choices: {', '.join(choices)}.")
    for dotted, rule in RANGES.items():
        _check_range(dotted, OmegaConf.select(result, dotted), rule)
    OmegaConf.set_struct(result, True)
    return result


_BOUND = re.compile(r"^(>=|>) (-?[\d.]+)$")
_INTERVAL = re.compile(r"^([\[(])(-?[\d.]+), (-?[\d.]+)([\])])$")


def _in_range(value: float, rule: str) -> bool:
    """`rule` is ">= 1", "> 0" or an interval such as "[0, 1)"."""
    bound = _BOUND.match(rule)
    if bound:
        op, low = bound.group(1), float(bound.group(2))
        return value >= low if op == ">=" else value > low
    left, low, high, right = _INTERVAL.match(rule).groups()
    low, high = float(low), float(high)
    return (value >= low if left == "[" else value > low) and (value <= high if right == "]" else value < high)


def _check_range(dotted: str, value, rule: str) -> None:
    if value is None:
        return
    values = list(value) if isinstance(value, ListConfig) else [value]
    if dotted == "optim.betas" and len(values) != 2:
        raise UserError(f"optim.betas={list(values)!r} is not valid: expected two values in {rule}.")
    for item in values:
        if isinstance(item, bool) or not isinstance(item, (int, float)) or not _in_range(item, rule):
            valid = f"in {rule}" if rule[0] in "[(" else rule
            shown = list(values) if len(values) > 1 or isinstance(value, ListConfig) else value
            raise UserError(f"{dotted}={shown!r} is out of range: it must be {valid}.")
