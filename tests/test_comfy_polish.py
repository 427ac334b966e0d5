"""ComfyUI polish found in a real ComfyUI 0.3.64: pairs path independent of the start folder, checkpoint
LoRAs outside the LoRA lists, lists ordered by role, and a conditioning input on DriftCorrect."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tiny_files import call_node, comfy_models_root, models_dir, random_lora
from vbridge_core.training.checkpoint import checkpoint_dir

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = "custom_nodes/ComfyUI-VBridge/vbridge_core/assets/samples/denoise"


def test_sample_pairs_path_resolves_from_any_start_folder(tmp_path, monkeypatch):
    from nodes.data_nodes import resolve_pairs_folder

    monkeypatch.chdir(tmp_path)  # ComfyUI started from another folder: the relative path does not exist here
    assert not (tmp_path / SAMPLES).exists()
    got = Path(resolve_pairs_folder(SAMPLES))
    assert got == ROOT / "vbridge_core" / "assets" / "samples" / "denoise" and (got / "lq").is_dir()
    # whatever the pack's folder is called
    assert Path(resolve_pairs_folder("custom_nodes/ComfyUI-VBridge-main/vbridge_core/assets/samples/denoise")) == got
    assert Path(resolve_pairs_folder("vbridge_core/assets/samples/denoise")) == got
    pairs, _, summary = call_node("LoadImagePairs", folder=SAMPLES)
    assert len(pairs) == 3 and "3" in summary
    assert resolve_pairs_folder("no/such/folder") == "no/such/folder"  # the scan then names it as missing


def test_checkpoints_stay_out_of_lora_folders(tmp_path):
    assert checkpoint_dir(tmp_path / "models" / "loras" / "vbridge" / "x.safetensors") == \
        tmp_path / "models" / "vbridge_checkpoints" / "vbridge" / "x.checkpoints"
    assert checkpoint_dir(tmp_path / "runs" / "x.safetensors") == tmp_path / "runs" / "x.checkpoints"


def test_lora_lists_hide_checkpoints_and_put_the_role_first(tmp_path):
    root = tmp_path / "models"
    root.mkdir()
    (root / "loras" / "vbridge" / "old.checkpoints").mkdir(parents=True)
    random_lora(root / "loras" / "vbridge" / "a_drift.safetensors", "drift_correction", 1)
    random_lora(root / "loras" / "vbridge" / "b_restore.safetensors", "restoration", 2)
    random_lora(root / "loras" / "vbridge" / "old.checkpoints" / "lora-step000010.safetensors", "restoration", 3)
    (root / "loras" / "other.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with models_dir(root):
        import nodes as pack

        req = pack.NODE_CLASS_MAPPINGS["LoadVBridge"].INPUT_TYPES()["required"]
    assert req["restoration_lora"][0] == ["none", "vbridge/b_restore.safetensors", "vbridge/a_drift.safetensors",
                                          "other.safetensors"]
    assert req["drift_lora"][0] == ["none", "vbridge/a_drift.safetensors", "vbridge/b_restore.safetensors",
                                    "other.safetensors"]


def test_drift_lora_without_prompt_works_with_conditioning(tmp_path, tiny_model_dir):
    root = comfy_models_root(tmp_path, tiny_model_dir, {"r.safetensors": dict(role="restoration", seed=1)})
    from safetensors import safe_open
    from safetensors.torch import save_file

    src = random_lora(tmp_path / "d_src.safetensors", "drift_correction", 2)
    with safe_open(str(src), framework="pt") as f:  # the same LoRA without its embedded prompt
        t = {k: f.get_tensor(k) for k in f.keys() if not k.startswith("vbridge.")}
        meta = f.metadata()
    save_file(t, str(root / "loras" / "vbridge" / "d.safetensors"), metadata=meta)
    with models_dir(root):
        (pipe,) = call_node("LoadVBridge", dit="tiny_dit.safetensors", vae="tiny_vae.safetensors",
                            restoration_lora="vbridge/r.safetensors", restoration_strength=1.0,
                            drift_lora="vbridge/d.safetensors", drift_strength=1.0, precision="bf16",
                            attention="auto", memory="keep on GPU")
    img = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(0))
    kw = dict(vbridge_model=pipe, image=img, frames=5, steps=2, seed=0)
    from vbridge_core.errors import InputError

    with pytest.raises(InputError, match="conditioning"):
        call_node("DriftCorrect", **kw)
    from vbridge_core.tiny import tiny_prompt_embeds

    cond = [[tiny_prompt_embeds(5), {}]]
    corrected, traj = call_node("DriftCorrect", conditioning=cond, **kw)
    assert corrected.shape == (1, 32, 32, 3) and traj.shape == (5, 32, 32, 3)
    again, _ = call_node("DriftCorrect", conditioning=cond, preset="custom", sigma_grid="official",
                         guidance_skip_tail=0.0, **kw)
    assert not torch.equal(again, corrected)  # the grid reaches the drift pass too
