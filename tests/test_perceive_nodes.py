"""V-Bridge Perceive, Auto Restore and Train Perceiver nodes, called as ComfyUI calls them, on the tiny model."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from vbridge_core.errors import InputError
from tiny_files import call_node, comfy_models_root, models_dir

pytestmark = pytest.mark.usefixtures("models_env")


@pytest.fixture(scope="module")
def models_root(tmp_path_factory, tiny_model_dir) -> Path:
    root = comfy_models_root(tmp_path_factory.mktemp("perceive_models"), tiny_model_dir, {
        "denoise.safetensors": dict(seed=1), "own.safetensors": dict(seed=5)})
    from vbridge_core.perceive_cli import stamp_lora_tasks

    stamp_lora_tasks(root / "loras" / "vbridge" / "denoise.safetensors", ["denoise"])
    stamp_lora_tasks(root / "loras" / "vbridge" / "own.safetensors", ["all"])
    return root


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    """A ComfyUI IMAGE batch: a clean photo crop and the same crop with strong noise."""
    from vbridge_core.degrade import gaussian_noise
    from vbridge_core.perceive.synth import clean_photos

    clean = dict(clean_photos("held_out"))["camera.png"][:, 64:128, 64:128]
    return torch.stack([clean, gaussian_noise(clean, 0, sigma=0.15)]).permute(0, 2, 3, 1).contiguous()


def test_registered_with_display_names():
    import nodes as pack

    for nid, name in (("PerceiveImage", "V-Bridge Perceive"), ("AutoRestore", "V-Bridge Auto Restore"),
                      ("TrainPerceiver", "V-Bridge Train Perceiver")):
        assert nid in pack.NODE_CLASS_MAPPINGS and pack.NODE_DISPLAY_NAME_MAPPINGS[nid] == name


def test_perceive_node(batch):
    report, labels, tiers, preview, js = call_node("PerceiveImage", image=batch, perceiver="built-in")
    from vbridge_core.perceive.model import Perceiver

    direct = Perceiver.builtin().perceive(list(batch.permute(0, 3, 1, 2)))
    assert labels == ["clean", "noise"] and tiers == [r.quality for r in direct]
    assert tiers[1] == "low" and tiers[0] != "low"  # the clean 64 px crop scores 0.75, on the high/medium line
    assert "noise" in report and preview.shape[0] == 2 and preview.shape[-1] == 3
    assert [e["degradation"] for e in json.loads(js)["images"]] == ["clean", "noise"]
    with pytest.raises(InputError, match="NaN"):
        call_node("PerceiveImage", image=torch.full((1, 32, 32, 3), float("nan")), perceiver="built-in")


def test_auto_restore_node(models_root):
    # sigma 0.1, not the batch fixture's 0.15: on that grey crop the shipped perceiver's haze also reaches 0.52
    # with 0.15, and the routing rule then rightly prefers the `all` LoRA that covers noise and haze
    from vbridge_core.degrade import gaussian_noise
    from vbridge_core.perceive.synth import clean_photos

    clean = dict(clean_photos("held_out"))["camera.png"][:, 64:128, 64:128]
    batch = torch.stack([clean, gaussian_noise(clean, 0, sigma=0.1)]).permute(0, 2, 3, 1).contiguous()
    with models_dir(models_root):
        (pipe,) = call_node("LoadVBridge", inference_mode=False, dit="tiny_dit.safetensors", vae="tiny_vae.safetensors",
                            restoration_lora="vbridge/own.safetensors", restoration_strength=1.0, drift_lora="none",
                            drift_strength=1.0, precision="bf16", attention="auto", memory="keep on GPU")
        restored, report, js = call_node("AutoRestore", vbridge_model=pipe, image=batch, lora_folder="vbridge",
                                         frames=5, steps=1, seed=0, lora_strength=1.0, force_restore=False,
                                         perceiver="built-in")
        rows = json.loads(js)["images"]
        assert [r["lora"] for r in rows] == [None, "denoise.safetensors"] and rows[1]["present"] == ["noise"]
        assert torch.equal(restored[0], batch[0]) and restored.shape == batch.shape
        assert "quality before -> after" in report
        assert pipe.adapters["restoration"]["file"].path.name == "own.safetensors"
        with pytest.raises(InputError, match="not a folder"):
            call_node("AutoRestore", vbridge_model=pipe, image=batch, lora_folder="missing", frames=5, steps=1, seed=0,
                      lora_strength=1.0, force_restore=False, perceiver="built-in")


class _ComfyClipVision:
    """Stand-in for ComfyUI's ClipVisionModel (comfy/clip_vision.py), which is not importable outside ComfyUI:
    ``encode_image(IMAGE [B, H, W, C])`` returns an object with ``image_embeds``. It wraps a real transformers
    CLIPVisionModelWithProjection (tiny, random weights) with CLIP's own preprocessing."""

    def __init__(self) -> None:
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        from vbridge_core.perceive.clip import hf_clip_embedder

        torch.manual_seed(0)
        self.embed = hf_clip_embedder(CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=1, image_size=32,
            patch_size=8, projection_dim=16)))

    def encode_image(self, image: torch.Tensor) -> Any:
        class Output:
            pass

        o = Output()
        o.image_embeds = self.embed(image.permute(0, 3, 1, 2))
        return o


