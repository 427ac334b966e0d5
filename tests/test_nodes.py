"""The ComfyUI node classes, called directly outside ComfyUI on the tiny model saved as single files.

Model files sit in a temporary ``$VBRIDGE_MODELS_DIR`` laid out like ComfyUI's ``models/`` folder
(``diffusion_models/``, ``vae/``, ``loras/vbridge/``), which is where ``comfy_bridge`` looks outside
ComfyUI. Every node runs end to end through ``getattr(node, Cls.FUNCTION)(**inputs)``.
"""
from __future__ import annotations

import gc
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

import nodes as pack
from nodes import comfy_bridge, loader_nodes
from vbridge_core.errors import InputError, ModelFileError, VBridgeError, WrongModelError
from vbridge_core.images import save_png
from vbridge_core.tiny import tiny_prompt_embeds
from tiny_files import call_node, comfy_models_root, models_dir

NODES = pack.NODE_CLASS_MAPPINGS
pytestmark = pytest.mark.usefixtures("models_env")


@pytest.fixture(scope="module")
def models_root(tmp_path_factory, tiny_model_dir) -> Path:
    """A ComfyUI-like models folder holding the tiny DiT and VAE as single files, and two LoRAs."""
    return comfy_models_root(tmp_path_factory.mktemp("comfy_models"), tiny_model_dir, {
        "restore.safetensors": dict(role="restoration", seed=1),
        "drift.safetensors": dict(role="drift_correction", seed=2)})


def _call(name: str, **kwargs: Any) -> tuple:
    return call_node(name, inference_mode=False, **kwargs)


def _load_kwargs(**over: Any) -> dict[str, Any]:
    kw = dict(dit="tiny_dit.safetensors", vae="tiny_vae.safetensors", restoration_lora="vbridge/restore.safetensors",
              restoration_strength=1.0, drift_lora="vbridge/drift.safetensors", drift_strength=1.0,
              precision="bf16", attention="auto", memory="keep on GPU")
    kw.update(over)
    return kw


@pytest.fixture(scope="module")
def model(models_root):
    with models_dir(models_root):
        (pipe,) = _call("LoadVBridge", **_load_kwargs())
    return pipe


def _images(b: int = 2, h: int = 32, w: int = 48, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, h, w, 3, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------ contract

def test_mappings_and_node_contract():
    assert set(NODES) == {"LoadVBridge", "RestoreTrajectory", "DriftCorrect", "LoadImagePairs", "ImageQualityMetrics",
                          "TrainLoRASettings", "TrainLoRA", "RestoreVideo", "TrainStabilizer",
                          "PerceiveImage", "AutoRestore", "TrainPerceiver"}
    assert set(pack.NODE_DISPLAY_NAME_MAPPINGS) == set(NODES)
    for node_id, cls in NODES.items():
        assert pack.NODE_DISPLAY_NAME_MAPPINGS[node_id].startswith("V-Bridge")
        assert cls.CATEGORY.startswith("V-Bridge")
        assert isinstance(cls.DESCRIPTION, str) and len(cls.DESCRIPTION) > 40
        assert callable(getattr(cls, cls.FUNCTION))
        assert len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES) == len(cls.OUTPUT_TOOLTIPS)
        spec = cls.INPUT_TYPES()
        for key, section in spec.items():
            if key == "hidden":  # ComfyUI-supplied values (UNIQUE_ID ...), no widgets
                continue
            for name, decl in section.items():
                assert isinstance(decl, tuple) and len(decl) == 2, (node_id, name)
                assert decl[1].get("tooltip"), f"{node_id}.{name} has no tooltip"


