"""bench/bench_train.py --tiny runs end to end and reports both implementations."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_train_tiny(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_train.py"), "--tiny", "--steps", "2",
                           "--warmup", "1", "--resolution", "32", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"ours", "diffusers"}
    for r in report["results"].values():
        assert r["step_ms_median"] > 0 and len(r["step_ms_runs"]) == 2
    assert "ratio ours/ref" in proc.stdout
