"""RNG capture/restore (also through a weights_only checkpoint) and environment capture."""

from __future__ import annotations

import json
import random
import sys

import numpy as np
import torch

from podium.engine.checkpoint import atomic_save, load_checkpoint
from podium.engine.reproducibility import (
    capture_rng_state,
    environment_info,
    restore_rng_state,
    rng_state_for_checkpoint,
    rng_state_from_checkpoint,
    seed_everything,
    write_environment,
)


def draws():
    # Gaussian draws exercise the cached-gaussian parts of the python and numpy states.
    return (
        [random.random() for _ in range(3)] + [random.gauss(0, 1)],
        np.random.rand(3).tolist() + [float(np.random.randn())],
        torch.rand(3).tolist() + torch.randn(1).tolist(),
    )


def prime_gauss_caches():
    random.gauss(0, 1)  # leaves python's gauss_next set
    np.random.randn()  # leaves numpy's has_gauss = 1


def test_seed_everything_makes_draws_repeat():
    seed_everything(123)
    first = draws()
    seed_everything(123)
    assert draws() == first
    seed_everything(124)
    assert draws() != first


def test_capture_restore_round_trip():
    seed_everything(5)
    prime_gauss_caches()
    state = capture_rng_state()
    expected = draws()
    draws()  # move on
    restore_rng_state(state)
    assert draws() == expected


def test_round_trip_through_a_weights_only_checkpoint(tmp_path):
    seed_everything(7)
    prime_gauss_caches()
    state = capture_rng_state()
    assert state["python"][2] is not None and state["numpy"][3] == 1  # caches are in use
    expected = draws()

    path = tmp_path / "last.pt"
    atomic_save({"rng": rng_state_for_checkpoint(state), "step": 3}, path)
    loaded = load_checkpoint(path)  # weights_only=True
    seed_everything(999)  # scramble every generator
    restore_rng_state(rng_state_from_checkpoint(loaded["rng"]))
    assert draws() == expected


def test_round_trip_without_cached_gaussians(tmp_path):
    seed_everything(8)
    state = capture_rng_state()
    expected = draws()
    atomic_save({"rng": rng_state_for_checkpoint(state)}, tmp_path / "a.pt")
    draws()
    restore_rng_state(rng_state_from_checkpoint(load_checkpoint(tmp_path / "a.pt")["rng"]))
    assert draws() == expected


def test_checkpoint_conversion_does_not_change_the_captured_state():
    state = capture_rng_state()
    python_before = state["python"]
    rng_state_for_checkpoint(state)
    assert state["python"] is python_before and isinstance(state["python"], tuple)
    assert isinstance(state["numpy"], tuple)


def test_environment_info_keys(tmp_path):
    info = environment_info(devices=["cpu"])
    assert "torch" in info["packages"]
    assert info["packages"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    build = info["torch_build"]
    assert build["version"] == torch.__version__
    assert {"cuda", "cudnn", "cuda_available"} <= set(build)
    assert {"commit", "dirty", "cwd"} <= set(info["git"])
    assert info["devices"] == ["cpu"]
    assert {"python", "platform", "argv", "gpus", "cpu_count"} <= set(info)

    path = tmp_path / "environment.json"
    write_environment(path, ["cpu"])
    written = json.loads(path.read_text())
    assert written["packages"]["torch"] == info["packages"]["torch"]


def test_environment_json_redacts_passwords_in_the_command_line(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["podium", "train", "tracking.uri=https://alice:s3cret@mlflow.example:5000"])
    write_environment(tmp_path / "environment.json", ["cpu"])
    text = (tmp_path / "environment.json").read_text()
    assert "s3cret" not in text
    assert json.loads(text)["argv"][-1] == "tracking.uri=https://alice:***@mlflow.example:5000"
