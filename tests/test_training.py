"""LoRA training on the tiny model: the loss falls, restoring the training pairs gets closer to the
target, resume equals an uninterrupted run, non-finite steps are skipped, drift mode feeds drift_correct.

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
from vbridge_core.training.checkpoint import checkpoint_dir, list_checkpoints
from vbridge_core.training.latent_cache import encode_video
from vbridge_core.training.trainer import TrainConfig, TrainingCancelled, train_drift_lora, train_lora


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
    pairs = _pairs(3)
    out = tmp_path_factory.mktemp("train") / "restore.safetensors"
    events = []
    cfg = _fast(steps=160, rank=8, alpha=8.0, resolution=64, learning_rate=4e-3, validation_steps=6,
                flip=False, crops_per_pair=1)
    res = train_lora(pipe, pairs, cfg, out, prompt_embeds=tiny_prompt_embeds(), validation_pairs=pairs,
                     callback=events.append, metadata={"prompt": "tiny"})
    return pipe, pairs, res, events


def test_loss_falls_and_outputs(trained):
    _, _, res, events = trained
    assert len(res.losses) == 160 and not res.skipped_steps
    first, last = sum(res.losses[:20]) / 20, sum(res.losses[-20:]) / 20
    assert last < 0.8 * first, (first, last)
    steps = [e for e in events if e.kind == "step"]
    assert [e.step for e in steps] == list(range(1, 161)) and steps[-1].total == 160
    assert all(math.isfinite(e.loss) for e in steps)
    assert res.loss_curve.shape[0] == 3 and res.loss_curve_path.is_file()
    assert res.validation_grid is not None and res.validation_grid.shape[0] == 3
    lf = read_lora(res.path)
    assert lf.role == "restoration" and lf.rank == 8
    assert lf.metadata["vbridge.resolution_curriculum"] == "64:160"
    assert torch.equal(lf.prompt_embeds, tiny_prompt_embeds())


def test_validation_improves(trained):
    _, _, res, _ = trained
    before, after = res.validation[0], res.validation[-1]
    assert before["label"] == "base" and after["label"] == "final"
    assert after["latent_mse"] < 0.6 * before["latent_mse"], (before, after)
    assert after["psnr_reachable"] > before["psnr_reachable"] + 0.5, (before, after)


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
    assert sum(gain) / len(gain) > 0.5, gain


def test_resume_equals_uninterrupted(tmp_path):
    pairs = _pairs(2)
    cfg = dict(stages="32:5,64:5", checkpoint_every=3, keep_checkpoints=2)
    full = train_lora(_pipe(), pairs, _fast(**cfg), tmp_path / "full.safetensors", prompt_embeds=tiny_prompt_embeds())

    count = {"n": 0}

    def cancel_after_7() -> bool:
        return count["n"] >= 7

    def cb(p):
        if p.kind == "step":
            count["n"] = p.step

    out = tmp_path / "part.safetensors"
    with pytest.raises(TrainingCancelled) as ei:
        train_lora(_pipe(), pairs, _fast(**cfg), out, prompt_embeds=tiny_prompt_embeds(), callback=cb,
                   should_cancel=cancel_after_7)
    assert ei.value.checkpoint is not None and ei.value.checkpoint.name == "state-step000007.pt"
    assert not out.exists()
    steps = [s for s, _ in list_checkpoints(checkpoint_dir(out))]
    assert steps == [6, 7]  # keep_checkpoints=2 dropped step 3
    assert not list(checkpoint_dir(out).glob("*.tmp*"))
    resumed = train_lora(_pipe(), pairs, _fast(**cfg), out, prompt_embeds=tiny_prompt_embeds(), resume="auto")
    assert resumed.losses == pytest.approx(full.losses, abs=1e-6)
    a, b = read_lora(full.path), read_lora(resumed.path)
    assert set(a.weights) == set(b.weights)
    for k in a.weights:
        torch.testing.assert_close(a.weights[k].down, b.weights[k].down, atol=1e-6, rtol=0)
        torch.testing.assert_close(a.weights[k].up, b.weights[k].up, atol=1e-6, rtol=0)


def test_resume_refuses_changed_settings(tmp_path):
    from vbridge_core.errors import InputError

    pairs = _pairs(1, size=32)
    out = tmp_path / "x.safetensors"
    with pytest.raises(TrainingCancelled):
        train_lora(_pipe(), pairs, _fast(steps=4, checkpoint_every=1), out, prompt_embeds=tiny_prompt_embeds(),
                   should_cancel=lambda: True)
    with pytest.raises(InputError, match="rank"):
        train_lora(_pipe(), pairs, _fast(steps=4, rank=8), out, prompt_embeds=tiny_prompt_embeds(), resume="auto")


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


def test_drift_mode_file_is_used_by_drift_correct(tmp_path):
    pipe = _pipe()
    pairs = _pairs(2, size=32)
    rest = train_lora(pipe, pairs, _fast(steps=4), tmp_path / "r.safetensors", prompt_embeds=tiny_prompt_embeds())
    events = []
    drift = train_drift_lora(pipe, pairs, rest.path, _fast(steps=4), tmp_path / "d.safetensors",
                             restore_settings=dict(steps=2), callback=events.append)
    assert any(e.kind == "restoring" for e in events)
    lf = read_lora(drift.path)
    assert lf.role == "drift_correction" and lf.metadata["vbridge.frames"] == 5
    assert lf.metadata["vbridge.restoration_lora"] == "r.safetensors"
    assert torch.equal(lf.prompt_embeds, tiny_prompt_embeds())
    # the drift-correction inputs were restored once and cached
    cached = list((checkpoint_dir(tmp_path / "d.safetensors") / "cache").glob("drift_inputs_*/*.png"))
    assert len(cached) == 2
    pipe.load_lora(drift.path)
    assert set(pipe.adapters) == {"restoration", "drift_correction"}
    img = pairs[0][0]
    base = pipe.run(img, role="none", steps=2, prompt_embeds=tiny_prompt_embeds()).final[0]
    fixed = pipe.drift_correct(img, steps=2).final[0]
    assert fixed.shape == img.shape and (fixed - base).abs().max() > 1e-4
