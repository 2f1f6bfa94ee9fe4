"""Ensembles over saved predictions: of run folders (`RUN/predictions/<split>/` sets, combined
and re-scored with the runs' own task) or of classification CSVs (files teammates share).

    from podium.toolkit.ensemble import ensemble_runs, ensemble_csvs
    report = ensemble_runs(["runs/a", "runs/b"], "runs/ens", weights=[2, 1])   # -> runs/ens/ensemble.json
    ensemble_runs(["runs/cv_a", "runs/cv_b"], "runs/ens", search="oof")       # weights fitted on OOF
    ensemble_csvs(["alice.csv", "bob.csv"], "team.csv")                        # id,label[,prob_...]

Members may be `podium cv` folders (fold runs + predictions/oof): `search="oof"` fits the
weights on their out-of-fold sets (podium.toolkit.weights says how) and applies them unchanged
to every other common split.

Task-agnostic: a run's task is built through the registry from its own config and card, and
only its `score_predictions`, `monitor` and `monitor_mode` are used.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

import numpy as np

from podium.errors import UserError

from podium.toolkit.sources import member_dir, model_run, run_splits
from podium.toolkit.sources import read_prediction_csv as _read_csv

REPORT = "ensemble.json"


# ---- run folders -------------------------------------------------------------------------------


def _task_name(run_dir: Path) -> str:
    from podium.engine.runcard import read_card
    from podium.engine.runconfig import load_run_config

    run_dir = model_run(run_dir) or run_dir  # a cv folder: its fold runs' task
    card = read_card(run_dir)
    return str(card["task"]) if card is not None else str(load_run_config(run_dir).task.name)


def _scoring_task(run_dir: Path):
    """The run's task, ready to score saved sets; None when its family cannot score them."""
    from podium.engine.runcard import task_for_run
    from podium.engine.task import Task

    task = task_for_run(model_run(run_dir) or run_dir)
    return None if type(task).score_predictions is Task.score_predictions else task


def main_metric(task, scores: dict) -> tuple[str, str] | None:
    """(metric, "max" | "min"): the task's monitor without its `val/` prefix when the scores hold
    it, else the first score (higher is better unless its name says loss or error)."""
    if not scores:
        return None
    name = str(getattr(task, "monitor", "")).removeprefix("val/")
    if name in scores:
        return name, str(getattr(task, "monitor_mode", "max"))
    name = next(iter(scores))
    return name, "min" if any(w in name for w in ("loss", "error", "mre")) else "max"


def ensemble_runs(run_dirs: Sequence, out_dir, weights: Sequence[float] | None = None, how: str = "mean",
                  splits: Sequence[str] | None = None, search: str | None = None) -> dict:
    """Combine the runs' saved prediction sets per split, write them under OUT/predictions/<split>/,
    score members and ensemble with the first run's task, write OUT/ensemble.json; return it.
    search="oof": fit the weights on the members' out-of-fold sets (RUN/predictions/oof, which
    `podium cv` writes) and apply them to every other common split (report["search"])."""
    from podium.engine.predictions import combine, read_predictions
    from podium.engine.runs import write_json

    runs = [member_dir(r) for r in run_dirs]
    if len(runs) < 2:
        raise UserError(f"an ensemble needs at least two runs, got {len(runs)}.")
    out_dir = Path(out_dir)
    if any(out_dir.resolve() == r.resolve() for r in runs):
        raise UserError(f"--out {out_dir} is one of the members; write the ensemble to a new folder.")
    if weights is not None and len(weights) != len(runs):
        raise UserError(f"{len(weights)} weights {list(weights)} for {len(runs)} runs; give one weight per run.")
    tasks = [_task_name(r) for r in runs]
    for run, task in zip(runs[1:], tasks[1:]):
        if task != tasks[0]:
            raise UserError(f"cannot ensemble {runs[0]} (task {tasks[0]}) with {run} (task {task}): "
                            "members must be runs of one task.")
    if search not in (None, "oof"):
        raise UserError(f"--search {search!r}: the weights are searched on out-of-fold predictions only (--search oof).")
    if search and weights is not None:
        raise UserError("give either --weights or --search oof, not both.")
    available = [run_splits(r) for r in runs]
    scorer = _scoring_task(runs[0])
    searched = _search_oof(runs, available, scorer, how) if search else None
    if searched is not None:
        weights = searched["weights"]
        available = [[s for s in have if s != "oof"] for have in available]  # the weights were fitted there
    if splits:
        for split in splits:
            for run, have in zip(runs, available):
                if split not in have:
                    raise UserError(f"{run} has no saved predictions for split {split!r} "
                                    f"({run / 'predictions' / split} is missing; it has: {', '.join(have) or 'none'}).")
        chosen = list(splits)
    else:
        chosen = [s for s in available[0] if all(s in have for have in available[1:])]
        if not chosen:
            raise UserError("the runs share no saved prediction split: " + "; ".join(
                f"{r}/predictions: {', '.join(h) or 'none'}" for r, h in zip(runs, available)))

    report = {"members": [str(r) for r in runs], "task": tasks[0], "how": how, "weights": None, "splits": {}}
    if searched is not None:
        report["search"] = searched
    for split in chosen:
        sets = [read_predictions(r / "predictions" / split) for r in runs]
        for run, s in zip(runs[1:], sets[1:]):
            if s.kind != sets[0].kind:
                raise UserError(f"cannot ensemble {runs[0]} ({sets[0].kind}) with {run} ({s.kind}) "
                                f"on split {split}: members must save one kind of prediction.")
        combined = combine(sets, weights, how)
        report["weights"] = combined.manifest["weights"]  # normalised
        folder = out_dir / "predictions" / split
        combined.write(folder)
        entry = {"kind": sets[0].kind, "predictions": str(folder), "members": {}, "ensemble": None}
        if scorer is not None:
            entry["members"] = {str(r): scorer.score_predictions(s, split) for r, s in zip(runs, sets)}
            entry["ensemble"] = scorer.score_predictions(read_predictions(folder), split)  # what was written
            entry.update(_gain(scorer, entry["members"], entry["ensemble"]))
        report["splits"][split] = entry
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / REPORT, report)
    return report


