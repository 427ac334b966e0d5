"""LoRAs from other trainers at the right scale: peft ``save_pretrained`` folders (their alpha, rsLoRA,
rank/alpha patterns) and the ComfyUI-applied tensor patches (``diff``, ``diff_b``, norm and conv keys).

References are built independently of :mod:`vbridge_core.lora`: peft's own injected model for the
folders, and for the patches a copy of the base whose tensors were changed by hand with ComfyUI's
arithmetic (``comfy/lora.py`` ``calculate_weight`` and ``comfy/weight_adapter/lora.py``):
``w += s * diff``, ``b += s * diff_b``, conv ``w += s * alpha / r * (up.flatten(1) @ down.flatten(1)).reshape(w.shape)``.
"""
from __future__ import annotations

import copy
import logging

import pytest
import torch
from safetensors.torch import save_file

from vbridge_core.errors import LoraMismatchError, ModelFileError
from vbridge_core.lora import (
    LoraFile, LoraLayer, apply_lora, loaded_loras, read_lora, remove_lora, set_active_loras,
)
from vbridge_core.tiny import build_tiny_transformer, tiny_prompt_embeds

ATOL = 1e-5
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]


@pytest.fixture(scope="module")
def base():
    return build_tiny_transformer(seed=0)


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(1, 48, 2, 4, 4, generator=g)
    timestep = torch.tensor([[0.0] * 4 + [700.0] * 4])
    return hidden, timestep, tiny_prompt_embeds()


def run(model, inputs) -> torch.Tensor:
    hidden, timestep, text = inputs
    with torch.no_grad():
        return model(hidden_states=hidden, timestep=timestep, encoder_hidden_states=text, return_dict=False)[0]


