"""Accelerator bases (issue 8 item 3): a step-distilled base as a LoRA in FastWan's ComfyUI key format,
stacked under the V-Bridge LoRAs, gives what loading the distilled weights as the DiT itself gives."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from tiny_files import fastwan_style_lora, random_lora
from vbridge_core.lora import read_lora, wan_to_diffusers_name
from vbridge_core.pipeline import VBridgePipeline
from vbridge_core.tiny import build_tiny_transformer, build_tiny_vae

#: original Wan names of the per-block 1-D weights -> diffusers names inside the block
_BLOCK_NORMS = {"self_attn.norm_q": "attn1.norm_q", "self_attn.norm_k": "attn1.norm_k",
                "cross_attn.norm_q": "attn2.norm_q", "cross_attn.norm_k": "attn2.norm_k", "norm3": "norm2"}


def _diffusers_owner(wan: str) -> str:
    """Diffusers module name of an original Wan module name (Linears and the block norms)."""
    if wan.startswith("blocks."):
        i, _, tail = wan[len("blocks."):].partition(".")
        if tail in _BLOCK_NORMS:
            return f"blocks.{i}.{_BLOCK_NORMS[tail]}"
    return wan_to_diffusers_name(wan)


def _merged(transformer: torch.nn.Module, path) -> torch.nn.Module:
    """The distilled DiT the accelerator LoRA stands for, by ComfyUI's rules at strength 1 (no alpha
    keys = scale 1): ``W += up @ down``, ``bias += diff_b``, ``weight += diff``."""
    from safetensors.torch import load_file

    merged = copy.deepcopy(transformer)
    params = dict(merged.named_parameters())
    sd = {k.removeprefix("diffusion_model."): v.float() for k, v in load_file(str(path)).items()}
    with torch.no_grad():
        for key, t in sd.items():
            if key.endswith(".lora_down.weight"):
                owner = key[: -len(".lora_down.weight")]
                params[f"{_diffusers_owner(owner)}.weight"] += sd[f"{owner}.lora_up.weight"] @ t
            elif key.endswith(".diff_b"):
                params[f"{_diffusers_owner(key[: -len('.diff_b')])}.bias"] += t
            elif key.endswith(".diff"):
                params[f"{_diffusers_owner(key[: -len('.diff')])}.weight"] += t
    return merged


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("accel")
    base = build_tiny_transformer(seed=11)
    accel = fastwan_style_lora(d / "Wan2_2_5B_FastWanFullAttn_lora_rank_128_bf16.safetensors", base, seed=4)
    return base, accel, random_lora(d / "restore.safetensors", seed=2)


def test_fastwan_format_file_reads_with_its_patches(files):
    _, accel, _ = files
    lf = read_lora(accel)
    assert lf.rank == 8 and not lf.unmapped_keys and lf.metadata == {}
    assert len(lf.weights) == 2 * 10 + 6  # every Linear of both blocks + text/time embeddings + head
    assert len(lf.patches) > 0  # the diff_b (bias) and diff (norm) tensors


@torch.no_grad()
def test_accelerator_lora_under_restoration_equals_the_distilled_dit(files):
    base, accel, restore = files
    x = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    vae = build_tiny_vae(3)
    kw = dict(solver="x0_renoise", sigmas=[1.0, 0.757, 0.522])
    stacked = VBridgePipeline(copy.deepcopy(base), vae, device="cpu", dtype=torch.float32)
    stacked.load_lora(accel, role="accelerator")
    stacked.load_lora(restore)
    a = stacked.restore(x, **kw)
    as_dit = VBridgePipeline(_merged(base, accel), vae, device="cpu", dtype=torch.float32)
    as_dit.load_lora(restore)
    b = as_dit.restore(x, **kw)
    assert (a.final[0] - b.final[0]).abs().max().item() <= 1e-4
    assert a.info["adapters"] == {"accelerator": 1.0, "restoration": 1.0}
    plain = VBridgePipeline(copy.deepcopy(base), vae, device="cpu", dtype=torch.float32)
    plain.load_lora(restore)
    p = plain.restore(x, **kw).final[0]
    assert (p - a.final[0]).abs().max().item() > 1e-3  # the accelerator does act
    stacked.adapters["accelerator"]["strength"] = 0.0  # strength 0 switches it off exactly
    assert (stacked.restore(x, **kw).final[0] - p).abs().max().item() <= 1e-5


def test_cli_takes_an_accelerator_lora_with_the_turbo_preset(tmp_path, tiny_model_dir):
    from diffusers import WanTransformer3DModel

    from vbridge_core.cli import main
    from vbridge_core.images import save_png

    save_png(torch.rand(3, 32, 32), tmp_path / "in.png")
    dit = WanTransformer3DModel.from_pretrained(str(tiny_model_dir / "transformer"))
    accel = fastwan_style_lora(tmp_path / "fastwan.safetensors", dit, seed=6)
    restore = random_lora(tmp_path / "r.safetensors", seed=1)
    out = tmp_path / "out"
    assert main(["restore", str(tmp_path / "in.png"), "--out", str(out), "--model", str(tiny_model_dir),
                 "--lora", str(restore), "--accelerator-lora", str(accel), "--preset", "turbo",
                 "--device", "cpu"]) == 0
    s = json.loads((out / "vbridge_settings.json").read_text())
    assert s["accelerator_lora"] == str(accel) and s["dit_calls_per_image"] == 3
    assert s["restore_info"]["adapters"] == {"accelerator": 1.0, "restoration": 1.0}
