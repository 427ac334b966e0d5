"""LoRA files through the whole restore: every key format of the same weights gives the same output."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from vbridge_core.lora import LoraLayer, diffusers_to_wan_name, read_lora, write_lora
from vbridge_core.pipeline import VBridgePipeline
from vbridge_core.tiny import build_tiny_transformer, build_tiny_vae, tiny_prompt_embeds

RANK = 4


@pytest.fixture(scope="module")
def layers():
    g = torch.Generator().manual_seed(0)
    model = build_tiny_transformer(21)
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.startswith("blocks.") and (".attn" in name or ".ffn" in name):
            out[name] = LoraLayer(down=torch.randn(RANK, mod.in_features, generator=g) * 0.05,
                                  up=torch.randn(mod.out_features, RANK, generator=g) * 0.05, alpha=float(RANK))
    return out


def _restore(path, image):
    pipe = VBridgePipeline(build_tiny_transformer(21), build_tiny_vae(22), device="cpu", dtype=torch.float32)
    pipe.load_lora(path)
    return pipe.restore(image, steps=4, seed=3).final[0]


def test_ours_peft_and_comfyui_keys_restore_identically(tmp_path, layers):
    prompt = tiny_prompt_embeds(4)
    ours = write_lora(tmp_path / "ours.safetensors", layers, rank=RANK, alpha=RANK,
                      metadata={"role": "restoration", "frames": 5}, prompt_embeds=prompt)
    back = read_lora(ours)
    assert back.role == "restoration" and back.rank == RANK
    assert torch.equal(back.prompt_embeds, prompt)
    for n, l in layers.items():
        assert torch.equal(back.weights[n].down, l.down) and torch.equal(back.weights[n].up, l.up)

    peft = {}
    comfy = {}
    for n, l in layers.items():
        peft[f"transformer.{n}.lora_A.weight"] = l.down
        peft[f"transformer.{n}.lora_B.weight"] = l.up
        w = diffusers_to_wan_name(n)
        comfy[f"diffusion_model.{w}.lora_down.weight"] = l.down
        comfy[f"diffusion_model.{w}.lora_up.weight"] = l.up
        comfy[f"diffusion_model.{w}.alpha"] = torch.tensor(float(RANK))
    # foreign files carry no prompt: the same embedding goes with the pipeline instead
    peft["vbridge.prompt_embeds"] = prompt
    comfy["vbridge.prompt_embeds"] = prompt
    save_file(peft, str(tmp_path / "peft.safetensors"))
    save_file(comfy, str(tmp_path / "comfy.safetensors"))

    image = torch.rand(3, 32, 48, generator=torch.Generator().manual_seed(1))
    a = _restore(ours, image)
    b = _restore(tmp_path / "peft.safetensors", image)
    c = _restore(tmp_path / "comfy.safetensors", image)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    torch.testing.assert_close(a, c, atol=1e-5, rtol=0)

    pipe = VBridgePipeline(build_tiny_transformer(21), build_tiny_vae(22), device="cpu", dtype=torch.float32,
                           prompt_embeds=prompt)
    base = pipe.restore(image, steps=4, seed=3).final[0]
    assert (base - a).abs().max() > 1e-3, "the LoRA must change the restore"


def test_switching_adapters_on_one_base(tmp_path, layers):
    prompt = tiny_prompt_embeds(4)
    r = write_lora(tmp_path / "r.safetensors", layers, rank=RANK, alpha=RANK, metadata={"role": "restoration"},
                   prompt_embeds=prompt)
    half = {n: LoraLayer(l.down, -l.up, l.alpha) for n, l in layers.items()}
    d = write_lora(tmp_path / "d.safetensors", half, rank=RANK, alpha=RANK, metadata={"role": "drift_correction"},
                   prompt_embeds=prompt)
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(2))
    both = VBridgePipeline(build_tiny_transformer(21), build_tiny_vae(22), device="cpu", dtype=torch.float32)
    both.load_lora(r)
    both.load_lora(d)
    assert set(both.adapters) == {"restoration", "drift_correction"}
    r1 = both.restore(image, steps=3).final[0]
    d1 = both.drift_correct(image, steps=3).final[0]
    r2 = both.restore(image, steps=3).final[0]
    torch.testing.assert_close(r1, r2, atol=0, rtol=0)
    only_d = VBridgePipeline(build_tiny_transformer(21), build_tiny_vae(22), device="cpu", dtype=torch.float32)
    only_d.load_lora(d)
    torch.testing.assert_close(d1, only_d.drift_correct(image, steps=3).final[0], atol=1e-6, rtol=0)
    only_r = VBridgePipeline(build_tiny_transformer(21), build_tiny_vae(22), device="cpu", dtype=torch.float32)
    only_r.load_lora(r)
    torch.testing.assert_close(r1, only_r.restore(image, steps=3).final[0], atol=1e-6, rtol=0)
    assert (r1 - d1).abs().max() > 1e-3


def test_restore_with_only_a_drift_lora_says_which_lora_is_missing(tmp_path, layers):
    from vbridge_core.errors import InputError

    d = write_lora(tmp_path / "d.safetensors", layers, rank=RANK, alpha=RANK, metadata={"role": "drift_correction"},
                   prompt_embeds=tiny_prompt_embeds(4))
    pipe = VBridgePipeline(build_tiny_transformer(21), build_tiny_vae(22), device="cpu", dtype=torch.float32)
    pipe.load_lora(d)
    with pytest.raises(InputError, match="needs the restoration LoRA.*--lora"):
        pipe.restore(torch.rand(3, 32, 32), steps=2)
    assert pipe.drift_correct(torch.rand(3, 32, 32), steps=2).final[0].shape == (3, 32, 32)
