"""Data-parallel restore: two CPU processes under torchrun (gloo) give exactly the outputs of a
one-process run, rank 0 writes one merged settings file, and ``--skip-existing`` resumes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tiny_files import random_lora
from vbridge_core.cli import main
from vbridge_core.images import save_png
from vbridge_core.parallel import split_by_cost

ROOT = Path(__file__).resolve().parents[1]


def test_split_by_cost_is_balanced_and_complete():
    costs = [100, 1, 50, 50, 30, 20, 99]
    shares = split_by_cost(costs, 3)
    assert sorted(i for s in shares for i in s) == list(range(len(costs)))
    loads = [sum(costs[i] for i in s) for s in shares]
    assert max(loads) - min(loads) <= max(costs)
    assert split_by_cost(costs, 3) == shares and split_by_cost(costs, 1) == [list(range(len(costs)))]
    assert split_by_cost([5], 2) == [[0], []]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("dp")
    g = torch.Generator().manual_seed(3)
    for name, (h, w) in {"a": (32, 32), "b": (64, 32), "c": (32, 48)}.items():
        save_png(torch.rand(3, h, w, generator=g), d / "in" / f"{name}.png")
    return d, random_lora(d / "r.safetensors", "restoration", 1), random_lora(d / "d.safetensors", "drift_correction", 2)


def _args(model, d, lora, drift, out, *extra):
    return ["restore", str(d / "in"), "--out", str(out), "--model", str(model), "--lora", str(lora),
            "--drift-lora", str(drift), "--steps", "2", "--drift-steps", "1", "--seed", "7", *extra]


def _pixels(p: Path) -> np.ndarray:
    return np.asarray(Image.open(p))


def test_two_processes_equal_one_and_resume(tmp_path, tiny_model_dir, setup, monkeypatch):
    d, lora, drift = setup
    one, two = tmp_path / "one", tmp_path / "two"
    torch.set_num_threads(1)  # the same intra-op threading as each torchrun process (OMP_NUM_THREADS=1)
    try:
        assert main(_args(tiny_model_dir, d, lora, drift, one)) == 0
    finally:
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(29600 + os.getpid() % 1000), "-m", "vbridge_core",
                           *_args(tiny_model_dir, d, lora, drift, two)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "restore: 100%" in proc.stderr and " 9/9 " in proc.stderr  # one bar on rank 0: 3 images x (2 + 1) steps
    for name in ("a", "b", "c"):
        for suffix in ("", "_base"):
            assert np.array_equal(_pixels(one / f"{name}{suffix}.png"), _pixels(two / f"{name}{suffix}.png")), name
    s = json.loads((two / "vbridge_settings.json").read_text())
    assert s["world_size"] == 2 and sum(s["images_per_rank"]) == 3 and min(s["images_per_rank"]) >= 1
    assert sorted(n for r in s["ranks"] for n in r["images"]) == ["a", "b", "c"]
    assert [r["rank"] for r in s["ranks"]] == [0, 1] and s["restore_info"]["images"] == 3
    # resume: only the missing image is restored again, with its own seed (in this process, with its
    # default thread count, so float reduction order may move a pixel value by one level)
    (two / "b.png").unlink()
    assert main(_args(tiny_model_dir, d, lora, drift, two, "--skip-existing")) == 0
    s = json.loads((two / "vbridge_settings.json").read_text())
    assert s["world_size"] == 1 and s["skipped"] == 2 and s["restore_info"]["images"] == 1
    assert np.abs(_pixels(one / "b.png").astype(int) - _pixels(two / "b.png").astype(int)).max() <= 1


def test_restore_video_by_clip(tmp_path, tiny_model_dir, setup):
    d, lora, _ = setup
    g = torch.Generator().manual_seed(5)
    for clip in ("c1", "c2"):
        for k in range(2):
            save_png(torch.rand(3, 32, 32, generator=g), tmp_path / "clips" / clip / f"f{k}.png")
    base = ["--model", str(tiny_model_dir), "--lora", str(lora), "--steps", "1", "--ema", "0.5"]
    assert main(["restore-video", str(tmp_path / "clips"), "--out", str(tmp_path / "all"), *base]) == 0
    assert main(["restore-video", str(tmp_path / "clips" / "c2"), "--out", str(tmp_path / "single"), *base]) == 0
    for k in range(2):
        assert np.array_equal(_pixels(tmp_path / "all" / "c2" / f"f{k}.png"), _pixels(tmp_path / "single" / f"f{k}.png"))
    s = json.loads((tmp_path / "all" / "vbridge_video_settings.json").read_text())
    assert s["world_size"] == 1 and s["clips_per_rank"] == [2] and sorted(s["info"]) == ["c1", "c2"]
    before = (tmp_path / "all" / "c1" / "f0.png").stat().st_mtime_ns
    assert main(["restore-video", str(tmp_path / "clips"), "--out", str(tmp_path / "all"), "--skip-existing", *base]) == 0
    assert (tmp_path / "all" / "c1" / "f0.png").stat().st_mtime_ns == before
    assert json.loads((tmp_path / "all" / "vbridge_video_settings.json").read_text())["ranks"][0]["skipped"] == ["c1", "c2"]
