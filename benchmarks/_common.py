"""Small helpers shared by the scripts in benchmarks/: arguments, statistics, output.

Every benchmark script takes the same two options:

    --quick      smaller sizes, fewer rounds (a smoke run: seconds, not minutes)
    --json OUT   also write the figures to OUT as JSON (folders are created)

and prints its figures as one rich table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Iterable, Sequence

from rich.console import Console
from rich.table import Table


def make_parser(description: str | None) -> argparse.ArgumentParser:
    """A parser with the common --quick and --json options; scripts add their own."""
    parser = argparse.ArgumentParser(
        description=(description or "").strip().splitlines()[0] if description else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true",
                        help="smaller sizes and fewer rounds (a smoke run)")
    parser.add_argument("--json", metavar="OUT", type=Path, default=None,
                        help="also write the figures to this JSON file")
    return parser


def median(values: Iterable[float]) -> float:
    values = list(values)
    if not values:
        raise ValueError("median of no values: the benchmark measured nothing")
    return float(statistics.median(values))


def machine_info() -> dict:
    """What the figures depend on: CPUs, threads, versions."""
    import torch

    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
    }


def print_table(title: str, columns: Sequence[str], rows: Iterable[Sequence[object]],
                caption: str | None = None, console: Console | None = None) -> None:
    """One rich table on stdout; the first column is left-aligned, the others right-aligned.
    A row that is None draws a section line."""
    table = Table(title=title, caption=caption)
    for i, name in enumerate(columns):
        table.add_column(name, justify="left" if i == 0 else "right")
    for row in rows:
        if row is None:
            table.add_section()
            continue
        table.add_row(*[str(cell) for cell in row])
    (console or Console()).print(table)


def write_json(path: Path | None, data: dict) -> Path | None:
    """Write `data` as JSON to `path` (no --json given: nothing to write)."""
    if path is None:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=float) + "\n")
    return path
