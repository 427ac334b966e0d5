"""LoRA training on the tiny model: the loss falls, restoring the training pairs gets closer to the
target, and non-finite steps are skipped (resume and drift mode: test_training_resume.py).

How "closer to HQ" is measured: the tiny VAE has random weights, so it decodes every latent to a
noise-like picture and PSNR against HQ cannot move much whatever the DiT does. What the LoRA can
change is where the sampler lands in latent space, so the test measures (a) the distance of the
sampled last latent frame to the encoded LQ -> HQ pseudo-video's last latent frame (the training
target) and (b) the PSNR of the restored image against the VAE round trip of that target (the
best image reachable through this VAE). Both must improve clearly after training.
"""
from __future__ import annotations

import math

import pytest
import torch

from vbridge_core import trajectory
from vbridge_core.lora import read_lora
from vbridge_core.metrics import psnr
from vbridge_core.pipeline import VBridgePipeline
from vbridge_core.tiny import build_tiny_transformer, build_tiny_vae, tiny_prompt_embeds
from vbridge_core.training import loop as loop_mod
from vbridge_core.training.latent_cache import encode_video
from vbridge_core.training.trainer import TrainConfig, train_lora


STEPS = 100


def _pairs(n: int, size: int = 64, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Smooth HQ images and noisier, darker LQs (a simple, consistent degradation)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        low = torch.rand(1, 3, 4, 4, generator=g)
        hq = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)[0]
        lq = (0.6 * hq + 0.15 * torch.randn(hq.shape, generator=g)).clamp(0, 1)
        out.append((lq, hq.clamp(0, 1)))
    return out


def _pipe() -> VBridgePipeline:
    return VBridgePipeline(build_tiny_transformer(0), build_tiny_vae(1), device="cpu", dtype=torch.float32)


def _fast(**kw) -> TrainConfig:
    base = dict(rank=4, alpha=4.0, learning_rate=3e-3, crops_per_pair=2, validation_fraction=0.0, seed=3)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    pipe = _pipe()
    pairs = _pairs(3, size=32)
    out = tmp_path_factory.mktemp("train") / "restore.safetensors"
    events = []
    cfg = _fast(steps=STEPS, rank=8, alpha=8.0, resolution=32, learning_rate=5e-3, validation_steps=6,
                flip=False, crops_per_pair=1)
    res = train_lora(pipe, pairs, cfg, out, prompt_embeds=tiny_prompt_embeds(), validation_pairs=pairs,
                     callback=events.append, metadata={"prompt": "tiny"})
    return pipe, pairs, res, events


def test_loss_falls_and_outputs(trained):
    _, _, res, events = trained
    assert len(res.losses) == STEPS and not res.skipped_steps
    first, last = sum(res.losses[:20]) / 20, sum(res.losses[-20:]) / 20
    assert last < 0.8 * first, (first, last)
    steps = [e for e in events if e.kind == "step"]
    assert [e.step for e in steps] == list(range(1, STEPS + 1)) and steps[-1].total == STEPS
    assert all(math.isfinite(e.loss) for e in steps)
    assert res.loss_curve.shape[0] == 3 and res.loss_curve_path.is_file()
    assert res.validation_grid is not None and res.validation_grid.shape[0] == 3
    lf = read_lora(res.path)
    assert lf.role == "restoration" and lf.rank == 8
    assert lf.metadata["vbridge.resolution_curriculum"] == f"32:{STEPS}"
    assert torch.equal(lf.prompt_embeds, tiny_prompt_embeds())


def test_validation_improves(trained):
    _, _, res, _ = trained
    before, after = res.validation[0], res.validation[-1]
    assert before["label"] == "base" and after["label"] == "final"
    assert after["latent_mse"] < 0.75 * before["latent_mse"], (before, after)
    assert after["psnr_reachable"] > before["psnr_reachable"] + 0.4, (before, after)


def test_restoring_the_training_pairs_gets_closer(trained):
    """Through the public path: load the written file, restore, compare with restore on the bare base."""
    pipe, pairs, res, _ = trained
    alphas = trajectory.alpha_schedule("linear", 5)
    lqs = [p[0] for p in pairs]
    targets = [pipe.decode(encode_video(pipe, trajectory.blend_pairs(lq[None], hq[None], alphas)))[0, :, -1]
               for lq, hq in pairs]
    base = pipe.run(lqs, role="restoration", steps=6, prompt_embeds=tiny_prompt_embeds())
    pipe.load_lora(res.path)
    after = pipe.restore(lqs, steps=6)
    gain = [float(psnr(a, t)) - float(psnr(b, t)) for a, b, t in zip(after.final, base.final, targets)]
    print("PSNR gain vs the reachable target (dB):", gain)
    assert sum(gain) / len(gain) > 0.4, gain


def test_non_finite_loss_skips_the_step(tmp_path, monkeypatch):
    real = loop_mod.flow_matching_loss
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        loss = real(*a, **k)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(loop_mod, "flow_matching_loss", flaky)
    events = []
    res = train_lora(_pipe(), _pairs(1, size=32), _fast(steps=5), tmp_path / "n.safetensors",
                     prompt_embeds=tiny_prompt_embeds(), callback=events.append)
    assert res.skipped_steps == [3] and math.isnan(res.losses[2])
    assert [e.step for e in events if e.kind == "skipped"] == [3]
    lf = read_lora(res.path)
    assert all(torch.isfinite(l.up).all() and torch.isfinite(l.down).all() for l in lf.weights.values())