def test_input_order_matches_the_workflow_spec():
    def req(name):
        return list(NODES[name].INPUT_TYPES()["required"])

    assert req("LoadVBridge") == ["dit", "vae", "restoration_lora", "restoration_strength", "drift_lora",
                                  "drift_strength", "precision", "attention", "memory"]
    assert req("RestoreTrajectory") == ["vbridge_model", "image", "frames", "steps", "seed", "shift", "solver", "guidance"]
    assert list(NODES["RestoreTrajectory"].INPUT_TYPES()["optional"]) == ["conditioning", "negative", "cache", "sigmas",
                                                                         "start_sigma", "preset", "sigma_grid",
                                                                         "guidance_skip_tail"]
    assert list(NODES["LoadVBridge"].INPUT_TYPES()["optional"]) == ["accelerator_lora", "accelerator_strength",
                                                                   "allow_partial_lora"]
    assert req("DriftCorrect") == ["vbridge_model", "image", "frames", "steps", "seed", "shift", "solver", "guidance",
                                   "preset", "sigma_grid", "guidance_skip_tail"]
    assert list(NODES["DriftCorrect"].INPUT_TYPES()["optional"]) == ["conditioning", "negative"]
    assert req("LoadImagePairs") == ["folder"]
    assert req("ImageQualityMetrics") == ["restored", "reference", "psnr_channel", "ssim_channel"]
    assert list(NODES["ImageQualityMetrics"].INPUT_TYPES()["optional"]) == ["degraded"]
    assert NODES["RestoreTrajectory"].RETURN_TYPES == ("IMAGE", "IMAGE", "STRING")
    assert NODES["LoadImagePairs"].RETURN_TYPES == ("VBRIDGE_PAIRS", "IMAGE", "STRING")
    r = NODES["RestoreTrajectory"].INPUT_TYPES()["required"]
    assert r["seed"][1]["control_after_generate"] is True and r["seed"][1]["max"] == 0xFFFFFFFFFFFFFFFF
    assert (r["frames"][1]["default"], r["frames"][1]["min"], r["frames"][1]["max"], r["frames"][1]["step"]) == (5, 5, 81, 4)
    assert r["solver"][0] == ["unipc", "euler", "x0_renoise"]


def test_loader_combos_list_the_model_folders():
    from vbridge_core.models import DIT_FILE_NAME, VAE_FILE_NAME

    assert (loader_nodes.DEFAULT_DIT, loader_nodes.DEFAULT_VAE) == (DIT_FILE_NAME, VAE_FILE_NAME)
    req = NODES["LoadVBridge"].INPUT_TYPES()["required"]
    assert req["dit"][0] == ["tiny_dit.safetensors"]
    assert req["vae"][0] == ["tiny_vae.safetensors"]
    # each list shows its own role first (read from the files' headers)
    assert req["restoration_lora"][0] == ["none", "vbridge/restore.safetensors", "vbridge/drift.safetensors"]
    assert req["drift_lora"][0] == ["none", "vbridge/drift.safetensors", "vbridge/restore.safetensors"]
    assert DIT_FILE_NAME in req["dit"][1]["tooltip"]
    assert req["precision"][0] == ["bf16", "fp16", "fp8_e4m3fn"] and req["precision"][1]["default"] == "bf16"
    assert req["attention"][0] == ["auto", "sdpa", "flash", "sage"]
    assert req["memory"][0] == ["keep on GPU", "offload"]


# ------------------------------------------------------------------------------------------ loader

def test_load_model_and_reuse_for_same_settings(model):
    assert set(model.adapters) == {"restoration", "drift_correction"}
    assert model.device.type == "cpu" and model.dtype == torch.float32  # fp32 automatically on CPU
    assert model.runtime["attention"] == "sdpa"
    (again,) = _call("LoadVBridge", **_load_kwargs())
    assert again is model
    (other,) = _call("LoadVBridge", **_load_kwargs(drift_lora="none"))
    assert other is not model and set(other.adapters) == {"restoration"}
    # Only weak references are kept: dropping the last strong one frees the model.
    n = loader_nodes.cache_size()
    del other
    gc.collect()
    assert loader_nodes.cache_size() == n - 1


def test_loader_options_offload_fp8_and_unavailable_attention(caplog):
    (pipe,) = _call("LoadVBridge", **_load_kwargs(restoration_lora="none", drift_lora="none", precision="fp8_e4m3fn",
                                                  attention="flash", memory="offload"))
    assert pipe.offload is True and pipe.adapters == {}
    assert pipe.runtime["attention"] == "sdpa"  # flash needs CUDA: SDPA with a warning
    assert any("SDPA" in r.getMessage() for r in caplog.records)


def test_fp8_weight_storage_runs_in_bf16(tiny_model_dir):
    from vbridge_core.models import load_transformer
    from vbridge_core.runtime import enable_fp8_storage

    t = load_transformer(tiny_model_dir, dtype=torch.bfloat16)
    enable_fp8_storage(t)
    assert t.blocks[0].attn1.to_q.weight.dtype == torch.float8_e4m3fn
    x = torch.randn(1, 48, 2, 4, 4, dtype=torch.bfloat16)
    with torch.no_grad():
        out = t(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=tiny_prompt_embeds().bfloat16(),
                return_dict=False)[0]
    assert out.shape == x.shape and torch.isfinite(out.float()).all()


