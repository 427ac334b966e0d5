"""``python -m vbridge_core demo``: the whole V-Bridge loop end to end, offline, on CPU, in about a minute.

It builds the tiny random-weight Wan2.2 model (real architecture, shrunk), trains a restoration
LoRA for a few steps on the sample pairs shipped in ``vbridge_core/assets/samples``, restores the
degraded images, trains a drift-correction LoRA on the restored outputs, refines them, and writes
before / after / trajectory images. The backbone is untrained: this is a smoke test of the code
paths, not a restoration; real results need the Wan2.2-TI2V-5B weights.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SAMPLES = Path(__file__).resolve().parent / "assets" / "samples"

NOTICE = ("SMOKE TEST: the demo runs an untrained tiny backbone (a few million random weights), so its "
          "'restorations' are not real restorations. It proves that loading, LoRA training, restoring and "
          "drift correction run end to end on this machine. Use the Wan2.2-TI2V-5B files for real results.")


def load_sample_pairs(root: Path = SAMPLES) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """``(name, lq, hq)`` for every pair under ``root/<task>/{lq,hq}/``."""
    from .images import load_image

    pairs = []
    for task in sorted(p for p in root.iterdir() if p.is_dir()):
        for lq in sorted((task / "lq").glob("*.png")):
            hq = task / "hq" / lq.name
            pairs.append((f"{task.name}_{lq.stem}", load_image(lq), load_image(hq)))
    return pairs


def default_demo_dir() -> Path:
    """Where the demo writes when no folder is given: ``vbridge_demo`` in the system temp folder (not the
    current folder, which is often the repository)."""
    import tempfile

    return Path(tempfile.gettempdir()) / "vbridge_demo"


def run_demo(out: Path, train_steps: int = 60, steps: int = 20, seed: int = 0) -> dict:
    """Run the demo into ``out`` and return the measured PSNRs (mean over the sample pairs)."""
    from .fileio import ensure_writable_dir, write_json_atomic
    from .images import save_png
    from .metrics import psnr
    from .pipeline import VBridgePipeline
    from .tiny import build_tiny_transformer, build_tiny_vae, tiny_prompt_embeds
    from .training.trainer import TrainConfig, train_lora

    t0 = time.perf_counter()
    out = ensure_writable_dir(out)
    logger.warning(NOTICE)
    torch.manual_seed(seed)
    pipe = VBridgePipeline(build_tiny_transformer(seed), build_tiny_vae(seed + 1), device="cpu", dtype=torch.float32)
    samples = load_sample_pairs()
    names = [s[0] for s in samples]
    lqs = [s[1] for s in samples]
    hqs = [s[2] for s in samples]
    prompt = tiny_prompt_embeds()
    loras = ensure_writable_dir(out / "loras")

    logger.info("training the restoration LoRA on %d sample pairs (%d steps)", len(samples), train_steps)
    cfg = TrainConfig(steps=train_steps, rank=16, alpha=16, learning_rate=2e-3, seed=seed, crops_per_pair=2)
    rest = train_lora(pipe, list(zip(lqs, hqs)), cfg, loras / "demo_restoration.safetensors", prompt_embeds=prompt,
                      metadata={"prompt": "(tiny demo prompt embedding)", "base_model": "vbridge-tiny"})
    pipe.load_lora(rest.path)
    restored = pipe.restore(lqs, steps=steps, seed=seed, return_trajectory=True)

    logger.info("training the drift-correction LoRA on the restored outputs (%d steps)", train_steps)
    dcfg = TrainConfig(steps=train_steps, rank=16, alpha=16, learning_rate=2e-3, seed=seed + 1,
                       role="drift_correction", crops_per_pair=2)
    drift = train_lora(pipe, list(zip(restored.final, hqs)), dcfg, loras / "demo_drift_correction.safetensors",
                       prompt_embeds=prompt, metadata={"base_model": "vbridge-tiny"})
    pipe.load_lora(drift.path)
    corrected = pipe.drift_correct(restored.final, steps=steps, seed=seed, return_trajectory=True)

    for i, name in enumerate(names):
        save_png(lqs[i], out / f"{name}_1_before.png")
        save_png(restored.final[i], out / f"{name}_2_restored.png")
        save_png(corrected.final[i], out / f"{name}_3_drift_corrected.png")
        save_png(hqs[i], out / f"{name}_4_reference.png")
        save_png(torch.cat(list(restored.trajectory[i]), dim=-1), out / f"{name}_trajectory.png")
        save_png(torch.cat([lqs[i], restored.final[i], corrected.final[i], hqs[i]], dim=-1),
                 out / f"{name}_compare.png")

    def mean_psnr(xs):
        return float(sum(float(psnr(x, y)) for x, y in zip(xs, hqs)) / len(xs))

    report = dict(pairs=len(samples), train_steps=train_steps, sampling_steps=steps,
                  psnr_before=mean_psnr(lqs), psnr_restored=mean_psnr(restored.final),
                  psnr_drift_corrected=mean_psnr(corrected.final),
                  restoration_loss_first_last=[rest.losses[0], rest.losses[-1]],
                  drift_loss_first_last=[drift.losses[0], drift.losses[-1]],
                  seconds=round(time.perf_counter() - t0, 1), notice=NOTICE)
    write_json_atomic(out / "demo_report.json", report)
    print(f"\nV-Bridge demo finished in {report['seconds']} s. Outputs in {out.resolve()}:")
    print("  <pair>_compare.png      before | restored | drift-corrected | reference")
    print("  <pair>_trajectory.png   the sampled pseudo-video, frame 0 (LQ) to the last frame (output)")
    print("  loras/                  the two trained LoRA files; demo_report.json  the numbers below")
    print(f"  mean PSNR vs reference: before {report['psnr_before']:.2f} dB, restored {report['psnr_restored']:.2f} dB, "
          f"drift-corrected {report['psnr_drift_corrected']:.2f} dB")
    print(f"  training loss: restoration {rest.losses[0]:.3f} -> {rest.losses[-1]:.3f}, "
          f"drift {drift.losses[0]:.3f} -> {drift.losses[-1]:.3f}")
    print("\n" + NOTICE)
    return report
