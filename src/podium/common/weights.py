"""Reading local weight files (nothing is ever downloaded at run time)."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from podium.errors import UserError

EXPECTED = ("a torch checkpoint or state_dict (.pt / .pth saved with torch.save, a podium "
            "checkpoints/*.pt) or a .safetensors file")


def _why(path: Path, err: Exception) -> str:
    # torch's own text for these failures advises weights_only=False (arbitrary code execution),
    # which is the wrong advice for a PNG given by mistake, so say what the file is instead.
    if path.suffix != ".safetensors" and zipfile.is_zipfile(path) and isinstance(err, pickle.UnpicklingError):
        return ("it holds pickled objects besides tensors (a whole model saved with torch.save(model)?); "
                "save model.state_dict() instead")
    if path.suffix != ".safetensors" and not zipfile.is_zipfile(path):
        with path.open("rb") as f:
            head = f.read(8)
        return f"it is not a file written by torch.save (it starts with {head!r})"
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def load_state_dict_file(path: Path, key: str = "model.weights") -> dict:
    """The tensors of a local weights file by name. Anything else — a missing file, an image, a
    text file, a pickled whole model, a bare tensor — is a UserError naming `key` and the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{key}={path}: file does not exist.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch / pickle / zip raise many types for a foreign file
        raise UserError(f"{key}={path}: cannot read it as {EXPECTED}: {_why(path, err)}.") from None
    for name in ("state_dict", "model"):  # podium checkpoints and common trainer formats
        if isinstance(state, dict) and name in state and isinstance(state[name], dict):
            state = state[name]
    if not isinstance(state, dict) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{key}={path}: holds {type(state).__name__}"
                        f"{' without tensors' if isinstance(state, dict) else ''}; expected {EXPECTED} "
                        "mapping parameter names to tensors.")
    return state
