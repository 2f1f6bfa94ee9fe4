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
    # Triton runs by default wherever its environment exists (the triton tests build it); else
    # the JSON says why it was left out
    engines = ["litserve", "triton"] if data["triton_skipped"] is None else ["litserve"]
    assert data["engines"] == engines
    assert set(data["figures"]) == {f"{e}_{v}" for e in engines for v in ("batched", "batch1")}
    for variant, figures in data["figures"].items():
        assert figures["max_batch_size"] == (8 if variant.endswith("_batched") else 1)
        for key in ("requests_per_s", "p50_ms", "p95_ms", "p99_ms", "burst_10_s"):
            assert _positive(figures[key]), (variant, key, figures.get(key))
        assert figures["p50_ms"] <= figures["p95_ms"] <= figures["p99_ms"]
        # CPU from /proc counts 10 ms ticks: 24 requests to Triton may read 0; LitServe's never do
        assert figures["cpu_resolution_ms_per_request"] == pytest.approx(1e3 / os.sysconf("SC_CLK_TCK") / 24)
        assert figures["cpu_ms_per_request_total"] >= 0 and figures["cpu_ms_per_request_total"] == pytest.approx(
            figures["cpu_ms_per_request_front"] + figures["cpu_ms_per_request_model"])
        if variant.startswith("litserve"):
            assert figures["cpu_ms_per_request_total"] > 0
        assert len(data["per_round"][variant]) == data["rounds"] == 2
        if variant.startswith("triton"):  # the clients' tensors are what the model takes
            assert figures["max_abs_difference_to_onnxruntime"] <= 1e-4
    pairs = ["litserve_batched/litserve_batch1"] + (["triton_batched/triton_batch1", "triton_batched/litserve_batched",
                                                     "triton_batch1/litserve_batch1"] if "triton" in engines else [])
    assert list(data["ratios"]) == pairs
    for pair in pairs:
        for key in ("throughput", "p50", "p99"):
            assert _positive(data["ratios"][pair][key]), (pair, key)
        assert data["ratios"][pair].get("cpu_per_request", 0) >= 0  # absent where B read 0 ticks
    budget = data["seed_budget"]
    assert budget["images"] == 10 and budget["limit_s"] == 1.0 and isinstance(budget["holds"], bool)
    assert set(budget["per_engine"]) == set(engines)
    assert isinstance(data["goal"]["met"], bool) and ("triton_cpu" in data["goal"]) == ("triton" in engines)
    assert data["machine"]["cpu_count"] >= 1


@pytest.mark.parametrize("engines, message", [("litserve,tf-serving", "unknown tf-serving"),
                                              ("triton", "Triton serves the ONNX export")])
def test_bad_engines_exit_2_before_any_work(tmp_path, engines, message):
    """An unknown engine, or Triton with LitServe's torch backend: refused before training."""
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--engines", engines, "--backend", "torch"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert list(tmp_path.iterdir()) == []


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
