"""benchmarks/serve_memory.py --quick runs end to end and writes its JSON (shape only: memory
figures are never asserted in a test), and the 7000 x 7000 upload is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "serve_memory.py"


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="reads /proc (Linux)")
def test_serve_memory_quick_writes_json(tmp_path, digits_run):
    out = tmp_path / "out.json"
    # the suite's 16 x 16 digits run (tests/conftest.py) instead of the script training its own
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--run-dir", str(digits_run), "--large", "2",
                           "--json", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads(out.read_text())
    assert data["benchmark"] == "serve_memory" and data["mode"] == "quick"
    figures = data["figures"]
    assert figures["idle"]["processes"] >= 2 and figures["idle"]["rss_mib"] > 0 and figures["idle"]["pss_mib"] > 0
    assert figures["large_statuses"] == [413, 413]  # over the default bound of a 16 x 16 model