def test_loader_errors_missing_file_and_wrong_model():
    with pytest.raises(ModelFileError, match="not found"):
        _call("LoadVBridge", **_load_kwargs(dit="wan2.2_ti2v_5B_fp16.safetensors"))
    with pytest.raises(WrongModelError, match="VAE"):
        _call("LoadVBridge", **_load_kwargs(dit="../vae/tiny_vae.safetensors"))
    with pytest.raises(VBridgeError):
        _call("LoadVBridge", **_load_kwargs(restoration_lora="vbridge/missing.safetensors"))


def test_is_changed_follows_the_files(models_root):
    cls = NODES["LoadVBridge"]
    a = cls.IS_CHANGED(**_load_kwargs())
    assert a == cls.IS_CHANGED(**_load_kwargs())
    lora = models_root / "loras" / "vbridge" / "restore.safetensors"
    st = lora.stat()
    import os

    os.utime(lora, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000))
    assert cls.IS_CHANGED(**_load_kwargs()) != a


# ------------------------------------------------------------------------------------------ restore

def test_restore_trajectory_outputs(model):
    img = _images(2, 32, 48)
    restored, traj, info = _call("RestoreTrajectory", vbridge_model=model, image=img, frames=5, steps=2, seed=3,
                                 shift=5.0, solver="unipc", guidance=1.0)
    assert restored.shape == (2, 32, 48, 3) and restored.dtype == torch.float32
    assert traj.shape == (10, 32, 48, 3)
    assert 0 <= restored.min() and restored.max() <= 1
    assert torch.equal(traj[4], restored[0]) and torch.equal(traj[9], restored[1])
    assert "steps: 2" in info and "seed: 3" in info and "time:" in info and "peak GPU memory" in info
    # Image i uses seed + i: the second image alone with seed 4 gives the same result.
    alone, _, _ = _call("RestoreTrajectory", vbridge_model=model, image=img[1:], frames=5, steps=2, seed=4,
                        shift=5.0, solver="unipc", guidance=1.0)
    assert torch.allclose(alone[0], restored[1], atol=1e-5)


def test_restore_node_at_its_maximum_seed_wraps_modulo_2_to_the_64(model):
    """Issue 9 item 7: the seed widget's maximum with a batch of 2 used to overflow; image 2 now uses seed 0."""
    from nodes.restore_nodes import MAX_SEED

    img = _images(2, 32, 32)
    top, _, _ = _call("RestoreTrajectory", vbridge_model=model, image=img, frames=5, steps=2, seed=MAX_SEED,
                      shift=5.0, solver="unipc", guidance=1.0)
    zero, _, _ = _call("RestoreTrajectory", vbridge_model=model, image=img[1:], frames=5, steps=2, seed=0,
                       shift=5.0, solver="unipc", guidance=1.0)
    assert torch.allclose(top[1], zero[0], atol=1e-5)


def test_restore_with_conditioning_and_guidance(model):
    img = _images(1, 32, 32, seed=1)
    base = dict(vbridge_model=model, image=img, frames=5, steps=2, seed=0, shift=5.0, solver="euler")
    plain, _, _ = _call("RestoreTrajectory", guidance=1.0, **base)
    cond = [[tiny_prompt_embeds(seed=9)[:, :7], {"pooled_output": None}]]
    neg = [[tiny_prompt_embeds(seed=10)[:, :5], {}]]
    prompted, _, _ = _call("RestoreTrajectory", guidance=1.0, conditioning=cond, **base)
    assert prompted.shape == plain.shape and not torch.allclose(prompted, plain)
    guided, _, info = _call("RestoreTrajectory", guidance=3.0, conditioning=cond, negative=neg, **base)
    assert guided.shape == plain.shape and "guidance: 3.0" in info
    with pytest.raises(InputError, match="umt5"):
        _call("RestoreTrajectory", guidance=1.0, conditioning=[[torch.zeros(1, 77, 768), {}]], **base)


def test_restore_bad_settings_are_clear_errors(model):
    base = dict(vbridge_model=model, image=_images(1), steps=1, seed=0, shift=5.0, solver="unipc", guidance=1.0)
    with pytest.raises(InputError, match="4k\\+1|4k \\+ 1|frames"):
        _call("RestoreTrajectory", frames=6, **base)
    with pytest.raises(InputError, match="V-Bridge Load Model"):
        _call("RestoreTrajectory", frames=5, **{**base, "vbridge_model": "not a model"})


