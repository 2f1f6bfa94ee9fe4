"""Turn a config node into an instance of its dataclass schema, with errors that name the key."""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from podium.common.augment import plain
from podium.errors import UserError


def as_config(cfg: Any, schema: type, group: str = "data") -> Any:
    """A DictConfig / mapping / dataclass -> an instance of `schema` (nested dataclasses included)."""
    if isinstance(cfg, schema):
        return cfg
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), plain(cfg) if not isinstance(cfg, dict) else cfg)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        msg = str(e).splitlines()[0]
        raise UserError(f"{group}{'.' + key if key else ''}: {msg}") from None
