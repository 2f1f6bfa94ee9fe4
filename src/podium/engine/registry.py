"""Registries by name, in the style of timm's `create_model`.

Every buildable object (task, model, dataset, loss, metric) is registered under a kind and a
name; configs say `model.name: small_cnn`, never an import path. A registration may carry a
dataclass schema: its fields are the config keys the object accepts, which is how an unknown key
or a wrongly typed value is caught before any work starts.

    from podium.engine.registry import register, build, list_names

    @register("loss", "focal", schema=FocalConfig)
    def focal_loss(cfg, **context): ...

    list_names("loss")                 # ['focal', ...]
    build("loss", "focal", cfg, num_classes=10)
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, Callable

from podium.errors import UserError

KINDS = ("task", "model", "dataset", "loss", "metric")


@dataclass(frozen=True)
class Entry:
    kind: str
    name: str
    factory: Callable[..., Any]
    schema: type | None
    help: str


_REGISTRY: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}


def register(kind: str, name: str, schema: type | None = None, help: str = ""):
    """Decorator: register `factory` under (kind, name). Duplicate names are refused."""
    if kind not in _REGISTRY:
        raise ValueError(f"unknown registry kind {kind!r}; kinds are {', '.join(KINDS)}")

    def decorator(factory):
        if name in _REGISTRY[kind]:
            existing = _REGISTRY[kind][name].factory
            raise ValueError(
                f"{kind} {name!r} is already registered by "
                f"{existing.__module__}.{existing.__qualname__}"
            )
        doc = help or (factory.__doc__ or "").strip().split("\n")[0]
        _REGISTRY[kind][name] = Entry(kind, name, factory, schema, doc)
        return factory

    return decorator


def get(kind: str, name: str) -> Entry:
    """Look up an entry; an unknown name is a user error that lists the valid choices."""
    load_builtin()
    entries = _REGISTRY[kind]
    if name not in entries:
        choices = ", ".join(sorted(entries)) or "(none registered)"
        raise UserError(f"unknown {kind} {name!r}. Valid choices: {choices}.")
    return entries[name]


def build(kind: str, name: str, *args, **kwargs):
    return get(kind, name).factory(*args, **kwargs)


def list_names(kind: str, pattern: str = "*") -> list[str]:
    load_builtin()
    return sorted(n for n in _REGISTRY[kind] if fnmatch.fnmatch(n, pattern))


def entries(kind: str) -> list[Entry]:
    load_builtin()
    return [_REGISTRY[kind][n] for n in sorted(_REGISTRY[kind])]


def unregister(kind: str, name: str) -> None:
    """For tests that register throwaway entries."""
    _REGISTRY[kind].pop(name, None)


_loaded = False


ENTRY_POINT_GROUP = "podium.tasks"


def load_builtin() -> None:
    """Import every task family declared under the `podium.tasks` entry-point group (once), so
    that its registrations run. The engine names no task: a family, built in or from another
    package, declares itself in its pyproject.toml."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    from importlib.metadata import entry_points

    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        entry_point.load()
