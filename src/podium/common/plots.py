"""Figures for every task family: drawn on an Agg canvas with matplotlib's object API, so that
plotting never touches pyplot's global state or needs a display (matplotlib is imported
inside, keeping module imports light)."""

from __future__ import annotations

from pathlib import Path


def new_figure(figsize: tuple[float, float]):
    """A Figure bound to an Agg canvas, independent of pyplot and of the global backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path