def test_drift_correct(model):
    img = _images(2, 32, 32, seed=2)
    corrected, traj = _call("DriftCorrect", vbridge_model=model, image=img, frames=5, steps=2, seed=0)
    assert corrected.shape == (2, 32, 32, 3) and traj.shape == (10, 32, 32, 3)
    (no_drift,) = _call("LoadVBridge", **_load_kwargs(drift_lora="none"))
    with pytest.raises(InputError, match="drift_lora.*V-Bridge Load Model|V-Bridge Load Model"):
        _call("DriftCorrect", vbridge_model=no_drift, image=img, frames=5, steps=2, seed=0)


class _Interrupted(Exception):
    """Stand-in for ComfyUI's InterruptProcessingException."""


def test_cancel_stops_within_one_step_and_propagates_unchanged(model, monkeypatch, tmp_path):
    calls = {"check": 0, "dit": 0}

    def fake_throw():
        calls["check"] += 1
        if calls["check"] >= 2:  # the user presses Cancel during step 1
            raise _Interrupted()

    monkeypatch.setattr(comfy_bridge, "throw_if_interrupted", fake_throw)
    hook = model.transformer.register_forward_hook(lambda *a: calls.__setitem__("dit", calls["dit"] + 1))
    monkeypatch.chdir(tmp_path)
    try:
        with pytest.raises(_Interrupted):
            _call("RestoreTrajectory", vbridge_model=model, image=_images(1), frames=5, steps=20, seed=0, shift=5.0,
                  solver="unipc", guidance=1.0)
    finally:
        hook.remove()
    assert calls["dit"] == 1
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_progress_and_preview(model, monkeypatch):
    seen = []

    class Bar:
        def __init__(self, total, desc=""):
            self.total = total

        def update_absolute(self, value, preview=None):
            seen.append((value, self.total, preview))

        def close(self):
            pass

    monkeypatch.setattr(comfy_bridge, "ProgressBar", Bar)
    monkeypatch.setattr(comfy_bridge, "latent_previewer", lambda: (lambda lat: ("JPEG", tuple(lat[:1, :, -1:].shape), 512)))
    _call("RestoreTrajectory", vbridge_model=model, image=_images(2), frames=9, steps=3, seed=0, shift=5.0,
          solver="unipc", guidance=1.0)
    assert [v for v, _, _ in seen] == [1, 2, 3, 4, 5, 6] and all(t == 6 for _, t, _ in seen)
    assert seen[0][2] == ("JPEG", (1, 48, 1, 2, 4), 512)  # last latent frame of 32x48 padded to 32x64


def test_previewer_is_none_outside_comfyui():
    assert comfy_bridge.latent_previewer() is None
    assert comfy_bridge.torch_device() is None


# ------------------------------------------------------------------------------------------ data

def _write_pairs(root: Path, task: str | None, stems_lq, stems_hq, size=(24, 32)) -> None:
    base = root / task if task else root
    g = torch.Generator().manual_seed(len(stems_lq))
    for sub, stems in (("lq", stems_lq), ("hq", stems_hq)):
        for s in stems:
            save_png(torch.rand(3, *size, generator=g), base / sub / f"{s}.png")


def test_load_image_pairs_tasks_preview_summary(tmp_path):
    _write_pairs(tmp_path, "denoise", ["a", "b", "c"], ["a", "b", "c"])
    _write_pairs(tmp_path, "deblur", ["x"], ["x"], size=(40, 40))
    pairs, preview, summary = _call("LoadImagePairs", folder=str(tmp_path))
    assert len(pairs) == 4 and pairs.tasks == ["deblur", "denoise"]
    assert [i.name for i in pairs] == ["deblur/x", "denoise/a", "denoise/b", "denoise/c"]
    assert preview.ndim == 4 and preview.shape[0] == 4 and preview.shape[-1] == 3
    assert preview.shape[2] == 2 * preview.shape[1] + 4  # LQ | gap | HQ at one common size
    assert "4 pairs" in summary and "denoise: 3" in summary
    lq, hq = pairs.load(1)
    assert lq.shape == hq.shape == (3, 24, 32)


def test_load_image_pairs_shipped_samples():
    root = Path(__file__).resolve().parents[1] / "vbridge_core" / "assets" / "samples"
    pairs, preview, _ = _call("LoadImagePairs", folder=str(root))
    assert len(pairs) >= 6 and set(pairs.tasks) == {"deblur", "denoise"}
    assert preview.shape[0] == min(8, len(pairs))


