"""Few-step sampling (issue 8): x0-renoise against the published DMD rule, explicit sigma lists,
start-from-LQ, batched CFG, DiT call counting, the turbo preset and step caching."""
from __future__ import annotations

import json

import pytest
import torch

from vbridge_core.errors import InputError
from vbridge_core.pipeline import VBridgePipeline
from vbridge_core.presets import FASTWAN_SIGMAS, PRESETS, TURBO_MAX_CALLS, WAN22_TURBO_SIGMAS, preset
from vbridge_core.sampler import SampleStats, SamplerSettings, sample
from vbridge_core.tiny import build_tiny_transformer, build_tiny_vae, tiny_prompt_embeds


@pytest.fixture(scope="module")
def dit():
    return build_tiny_transformer(seed=3)


@pytest.fixture(scope="module")
def pipe(dit):
    return VBridgePipeline(dit, build_tiny_vae(), device="cpu", dtype=torch.float32,
                           prompt_embeds=tiny_prompt_embeds(), negative_prompt_embeds=tiny_prompt_embeds(9))


def _inputs(batch: int = 1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cond = torch.randn(batch, 48, 1, 4, 4, generator=g)
    noise = torch.randn(batch, 48, 2, 4, 4, generator=g)
    return cond, noise


def _call(dit, x, t, emb):
    """One DiT call the way Wan2.2 TI2V makes it: frame-0 tokens at timestep 0, the rest at ``t``."""
    _, _, f, h, w = x.shape
    ts = torch.full((f, h // 2, w // 2), float(t))
    ts[0] = 0
    return dit(hidden_states=x, timestep=ts.flatten()[None].expand(x.shape[0], -1), encoder_hidden_states=emb,
               return_dict=False)[0]


def _published_dmd(dit, cond, noise, emb, timesteps, generator):
    """Direct transcription of the few-step rule of FastVideo's ``DmdDenoisingStage`` ("sde" branch) and
    Wan2.2-TI2V-5B-Turbo's ``Wan22FewstepInferencePipeline``: at each listed timestep t (sigma = t / 1000)
    predict x0 = x_t - sigma * v, then re-noise with fresh noise to the next timestep via the flow
    ``add_noise`` (1 - s) x0 + s eps, re-imposing the image latent on frame 0 (mask2); the last step
    returns x0."""
    mask = torch.ones_like(noise)
    mask[:, :, 0] = 0
    x = (1 - mask) * cond + mask * noise
    for i, t in enumerate(timesteps):
        sigma = t / 1000.0
        x0 = x - sigma * _call(dit, x, t, emb)
        if i < len(timesteps) - 1:
            s_next = timesteps[i + 1] / 1000.0
            x = (1 - s_next) * x0 + s_next * torch.randn(noise.shape, generator=generator)
            x = (1 - mask) * cond + mask * x
        else:
            x = x0
    return (1 - mask) * cond + mask * x


@pytest.mark.parametrize("timesteps", [[1000, 757, 522], [1000, 750, 500, 250]])
@torch.no_grad()
def test_x0_renoise_matches_the_published_dmd_rule(dit, timesteps):
    cond, noise = _inputs()
    emb = tiny_prompt_embeds()
    ref = _published_dmd(dit, cond, noise, emb, timesteps, torch.Generator().manual_seed(5))
    stats = SampleStats()
    ours = sample(dit, cond, noise, emb, SamplerSettings(solver="x0_renoise", sigmas=[t / 1000 for t in timesteps]),
                  generator=torch.Generator().manual_seed(5), stats=stats)
    assert (ours - ref).abs().max().item() <= 1e-5
    assert ref[:, :, 1:].std() > 0.1  # not trivially equal
    assert stats.dit_calls_per_image == len(timesteps) == stats.forward_passes
    assert [round(s, 6) for s in stats.sigmas] == [t / 1000 for t in timesteps]
    # the published schedules are what the presets name
    assert tuple(t / 1000 for t in timesteps) in (FASTWAN_SIGMAS, WAN22_TURBO_SIGMAS)


@torch.no_grad()
def test_x0_renoise_per_image_generators_make_batching_irrelevant(dit):
    cond, noise = _inputs(batch=2)
    emb = tiny_prompt_embeds()
    s = SamplerSettings(solver="x0_renoise", sigmas=FASTWAN_SIGMAS)
    both = sample(dit, cond, noise, emb, s, generator=[torch.Generator().manual_seed(k) for k in (1, 2)])
    one = sample(dit, cond[1:], noise[1:], emb, s, generator=[torch.Generator().manual_seed(2)])
    assert (both[1:] - one).abs().max().item() <= 1e-5


@torch.no_grad()
def test_euler_on_an_explicit_sigma_list_is_the_flow_euler_rule(dit):
    cond, noise = _inputs(seed=1)
    emb = tiny_prompt_embeds()
    sigmas = [0.9, 0.6, 0.3]
    mask = torch.ones_like(noise)
    mask[:, :, 0] = 0
    x = noise.clone()
    for i, s in enumerate(sigmas):
        v = _call(dit, (1 - mask) * cond + mask * x, s * 1000, emb)
        x = x + ((sigmas[i + 1] if i + 1 < len(sigmas) else 0.0) - s) * v
    ref = (1 - mask) * cond + mask * x
    ours = sample(dit, cond, noise, emb, SamplerSettings(solver="euler", sigmas=sigmas))
    assert (ours - ref).abs().max().item() <= 1e-5
    # UniPC runs the same list (its own multistep update); the DiT saw exactly these sigmas
    stats = SampleStats()
    sample(dit, cond, noise, emb, SamplerSettings(solver="unipc", sigmas=sigmas), stats=stats)
    assert stats.sigmas == pytest.approx(sigmas, abs=1e-6)


@torch.no_grad()
def test_start_from_lq_noises_the_condition_and_truncates_or_rescales_the_grid(dit):
    cond, noise = _inputs(seed=2)
    emb = tiny_prompt_embeds()
    # one x0 step from sigma 0.4: the start is (1 - 0.4) * lq + 0.4 * noise on frames >= 1
    ours = sample(dit, cond, noise, emb, SamplerSettings(solver="x0_renoise", sigmas=[1.0, 0.4], start_sigma=0.4))
    mask = torch.ones_like(noise)
    mask[:, :, 0] = 0
    x = 0.6 * cond.expand_as(noise) + 0.4 * noise
    x_in = (1 - mask) * cond + mask * x
    ref = (1 - mask) * cond + mask * (x_in - 0.4 * _call(dit, x_in, 400.0, emb))
    assert (ours - ref).abs().max().item() <= 1e-5
    # an explicit list is truncated (entries above s dropped, s prepended when missing) ...
    assert SamplerSettings(sigmas=FASTWAN_SIGMAS, start_sigma=0.6).plan() == [0.6, 0.522]
    assert SamplerSettings(sigmas=FASTWAN_SIGMAS, start_sigma=0.757).plan() == [0.757, 0.522]
    # ... a generated grid keeps its steps and is rescaled to start at s
    full = SamplerSettings(steps=4).plan() or SamplerSettings(steps=4, solver="x0_renoise").plan()
    part = SamplerSettings(steps=4, start_sigma=0.5).plan()
    assert len(part) == 4 and part[0] == pytest.approx(0.5)
    assert [p / part[0] for p in part] == pytest.approx([f / full[0] for f in full])
    # the default grid is left to the scheduler untouched (reference-equivalent numerics)
    assert SamplerSettings(steps=50).plan() is None


@torch.no_grad()
def test_batched_cfg_equals_two_calls_and_counts_both(dit):
    cond, noise = _inputs(batch=2, seed=4)
    emb, neg = tiny_prompt_embeds(), tiny_prompt_embeds(9)
    s1, s2 = SampleStats(), SampleStats()
    kw = dict(steps=6, guidance=5.0, guidance_skip_tail=0.34)
    one = sample(dit, cond, noise, emb, SamplerSettings(**kw, batch_cfg=True), negative_prompt_embeds=neg, stats=s1)
    two = sample(dit, cond, noise, emb, SamplerSettings(**kw, batch_cfg=False), negative_prompt_embeds=neg, stats=s2)
    assert (one - two).abs().max().item() <= 1e-5
    assert s1.dit_calls_per_image == s2.dit_calls_per_image == 6 + 4
    assert (s1.forward_passes, s2.forward_passes) == (6, 10)


def test_dit_calls_per_image_of_the_presets():
    import dataclasses

    fields = {f.name for f in dataclasses.fields(SamplerSettings)}

    def calls(name):
        kw = preset(name)  # a preset may also hold pipeline options (frames, ...): keep the sampler's own
        return SamplerSettings(**{k: v for k, v in kw.items() if k in fields}).dit_calls_per_image()

    assert calls("fast") == 50
    assert calls("paper") == 93
    assert calls("turbo") <= TURBO_MAX_CALLS and PRESETS["turbo"]["guidance"] == 1.0


def test_restore_reports_calls_and_turbo_preset_runs(pipe):
    x = torch.rand(3, 32, 32)
    res = pipe.restore(x, steps=5, guidance=4.0, guidance_skip_tail=0.2)
    assert res.info["dit_calls_per_image"] == 5 + 4 and res.info["dit_forward_passes"] == 5
    kw = preset("turbo")
    res = pipe.restore(x, **kw)
    assert res.info["dit_calls_per_image"] == 3 and res.info["solver"] == "x0_renoise"
    assert res.info["sigmas"] == list(FASTWAN_SIGMAS)
    assert res.final[0].shape == (3, 32, 32) and torch.isfinite(res.final[0]).all()
    # deterministic per seed (the re-noising draws come from the image's seeded generator)
    again = pipe.restore(x, **kw)
    assert torch.equal(res.final[0], again.final[0])


def test_turbo_preset_takes_the_schedule_a_student_lora_names(tmp_path):
    from vbridge_core.lora import read_lora, write_lora
    from tiny_files import random_lora

    src = read_lora(random_lora(tmp_path / "s.safetensors"))
    path = write_lora(tmp_path / "student.safetensors", src.weights, rank=src.rank, alpha=src.alpha,
                      metadata=dict(src.metadata, turbo_sigmas=[0.8, 0.4], turbo_start_sigma=0.8,
                                    turbo_solver="x0_renoise"), prompt_embeds=src.prompt_embeds)
    kw = preset("turbo", lora=read_lora(path))
    assert kw["sigmas"] == (0.8, 0.4) and kw["start_sigma"] == 0.8 and kw["steps"] == 2
    assert preset("turbo", lora=src)["sigmas"] == FASTWAN_SIGMAS  # no turbo metadata: the published one
    with pytest.raises(InputError, match="descending"):
        preset("turbo", lora={"vbridge.turbo_sigmas": [0.2, 0.5]})


@pytest.mark.parametrize("kwargs,match", [
    (dict(sigmas=[0.5, 0.9]), "descending"), (dict(sigmas=[1.2, 0.5]), r"\(0, 1\]"), (dict(sigmas=[]), "empty"),
    (dict(sigmas="0.9,0.5"), "list of numbers"), (dict(start_sigma=0.0), "start_sigma"),
    (dict(start_sigma=1.5), "start_sigma"), (dict(solver="dmd"), "unknown solver"),
])
def test_bad_few_step_settings_say_what_to_change(kwargs, match):
    with pytest.raises(InputError, match=match):
        SamplerSettings(**kwargs).validate()


def test_first_block_cache_skips_passes_and_reports(pipe):
    x = torch.rand(3, 32, 32)
    plain = pipe.restore(x, steps=6)
    assert plain.info["cache"] is None
    cached = pipe.restore(x, steps=6, cache="fbc:5")
    rep = cached.info["cache"]
    assert rep["method"] == "fbc:5" and rep["dit_passes"] == 6 and rep["skipped"] > 0
    assert cached.info["dit_calls_per_image"] == 6
    assert not torch.equal(plain.final[0], cached.final[0])
    # the hooks are gone afterwards: an uncached run is bit-identical to the first
    assert torch.equal(pipe.restore(x, steps=6).final[0], plain.final[0])
    # a threshold nothing passes changes nothing
    strict = pipe.restore(x, steps=6, cache="fbc:1e-9")
    assert strict.info["cache"]["skipped"] == 0
    assert (strict.final[0] - plain.final[0]).abs().max().item() <= 1e-6
    with pytest.raises(InputError, match="unknown cache"):
        pipe.restore(x, steps=2, cache="teacache")
    with pytest.raises(InputError, match="calibration file"):
        pipe.restore(x, steps=2, cache="mag")


def test_cli_turbo_preset_records_calls(tmp_path, tiny_model_dir):
    from tiny_files import random_lora
    from vbridge_core.cli import main
    from vbridge_core.images import save_png

    save_png(torch.rand(3, 32, 32), tmp_path / "in.png")
    lora = random_lora(tmp_path / "r.safetensors")
    out = tmp_path / "out"
    rc = main(["restore", str(tmp_path / "in.png"), "--out", str(out), "--model", str(tiny_model_dir), "--lora",
               str(lora), "--preset", "turbo", "--device", "cpu"])
    assert rc == 0 and (out / "in.png").exists()
    settings = json.loads((out / "vbridge_settings.json").read_text())
    assert settings["dit_calls_per_image"] == 3 and settings["restore_info"]["dit_calls_per_image"] == 3
    assert settings["sampler"]["solver"] == "x0_renoise"
    out2 = tmp_path / "out2"
    rc = main(["restore", str(tmp_path / "in.png"), "--out", str(out2), "--model", str(tiny_model_dir), "--lora",
               str(lora), "--sigmas", "0.9,0.5", "--start-sigma", "0.7", "--solver", "euler", "--cache", "fbc",
               "--device", "cpu"])
    assert rc == 0
    info = json.loads((out2 / "vbridge_settings.json").read_text())["restore_info"]
    assert info["sigmas"] == [0.7, 0.5] and info["dit_calls_per_image"] == 2 and info["cache"]["dit_passes"] == 2
    assert main(["restore", str(tmp_path / "in.png"), "--out", str(out2), "--model", str(tiny_model_dir),
                 "--lora", str(lora), "--sigmas", "0.5,0.9", "--device", "cpu"]) == 2


def test_cache_calibrate_writes_mag_ratios_and_reports_deviation(tmp_path, tiny_model_dir, capsys):
    from tiny_files import random_lora
    from vbridge_core.cli import main
    from vbridge_core.images import save_png

    save_png(torch.rand(3, 32, 32), tmp_path / "in.png")
    lora = random_lora(tmp_path / "r.safetensors")
    out = tmp_path / "cal"
    rc = main(["cache-calibrate", str(tmp_path / "in.png"), "--out", str(out), "--model", str(tiny_model_dir),
               "--lora", str(lora), "--steps", "6", "--device", "cpu", "--evaluate", "fbc:1e-9", "fbc:5",
               f"mag:{out / 'magcache.json'}:5"])
    assert rc == 0
    mag = json.loads((out / "magcache.json").read_text())
    assert len(mag["mag_ratios"]) == 6 and mag["mag_ratios"][0] == 1.0 and mag["steps"] == 6
    rows = {r["cache"]: r for r in json.loads((out / "cache_report.json").read_text())["rows"]}
    assert rows["fbc:1e-9"]["skipped_fraction"] == 0 and rows["fbc:1e-9"]["max_abs_diff"] <= 1e-6
    assert rows["fbc:5"]["skipped_fraction"] > 0 and rows["fbc:5"]["psnr_to_uncached_db"] > 0
    mag_row = rows[f"mag:{out / 'magcache.json'}:5"]
    assert mag_row["skipped_fraction"] > 0 and mag_row["max_abs_diff"] > 0
    assert "PSNR vs uncached" in capsys.readouterr().out


def test_compile_failure_at_first_use_falls_back_to_eager(caplog):
    """A backend that cannot compile (e.g. no Triton) fails at the first forward; the run logs it and
    finishes eagerly with the eager result."""
    def broken_backend(gm, example_inputs):
        raise RuntimeError("no working C++/Triton toolchain")

    p = VBridgePipeline(build_tiny_transformer(5), build_tiny_vae(6), device="cpu", dtype=torch.float32,
                        prompt_embeds=tiny_prompt_embeds())
    x = torch.rand(3, 32, 32)
    eager = p.restore(x, steps=2).final[0]
    assert p.maybe_compile(None) is False  # auto: CPU stays eager
    p.compile(backend=broken_backend)
    with caplog.at_level("WARNING"):
        res = p.restore(x, steps=2)
    assert "falling back to eager" in caplog.text
    assert res.info["compiled"] is None and torch.equal(res.final[0], eager)
    # uncompile (training does it) removes every compiled block wrapper
    p.compile(backend="eager")
    assert any(getattr(m, "_compiled_call_impl", None) is not None for m in p.transformer.modules())
    p.uncompile()
    assert p.compiled is None
    assert all(getattr(m, "_compiled_call_impl", None) is None for m in p.transformer.modules())


def test_restore_node_runs_an_explicit_few_step_schedule(pipe):
    from nodes.restore_nodes import RestoreTrajectory, parse_sigmas

    image = torch.rand(1, 32, 32, 3)
    final, traj, info = RestoreTrajectory().restore(pipe, image, frames=5, steps=50, seed=0, shift=5.0,
                                                    solver="x0_renoise", guidance=1.0, sigmas="1.0, 0.757, 0.522")
    assert final.shape == (1, 32, 32, 3) and traj.shape == (5, 32, 32, 3)
    assert "dit_calls_per_image: 3" in info
    assert parse_sigmas("") is None and parse_sigmas(" 0.9,0.5 ") == [0.9, 0.5]
    with pytest.raises(InputError, match="comma-separated"):
        parse_sigmas("0.9;0.5")
