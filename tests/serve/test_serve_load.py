"""benchmarks/serve_load.py --quick runs end to end and writes its JSON (shape only: timings
are never asserted in a test)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "serve_load.py"


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


@pytest.mark.slow
def test_serve_load_quick_writes_json(tmp_path, digits_run):
    out = tmp_path / "out.json"
    # the suite's digits run (tests/conftest.py) instead of the script training its own, and
    # fewer clients and requests than --quick's 8 x 80 per round: enough for every figure
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--run-dir", str(digits_run), "--clients", "4",
                           "--requests", "24", "--json", str(out)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "batched" in proc.stdout and "batch1" in proc.stdout  # the table (it wraps in narrow terminals)

    data = json.loads(out.read_text())
    assert data["benchmark"] == "serve_load" and data["mode"] == "quick"
    assert data["run"]["model"] == "small_cnn" and data["run"]["input"] == [3, 16, 16]
    assert _positive(data["run"]["parameters"])
    for variant, batch in (("batched", 8), ("batch1", 1)):
        figures = data["figures"][variant]
        assert figures["max_batch_size"] == batch
        for key in ("requests_per_s", "p50_ms", "p95_ms", "p99_ms", "burst_10_s"):
            assert _positive(figures[key]), (variant, key, figures[key])
        assert figures["p50_ms"] <= figures["p95_ms"] <= figures["p99_ms"]
        assert len(data["per_round"][variant]) == data["rounds"] == 2
    for key in ("throughput", "p50", "p99"):
        assert _positive(data["ratios"][key]), key
    budget = data["seed_budget"]
    assert budget["images"] == 10 and budget["limit_s"] == 1.0 and isinstance(budget["holds"], bool)
    assert isinstance(data["goal"]["met"], bool)
    assert data["machine"]["cpu_count"] >= 1


def test_the_scripts_own_training_flags_compose():
    """Without --run-dir the serving benchmarks train a digits run; the test above hands them the
    suite's run instead, so their own flags are checked here (composed and validated, not run)."""
    import importlib.util

    from podium.config import compose

    for name in ("serve_load", "serve_memory"):
        spec = importlib.util.spec_from_file_location(f"bench_{name}", SCRIPT.parent / f"{name}.py")
        script = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(script)
        quick = script.TRAIN_QUICK + script.TRAIN_COMMON if name == "serve_load" else script.TRAIN + script.QUICK
        cfg = compose(quick)
        assert cfg.task.name == "classification" and int(cfg.data.image_size) == 16
