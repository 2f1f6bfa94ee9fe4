"""Reconstruction models, registered under kind "model" when this package is imported:
"varnet" (E2E-VarNet, varnet.py) and "fivarnet" (FI-VarNet, fivarnet.py), both built from the
normalised U-Net (unet.py) with optional LSKA attention (lska.py).

Every factory is `factory(cfg, **context)`; every model takes (masked k-space (B, coils, H, W,
2), mask (B, 1, 1, W, 1), num_low_frequencies (B,) or None), returns the (B, H, W) RSS image,
and has `set_grad_checkpointing(enable)` and `sens_maps(...)`.
"""

from podium.tasks.reconstruction.models import fivarnet, lska, unet, varnet  # noqa: F401