def test_train_perceiver_node_clip_and_use_it(models_root, batch):
    from vbridge_core.errors import InputError as IE

    clip = _ComfyClipVision()
    with models_dir(models_root):
        path, info = call_node("TrainPerceiver", inference_mode=False, kind="clip", output_name="mine", samples=60,
                               steps=20, seed=0, clip_vision=clip)
        assert Path(path).name == "mine.safetensors" and json.loads(info)["examples"] == 60
        report, labels, tiers, preview, js = call_node("PerceiveImage", image=batch, perceiver="mine.safetensors",
                                                       clip_vision=clip)
        assert len(labels) == 2 and all(t in ("high", "medium", "low") for t in tiers)
        with pytest.raises(IE, match="clip_vision"):
            call_node("PerceiveImage", image=batch, perceiver="mine.safetensors")
        with pytest.raises(IE, match="folders"):
            call_node("TrainPerceiver", inference_mode=False, kind="clip", output_name="../x", samples=60, steps=5,
                      seed=0, clip_vision=clip)


def test_train_perceiver_node_builtin_learns_the_hq_images_of_connected_pairs(models_root, tmp_path, batch):
    """kind builtin with pairs connected: every HQ image joins the training photos (train-perceiver --extra-photos);
    two task folders may hold HQ files of the same name; an HQ image too small for a crop is a clear error."""
    from tiny_files import procedural_photo
    from vbridge_core.degrade import gaussian_noise
    from vbridge_core.images import save_png
    from vbridge_core.perceive.model import Perceiver

    for t in ("denoise", "deblur"):
        for i in range(2):
            hq = procedural_photo(3 * i + len(t), size=160)
            save_png(hq, tmp_path / "pairs" / t / "hq" / f"p{i}.png")
            save_png(gaussian_noise(hq, i, sigma=0.1), tmp_path / "pairs" / t / "lq" / f"p{i}.png")
    (pairs, _, _) = call_node("LoadImagePairs", folder=str(tmp_path / "pairs"))
    with models_dir(models_root):
        path, info = call_node("TrainPerceiver", inference_mode=False, kind="builtin", output_name="mine_builtin",
                               samples=200, steps=10, seed=0, pairs=pairs)
        info = json.loads(info)
        assert info["extra_photos"] == ["p0.png", "p1.png", "p0.png", "p1.png"] and info["samples"] == 200
        assert Perceiver.load(path).info == info
        _, labels, _, _, _ = call_node("PerceiveImage", image=batch, perceiver="mine_builtin.safetensors")
        assert len(labels) == 2
        save_png(procedural_photo(9, size=96), tmp_path / "pairs" / "deblur" / "hq" / "p9.png")
        save_png(procedural_photo(9, size=96), tmp_path / "pairs" / "deblur" / "lq" / "p9.png")
        (pairs, _, _) = call_node("LoadImagePairs", folder=str(tmp_path / "pairs"))
        with pytest.raises(InputError, match="p9.png is 96x96 px.*at least 128 px"):
            call_node("TrainPerceiver", inference_mode=False, kind="builtin", output_name="x", samples=200, steps=10,
                      seed=0, pairs=pairs)
