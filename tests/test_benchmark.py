"""``benchmark``: FoundIR's folder layouts are detected, every task is restored and scored (before and
after) with the foundir protocol, reports come in the paper's task order, and --skip-existing resumes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tiny_files import random_lora
from vbridge_core.benchmark import FOUNDIR_TASKS, find_benchmark, limit_per_task, task_order
from vbridge_core.cli import main
from vbridge_core.errors import InputError
from vbridge_core.images import load_image, save_png
from vbridge_core.metrics import image_metrics


def _foundir(root: Path, tasks=("05Noise", "01Blur"), n: int = 2, side_by_side: bool = False) -> Path:
    g = torch.Generator().manual_seed(0)
    for t in tasks:
        for i in range(n):
            hq = torch.rand(3, 32, 32, generator=g)
            lq_dir, gt_dir = (root / "LQ" / t, root / "GT" / t) if side_by_side else (root / t / "LQ", root / t / "GT")
            save_png(hq, gt_dir / f"{i:04d}.png")
            save_png((hq * 0.7 + 0.1).clamp(0, 1), lq_dir / f"{i:04d}.png")
    return root


def test_layouts_and_order(tmp_path):
    layout, pairs = find_benchmark(_foundir(tmp_path / "a"))
    assert layout == "foundir" and [p.name for p in pairs] == ["01Blur/0000", "01Blur/0001", "05Noise/0000", "05Noise/0001"]
    layout, pairs2 = find_benchmark(_foundir(tmp_path / "b", side_by_side=True))
    assert layout == "foundir" and [p.name for p in pairs2] == [p.name for p in pairs]
    save_png(torch.rand(3, 32, 32), tmp_path / "c" / "denoise" / "lq" / "x.png")
    save_png(torch.rand(3, 32, 32), tmp_path / "c" / "denoise" / "hq" / "x.png")
    assert find_benchmark(tmp_path / "c")[0] == "pairs"
    assert [p.name for p in limit_per_task(pairs, 1)] == ["01Blur/0000", "05Noise/0000"]
    assert task_order(["zz", "10Rain", "01Blur"]) == ["01Blur", "10Rain", "zz"] and len(FOUNDIR_TASKS) == 20
    (tmp_path / "a" / "01Blur" / "GT" / "0001.png").unlink()
    with pytest.raises(InputError, match="without a partner"):
        find_benchmark(tmp_path / "a")


def test_benchmark_scores_before_and_after(tmp_path, tiny_model_dir):
    root = _foundir(tmp_path / "set", n=3)
    lora = random_lora(tmp_path / "r.safetensors", "restoration", 1)
    out = tmp_path / "out"
    args = ["benchmark", str(root), "--out", str(out), "--model", str(tiny_model_dir), "--lora", str(lora),
            "--steps", "1", "--limit", "2"]
    assert main(args) == 0
    rep = json.loads((out / "benchmark.json").read_text())
    assert list(rep["tasks"]) == ["01Blur", "05Noise"] and rep["tasks"]["01Blur"]["n"] == 2
    assert rep["world_size"] == 1 and rep["mean"]["n"] == 4 and rep["protocol"] == "foundir"
    img = rep["images"]["05Noise/0001"]
    x, y, q = (load_image(p) for p in (out / "05Noise" / "0001.png", root / "05Noise" / "GT" / "0001.png",
                                        root / "05Noise" / "LQ" / "0001.png"))
    # the scores are the foundir protocol's own (vbridge_core.metrics.image_metrics), per image
    after, before = image_metrics(x[None], y[None], "foundir"), image_metrics(q[None], y[None], "foundir")
    assert img["psnr"] == pytest.approx(float(after["psnr"]), abs=1e-9)
    assert img["ssim"] == pytest.approx(float(after["ssim"]), abs=1e-9)
    assert img["lq"]["psnr"] == pytest.approx(float(before["psnr"]), abs=1e-9)
    t = rep["tasks"]["05Noise"]
    assert t["psnr"] == pytest.approx((rep["images"]["05Noise/0000"]["psnr"] + img["psnr"]) / 2)
    assert rep["mean"]["psnr"] == pytest.approx((rep["tasks"]["01Blur"]["psnr"] + t["psnr"]) / 2)
    md = (out / "benchmark.md").read_text()
    assert md.index("01Blur") < md.index("05Noise") and "PSNR LQ" in md and "mean of 2 tasks" in md
    assert not (out / "05Noise" / "0002.png").exists()  # --limit 2
    before = (out / "01Blur" / "0000.png").stat().st_mtime_ns
    assert main(args + ["--skip-existing", "--protocol", "release"]) == 0
    rep2 = json.loads((out / "benchmark.json").read_text())
    assert (out / "01Blur" / "0000.png").stat().st_mtime_ns == before and rep2["restored_per_rank"] == [0]
    assert set(rep2["mean"]) >= {"psnr_y", "ssim_y", "psnr_rgb", "ssim_rgb"}
