"""The benchmark scripts run end to end and write their JSON (those on the real ISBI and DRIVE
images: tests/test_benchmarks_images.py, a file of their own so that xdist can balance them).

Only the shape of the output is checked: keys present, numbers positive. Timing ratios are
never asserted here (a benchmark is not a timed unit test; shared machines are noisy).
"""

from __future__ import annotations

import json
import math
import os
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


MRI_SLICE = (BENCHMARKS.parent / ".." / "shared" / "data" / "mri" / "espirit_brain_8ch.mat").resolve()


@pytest.mark.slow
@pytest.mark.realdata
@pytest.mark.skipif(not MRI_SLICE.exists(), reason="../shared/data/mri not present")
def test_mri_real_slice_quick_writes_every_method(tmp_path):
    out = tmp_path / "out.json"
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "mri_real_slice.py"), "--quick", "--json", str(out),
         "--run-root", str(tmp_path / "runs"), "--override", f"data.cache_dir={tmp_path / 'cache'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads(out.read_text())
    figures = data["figures"]
    methods = ("zero_filled", "grappa", "sense_one_map", "sense_two_map", "cs_l1wavelet_two_map", "cs_tv_two_map",
               "cs_l1wavelet_one_map", "cs_l1wavelet_two_map_reference_tuned", "varnet_simulated",
               "varnet_simulated_flip_tta", "varnet_adapted")
    for method in methods:
        for acc in (4, 8):
            assert 0 < figures[f"{method}_acc{acc}"]["ssim"] <= 1
    # the protocol's floor, as ../shared/reference.md measured it
    assert abs(figures["zero_filled_acc4"]["ssim"] - 0.737) < 0.002
    assert abs(figures["zero_filled_acc8"]["ssim"] - 0.699) < 0.002
    # sigpy's two-map ESPIRiT + L1-wavelet beats zero filling even with the quick run's 10 iterations
    assert figures["cs_l1wavelet_two_map_acc4"]["ssim"] > figures["zero_filled_acc4"]["ssim"] + 0.02
    assert data["adaptation"]["acc4"]["steps_run"] == 2 and data["adaptation"]["acc4"]["val_loss"][0]["step"] == 0


@pytest.mark.slow
def test_varnet_memory_quick_writes_ratios(tmp_path):
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "varnet_memory.py"), "--quick", "--json", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads(out.read_text())
    for variant in ("plain", "checkpointing"):
        assert _positive(data["figures"][variant]["step_s"])
    assert _positive(data["time_ratio"]) and data["memory_ratio"] >= 0


@pytest.mark.slow
def test_channels_last_quick_times_every_family(tmp_path):
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "channels_last.py"), "--quick", "--json", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    cases = json.loads(out.read_text())["cases"]
    assert [c["case"].split()[0] for c in cases] == ["landmarks", "segmentation", "classification", "MRI"]
    for case in cases:
        assert all(_positive(case[k]) for k in ("nchw_ms", "nhwc_ms", "speedup"))
