"""bench/bench_restore.py --tiny runs end to end: both implementations timed, final frames agree."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_restore_tiny(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_restore.py"), "--tiny", "--steps", "2",
                           "--runs", "1", "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    results = report["results"]
    assert set(results) == {"ours", "diffusers"}
    for name, r in results.items():
        assert r["seconds_median"] > 0, name
        assert len(r["seconds_runs"]) == 1
        assert r["peak_memory_gb"] >= 0
    assert report["config"]["steps"] == 2 and report["config"]["device"] == "cpu"
    assert report["max_abs_diff_final"] <= 1e-4
    assert report["ratio_ours_over_diffusers"]["seconds"] > 0
    # the table is printed to stdout
    assert "ratio ours/ref" in proc.stdout and "diffusers (ref)" in proc.stdout


def test_bench_restore_cuda_missing_is_a_clear_error():
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is present: the missing-CUDA error cannot be shown here")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_restore.py"), "--device", "cuda"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "CUDA" in proc.stderr
