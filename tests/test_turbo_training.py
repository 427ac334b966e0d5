"""Turbo distillation (``train --mode turbo``): the student starts as the teacher, learns towards the
teacher's cached 50-step outputs, records its schedule for ``--preset turbo``, resumes exactly, and its
training-side sampler is the inference sampler (``sampler.sample`` with ``solver="x0_renoise"``)."""
from __future__ import annotations

import pytest
import torch

from vbridge_core.errors import InputError
from vbridge_core.lora import read_lora
from vbridge_core.tiny import tiny_prompt_embeds
from vbridge_core.training.checkpoint import checkpoint_dir
from vbridge_core.training.trainer import TrainingCancelled, train_lora
from vbridge_core.training.turbo import TurboSettings, few_step_sample, train_turbo_lora

from test_training import _fast, _pairs, _pipe

TURBO = TurboSettings(calls=2, teacher_steps=3)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    path = tmp_path_factory.mktemp("turbo") / "teacher.safetensors"
    train_lora(_pipe(), _pairs(2, size=32), _fast(steps=3, resolution=32, crops_per_pair=1), path,
               prompt_embeds=tiny_prompt_embeds(), write_plots=False)
    return path


def _student_cfg(**kw):
    return _fast(**{**dict(steps=4, resolution=32, crops_per_pair=1), **kw})


def test_student_file_schedule_and_teacher_cache(tmp_path, teacher):
    pipe = _pipe()
    events = []
    out = tmp_path / "student.safetensors"
    res = train_turbo_lora(pipe, _pairs(2, size=32), teacher, _student_cfg(rank=16), out, turbo=TURBO,
                           callback=events.append, write_plots=False)
    assert [e.kind for e in events].count("teacher") == 2  # 2 pairs x 1 view, sampled once
    assert all(torch.isfinite(torch.tensor(res.losses)))
    lf, tf = read_lora(res.path), read_lora(teacher)
    assert lf.role == "restoration" and lf.rank == tf.rank  # the student took the teacher's rank, not 16
    meta = {k.removeprefix("vbridge."): v for k, v in lf.metadata.items()}
    assert meta["turbo_sigmas"] == [1.0, 0.5] and meta["turbo_start_sigma"] is None
    assert meta["turbo_solver"] == "x0_renoise" and meta["turbo_calls"] == 2
    assert meta["turbo_teacher"] == "teacher.safetensors"
    assert torch.equal(lf.prompt_embeds, tf.prompt_embeds)
    # trained away from the teacher it started from
    name = sorted(tf.weights)[0]
    assert (lf.weights[name].up - tf.weights[name].up).abs().max() > 1e-5
    assert not pipe.adapters and not getattr(pipe.transformer, "peft_config", {})  # the pipeline is left clean
    cached = list((checkpoint_dir(out) / "cache").glob("turbo_teacher_*.safetensors"))
    assert len(cached) == 1
    # a second run with the same teacher and views reads the cache instead of sampling again
    events.clear()
    train_turbo_lora(_pipe(), _pairs(2, size=32), teacher, _student_cfg(), tmp_path / "again.safetensors",
                     turbo=TURBO, callback=events.append, cache_dir=checkpoint_dir(out) / "cache", write_plots=False)
    assert "teacher" not in [e.kind for e in events]


def test_student_starts_as_the_teacher(tmp_path, teacher):
    """One step at a negligible learning rate leaves the student equal to the teacher it was copied from."""
    res = train_turbo_lora(_pipe(), _pairs(1, size=32), teacher, _student_cfg(steps=1, learning_rate=1e-12),
                           tmp_path / "s.safetensors", turbo=TURBO, write_plots=False)
    lf, tf = read_lora(res.path), read_lora(teacher)
    assert set(lf.weights) == set(tf.weights)
    for n in tf.weights:
        torch.testing.assert_close(lf.weights[n].delta(), tf.weights[n].delta(), atol=1e-6, rtol=1e-5)


