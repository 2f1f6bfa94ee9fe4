"""Ensembles over saved predictions: of run folders (`RUN/predictions/<split>/` sets, combined
and re-scored with the runs' own task) or of classification CSVs (files teammates share).

    from podium.toolkit.ensemble import ensemble_runs, ensemble_csvs
    report = ensemble_runs(["runs/a", "runs/b"], "runs/ens", weights=[2, 1])   # -> runs/ens/ensemble.json
    ensemble_csvs(["alice.csv", "bob.csv"], "team.csv")                        # id,label[,prob_...]

Task-agnostic: a run's task is built through the registry from its own config and card, and
only its `score_predictions`, `monitor` and `monitor_mode` are used.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

import numpy as np

from podium.errors import UserError

REPORT = "ensemble.json"


# ---- run folders -------------------------------------------------------------------------------


def run_splits(run_dir: Path) -> list[str]:
    """The splits a run saved a prediction set for (folders with a manifest)."""
    root = Path(run_dir) / "predictions"
    return sorted(p.name for p in root.iterdir() if (p / "manifest.json").is_file()) if root.is_dir() else []


def _task_name(run_dir: Path) -> str:
    from podium.engine.runcard import read_card
    from podium.engine.runconfig import load_run_config

    card = read_card(run_dir)
    return str(card["task"]) if card is not None else str(load_run_config(run_dir).task.name)


def _scoring_task(run_dir: Path):
    """The run's task, ready to score saved sets; None when its family cannot score them."""
    from podium.engine.runcard import task_for_run
    from podium.engine.task import Task

    task = task_for_run(run_dir)
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
                  splits: Sequence[str] | None = None) -> dict:
    """Combine the runs' saved prediction sets per split, write them under OUT/predictions/<split>/,
    score members and ensemble with the first run's task, write OUT/ensemble.json; return it."""
    from podium.engine.predictions import combine, read_predictions
    from podium.engine.runs import existing_run_dir, write_json

    runs = [existing_run_dir(r) for r in run_dirs]
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
    available = [run_splits(r) for r in runs]
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

    scorer = _scoring_task(runs[0])
    report = {"members": [str(r) for r in runs], "task": tasks[0], "how": how, "weights": None, "splits": {}}
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


# ---- classification CSVs ---------------------------------------------------------------------------


def _read_csv(path: Path) -> tuple[list[str], dict[str, dict]]:
    """(prob columns, {id: row}) of a predictions CSV with an `id` (or eval's `index`) column."""
    if not path.is_file():
        raise UserError(f"{path}: no such CSV file.")
    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            fields = list(reader.fieldnames or [])
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"{path}: unreadable CSV ({e}).") from None
    key = "id" if "id" in fields else "index" if "index" in fields else None
    probs = [c for c in fields if c.startswith("prob_")]
    if key is None or (not probs and "label" not in fields):
        raise UserError(f"{path}: expected columns id,label[,prob_<class>...] (as podium predict writes), "
                        f"got {','.join(fields) or 'no header'}.")
    table: dict[str, dict] = {}
    for n, row in enumerate(rows, start=2):
        if row[key] in table:
            raise UserError(f"{path}, line {n}: id {row[key]!r} appears twice.")
        table[row[key]] = row
    return probs, table


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

