"""Registry: names, duplicates, unknown names and the built-in registrations."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from podium.engine import registry
from podium.errors import UserError


@dataclass
class _ThrowawayConfig:
    name: str = "zz_throwaway"
    size: int = 1


def test_register_build_and_unregister():
    try:

        @registry.register("loss", "zz_throwaway", schema=_ThrowawayConfig)
        def throwaway(cfg, **context):
            """A loss for tests only."""
            return ("built", cfg, context)

        entry = registry.get("loss", "zz_throwaway")
        assert entry.kind == "loss" and entry.name == "zz_throwaway"
        assert entry.schema is _ThrowawayConfig
        assert entry.help == "A loss for tests only."
        assert registry.build("loss", "zz_throwaway", "cfg", num_classes=3) == ("built", "cfg", {"num_classes": 3})
        assert "zz_throwaway" in registry.list_names("loss")
    finally:
        registry.unregister("loss", "zz_throwaway")
    assert "zz_throwaway" not in registry.list_names("loss")


def test_duplicate_names_are_refused():
    def first(cfg):
        return 1

    def second(cfg):
        return 2

    try:
        registry.register("model", "zz_duplicate")(first)
        with pytest.raises(ValueError, match="already registered") as info:
            registry.register("model", "zz_duplicate")(second)
        assert "first" in str(info.value)  # names the factory that holds the name
        assert registry.get("model", "zz_duplicate").factory is first  # the first one is kept
    finally:
        registry.unregister("model", "zz_duplicate")


def test_builtin_names_cannot_be_overwritten():
    registry.load_builtin()
    original = registry.get("model", "small_cnn").factory
    with pytest.raises(ValueError, match="already registered"):
        registry.register("model", "small_cnn")(lambda cfg: None)
    assert registry.get("model", "small_cnn").factory is original


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="unknown registry kind"):
        registry.register("optimizer", "x")


def test_unknown_name_is_a_user_error_listing_choices():
    with pytest.raises(UserError) as info:
        registry.get("model", "no_such_model")
    message = str(info.value)
    assert "no_such_model" in message
    assert "small_cnn" in message and "timm" in message

    with pytest.raises(UserError, match="focal"):
        registry.build("loss", "no_such_loss")


def test_list_names_with_a_pattern():
    try:
        for name in ("zz_pat_alpha", "zz_pat_beta", "zz_other"):
            registry.register("metric", name)(lambda *a, **k: None)
        assert registry.list_names("metric", "zz_pat_*") == ["zz_pat_alpha", "zz_pat_beta"]
        assert registry.list_names("metric", "zz_*") == ["zz_other", "zz_pat_alpha", "zz_pat_beta"]
        assert registry.list_names("metric", "nothing_matches_*") == []
    finally:
        for name in ("zz_pat_alpha", "zz_pat_beta", "zz_other"):
            registry.unregister("metric", name)
    assert registry.list_names("loss", "weighted_*") == ["weighted_ce"]
    all_names = registry.list_names("loss")
    assert all_names == sorted(all_names)


def test_builtin_registrations_exist():
    assert {"small_cnn", "timm"} <= set(registry.list_names("model"))
    assert {"digits", "image_folder", "csv"} <= set(registry.list_names("dataset"))
    assert {"cross_entropy", "weighted_ce", "focal", "asymmetric"} <= set(registry.list_names("loss"))
    assert "classification" in registry.list_names("task")
    # Config-validated groups carry a schema (config keys are checked against it).
    for kind, name in [("model", "small_cnn"), ("model", "timm"), ("dataset", "digits"),
                       ("loss", "focal"), ("task", "classification")]:
        entry = registry.get(kind, name)
        assert entry.schema is not None
    assert [e.name for e in registry.entries("model")] == registry.list_names("model")


def test_unregister_unknown_name_is_harmless():
    registry.unregister("loss", "zz_never_registered")
