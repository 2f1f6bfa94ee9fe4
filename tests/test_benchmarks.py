"""The benchmark scripts run end to end and write their JSON.

Only the shape of the output is checked: keys present, numbers positive. Timing ratios are
never asserted here (a benchmark is not a timed unit test; shared machines are noisy).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

STEP_KEYS = ("trainer_median_ms", "plain_median_ms", "ratio", "goal", "data_wait_share", "steps", "rounds")
DATA_KEYS = ("defaults_samples_per_s", "workers0_samples_per_s", "ratio", "num_workers_default")


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


@pytest.mark.slow
def test_trainer_overhead_quick_writes_json(tmp_path):
    out = tmp_path / "out.json"
    # --quick with the hidden --tiny sizes: the quick run itself takes about a minute.
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "trainer_overhead.py"), "--quick", "--tiny", "--json", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "ratio Trainer / plain" in proc.stdout

    data = json.loads(out.read_text())
    assert {"machine", "step_time", "data_loading"} <= set(data)
    machine = data["machine"]
    assert machine["cpu_count"] >= 1 and machine["torch"]

    step = data["step_time"]
    for key in STEP_KEYS:
        assert key in step, key
    for key in ("trainer_median_ms", "plain_median_ms", "ratio", "goal", "steps", "rounds"):
        assert _positive(step[key]), (key, step[key])
    assert 0 <= step["data_wait_share"] < 1
    assert isinstance(step["steps"], int) and isinstance(step["rounds"], int)

    loading = data["data_loading"]
    for key in DATA_KEYS:
        assert key in loading, key
    for key in ("defaults_samples_per_s", "workers0_samples_per_s", "ratio"):
        assert _positive(loading[key]), (key, loading[key])
    assert isinstance(loading["num_workers_default"], int) and loading["num_workers_default"] >= 0