def _peft_folder(base, tmp_path, **cfg):
    """A peft ``save_pretrained`` folder of a random adapter on ``base``, and peft's own output with it."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(base), LoraConfig(target_modules=TARGETS, **cfg))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    folder = tmp_path / "peft_adapter"
    model.save_pretrained(str(folder))
    return folder, model.get_base_model()


def test_peft_save_pretrained_folder_uses_its_alpha(tmp_path, base, inputs):
    folder, peft_model = _peft_folder(base, tmp_path, r=4, lora_alpha=16)
    assert (folder / "adapter_model.safetensors").is_file() and (folder / "adapter_config.json").is_file()
    ref = run(peft_model, inputs)
    lf = read_lora(folder)  # the folder, as saved
    assert lf.alpha == 16.0 and lf.rank == 4 and not lf.unmapped_keys
    m = copy.deepcopy(base)
    apply_lora(m, lf, "peft")
    fixed = (run(m, inputs) - ref).abs().max().item()
    assert fixed < ATOL
    # the file inside the folder (what ComfyUI's file list shows) reads its config too
    assert read_lora(folder / "adapter_model.safetensors").alpha == 16.0
    # the old reading (alpha = rank, i.e. scale 1 instead of 4) is visibly off: the test can fail
    wrong = LoraFile(weights={n: LoraLayer(l.down, l.up, float(l.rank)) for n, l in lf.weights.items()}, rank=4, alpha=4.0)
    m2 = copy.deepcopy(base)
    apply_lora(m2, wrong, "wrong")
    assert (run(m2, inputs) - ref).abs().max().item() > 100 * ATOL


def test_peft_rslora_and_patterns(tmp_path, base, inputs):
    folder, peft_model = _peft_folder(base, tmp_path, r=4, lora_alpha=8, use_rslora=True,
                                      rank_pattern={"blocks.1.attn1.to_q": 2}, alpha_pattern={"blocks.0.ffn.net.2": 3})
    lf = read_lora(folder)
    assert lf.weights["blocks.1.attn1.to_q"].rank == 2
    assert lf.weights["blocks.0.ffn.net.2"].alpha == pytest.approx(3 * 4 ** 0.5)
    m = copy.deepcopy(base)
    apply_lora(m, lf, "rs")
    assert torch.allclose(run(m, inputs), run(peft_model, inputs), atol=ATOL, rtol=ATOL)


def test_lora_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFileError, match="adapter_model.safetensors"):
        read_lora(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file({"base_model.model.blocks.0.attn1.to_q.lora_A.weight": torch.zeros(2, 256),
               "base_model.model.blocks.0.attn1.to_q.lora_B.weight": torch.zeros(256, 2)},
              str(bad / "adapter_model.safetensors"))
    (bad / "adapter_config.json").write_text('{"r": 2, "lora_alpha": 2, "use_dora": true}')
    with pytest.raises(LoraMismatchError, match="DoRA"):
        read_lora(bad)


# ---- ComfyUI tensor patches ----------------------------------------------------------------------


def _patch_file(path, base, seed: int, scale: float = 1.0):
    """A ComfyUI-style file mixing a Linear LoRA with diff / diff_b / norm / modulation / conv keys, and the
    same changes as (diffusers tensor name, kind, value) for the hand-made reference."""
    g = torch.Generator().manual_seed(seed)
    params = dict(base.named_parameters())

    def rnd(shape, s=0.02):
        return torch.randn(shape, generator=g) * s * scale

    t: dict[str, torch.Tensor] = {}
    ref: list[tuple[str, str, object]] = []
    # a Linear LoRA (peft adapter) plus the Linear's bias diff
    q = params["blocks.0.attn1.to_q.weight"]
    down, up = rnd((4, q.shape[1]), 0.1), rnd((q.shape[0], 4), 0.5)
    t["diffusion_model.blocks.0.self_attn.q.lora_down.weight"] = down
    t["diffusion_model.blocks.0.self_attn.q.lora_up.weight"] = up
    t["diffusion_model.blocks.0.self_attn.q.alpha"] = torch.tensor(8.0)
    ref.append(("blocks.0.attn1.to_q.weight", "delta", 8.0 / 4 * up @ down))
    for orig, diffusers_name, key in (
        ("blocks.0.self_attn.q", "blocks.0.attn1.to_q.bias", "diff_b"),
        ("blocks.1.ffn.2", "blocks.1.ffn.net.2.bias", "diff_b"),
        ("blocks.0.norm3", "blocks.0.norm2.weight", "diff"),
        ("blocks.0.norm3", "blocks.0.norm2.bias", "diff_b"),
        ("blocks.1.self_attn.norm_q", "blocks.1.attn1.norm_q.weight", "diff"),
        ("blocks.0.modulation", "blocks.0.scale_shift_table", "diff"),
        ("head.modulation", "scale_shift_table", "diff"),
        ("patch_embedding", "patch_embedding.bias", "diff_b"),
        ("text_embedding.0", "condition_embedder.text_embedder.linear_1.weight", "diff"),
    ):
        v = rnd(params[diffusers_name].shape)
        t[f"diffusion_model.{orig}.{key}"] = v
        ref.append((diffusers_name, "delta", v))
    # kohya-style name for a norm diff
    v = rnd(params["blocks.1.attn2.norm_k.weight"].shape)
    t["lora_unet_blocks_1_cross_attn_norm_k.diff"] = v
    ref.append(("blocks.1.attn2.norm_k.weight", "delta", v))
    # a conv LoRA on the Conv3d patch embedding (kernel 1x2x2)
    w = params["patch_embedding.weight"]
    cdown, cup = rnd((3, w.shape[1], 1, 2, 2), 0.3), rnd((w.shape[0], 3, 1, 1, 1), 0.3)
    t["diffusion_model.patch_embedding.lora_down.weight"] = cdown
    t["diffusion_model.patch_embedding.lora_up.weight"] = cup
    t["diffusion_model.patch_embedding.alpha"] = torch.tensor(1.5)
    ref.append(("patch_embedding.weight", "delta", 1.5 / 3 * (cup.flatten(1) @ cdown.flatten(1)).reshape(w.shape)))
    save_file(t, str(path))
    return path, ref


def _hand_patched(base, *refs_strengths):
    m = copy.deepcopy(base)
    params = dict(m.named_parameters())
    with torch.no_grad():
        for ref, s in refs_strengths:
            for name, _, v in ref:
                params[name] += s * v
    return m


def test_comfyui_patch_keys_apply_switch_and_remove(tmp_path, base, inputs):
    pa, ref_a = _patch_file(tmp_path / "a.safetensors", base, 1)
    pb, ref_b = _patch_file(tmp_path / "b.safetensors", base, 2, scale=0.5)
    lf = read_lora(pa)
    assert set(lf.weights) == {"blocks.0.attn1.to_q"} and len(lf.patches) == 11 and not lf.unmapped_keys
    assert "11 tensor patches" in lf.describe()
    m = copy.deepcopy(base)
    originals = {n: p.detach().clone() for n, p in m.named_parameters()}
    apply_lora(m, pa, "a", strength=0.6)
    apply_lora(m, pb, "b", strength=1.0)
    set_active_loras(m, {"a": 0.6})
    out_a = run(m, inputs)
    assert torch.allclose(out_a, run(_hand_patched(base, (ref_a, 0.6)), inputs), atol=ATOL, rtol=ATOL)
    set_active_loras(m, {"b": 1.0})
    assert torch.allclose(run(m, inputs), run(_hand_patched(base, (ref_b, 1.0)), inputs), atol=ATOL, rtol=ATOL)
    set_active_loras(m, {"a": 0.6, "b": 1.0})
    assert torch.allclose(run(m, inputs), run(_hand_patched(base, (ref_a, 0.6), (ref_b, 1.0)), inputs),
                          atol=ATOL, rtol=ATOL)
    set_active_loras(m, {})
    assert torch.equal(run(m, inputs), run(base, inputs))
    set_active_loras(m, {"a": 0.6})
    assert torch.allclose(run(m, inputs), out_a, atol=1e-6, rtol=0)
    remove_lora(m, "a")
    remove_lora(m, "b")
    assert loaded_loras(m) == []
    for n, p in m.named_parameters():
        n = n.replace(".base_layer", "")
        assert torch.equal(p, originals[n]), n


def test_patch_only_lora_inside_inference_mode(tmp_path, base, inputs):
    """An extracted bias/norm-only file makes no peft adapter; ComfyUI runs nodes in inference mode."""
    params = dict(base.named_parameters())
    v = torch.randn(params["blocks.0.norm2.bias"].shape) * 0.05
    p = tmp_path / "bias_only.safetensors"
    save_file({"diffusion_model.blocks.0.norm3.diff_b": v}, str(p))
    m = copy.deepcopy(base)
    with torch.inference_mode():
        apply_lora(m, p, "bias")
        out = run(m, inputs)
    assert loaded_loras(m) == ["bias"]
    assert torch.allclose(out, run(_hand_patched(base, ([("blocks.0.norm2.bias", "delta", v)], 1.0)), inputs),
                          atol=ATOL, rtol=ATOL)
    assert not dict(m.named_parameters())["blocks.0.norm2.bias"].is_inference()


def test_unsupported_keys_are_listed_and_allow_partial_applies_the_rest(tmp_path, base, inputs, caplog):
    params = dict(base.named_parameters())
    q = params["blocks.0.attn1.to_q.weight"]
    down, up = torch.randn(2, q.shape[1]) * 0.1, torch.randn(q.shape[0], 2) * 0.1
    t = {"diffusion_model.blocks.0.self_attn.q.lora_down.weight": down,
         "diffusion_model.blocks.0.self_attn.q.lora_up.weight": up,
         "diffusion_model.blocks.1.self_attn.k.hada_w1_a": torch.zeros(2, 2),
         "diffusion_model.blocks.1.self_attn.k.hada_w1_b": torch.zeros(2, 2),
         "diffusion_model.blocks.0.norm3.diff": torch.zeros(7)}  # wrong shape
    p = tmp_path / "mixed.safetensors"
    save_file(t, str(p))
    m = copy.deepcopy(base)
    with pytest.raises(LoraMismatchError) as e:
        apply_lora(m, p, "x")
    msg = str(e.value)
    assert "hada_w1_a" in msg and "LoHa" in msg and "blocks.0.norm2.weight" in msg and "--allow-partial" in msg
    assert loaded_loras(m) == []
    with caplog.at_level(logging.WARNING, logger="vbridge_core.lora"):
        apply_lora(m, p, "x", allow_partial=True)
    assert "hada_w1_b" in caplog.text
    ref = _hand_patched(base, ([("blocks.0.attn1.to_q.weight", "delta", up @ down)], 1.0))
    assert torch.allclose(run(m, inputs), run(ref, inputs), atol=ATOL, rtol=ATOL)


# ---- the three surfaces of --allow-partial: CLI, node, API -----------------------------------------


@pytest.fixture(scope="module")
def partial_lora(tmp_path_factory):
    """Our restoration LoRA plus two LoHa keys no loader applies (a file that only loads partially)."""
    from safetensors import safe_open

    from tiny_files import random_lora

    d = tmp_path_factory.mktemp("partial")
    src = random_lora(d / "src.safetensors", "restoration", 1)
    with safe_open(str(src), framework="pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    t["diffusion_model.blocks.1.self_attn.k.hada_w1_a"] = torch.zeros(2, 2)
    t["diffusion_model.blocks.1.self_attn.k.hada_w1_b"] = torch.zeros(2, 2)
    p = d / "partial.safetensors"
    save_file(t, str(p), metadata=meta)
    return p


def test_cli_allow_partial(tmp_path, tiny_model_dir, partial_lora, capsys):
    import json

    from vbridge_core.cli import main
    from vbridge_core.images import save_png

    save_png(torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0)), tmp_path / "in.png")
    args = ["restore", str(tmp_path / "in.png"), "--model", str(tiny_model_dir), "--lora", str(partial_lora),
            "--steps", "1"]
    assert main(args + ["--out", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "hada_w1_a" in err and "--allow-partial" in err
    assert not (tmp_path / "refused" / "in.png").exists()
    assert main(args + ["--out", str(tmp_path / "out"), "--allow-partial"]) == 0
    settings = json.loads((tmp_path / "out" / "vbridge_settings.json").read_text())
    skipped = settings["restore_info"]["lora_not_applied"]["restoration"]
    assert any("hada_w1_a" in s for s in skipped) and settings["lora_skipped"]["restoration"] == skipped


def test_node_allow_partial_input(tmp_path, tiny_model_dir, partial_lora):
    import shutil

    from tiny_files import call_node, comfy_models_root, models_dir
    from vbridge_core.errors import LoraMismatchError as Mismatch

    root = comfy_models_root(tmp_path, tiny_model_dir, {})
    shutil.copy(partial_lora, root / "loras" / "vbridge" / "partial.safetensors")
    common = dict(dit="tiny_dit.safetensors", vae="tiny_vae.safetensors", restoration_lora="vbridge/partial.safetensors",
                  restoration_strength=1.0, drift_lora="none", drift_strength=1.0, precision="bf16",
                  attention="auto", memory="keep on GPU")
    with models_dir(root):
        with pytest.raises(Mismatch, match="allow_partial_lora"):
            call_node("LoadVBridge", **common)
        (pipe,) = call_node("LoadVBridge", allow_partial_lora=True, **common)
    assert any("hada_w1_b" in s for s in pipe.adapters["restoration"]["skipped"])
