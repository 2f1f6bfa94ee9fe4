"""Seeding, RNG state capture/restore and environment capture.

A run is reproducible when every source of randomness is either seeded from `cfg.seed` or saved
in the checkpoint: python, numpy and torch (CPU and CUDA) generators are both. Data-loading
randomness does not depend on these global generators at all: each sample's augmentation is
seeded from (seed, epoch, index) (see `podium.engine.loading`), so it is the same whatever the
number of workers and wherever a resumed run restarts.
"""

from __future__ import annotations

import json
import os
import platform
import random
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from podium.common.redact import redact

PACKAGES = (
    "podium", "torch", "torchvision", "lightning", "timm", "hydra-core", "omegaconf", "mlflow",
    "numpy", "scikit-learn", "Pillow", "segmentation-models-pytorch", "monai", "onnxruntime",
)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS needs this workspace setting for deterministic matmuls.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def capture_rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(_as_python_state(state["python"]))
    np.random.set_state(_as_numpy_state(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_python_state(state):
    # A checkpoint loaded with weights_only=True returns lists where tuples were saved.
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def _as_numpy_state(state):
    name, keys, pos, has_gauss, cached = state
    return (name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached)


def rng_state_for_checkpoint(state: dict) -> dict:
    """Convert RNG states to types `torch.load(weights_only=True)` accepts."""
    name, keys, pos, has_gauss, cached = state["numpy"]
    out = dict(state)
    out["python"] = list(state["python"])
    out["python"][1] = list(state["python"][1])
    out["numpy"] = [name, torch.from_numpy(np.asarray(keys).astype(np.int64)), int(pos),
                    int(has_gauss), float(cached)]
    return out


def rng_state_from_checkpoint(state: dict) -> dict:
    out = dict(state)
    name, keys, pos, has_gauss, cached = state["numpy"]
    keys = keys.numpy().astype(np.uint32) if torch.is_tensor(keys) else np.asarray(keys, np.uint32)
    out["numpy"] = (name, keys, pos, has_gauss, cached)
    return out


def _git_commit(cwd: Path) -> dict:
    def git(*args):
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=5)

    try:
        commit = git("rev-parse", "HEAD")
        if commit.returncode != 0:
            return {"commit": None, "dirty": None}
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip() != ""
        return {"commit": commit.stdout.strip(), "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def environment_info(devices: list[str] | None = None) -> dict:
    """Everything needed to tell two runs' software apart (written to environment.json)."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    source_dir = Path(__file__).resolve().parents[3]
    cuda_ok = torch.cuda.is_available()
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "argv": redact(sys.argv),  # tracking.uri=https://user:password@... must not land on disk
        "git": _git_commit(source_dir) | {"cwd": _git_commit(Path.cwd())["commit"]},
        "packages": versions,
        "torch_build": {
            "version": torch.__version__,
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if cuda_ok else None,
            "cuda_available": cuda_ok,
        },
        "devices": devices or [],
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda_ok else [],
        "cpu_count": os.cpu_count(),
    }


def write_environment(path: Path, devices: list[str] | None = None) -> None:
    path.write_text(json.dumps(environment_info(devices), indent=2, default=str))
