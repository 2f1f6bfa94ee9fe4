"""Runs that several test files read, trained once per pytest process (session fixtures).

    .venv/bin/python -m pytest -q tests/serve/test_server.py tests/engine/test_resume.py
    # -> `digits_run` is trained once and served, resumed (from a copy), ...

Many files need "a tiny finished run" of the same kind; training it in each file's own module
fixture cost the suite minutes. With pytest-xdist (`make test`: -n auto --dist loadfile) each
worker builds a session fixture the first time one of its files asks for it, so a run is
trained at most once per worker.

Consumers only read a shared run (predict into tmp_path, serve, export elsewhere). A test that
writes into a run (eval, resume, a changed card or checkpoint) works on a copy of it
(`shutil.copytree(digits_run, tmp_path / "run")`).
Each fixture's teardown checks that the run's files are as training left them, so a consumer
that writes into a shared run fails loudly instead of silently changing its neighbours' input.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests.postgres import postgres_url  # noqa: F401  (a real PostgreSQL 15 server, session-wide)

# One intra-op thread per test process, inherited by every child (`podium train` subprocesses,
# servers, benchmark scripts). `make test` runs one pytest worker per core; torch's default of
# one thread per core in each of them (and in each child) puts several spinning threads on
# every core, which made a 1-minute benchmark smoke test take 4-5 minutes inside the suite.
# Set before any test module imports torch; a value the caller exported is kept.
os.environ.setdefault("OMP_NUM_THREADS", "1")
if "torch" in sys.modules:  # imported early by a plugin: apply it there too
    sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# The digits flags used across the suite for a run of a few seconds: 16 x 16 images, a
# two-block CNN of width 8, one epoch, no MLflow, no augmentation.
DIGITS_TINY = ["experiment=digits", "data.image_size=16", "model.width=8", "model.blocks=2", "trainer.max_epochs=1",
               "trainer.num_workers=0", "tracking=none", "trainer.progress_bar=false", "data.augment=[]"]

# The VarNet flags of tests/tasks/reconstruction/test_e2e_reconstruction.py and the serving tests:
# 48 x 40 simulated k-space, 4 coils, one cascade of a 4-channel U-Net.
VARNET_TINY = ["experiment=varnet_demo", "data.shape=[48,40]", "data.num_coils=4", "data.train_size=4",
               "data.val_slices=2", "model.cascades=1", "model.chans=4", "model.sens_chans=2", "model.pools=2",
               "model.sens_pools=2", "trainer.max_epochs=1", "trainer.num_workers=0", "tracking=none",
               "trainer.progress_bar=false"]


def _fingerprint(run: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(run)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(run.rglob("*")) if p.is_file()}


def _train(args: list[str]) -> str:
    from typer.testing import CliRunner

    from podium.cli import app

    result = CliRunner().invoke(app, ["train", *args])
    assert result.exit_code == 0, result.output
    return result.output


def _shared(run: Path):
    """Yield `run`, then check that no consumer wrote into it."""
    before = _fingerprint(run)
    yield run
    after = _fingerprint(run)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"a test wrote into the shared run {run} (copy it first): {changed[:10]}"


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory) -> Path:
    """A finished DIGITS_TINY run (read only). Its `podium train` output is in ../train-output.txt."""
    run = tmp_path_factory.mktemp("shared-digits") / "run"
    output = _train([*DIGITS_TINY, f"run.dir={run}"])
    (run.parent / "train-output.txt").write_text(output)
    yield from _shared(run)


@pytest.fixture(scope="session")
def digits_train_output(digits_run) -> str:
    """What `podium train` printed for `digits_run`."""
    return (digits_run.parent / "train-output.txt").read_text()


@pytest.fixture(scope="session")
def card_run(tmp_path_factory) -> Path:
    """A finished three-class image-folder run whose training data is gone (read only)."""
    from tests.engine.test_runcard import train_without_data

    yield from _shared(train_without_data(tmp_path_factory.mktemp("shared-card")))


@pytest.fixture(scope="session")
def varnet_run(tmp_path_factory) -> Path:
    """A finished VARNET_TINY run on simulated k-space (read only)."""
    tmp = tmp_path_factory.mktemp("shared-varnet")
    _train([*VARNET_TINY, f"run.dir={tmp / 'run'}", f"data.cache_dir={tmp / 'cache'}"])
    yield from _shared(tmp / "run")
