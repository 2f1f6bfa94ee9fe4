"""Figures for reconstruction: target, reconstruction and error map side by side."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from podium.common.plots import new_figure, save_figure


def plot_reconstruction(target: np.ndarray, recon: np.ndarray, path: Path, *, title: str = "",
                        data_range: float | None = None, zero_filled: np.ndarray | None = None,
                        target_label: str = "target") -> Path:
    """Target | (zero-filled) | reconstruction | |error| (x5, same grey scale as the images)."""
    vmax = float(data_range or target.max())
    panels = [(target_label, target)]
    if zero_filled is not None:
        panels.append(("zero-filled", zero_filled))
    panels += [("reconstruction", recon), (f"|difference to {target_label}| x 5", np.abs(recon - target) * 5)]
    fig = new_figure((3.2 * len(panels), 3.6))
    for i, (name, image) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        ax.imshow(image, cmap="gray" if "difference" not in name else "inferno", vmin=0, vmax=vmax)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)