def test_load_image_pairs_errors_list_the_problems(tmp_path):
    with pytest.raises(InputError, match="no image pairs"):
        _call("LoadImagePairs", folder=str(tmp_path))
    with pytest.raises(InputError, match="not found"):
        _call("LoadImagePairs", folder=str(tmp_path / "nope"))
    with pytest.raises(InputError, match="no pairs folder"):
        _call("LoadImagePairs", folder="  ")
    (tmp_path / "lq").mkdir()
    (tmp_path / "hq").mkdir()
    with pytest.raises(InputError, match="hold no images"):
        _call("LoadImagePairs", folder=str(tmp_path))
    _write_pairs(tmp_path, None, ["a", "b", "only_lq1", "only_lq2"], ["a", "b", "only_hq"])
    _write_pairs(tmp_path, "broken", ["z"], [])
    shutil.rmtree(tmp_path / "broken" / "hq", ignore_errors=True)
    with pytest.raises(InputError) as e:
        _call("LoadImagePairs", folder=str(tmp_path))
    msg = str(e.value)
    for name in ("only_lq1", "only_lq2", "only_hq", "broken/"):
        assert name in msg


def test_load_image_pairs_is_changed(tmp_path):
    _write_pairs(tmp_path, None, ["a"], ["a"])
    cls = NODES["LoadImagePairs"]
    a = cls.IS_CHANGED(folder=str(tmp_path))
    _write_pairs(tmp_path, None, ["b"], ["b"])
    assert cls.IS_CHANGED(folder=str(tmp_path)) != a


def test_image_quality_metrics():
    from vbridge_core.metrics import psnr

    ref = _images(2, 32, 32, seed=5)
    restored = (ref + 0.05 * _images(2, 32, 32, seed=6)).clamp(0, 1)
    degraded = (ref + 0.2 * _images(2, 32, 32, seed=7)).clamp(0, 1)
    table, comp = _call("ImageQualityMetrics", restored=restored, reference=ref, psnr_channel="rgb",
                        ssim_channel="y", degraded=degraded)
    assert comp.shape == (2, 32, 3 * 32 + 2 * 4, 3)
    expected = psnr(restored.permute(0, 3, 1, 2), ref.permute(0, 3, 1, 2))
    assert f"{float(expected[0]):.2f}" in table and "mean" in table and "degraded vs reference" in table
    # One reference for the whole batch.
    table1, comp1 = _call("ImageQualityMetrics", restored=restored, reference=ref[:1], psnr_channel="y",
                          ssim_channel="rgb")
    assert comp1.shape == (2, 32, 2 * 32 + 4, 3) and "PSNR (Y)" in table1


def test_image_quality_metrics_errors():
    with pytest.raises(InputError, match="48x32.*32x32|32x32.*48x32"):
        _call("ImageQualityMetrics", restored=_images(1, 32, 48), reference=_images(1, 32, 32), psnr_channel="rgb",
              ssim_channel="y")
    with pytest.raises(InputError, match="3 restored images but 2 reference"):
        _call("ImageQualityMetrics", restored=_images(3), reference=_images(2), psnr_channel="rgb", ssim_channel="y")
    with pytest.raises(InputError, match="degraded"):
        _call("ImageQualityMetrics", restored=_images(1), reference=_images(1), psnr_channel="rgb", ssim_channel="y",
              degraded=_images(1, 16, 16))


def test_nodes_run_under_inference_mode_like_comfyui():
    """ComfyUI executes every node inside torch.inference_mode(); conditioning tensors are inference tensors."""
    with torch.inference_mode():
        (pipe,) = _call("LoadVBridge", **_load_kwargs(drift_lora="none", restoration_strength=0.5))
        cond = [[tiny_prompt_embeds(seed=4)[:, :6].clone(), {}]]
        restored, traj, _ = _call("RestoreTrajectory", vbridge_model=pipe, image=_images(1), frames=5, steps=2, seed=0,
                                  shift=5.0, solver="unipc", guidance=2.0, conditioning=cond, negative=cond)
    assert restored.shape == (1, 32, 48, 3) and traj.shape == (5, 32, 48, 3)
    # Weights were loaded outside inference mode, so the same model stays usable for LoRA training.
    assert not any(p.is_inference() for p in pipe.transformer.parameters())