def _gain(task, members: dict[str, dict], ensemble: dict) -> dict:
    """The main metric, the best member on it and the ensemble's gain (positive = better)."""
    found = main_metric(task, ensemble)
    if found is None:
        return {}
    name, mode = found
    values = {run: float(s[name]) for run, s in members.items() if name in s}
    if not values:
        return {"main_metric": name, "mode": mode}
    best = (max if mode == "max" else min)(values, key=values.get)
    gain = float(ensemble[name]) - values[best]
    return {"main_metric": name, "mode": mode, "best_member": best, "gain": gain if mode == "max" else -gain}


# ---- weights searched on out-of-fold predictions ---------------------------------------------------


def _search_oof(runs: list[Path], available: list[list[str]], scorer, how: str) -> dict:
    """Fit the members' weights on their OOF sets (podium.toolkit.weights); report the searched
    and the equal weights' OOF scores: the main metric, and the log-loss for class_probs."""
    from podium.engine.predictions import combine, read_predictions
    from podium.toolkit import weights as search

    for run, have in zip(runs, available):
        if "oof" not in have:
            raise UserError(f"{run} has no out-of-fold predictions ({run / 'predictions' / 'oof'} is missing; "
                            f"it has: {', '.join(have) or 'none'}): make the members with `podium cv`.")
    sets = [read_predictions(r / "predictions" / "oof") for r in runs]
    equal = combine(sets, None, how)  # also checks the members fit together (kind, ids, truth)
    first, m = sets[0], len(sets)

    def metric(w) -> tuple[str, str, float] | None:
        if scorer is None:
            return None
        scores = scorer.score_predictions(combine(sets, w, how), "oof")
        found = main_metric(scorer, scores)
        return None if found is None else (*found, float(scores[found[0]]))

    report = {"on": "oof", "fitted_on": "out-of-fold predictions only (RUN/predictions/oof); the other splits "
              "take the weights unchanged, so their scores are not fitted", "count": len(first.ids)}
    if first.kind == "class_probs" and how == "mean":
        labels_name = next((n for n in first.arrays if first.role(n) == "truth"), None)
        probs_name = next((n for n in first.arrays if first.role(n) == "prediction"), None)
        if labels_name is None or probs_name is None:
            raise UserError(f"{first.folder}: an OOF set needs the probabilities and the true labels to fit weights.")
        rows = [[s.row(i) for i in first.ids] for s in sets]
        probs = [np.asarray(s.arrays[probs_name])[np.asarray(r, dtype=np.int64)] for s, r in zip(sets, rows)]
        labels = np.asarray(first.arrays[labels_name], dtype=np.int64)
        w = search.search_log_loss(probs, labels)
        true_probs = search.true_class_probs(probs, labels)
        report.update(method="scipy SLSQP on the simplex, equal weights + 5 Dirichlet restarts", objective="log_loss")
        report["equal"] = {"log_loss": search.log_loss(true_probs, np.full(m, 1.0 / m))}
        report["searched"] = {"log_loss": search.log_loss(true_probs, w)}
        report["members"] = {str(r): {"log_loss": search.log_loss(true_probs, np.eye(m)[k])} for k, r in enumerate(runs)}
    else:
        if scorer is None:
            raise UserError(f"the {runs[0]} task cannot score saved predictions, so no weights can be searched "
                            "for its kind; give --weights.")
        name, mode, _ = metric(equal.manifest["weights"])
        w, trace = search.greedy_selection(m, lambda w: metric(w)[2], mode)
        report.update(method="greedy ensemble selection with replacement (Caruana et al. 2004), 20 steps",
                      objective=name, mode=mode, trace=trace)
        report["equal"], report["searched"], report["members"] = {}, {}, {str(r): {} for r in runs}
    for key, value in (("equal", np.full(m, 1.0 / m)), ("searched", w)):
        found = metric(value)
        if found is not None:
            report[key][found[0]] = found[2]
            report["main_metric"], report["mode"] = found[0], found[1]
    for k, r in enumerate(runs):
        found = metric(np.eye(m)[k])
        if found is not None:
            report["members"][str(r)][found[0]] = found[2]
    report["weights"] = [float(x) for x in w]
    return report


