"""VBridgePipeline behaviour on the tiny model: sizes, seeds, batching, callbacks, cancel, bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vbridge_core.errors import Cancelled, InputError
from vbridge_core.pipeline import VBridgePipeline
from vbridge_core.sampler import SamplerSettings, make_scheduler
from vbridge_core.tiny import build_tiny_transformer, build_tiny_vae, tiny_prompt_embeds


@pytest.fixture(scope="module")
def pipe():
    return VBridgePipeline(build_tiny_transformer(11), build_tiny_vae(12), device="cpu", dtype=torch.float32,
                           prompt_embeds=tiny_prompt_embeds(1), negative_prompt_embeds=tiny_prompt_embeds(2))


def test_any_sizes_and_modes(pipe):
    rng = np.random.default_rng(0)
    rgb = torch.rand(3, 37, 50)
    gray = rng.integers(0, 256, (40, 33), dtype=np.uint8)          # [H, W] uint8
    rgba = rng.integers(0, 65536, (20, 24, 4), dtype=np.uint16)    # [H, W, 4] 16-bit
    res = pipe.restore([rgb, gray, rgba], steps=3, return_trajectory=True)
    assert [tuple(f.shape) for f in res.final] == [(3, 37, 50), (3, 40, 33), (3, 20, 24)]
    assert [tuple(t.shape) for t in res.trajectory] == [(5, 3, 37, 50), (5, 3, 40, 33), (5, 3, 20, 24)]
    for f, t in zip(res.final, res.trajectory):
        assert torch.equal(f, t[-1])
        assert 0 <= f.min() and f.max() <= 1
    assert res.info["images"] == 3 and res.info["steps"] == 3


def test_seeds_are_per_image_and_batching_does_not_change_results(pipe):
    a, b = torch.rand(3, 32, 32), torch.rand(3, 32, 32)
    both = pipe.restore(torch.stack([a, b]), steps=4, seed=10, batch_size=2)
    only_a = pipe.restore(a, steps=4, seed=10)
    only_b = pipe.restore(b, steps=4, seed=11)
    torch.testing.assert_close(both.final[0], only_a.final[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(both.final[1], only_b.final[0], atol=1e-5, rtol=0)
    other_seed = pipe.restore(a, steps=4, seed=99)
    assert (other_seed.final[0] - only_a.final[0]).abs().max() > 1e-3


def test_callback_and_cancel_within_one_step(pipe):
    seen = []
    pipe.restore(torch.rand(3, 32, 32), steps=6, callback=lambda info: seen.append((info.step, info.denoised.shape)))
    assert [s for s, _ in seen] == list(range(1, 7))
    assert seen[0][1] == (1, 48, 2, 2, 2)

    calls = []
    handle = pipe.transformer.register_forward_hook(lambda *a: calls.append(1))
    try:
        state = {"n": 0}

        def should_cancel():
            state["n"] += 1
            return state["n"] > 3

        with pytest.raises(Cancelled, match="step 4 of 50"):
            pipe.restore(torch.rand(3, 32, 32), steps=50, should_cancel=should_cancel)
        assert len(calls) == 3
    finally:
        handle.remove()


def test_solvers_and_grids_run(pipe):
    x = torch.rand(3, 32, 32)
    outs = {}
    for solver in ("unipc", "euler"):
        for grid in ("diffusers", "official"):
            outs[solver, grid] = pipe.restore(x, steps=5, solver=solver, sigma_grid=grid).final[0]
            assert torch.isfinite(outs[solver, grid]).all()
    assert (outs["unipc", "diffusers"] - outs["euler", "diffusers"]).abs().max() > 1e-4


def test_official_grid_matches_the_wan_code():
    # the release anchors: last sigma 0.0925 (official) vs 0.0968 (diffusers) at 50 steps, shift 5
    off, off_t = make_scheduler(SamplerSettings(steps=50, sigma_grid="official"))
    dif, _ = make_scheduler(SamplerSettings(steps=50, sigma_grid="diffusers"))
    assert abs(float(off.sigmas[-2]) - 0.0925) < 5e-4
    assert abs(float(dif.sigmas[-2]) - 0.0968) < 5e-4
    assert float(off.sigmas[-1]) == 0.0
    assert torch.equal(off_t, torch.floor(off_t))  # integer timesteps for the DiT, as the official code


@pytest.mark.parametrize("kwargs,match", [
    (dict(frames=6), "4k\\+1"),
    (dict(frames=3), "4k\\+1"),
    (dict(steps=0), "steps"),
    (dict(shift=0), "shift"),
    (dict(solver="ddim"), "solver"),
    (dict(guidance=0.5), "guidance"),
    (dict(batch_size=0), "batch_size"),
])
def test_bad_settings(pipe, kwargs, match):
    with pytest.raises(InputError, match=match):
        pipe.restore(torch.rand(3, 32, 32), **kwargs)


def test_missing_prompts_and_adapters():
    bare = VBridgePipeline(build_tiny_transformer(11), build_tiny_vae(12), device="cpu", dtype=torch.float32)
    with pytest.raises(InputError, match="no prompt embedding"):
        bare.restore(torch.rand(3, 32, 32), steps=2)
    with pytest.raises(InputError, match="text encoder"):
        bare.restore(torch.rand(3, 32, 32), steps=2, prompt="restore this")
    bare.prompt_embeds = tiny_prompt_embeds()
    with pytest.raises(InputError, match="negative prompt"):
        bare.restore(torch.rand(3, 32, 32), steps=2, guidance=3.0)
    with pytest.raises(InputError, match="drift-correction LoRA"):
        bare.drift_correct(torch.rand(3, 32, 32), steps=2)


def test_bad_images(pipe):
    with pytest.raises(InputError):
        pipe.restore(torch.rand(3, 0, 16), steps=2)
    with pytest.raises(InputError, match="no images"):
        pipe.restore([], steps=2)


def test_tiny_and_degenerate_images(pipe):
    res = pipe.restore([torch.rand(3, 1, 1), torch.rand(3, 5, 7), torch.rand(3, 1, 40)], steps=2)
    assert [tuple(f.shape) for f in res.final] == [(3, 1, 1), (3, 5, 7), (3, 1, 40)]
    assert all(torch.isfinite(f).all() for f in res.final)


def test_offload_gives_the_same_result(tiny_model_dir):
    a = VBridgePipeline.from_files(tiny_model_dir, device="cpu")
    b = VBridgePipeline.from_files(tiny_model_dir, device="cpu", offload=True)
    x = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    pe = tiny_prompt_embeds()
    ra = a.restore(x, steps=3, prompt_embeds=pe).final[0]
    rb = b.restore(x, steps=3, prompt_embeds=pe)
    assert rb.info["offload"] is True
    torch.testing.assert_close(ra, rb.final[0], atol=0, rtol=0)


def test_same_seed_for_video_frames(pipe):
    a = torch.rand(3, 32, 32)
    batched = pipe.restore(torch.stack([a, a]), steps=3, seed=4, batch_size=2, same_seed=True)
    torch.testing.assert_close(batched.final[0], batched.final[1], atol=1e-5, rtol=0)
    default = pipe.restore(torch.stack([a, a]), steps=3, seed=4)
    assert (default.final[0] - default.final[1]).abs().max() > 1e-4


def test_regional_compile_keeps_results_and_lora_switching(tmp_path):
    """Graph capture of the blocks (fullgraph, with peft LoRA layers) on CPU: ``aot_eager`` runs the
    captured graphs without generating kernels, so the check is fast and exact."""
    from vbridge_core.lora import LoraLayer, write_lora

    g = torch.Generator().manual_seed(0)
    w = {f"blocks.{i}.attn1.to_q": LoraLayer(torch.randn(4, 256, generator=g) * 0.05,
                                             torch.randn(256, 4, generator=g) * 0.05, 4.0) for i in range(2)}
    path = write_lora(tmp_path / "l.safetensors", w, rank=4, alpha=4, metadata={"role": "restoration"},
                      prompt_embeds=tiny_prompt_embeds())
    p = VBridgePipeline(build_tiny_transformer(5), build_tiny_vae(6), device="cpu", dtype=torch.float32,
                        prompt_embeds=tiny_prompt_embeds())
    p.load_lora(path)
    x = torch.rand(3, 32, 32, generator=g)
    eager = p.restore(x, steps=3).final[0]
    p.compile(backend="aot_eager")
    res = p.restore(x, steps=3)
    assert res.info["compiled"] == "aot_eager"
    torch.testing.assert_close(res.final[0], eager, atol=1e-5, rtol=0)
    # the compiled blocks follow adapter changes: at strength 0 the result is the bare base model's
    base = VBridgePipeline(build_tiny_transformer(5), build_tiny_vae(6), device="cpu", dtype=torch.float32,
                           prompt_embeds=tiny_prompt_embeds()).restore(x, steps=3).final[0]
    p.adapters["restoration"]["strength"] = 0.0
    off = p.restore(x, steps=3).final[0]
    torch.testing.assert_close(off, base, atol=1e-5, rtol=0)
    assert (base - eager).abs().max() > 1e-4


def test_half_precision_dit_with_fp32_kept_modules_restores_and_trains(tiny_model_dir):
    """The loader keeps diffusers' fp32 modules (Wan's scale_shift_table is the *first* parameter) when the
    DiT is loaded in bf16/fp16, as on every GPU by default: the sampler and the training loss must feed the
    DiT its compute dtype, not the first parameter's (regression: fp32 inputs into a bf16 conv crashed)."""
    from vbridge_core.sampler import compute_dtype
    from vbridge_core.training.flow_matching import flow_matching_loss

    for dt in (torch.bfloat16, torch.float16):
        p = VBridgePipeline.from_files(tiny_model_dir, device="cpu", dtype=dt)
        assert next(p.transformer.parameters()).dtype == torch.float32  # the fp32-kept first parameter
        assert compute_dtype(p.transformer) == dt
        res = p.restore(torch.rand(3, 32, 32), steps=2, prompt_embeds=tiny_prompt_embeds())
        assert torch.isfinite(res.final[0]).all()
    for solver in ("euler", "unipc"):  # the latent state stays fp32 (Euler cast it to the DiT's dtype every step)
        seen = []
        p.restore(torch.rand(3, 32, 32), steps=2, solver=solver, prompt_embeds=tiny_prompt_embeds(),
                  callback=lambda info: seen.append(info.latents.dtype))
        assert seen == [torch.float32, torch.float32], solver
    z = torch.randn(1, 48, 2, 2, 2)
    loss = flow_matching_loss(p.transformer, z, tiny_prompt_embeds(), torch.tensor([0.5]), torch.randn_like(z))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_resolve_device_refuses_unknown_and_missing_devices():
    from vbridge_core.pipeline import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type in ("cpu", "cuda")
    with pytest.raises(InputError, match="unknown device"):
        resolve_device("foo")
    with pytest.raises(InputError, match="cuda:99"):
        resolve_device("cuda:99")
    with pytest.raises(InputError, match="unknown device"):
        VBridgePipeline(build_tiny_transformer(0), build_tiny_vae(1), device="gpu0")


def test_loading_a_lora_under_another_role_warns(tmp_path, caplog):
    """A restoration LoRA passed as --drift-lora ran silently; it now says so (the train CLI already did)."""
    import logging

    from tiny_files import random_lora

    p = VBridgePipeline(build_tiny_transformer(0), build_tiny_vae(1), device="cpu")
    rest = random_lora(tmp_path / "r.safetensors", "restoration", 1)
    with caplog.at_level(logging.WARNING, logger="vbridge_core.pipeline"):
        p.load_lora(rest, role="restoration")
        assert not [r for r in caplog.records if "trained as" in r.getMessage()]
        p.load_lora(rest, role="drift_correction")
    assert any("trained as a restoration LoRA" in r.getMessage() for r in caplog.records)
