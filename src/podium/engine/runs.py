"""Run folders: creation, the files the design page promises, and listing for `podium runs`.

    runs/20261124-101500-digits/
      config.yaml  environment.json  metrics.json  history.csv
      checkpoints/{last,best}.pt  plots/*.png  predictions/
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

from podium.errors import UserError


def new_run_dir(root: str, name: str | None, experiment: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(root) / (name or f"{stamp}-{experiment}")
    path, n = base, 1
    while path.exists():  # two runs started in the same second
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def existing_run_dir(path: str | Path) -> Path:
    path = Path(path)
    if not (path / "config.yaml").is_file():
        raise UserError(f"{path} is not a podium run folder (no config.yaml inside).")
    return path


def write_json(path: Path, data) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=float))
    tmp.replace(path)


def write_history(path: Path, rows: list[dict]) -> None:
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def find_runs(root: Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    found = {p.parent for p in root.rglob("config.yaml") if "mlartifacts" not in p.parts}
    return sorted(found, key=lambda p: p.stat().st_mtime)


def run_summary(path: Path) -> dict:
    """{"run", "status", "metrics"}; a metrics.json that is not a JSON object of metrics (a
    half-written or hand-edited file) gives status "unreadable metrics" and a "problem" naming
    the file, so one broken run never hides the others from `podium runs`."""
    metrics_file = path / "metrics.json"
    metrics, problem = {}, None
    if metrics_file.is_file():
        try:
            metrics = json.loads(metrics_file.read_text())
            if not isinstance(metrics, dict):
                problem = f"{metrics_file}: expected a JSON object of metrics, got {type(metrics).__name__}"
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            problem = f"{metrics_file}: not valid JSON ({err})"
    if problem:
        return {"run": str(path), "status": "unreadable metrics", "metrics": {}, "problem": problem}
    status = "finished" if metrics else ("resumable" if (path / "checkpoints/last.pt").is_file() else "incomplete")
    return {"run": str(path), "status": status, "metrics": metrics}