# ---- classification CSVs ---------------------------------------------------------------------------


def ensemble_csvs(csv_files: Sequence, out_file, weights: Sequence[float] | None = None) -> dict:
    """Average classification CSVs by id (prob_<class> columns, weighted) or, when they hold labels
    only, take the weighted majority vote of `label`: a tie goes to the earliest file's label among
    the tied ones (the first file's when it is tied). Writes id,label[,prob_...] in the first
    file's row order; returns a small report."""
    files = [Path(p) for p in csv_files]
    if len(files) < 2:
        raise UserError(f"an ensemble needs at least two CSV files, got {len(files)}.")
    w = np.ones(len(files)) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (len(files),) or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise UserError(f"ensemble weights {weights!r}: expected {len(files)} non-negative numbers, not all zero.")
    w = w / w.sum()
    tables = [_read_csv(p) for p in files]
    cols, first = tables[0]
    for path, (c, table) in zip(files[1:], tables[1:]):
        if c != cols:
            raise UserError(f"cannot ensemble {files[0]} and {path}: different class columns "
                            f"({','.join(cols) or 'labels only'} vs {','.join(c) or 'labels only'}).")
        if set(table) != set(first):
            only_a, only_b = sorted(set(first) - set(table)), sorted(set(table) - set(first))
            raise UserError(f"cannot ensemble {files[0]} and {path}: different ids (only in the first: "
                            f"{only_a[:5]} ({len(only_a)}); only in the second: {only_b[:5]} ({len(only_b)})).")
    ids = list(first)
    classes = [c.removeprefix("prob_") for c in cols]
    if cols:
        stacked = np.stack([_probs(path, table, ids, cols) for path, (_, table) in zip(files, tables)])
        mean = np.tensordot(w, stacked, axes=1)
        labels = [classes[i] for i in mean.argmax(axis=1)]
        member_labels = [[classes[i] for i in s.argmax(axis=1)] for s in stacked]
    else:
        member_labels = [[table[i]["label"] for i in ids] for _, table in tables]
        labels = [_vote([m[r] for m in member_labels], w) for r in range(len(ids))]
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    with out_file.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "label", *cols])
        for r, id_ in enumerate(ids):
            writer.writerow([id_, labels[r], *([f"{p:.6f}" for p in mean[r]] if cols else [])])
    agreement = {str(p): float(np.mean([a == b for a, b in zip(m, labels)])) if ids else 1.0
                 for p, m in zip(files, member_labels)}
    return {"members": [str(p) for p in files], "weights": w.tolist(), "how": "mean" if cols else "vote",
            "rows": len(ids), "classes": classes, "agreement": agreement, "out": str(out_file)}


def _probs(path: Path, table: dict, ids: list[str], cols: list[str]) -> np.ndarray:
    try:
        return np.array([[float(table[i][c]) for c in cols] for i in ids], dtype=np.float64)
    except (TypeError, ValueError):
        bad = next(i for i in ids if not all(_is_number(table[i][c]) for c in cols))
        raise UserError(f"{path}: id {bad!r} has a probability that is not a number.") from None


def _is_number(text) -> bool:
    try:
        float(text)
        return True
    except (TypeError, ValueError):
        return False


def _vote(labels: list[str], w: np.ndarray) -> str:
    totals: dict[str, float] = {}
    for label, weight in zip(labels, w):
        totals[label] = totals.get(label, 0.0) + float(weight)
    top = max(totals.values())
    # dict order is first-seen order, so a tie goes to the earliest file's label
    return next(label for label, total in totals.items() if np.isclose(total, top))

