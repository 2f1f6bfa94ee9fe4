"""The sweep's pictures, drawn by Optuna's matplotlib backend (optuna.visualization.matplotlib).

    podium sweep experiment=digits sweep.trials=8 'sweep.space={optim.lr: {type: float, low: 1e-4, high: 1e-2, log: true}}'
    # -> <sweep>/plots/history.png, importance.png, parallel.png

Parameter importance (fANOVA over the finished trials) needs at least two completed trials; the
parallel-coordinate plot one completed trial with parameters; a plot that cannot be drawn yet is
left out (and said so), never an error.
"""

from __future__ import annotations

import warnings
from pathlib import Path


def _complete(study) -> list:
    import optuna

    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))


def write_plots(study, folder: Path) -> dict[str, str]:
    """{"history": path, "importance": path, "parallel": path} for the plots that could be drawn;
    skipped ones map to the reason."""
    import matplotlib

    matplotlib.use("Agg")  # files only: never open a window, never need a display
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    complete = _complete(study)
    with_params = [t for t in complete if t.params]
    plots = {
        "history": (ovm.plot_optimization_history, None if complete else "no completed trial yet"),
        "importance": (ovm.plot_param_importances,
                       None if len(with_params) >= 2 else "parameter importance needs 2 completed trials"),
        "parallel": (ovm.plot_parallel_coordinate, None if with_params else "no completed trial with parameters"),
    }
    written: dict[str, str] = {}
    for name, (draw, skip) in plots.items():
        if skip:
            written[name] = f"skipped: {skip}"
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ExperimentalWarning: the matplotlib backend's API may change
            try:
                ax = draw(study)
            except (ValueError, RuntimeError) as err:  # e.g. importance of a parameter with one value
                written[name] = f"skipped: {err}"
                continue
        figure = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
        figure.set_size_inches(8, 5)
        figure.tight_layout()
        path = folder / f"{name}.png"
        figure.savefig(path, dpi=100)
        plt.close(figure)
        written[name] = str(path)
    return written
