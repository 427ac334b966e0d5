"""bench/bench_turbo.py --tiny on a minimal config: every method row is produced through the pipeline,
with its DiT call count, and the report has the shape the issue asks for."""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_turbo_minimal(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import bench_turbo
    finally:
        sys.path.remove(str(ROOT / "bench"))
    out = tmp_path / "turbo.json"
    rc = bench_turbo.main(["--tiny", "--teacher-steps", "1", "--student-steps", "1", "--calls", "2",
                           "--sample-steps", "3", "--train-pairs", "1", "--held-out", "1", "--start-sigma", "0.6",
                           "--threads", "1", "--json", str(out)])
    report = json.loads(out.read_text())
    assert rc == (0 if report["passed"] else 1)
    rows = report["rows"]
    assert {r["kind"] for r in rows} == {"teacher", "naive", "student", "start_from_lq", "cached"}
    calls = {(r["kind"], r["solver"]): r["dit_calls_per_image"] for r in rows}
    assert calls[("teacher", "unipc")] == 3 and calls[("cached", "unipc")] <= 3
    assert calls[("naive", "unipc")] == calls[("naive", "x0_renoise")] == calls[("student", "x0_renoise")] == 2
    for r in rows:
        assert r["seconds_per_image"] > 0 and r["latent_mse_to_teacher"] >= 0
        assert r["psnr_to_teacher_db"] is None if r["kind"] == "teacher" else r["psnr_to_teacher_db"] > 0
    student = next(r for r in rows if r["kind"] == "student")
    assert student["sigmas"] == [1.0, 0.5]  # the schedule came from the student's metadata (--preset turbo)
    assert [c["calls"] for c in report["checks"]] == [2]
