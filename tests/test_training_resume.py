"""Training: resume equals an uninterrupted run, changed settings are refused, drift mode feeds drift_correct."""
from __future__ import annotations

import pytest
import torch

from vbridge_core.lora import read_lora
from vbridge_core.tiny import tiny_prompt_embeds
from vbridge_core.training.checkpoint import checkpoint_dir, list_checkpoints
from vbridge_core.training.trainer import TrainingCancelled, train_drift_lora, train_lora

from test_training import _fast, _pairs, _pipe


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
    assert ei.value.checkpoint is not None and ei.value.checkpoint.name == "state-step000007.safetensors"
    assert not out.exists()
    steps = [s for s, _ in list_checkpoints(checkpoint_dir(out))]
    assert steps == [6, 7]  # keep_checkpoints=2 dropped step 3
    assert not list(checkpoint_dir(out).glob("*.tmp*"))
    resumed = train_lora(_pipe(), pairs, _fast(**cfg), out, prompt_embeds=tiny_prompt_embeds(), resume="auto")
    assert resumed.losses == full.losses  # bit for bit: the safetensors+JSON state loses nothing
    a, b = read_lora(full.path), read_lora(resumed.path)
    assert set(a.weights) == set(b.weights)
    for k in a.weights:
        assert torch.equal(a.weights[k].down, b.weights[k].down)
        assert torch.equal(a.weights[k].up, b.weights[k].up)


def test_resume_refuses_changed_settings(tmp_path):
    from vbridge_core.errors import InputError

    pairs = _pairs(1, size=32)
    out = tmp_path / "x.safetensors"
    with pytest.raises(TrainingCancelled):
        train_lora(_pipe(), pairs, _fast(steps=4, checkpoint_every=1), out, prompt_embeds=tiny_prompt_embeds(),
                   should_cancel=lambda: True)
    with pytest.raises(InputError, match="rank"):
        train_lora(_pipe(), pairs, _fast(steps=4, rank=8), out, prompt_embeds=tiny_prompt_embeds(), resume="auto")


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
