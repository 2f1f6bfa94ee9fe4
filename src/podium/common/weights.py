"""Reading local weight files (nothing is ever downloaded at run time)."""

from __future__ import annotations

from pathlib import Path

import torch

from podium.errors import UserError


def load_state_dict_file(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"model.weights={path}: file does not exist.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):  # podium checkpoints and common trainer formats
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state
