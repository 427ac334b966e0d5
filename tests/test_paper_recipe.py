"""The authors' recipe from the graph and the API: presets on the nodes, the release's size rule,
prompts padded to 512 tokens wherever they enter, and what to do when a full fine-tune has no prompt."""
from __future__ import annotations

import pytest
import torch

from tiny_files import call_node, random_lora
from vbridge_core.errors import InputError
from vbridge_core.pipeline import VBridgePipeline
from vbridge_core.presets import PRESETS, preset, preset_choices, resolve_settings
from vbridge_core.runtime import WAN_TEXT_LEN, pad_prompt_embeds
from vbridge_core.tiny import tiny_prompt_embeds


@pytest.fixture(scope="module")
def pipe(tiny_model_dir, tmp_path_factory):
    p = VBridgePipeline.from_files(tiny_model_dir, device="cpu", dtype=torch.float32)
    p.load_lora(random_lora(tmp_path_factory.mktemp("recipe") / "r.safetensors", "restoration", 1))
    return p


class TextLengths:
    """Records the prompt length and the number of calls of every DiT forward."""

    def __init__(self, transformer):
        self.lengths: list[int] = []
        self.handle = transformer.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.lengths.append(int(kwargs["encoder_hidden_states"].shape[1]))

    def close(self):
        self.handle.remove()


def test_preset_choices_follow_presets():
    assert preset_choices() == list(PRESETS) + ["custom"]
    from nodes.restore_nodes import DriftCorrect, RestoreTrajectory

    for cls in (RestoreTrajectory, DriftCorrect):
        types = cls.INPUT_TYPES()
        req = {**types["required"], **types.get("optional", {})}
        assert req["preset"][0] == preset_choices() and req["preset"][1]["default"] == "custom"
        assert req["sigma_grid"][0] == ["diffusers", "official"] and "guidance_skip_tail" in req
    custom = dict(frames=9, seed=3, steps=7, shift=2.0, solver="euler", guidance=1.5, sigma_grid="official",
                  guidance_skip_tail=0.2)
    assert resolve_settings("custom", custom) == custom
    assert resolve_settings("paper", custom) == dict(preset("paper"), frames=9, seed=3)


def test_node_paper_preset_runs_the_release_loop(pipe):
    img = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(0))
    spy = TextLengths(pipe.transformer)
    try:
        _, _, info = call_node("RestoreTrajectory", vbridge_model=pipe, image=img, frames=5, steps=3, seed=0,
                               shift=1.0, solver="euler", guidance=1.0, preset="paper", sigma_grid="diffusers",
                               guidance_skip_tail=0.0)
    finally:
        spy.close()
    # 50 steps, guidance 6, no unconditional pass in the last 7 steps: 93 noise predictions (widgets ignored),
    # made in 50 DiT calls (the two guidance passes of a step share one batched call)
    assert len(spy.lengths) == 50 and set(spy.lengths) == {WAN_TEXT_LEN}
    for line in ("dit_calls_per_image: 93", "steps: 50", "sigma_grid: official", "guidance: 6.0", "guidance_skip_tail: 0.15", "preset: paper",
                 "solver: unipc", "shift: 5.0"):
        assert line in info


def test_node_custom_reaches_grid_and_skip_tail(pipe):
    img = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(1))
    kw = dict(frames=5, steps=4, seed=2, shift=5.0, solver="unipc", guidance=2.0)
    restored, _, info = call_node("RestoreTrajectory", vbridge_model=pipe, image=img, preset="custom",
                                  sigma_grid="official", guidance_skip_tail=0.5, **kw)
    assert "sigma_grid: official" in info and "guidance_skip_tail: 0.5" in info
    direct = pipe.restore(img.permute(0, 3, 1, 2), sigma_grid="official", guidance_skip_tail=0.5, **kw).final[0]
    assert torch.equal(restored[0].permute(2, 0, 1), direct)


def test_release_size_rule(pipe):
    """1441x100 is taller than 1440: the release resizes it to an area-preserving 1440x96 (multiples of 32)."""
    x = torch.rand(3, 1441, 100, generator=torch.Generator().manual_seed(2))
    res = pipe.restore(x, steps=1, release_size=True)
    assert res.final[0].shape == (3, 1440, 96)
    assert res.info["release_size"]["resized"] == [{"image": 0, "from": [1441, 100], "to": [1440, 96]}]
    from vbridge_core.images import resize_image

    same = pipe.restore(resize_image(x, (1440, 96)), steps=1).final[0]
    assert torch.equal(res.final[0], same)
    small = pipe.restore(x[:, :64, :64], steps=1, release_size=True)
    assert small.final[0].shape == (3, 64, 64) and small.info["release_size"]["resized"] == []
    assert preset("paper")["release_size"] is True and "release_size" not in preset("fast")


def test_prompt_embeds_are_padded_wherever_they_enter(pipe):
    x = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(3))
    short = tiny_prompt_embeds(7)
    assert short.shape[1] < WAN_TEXT_LEN
    spy = TextLengths(pipe.transformer)
    try:
        a = pipe.restore(x, steps=2, prompt_embeds=short).final[0]          # API, unpadded
        b = pipe.restore(x, steps=2, prompt_embeds=pad_prompt_embeds(short)).final[0]
        pipe.restore(x, steps=2)                                             # the LoRA file's embedding
    finally:
        spy.close()
    assert torch.equal(a, b)
    assert set(spy.lengths) == {WAN_TEXT_LEN}
    padded = pad_prompt_embeds(short)
    assert torch.equal(padded[:, : short.shape[1]], short) and not padded[:, short.shape[1]:].any()


def test_full_finetune_without_prompt_says_how(tiny_model_dir, tmp_path, capsys):
    bare = VBridgePipeline.from_files(tiny_model_dir, device="cpu", dtype=torch.float32)
    with pytest.raises(InputError, match=r"--text-encoder.*release_prompt_embeds.*CLIPTextEncode"):
        bare.restore(torch.rand(3, 32, 32), steps=1)
    from vbridge_core.cli import main
    from vbridge_core.images import save_png

    save_png(torch.rand(3, 32, 32), tmp_path / "in.png")
    assert main(["restore", str(tmp_path / "in.png"), "--out", str(tmp_path / "o"), "--model", str(tiny_model_dir),
                 "--preset", "paper"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--preset paper --text-encoder" in err and "cached" in err
