"""A finished run's own config: RUN/config.yaml read back, with `key=value` overrides, validated.

    from podium.engine.runconfig import load_run_config
    cfg = load_run_config("runs/x", ["trainer.accelerator=cpu"])

It lives in the engine because the engine's inference paths (session.trainer_for_run,
runcard.load_model) need it, and the engine never imports `podium.config` at module level:
that module composes configs with Hydra and depends on the engine, not the other way round.
`podium.config` re-exports `load_run_config` for existing callers.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf

from podium.engine.schema import TOP_LEVEL_KEYS
from podium.errors import UserError


def _read_run_config(path: Path) -> DictConfig:
    """A run's config.yaml as a DictConfig; a file that is not a YAML mapping (a half-copied or
    hand-edited file) is a UserError naming it. The mapping check goes first because OmegaConf
    reads a bare word as a key ("just text" -> {"just text": None}) and a list as a ListConfig."""
    broken = f"{path} is not a valid run config"
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        at = f" (line {where.line + 1}, column {where.column + 1})" if where else ""
        raise UserError(f"{broken}: invalid YAML{at}: {getattr(err, 'problem', None) or err} "
                        f"(the run's checkpoints hold a copy under their 'config' key).") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{broken}: cannot read it ({err}).") from None
    if not isinstance(raw, dict):
        raise UserError(f"{broken}: expected a mapping of config groups (task, data, model, ...), "
                        f"got {'an empty file' if raw is None else type(raw).__name__}.")
    try:
        return OmegaConf.load(path)  # OmegaConf's own YAML rules (e.g. 1e-3 is a float)
    except Exception as err:  # noqa: BLE001 - e.g. a non-string key OmegaConf refuses
        raise UserError(f"{broken}: {str(err).splitlines()[0]}") from None


GROUP_KINDS = {"task": "task", "data": "dataset", "model": "model", "loss": "loss"}


def _added_since(cfg: DictConfig, key: str) -> bool:
    """True when `key` is missing from a run's config only because the schema of its group (an
    engine group, or the run's own registered task / dataset / model / loss) gained it after the
    run was made (e.g. task.submission_size): such an override is valid on the older run."""
    from podium.engine import registry
    from podium.engine.schema import ENGINE_GROUPS

    group, _, rest = key.partition(".")
    if not rest:
        return False
    schema = ENGINE_GROUPS.get(group)
    if schema is None and group in GROUP_KINDS and OmegaConf.select(cfg, f"{group}.name") is not None:
        try:
            schema = registry.get(GROUP_KINDS[group], str(cfg[group].name)).schema
        except UserError:
            return False
    if schema is None:
        return False
    return OmegaConf.select(OmegaConf.structured(schema), rest, default="__missing__") != "__missing__"


def load_run_config(run_dir: Path, overrides: list[str] | None = None) -> DictConfig:
    """A run's own resolved config, with optional `key=value` overrides, validated again."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise UserError(f"{run_dir} is not a podium run folder (no config.yaml inside).")
    cfg = _read_run_config(path)
    if overrides:
        for item in overrides:
            if "=" not in item:
                raise UserError(f"override '{item}' is not of the form key=value.")
            key, value = item.split("=", 1)
            # a top-level key added since the run was made (tta=...) is valid on an older run
            if (OmegaConf.select(cfg, key, default="__missing__") == "__missing__" and key not in TOP_LEVEL_KEYS
                    and not _added_since(cfg, key)):
                parent = key.rsplit(".", 1)[0] if "." in key else None
                node = OmegaConf.select(cfg, parent) if parent else cfg
                keys = ", ".join(sorted(node.keys())) if isinstance(node, DictConfig) else ""
                raise UserError(f"unknown config key '{key}'. Valid keys of {parent or 'the config'}: {keys}.")
            OmegaConf.update(cfg, key, yaml.safe_load(value) if value else None, merge=False)
    # Imported here, not at the top: validate needs the config schemas of podium.config, which
    # imports the engine; a module-level import would point the arrow engine -> config.
    from podium.config import validate

    try:
        return validate(cfg)
    except UserError as err:  # say which file (and overrides) the bad key came from
        source = f"{path} with overrides {' '.join(overrides)}" if overrides else str(path)
        raise UserError(f"{source}: {err}") from None
