"""Accuracy-stability trade-off of the causal stabilizers on a synthetic flickering clip.

Trains a controlled and a spatial stabilizer on clips synthesised from the shipped sample photos
(smooth random camera motion, Gaussian noise re-drawn per frame, simulated flickering restorer:
clean + a per-frame redrawn error), then scores none / EMA / controlled / spatial on held-out clips
from *other* photos: PSNR and SSIM against the clean clip, temporal stability (mean |o_t - o_{t-1}|,
all pixels and static pixels only), and the extra time per frame each stabilizer costs. The EMA
strength is chosen to match the controlled stabilizer's stability (bisection), plus fixed values.

    python bench/bench_stabilize.py [--steps 300] [--size 96] [--time-size 512] [--threads 1]

Prints a Markdown table (this is a bench script: printing is its job).
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vbridge_core import stabilize as S  # noqa: E402
from vbridge_core.images import load_image  # noqa: E402


def procedural_photo(seed: int, size: int = 192) -> torch.Tensor:
    """Gradients, discs and a striped band: edges that move under the camera motion."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    img = torch.stack([0.3 + 0.4 * xx, 0.3 + 0.4 * yy, 0.5 + 0.2 * (xx - yy)])
    for _ in range(8):
        cx, cy, r = torch.rand(3, generator=g)
        col = torch.rand(3, 1, 1, generator=g)
        m = ((xx - cx) ** 2 + (yy - cy) ** 2 < (0.04 + 0.12 * r) ** 2).float()
        img = img * (1 - m) + col * m
    stripes = (torch.sin(2 * math.pi * 9 * (xx + 0.5 * yy)) > 0).float()
    band = (yy > 0.75).float()
    return (img * (1 - band) + (0.2 + 0.6 * stripes) * band).clamp(0, 1)


def evaluate(stab, clips) -> dict[str, float]:
    rows = []
    for c in clips:
        out = S.stabilize_sequence(c.restored, stab, inputs=c.inputs)
        m = S.sequence_metrics(out, c.target)
        m["static"] = S.temporal_stability(out, mask="static", reference=c.target)
        rows.append(m)
    return {k: sum(r[k] for r in rows) / len(rows) for k in ("psnr", "ssim", "stability", "static")}


def time_per_frame(stab, size: int, frames: int = 12, repeats: int = 3) -> float:
    """Median seconds per stabilized frame (after the first) at ``size`` x ``size``, no grad."""
    z, x = torch.rand(frames, 3, size, size), torch.rand(frames, 3, size, size)
    best = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        S.stabilize_sequence(z, stab, inputs=x)
        best.append((time.perf_counter() - t0) / (frames - 1))
    return sorted(best[1:])[len(best[1:]) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--size", type=int, default=96, help="clip frame side")
    ap.add_argument("--time-size", type=int, default=512, help="frame side for the timing column")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stability-weight", type=float, default=0.4)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    train_photos = [load_image(p) for p in sorted(glob.glob(str(ROOT / "vbridge_core/assets/samples/*/hq/*.png")))]
    test_photos = [procedural_photo(s) for s in range(3)]
    train = S.synthesize_clips(train_photos, n_frames=10, seed=a.seed, degradation="gaussian_noise", size=a.size,
                               clips_per_photo=3)
    test = S.synthesize_clips(test_photos, n_frames=24, seed=a.seed + 100, degradation="gaussian_noise", size=a.size,
                              clips_per_photo=2)
    cfg = dict(steps=a.steps, stability_weight=a.stability_weight, crop=64, batch_size=4, hidden=24, clip_frames=5,
               seed=a.seed)
    t0 = time.perf_counter()
    ctrl = S.train_stabilizer(train, "controlled", **cfg)
    t_ctrl = time.perf_counter() - t0
    t0 = time.perf_counter()
    spat = S.train_stabilizer(train, "spatial", **cfg)
    t_spat = time.perf_counter() - t0

    evaluate(None, test)  # warm-up of the scoring path before the bisection
    s_target = evaluate(ctrl.stabilizer, test)["stability"]
    lo, hi = 0.02, 1.0
    for _ in range(20):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if evaluate(mid, test)["stability"] > s_target else (mid, hi)
    b_match = round(0.5 * (lo + hi), 3)
    stabs = {"none": None, "EMA b=0.5": 0.5, f"EMA b={b_match} (matched)": b_match, "EMA b=0.3": 0.3,
             "controlled": ctrl.stabilizer, "spatial (k=5)": spat.stabilizer}
    ref = {"psnr": float("inf"), "ssim": 1.0,
           "stability": sum(S.temporal_stability(c.target) for c in test) / len(test),
           "static": sum(S.temporal_stability(c.target, mask="static", reference=c.target) for c in test) / len(test)}
    rows = []
    for name, st in stabs.items():
        m = evaluate(st, test)
        ms = time_per_frame(st, a.time_size) * 1000 if st is not None else 0.0
        params = S.count_parameters(S.as_stabilizer(st)) if st is not None else 0
        rows.append((name, m, ms, params))
    print(f"| stabilizer | PSNR (dB) | SSIM (Y) | stability, all px (x1e-3) | stability, static px (x1e-3) | "
          f"extra ms/frame at {a.time_size}^2 | parameters |")
    print("|---|---|---|---|---|---|---|")
    for name, m, ms, params in rows:
        print(f"| {name} | {m['psnr']:.2f} | {m['ssim']:.4f} | {m['stability'] * 1e3:.2f} | {m['static'] * 1e3:.2f} | "
              f"{ms:.2f} | {params} |")
    print(f"| clean clip (real motion) | - | - | {ref['stability'] * 1e3:.2f} | {ref['static'] * 1e3:.2f} | - | - |")
    print(f"\ntraining: controlled {t_ctrl:.1f} s, spatial {t_spat:.1f} s ({a.steps} steps each, "
          f"{torch.get_num_threads()} thread(s)); test: {len(test)} clips x 24 frames at {a.size}^2")
    if a.json:
        Path(a.json).write_text(json.dumps({n: dict(m, ms_per_frame=ms, parameters=p) for n, m, ms, p in rows},
                                           indent=2))


if __name__ == "__main__":
    main()