def test_resume_equals_uninterrupted(tmp_path, teacher):
    pairs = _pairs(2, size=32)
    turbo = TurboSettings(calls=4, teacher_steps=2, hq_weight=0.5)
    cache = tmp_path / "cache"  # the teacher's targets are sampled once for the three runs
    full = train_turbo_lora(_pipe(), pairs, teacher, _student_cfg(steps=4), tmp_path / "full.safetensors",
                            turbo=turbo, cache_dir=cache, write_plots=False)
    out = tmp_path / "part.safetensors"
    steps = {"n": 0}
    with pytest.raises(TrainingCancelled):
        train_turbo_lora(_pipe(), pairs, teacher, _student_cfg(steps=4, checkpoint_every=1), out, turbo=turbo,
                         callback=lambda p: steps.update(n=p.step) if p.kind == "step" else None,
                         should_cancel=lambda: steps["n"] >= 2, cache_dir=cache, write_plots=False)
    resumed = train_turbo_lora(_pipe(), pairs, teacher, _student_cfg(steps=4, checkpoint_every=1), out, turbo=turbo,
                               resume="auto", cache_dir=cache, write_plots=False)
    assert resumed.losses == pytest.approx(full.losses, abs=1e-6)
    with pytest.raises(InputError, match="turbo"):  # other turbo settings: refused, not mixed
        train_turbo_lora(_pipe(), pairs, teacher, _student_cfg(steps=4, checkpoint_every=1), out,
                         turbo=TurboSettings(calls=2, teacher_steps=2), resume=out.with_name("part.checkpoints"),
                         write_plots=False)


def test_bad_turbo_settings_are_clear_errors(tmp_path, teacher):
    with pytest.raises(InputError, match="calls"):
        TurboSettings(calls=3).validate()
    with pytest.raises(InputError, match="start_sigma"):
        TurboSettings(calls=2, sigmas=[1.0, 0.5], start_sigma=0.6).validate()
    with pytest.raises(InputError, match="decrease"):
        TurboSettings(calls=2, sigmas=[0.5, 0.8]).validate()
    with pytest.raises(InputError, match="not found"):
        train_turbo_lora(_pipe(), _pairs(1, size=32), tmp_path / "nope.safetensors", _student_cfg(),
                         tmp_path / "s.safetensors")
    assert TurboSettings(calls=4, start_sigma=0.6).schedule() == [0.6, 0.45, 0.3, 0.15]


def test_cli_turbo_mode_needs_a_teacher(tmp_path, capsys):
    from vbridge_core.cli import main

    base = ["train", "--mode", "turbo", "--pairs", str(tmp_path), "--out", str(tmp_path / "s.safetensors")]
    assert main(base) == 2
    assert "--teacher-lora" in capsys.readouterr().err
    assert main(base + ["--teacher-lora", str(tmp_path / "missing.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not found" in err
    assert main(base + ["--teacher-lora", __file__, "--turbo-calls", "2", "--turbo-sigmas", "1,0.5,0.25"]) == 2
    assert "one entry per call" in capsys.readouterr().err


@pytest.mark.parametrize("start", [None, 0.6])
def test_training_sampler_is_the_inference_sampler(start):
    """The student is trained on the states ``sampler.sample(solver="x0_renoise")`` produces at inference."""
    from vbridge_core.sampler import SamplerSettings, sample

    tr = _pipe().transformer
    sigmas = TurboSettings(calls=4, start_sigma=start).schedule()
    g = torch.Generator().manual_seed(0)
    cond = torch.randn(1, 48, 1, 2, 2, generator=g)
    noise = torch.randn(1, 48, 2, 2, 2, generator=g)
    ref_gen = torch.Generator().manual_seed(5)
    ref = sample(tr, cond, noise, tiny_prompt_embeds(), SamplerSettings(sigmas=sigmas, start_sigma=start,
                                                                         solver="x0_renoise"), generator=ref_gen)
    fresh_gen = torch.Generator().manual_seed(5)
    fresh = [torch.randn(noise.shape, generator=fresh_gen) for _ in range(len(sigmas) - 1)]
    with torch.no_grad():
        ours = few_step_sample(tr, cond, noise, tiny_prompt_embeds(), sigmas, start, "x0_renoise", fresh)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
