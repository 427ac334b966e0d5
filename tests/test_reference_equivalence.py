"""Our restore reproduces diffusers' WanImageToVideoPipeline(expand_timesteps=True) on the same work.

Same tiny random-weight transformer and VAE, same image, seed, frames, scheduler and prompts:
the final frame must agree to 1e-4 (fp32, CPU), at guidance 5 (two DiT calls a step) and 1.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vbridge_core.pipeline import VBridgePipeline
from vbridge_core.runtime import pad_prompt_embeds
from vbridge_core.tiny import build_tiny_transformer, build_tiny_vae, tiny_prompt_embeds


@pytest.fixture(scope="module")
def models():
    return build_tiny_transformer(seed=3), build_tiny_vae(seed=4)


def _diffusers_reference(transformer, vae, image, pos, neg, frames, steps, guidance, seed, shift):
    from diffusers import UniPCMultistepScheduler, WanImageToVideoPipeline

    sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                    num_train_timesteps=1000, flow_shift=shift)
    pipe = WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=sched, image_processor=None,
                                   image_encoder=None, transformer=transformer, transformer_2=None,
                                   boundary_ratio=None, expand_timesteps=True)
    pipe.set_progress_bar_config(disable=True)
    h, w = image.size[1], image.size[0]
    out = pipe(image=image, prompt_embeds=pos, negative_prompt_embeds=neg, height=h, width=w, num_frames=frames,
               num_inference_steps=steps, guidance_scale=guidance, output_type="pt",
               generator=torch.Generator("cpu").manual_seed(seed)).frames
    return out[0]  # [F, 3, H, W] in 0..1


@pytest.mark.parametrize("guidance,frames,steps", [(5.0, 5, 12), (1.0, 5, 12), (1.0, 9, 6)])
def test_restore_matches_diffusers_pipeline(models, guidance, frames, steps):
    transformer, vae = models
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
    image = Image.fromarray(arr)
    pos = tiny_prompt_embeds(seed=5)
    neg = tiny_prompt_embeds(seed=6)

    # diffusers' text path zero-pads umt5 embeddings to 512 tokens; we pad whatever we are given
    ref = _diffusers_reference(transformer, vae, image, pad_prompt_embeds(pos), pad_prompt_embeds(neg), frames, steps,
                               guidance, seed=7, shift=5.0)
    pipe = VBridgePipeline(transformer, vae, device="cpu", dtype=torch.float32, prompt_embeds=pos,
                           negative_prompt_embeds=neg)
    res = pipe.restore(torch.from_numpy(arr).permute(2, 0, 1).float() / 255, frames=frames, steps=steps, seed=7,
                       shift=5.0, solver="unipc", guidance=guidance, return_trajectory=True)
    ours = res.final[0]
    assert ours.shape == (3, 64, 96)
    assert res.trajectory[0].shape == (frames, 3, 64, 96)
    diff = (ours - ref[-1]).abs().max().item()
    assert diff <= 1e-4, f"final frame differs from diffusers by {diff}"
    assert (res.trajectory[0] - ref).abs().max().item() <= 1e-4
    # the tiny model is random: make sure the comparison is not trivially of two constant images
    assert ours.std() > 0.01


def test_guidance_one_makes_one_call_per_step(models):
    transformer, vae = models
    calls = []
    handle = transformer.register_forward_hook(lambda *a: calls.append(1))
    try:
        pipe = VBridgePipeline(transformer, vae, device="cpu", dtype=torch.float32, prompt_embeds=tiny_prompt_embeds(),
                               negative_prompt_embeds=tiny_prompt_embeds(9))
        pipe.restore(torch.rand(3, 32, 32), steps=4, guidance=1.0)
        assert len(calls) == 4
        calls.clear()
        res = pipe.restore(torch.rand(3, 32, 32), steps=20, guidance=6.0, guidance_skip_tail=0.15, batch_cfg=False)
        assert len(calls) == 20 + 17  # the unconditional pass is skipped for the last 15% (3 of 20)
        assert res.info["dit_calls_per_image"] == 37
        calls.clear()
        # batched CFG: the same 37 noise predictions per image in 20 forward calls
        res = pipe.restore(torch.rand(3, 32, 32), steps=20, guidance=6.0, guidance_skip_tail=0.15)
        assert len(calls) == 20 and res.info["dit_calls_per_image"] == 37
    finally:
        handle.remove()
