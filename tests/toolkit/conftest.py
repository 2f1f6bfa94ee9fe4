"""Shared toolkit fixtures: two tiny digits runs that differ by seed, for ensemble, diff, audit."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import DIGITS_TINY, _shared, _train


@pytest.fixture(scope="session")
def runs(digits_run, tmp_path_factory) -> list[Path]:
    """The suite's shared DIGITS_TINY run (seed 0) and the same run with seed 1 (trained once per
    session; read only: a test that writes into one copies it first)."""
    other = tmp_path_factory.mktemp("toolkit_runs") / "seed1"
    _train([*DIGITS_TINY, "seed=1", f"run.dir={other}"])
    for run in _shared(other):
        yield [digits_run, run]
