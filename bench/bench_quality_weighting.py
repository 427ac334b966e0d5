#!/usr/bin/env python
"""Quality-aware training (``--quality-weighting``) against the plain flow-matching loss, per quality tier.

Both runs train the same LoRA (same seed, pairs, steps, noise draws) on the same tiny random-weight
Wan model; the only difference is the per-pair loss weight ``1 + strength * (1 - perceived quality)``
(normalised to mean 1, :mod:`vbridge_core.perceive.weighting`). Pairs are crops of the bundled
scikit-image photos with Gaussian noise at a spread of strengths (so the training set holds easy and
hard pairs of one task), split into training and validation pairs. Validation PSNR is reported per
tier of the applied severity (high / medium / low) before training and after each run.

The tiny model has random base weights, so absolute PSNRs say nothing about the 5B model; the
comparison shows what the weighting does to the balance between easy and hard pairs at equal cost.

    python bench/bench_quality_weighting.py --tiny            # 32 px, 10 training pairs, 120 steps
    python bench/bench_quality_weighting.py --steps 300 --pairs 24 --json qw.json
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vbridge_core.metrics import psnr  # noqa: E402
from vbridge_core.perceive.labels import TIERS, severity_of, tier_of  # noqa: E402


def make_pairs(n: int, size: int, seed: int) -> list[tuple[str, torch.Tensor, torch.Tensor, str]]:
    """``(name, lq, hq, tier)``: noise sigma spread evenly over 4/255..60/255 (all tiers present)."""
    from vbridge_core.degrade import gaussian_noise
    from vbridge_core.perceive.synth import _random_crop, clean_photos

    photos = clean_photos("all")
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        _, p = photos[int(torch.randint(len(photos), (1,), generator=g))]
        hq = _random_crop(p, size, g)
        sigma = (4 + 56 * i / max(1, n - 1)) / 255
        lq = gaussian_noise(hq, seed * 1000 + i, sigma=sigma)
        tier = tier_of(1 - severity_of("gaussian_noise", {"sigma": sigma}))
        out.append((f"p{i:02d}", lq, hq, tier))
    return out


def per_tier_psnr(pipe, pairs, steps: int, seed: int, lora: bool) -> dict[str, float]:
    res = {}
    for t in TIERS:
        sel = [(lq, hq) for _, lq, hq, tier in pairs if tier == t]
        if not sel:
            continue
        if lora:
            outs = pipe.restore([lq for lq, _ in sel], steps=steps, seed=seed).final
        else:
            outs = [lq for lq, _ in sel]
        res[t] = round(sum(float(psnr(o, hq)) for o, (_, hq) in zip(outs, sel)) / len(sel), 3)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="small run (the CI check): 32 px, 10 train pairs, 120 steps")
    ap.add_argument("--pairs", type=int, default=24, help="training pairs")
    ap.add_argument("--val-pairs", type=int, default=12, help="validation pairs")
    ap.add_argument("--steps", type=int, default=300, help="training steps per run")
    ap.add_argument("--size", type=int, default=32, help="pair side (multiple of 32)")
    ap.add_argument("--strength", type=float, default=1.0, help="quality-weighting strength of the weighted run")
    ap.add_argument("--restore-steps", type=int, default=8, help="sampling steps of the validation restores")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if a.tiny:
        a.pairs, a.val_pairs, a.steps = 10, 6, 120
    logging.basicConfig(level=logging.WARNING)
    from vbridge_core.pipeline import VBridgePipeline
    from vbridge_core.tiny import build_tiny_transformer, build_tiny_vae, tiny_prompt_embeds
    from vbridge_core.training.trainer import TrainConfig, train_lora

    train = make_pairs(a.pairs, a.size, a.seed)
    val = make_pairs(a.val_pairs, a.size, a.seed + 1)
    results: dict = {"settings": vars(a), "base_identity": per_tier_psnr(None, val, 0, 0, lora=False)}
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for label, strength in (("plain", 0.0), ("quality_weighted", a.strength)):
            pipe = VBridgePipeline(build_tiny_transformer(0), build_tiny_vae(1), device="cpu", dtype=torch.float32)
            cfg = TrainConfig(steps=a.steps, resolution=a.size, rank=8, alpha=8.0, learning_rate=5e-3,
                              crops_per_pair=1, flip=False, validation_fraction=0.0, seed=a.seed,
                              quality_weighting=strength)
            t0 = time.perf_counter()
            res = train_lora(pipe, [(n, lq, hq) for n, lq, hq, _ in train], cfg, Path(tmp) / f"{label}.safetensors",
                             prompt_embeds=tiny_prompt_embeds(), write_plots=False)
            pipe.load_lora(res.path, role="restoration")
            results[label] = {"psnr_per_tier": per_tier_psnr(pipe, val, a.restore_steps, a.seed, lora=True),
                              "final_loss": round(sum(res.losses[-10:]) / 10, 5),
                              "seconds": round(time.perf_counter() - t0, 1)}
    tiers_train = {t: sum(1 for *_, tt in train if tt == t) for t in TIERS}
    tiers_val = {t: sum(1 for *_, tt in val if tt == t) for t in TIERS}
    print(f"pairs per tier: train {tiers_train}, validation {tiers_val}; {a.steps} steps at {a.size} px")
    print("| run | " + " | ".join(f"PSNR {t}" for t in TIERS) + " |")
    print("|---|" + "---|" * len(TIERS))
    print("| LQ (no restore) | " + " | ".join(str(results['base_identity'].get(t, '-')) for t in TIERS) + " |")
    for label in ("plain", "quality_weighted"):
        r = results[label]["psnr_per_tier"]
        print(f"| {label} | " + " | ".join(str(r.get(t, '-')) for t in TIERS) + " |")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
