"""'V-Bridge Train LoRA' and its settings node, called directly on the tiny model as ComfyUI would.

Model files sit in a temporary ``$VBRIDGE_MODELS_DIR`` laid out like ComfyUI's ``models/`` folder, so
trained LoRAs land in ``loras/vbridge/`` there (``comfy_bridge.lora_output_dir`` outside ComfyUI).
Training calls run under ``torch.inference_mode()`` like ComfyUI's executor, with conditioning
tensors made there. Cancel is simulated by patching ``comfy_bridge.interrupt_requested`` (Cancel
pressed) and ``comfy_bridge.throw_if_interrupted`` (ComfyUI's interrupt exception).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import nodes as pack
from nodes import comfy_bridge
from vbridge_core import train_runtime
from vbridge_core.errors import InputError
from vbridge_core.images import save_png
from vbridge_core.lora import read_lora
from vbridge_core.tiny import tiny_prompt_embeds
from vbridge_core.training.checkpoint import checkpoint_dir, list_checkpoints
from tiny_files import call_node, comfy_models_root, models_dir

NODES = pack.NODE_CLASS_MAPPINGS
pytestmark = pytest.mark.usefixtures("models_env")


@pytest.fixture(scope="module")
def models_root(tmp_path_factory, tiny_model_dir) -> Path:
    return comfy_models_root(tmp_path_factory.mktemp("comfy_models_train"), tiny_model_dir, {
        "restore.safetensors": dict(role="restoration", seed=1, prompt="tiny prompt")})


_call = call_node  # under torch.inference_mode(), as ComfyUI executes nodes


def _load(restoration_lora: str = "none", strength: float = 1.0, memory: str = "keep on GPU"):
    (pipe,) = _call("LoadVBridge", dit="tiny_dit.safetensors", vae="tiny_vae.safetensors",
                    restoration_lora=restoration_lora, restoration_strength=strength, drift_lora="none",
                    drift_strength=1.0, precision="bf16", attention="auto", memory=memory)
    return pipe


@pytest.fixture(scope="module")
def bare_model(models_root):
    with models_dir(models_root):
        return _load()


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    g = torch.Generator().manual_seed(0)
    for i in range(4):
        hq = torch.nn.functional.interpolate(torch.rand(1, 3, 4, 4, generator=g), size=(32, 40), mode="bilinear",
                                             align_corners=False)[0]
        save_png(hq, root / "hq" / f"p{i}.png")
        save_png((0.6 * hq + 0.1 * torch.randn(hq.shape, generator=g)).clamp(0, 1), root / "lq" / f"p{i}.png")
    (ps, _, _) = _call("LoadImagePairs", folder=str(root))
    return ps


def _settings(**over: Any) -> dict:
    kw = dict(train_runtime.DEFAULT_SETTINGS)
    kw.update(rank=4, alpha=0.0, learning_rate=1e-3, crops_per_pair=1, gradient_checkpointing=False,
              validation_fraction=0.25, validation_steps=2, checkpoint_every=0, restore_steps=2)
    kw.update(over)
    (s,) = _call("TrainLoRASettings", **kw)
    return s


def _cond(seed: int = 9) -> list:
    with torch.inference_mode():
        return [[tiny_prompt_embeds(seed=seed)[:, :7].clone(), {"pooled_output": None}]]


def _train(model, pairs, name: str, **over: Any) -> tuple:
    kw = dict(vbridge_model=model, pairs=pairs, mode="restoration", output_name=name, stages="32:3", seed=0,
              resume=True, settings=_settings(), conditioning=_cond(), unique_id="7")
    kw.update(over)
    return _call("TrainLoRA", **kw)


# ------------------------------------------------------------------------------------------ contract

def test_node_contract_and_defaults():
    t = NODES["TrainLoRA"].INPUT_TYPES()
    assert list(t["required"]) == ["vbridge_model", "pairs", "mode", "output_name", "stages", "seed", "resume"]
    assert list(t["optional"]) == ["settings", "conditioning", "negative"]
    assert t["required"]["mode"][0] == ["restoration", "drift_correction", "turbo"]
    assert t["required"]["stages"][1]["default"] == "512:400,720:300,960:300"
    assert t["required"]["seed"][1]["control_after_generate"] is True
    assert t["required"]["resume"][1]["default"] is True
    assert NODES["TrainLoRA"].RETURN_TYPES == ("STRING", "IMAGE", "IMAGE", "STRING")
    assert NODES["TrainLoRA"].OUTPUT_NODE is True
    s = NODES["TrainLoRASettings"].INPUT_TYPES()["required"]
    assert list(s) == list(train_runtime.DEFAULT_SETTINGS)
    assert {k: v[1]["default"] for k, v in s.items()} == train_runtime.DEFAULT_SETTINGS
    assert s["optimizer"][0] == ["adamw", "adamw8bit"]
    # Without the settings node the trainer uses the same defaults.
    cfg = train_runtime.make_train_config(None, stages="512:400,720:300,960:300", seed=1, role="restoration")
    assert cfg.rank == 32 and cfg.alpha == 32.0 and cfg.gradient_checkpointing and cfg.checkpoint_every == 100
    assert [str(x) for x in cfg.curriculum()] == ["512:400", "704:300", "960:300"]


def test_settings_errors_are_clear():
    with pytest.raises(InputError, match="stages"):
        train_runtime.make_train_config(None, stages="  ", seed=0, role="restoration")
    with pytest.raises(InputError, match="stage"):
        train_runtime.make_train_config(None, stages="512x400", seed=0, role="restoration")
    with pytest.raises(InputError, match="unknown training settings"):
        train_runtime.merged_settings({"bogus": 1})
    with pytest.raises(InputError, match="target_modules"):
        train_runtime.make_train_config({"target_modules": " , "}, stages="64:1", seed=0, role="restoration")


@pytest.mark.parametrize("bad", ["../evil", "a/b", "..\\x", "/abs/path", ".hidden", "..", "", "   ", ".safetensors"])
def test_output_name_refuses_paths(bad, tmp_path):
    with pytest.raises(InputError, match="output_name"):
        train_runtime.output_lora_path(tmp_path, bad)


def test_output_name_sanitises_odd_characters(tmp_path):
    assert train_runtime.sanitize_output_name("  my lora:v2*.safetensors ") == "my_lora_v2_"
    assert train_runtime.output_lora_path(tmp_path, "denoise-50.v1") == tmp_path.resolve() / "denoise-50.v1.safetensors"
    with pytest.raises(InputError, match="characters"):
        train_runtime.sanitize_output_name("x" * 200)


def test_bad_output_name_fails_before_training_and_writes_nothing(bare_model, pairs, models_root, tmp_path):
    before = sorted(p for p in models_root.rglob("*"))
    with pytest.raises(InputError, match="plain file name"):
        _train(bare_model, pairs, "../evil")
    assert sorted(p for p in models_root.rglob("*")) == before
    assert not (models_root / "loras" / "evil.safetensors").exists()


# ------------------------------------------------------------------------------------------ training

def test_restoration_end_to_end(bare_model, pairs, models_root, monkeypatch):
    texts, bars = [], []

    class Bar:
        def __init__(self, total, desc=""):
            self.total = total

        def update_keep_interrupt(self, value, preview=None, total=None):
            bars.append((value, total))

        def close(self):
            pass

    monkeypatch.setattr(comfy_bridge, "ProgressBar", Bar)
    monkeypatch.setattr(comfy_bridge, "show_text", lambda node_id, text: texts.append((node_id, text)))
    neg = _cond(seed=11)
    path, curve, grid, info = _train(bare_model, pairs, "my_restoration", negative=neg)
    out = models_root / "loras" / "vbridge" / "my_restoration.safetensors"
    assert Path(path) == out.resolve() and out.is_file()
    lf = read_lora(out)
    assert lf.role == "restoration" and lf.rank == 4 and lf.alpha == 4.0
    assert lf.metadata["vbridge.resolution_curriculum"] == "32:3"
    assert lf.prompt_embeds.shape == (1, 512, 4096)  # padded to Wan's 512 tokens
    assert torch.equal(lf.prompt_embeds[:, :7], tiny_prompt_embeds(seed=9)[:, :7])
    assert lf.negative_prompt_embeds is not None
    assert curve.ndim == 4 and curve.shape[0] == 1 and curve.shape[-1] == 3
    assert grid.ndim == 4 and grid.shape[-1] == 3 and grid.shape[2] > 2 * grid.shape[1]  # LQ | before | after | HQ
    assert "steps: 3" in info and "validation PSNR" in info and str(out.resolve()) in info
    assert bars[-1] == (3, 3) and all(v <= t for v, t in bars)
    steps = [t for _, t in texts if t.startswith("step ")]
    assert [t.split(" |")[0] for t in steps] == ["step 1/3", "step 2/3", "step 3/3"] and all("loss" in t for t in steps)
    assert any(t.startswith("encoding training latents") for _, t in texts) and all(n == "7" for n, _ in texts)
    assert list_checkpoints(checkpoint_dir(out)) == []  # finished: no resumable state left behind
    # The new file is listed for LoadVBridge (after a refresh) and loads as its restoration LoRA.
    assert "vbridge/my_restoration.safetensors" in comfy_bridge.filename_list("loras")
    pipe = _load("vbridge/my_restoration.safetensors")
    assert pipe.adapters["restoration"]["file"].path == out
    # The model is left as it was: no training adapter, nothing trainable, no inference tensors.
    from vbridge_core.lora import loaded_loras

    assert loaded_loras(bare_model.transformer) == []
    assert not any(p.requires_grad or p.is_inference() for p in bare_model.transformer.parameters())


def test_train_node_at_its_maximum_seed(bare_model, pairs, models_root):
    """Issue 9 item 7: the seed widget's maximum used to overflow the derived generators (seed + 7919, ...)."""
    from nodes.train_nodes import MAX_SEED

    path, _, _, info = _train(bare_model, pairs, "max_seed", seed=MAX_SEED, stages="32:1",
                              settings=_settings(validation_fraction=0.0))
    assert Path(path).is_file() and f"seed {MAX_SEED}" in info


def test_missing_prompt_is_a_clear_error(bare_model, pairs):
    with pytest.raises(InputError, match="CLIPLoader.*wan|CLIPTextEncode"):
        _train(bare_model, pairs, "no_prompt", conditioning=None)


def test_drift_mode_needs_a_restoration_lora(bare_model, pairs):
    with pytest.raises(InputError, match="restoration_lora"):
        _train(bare_model, pairs, "drift_no_lora", mode="drift_correction")


def test_drift_correction_end_to_end(pairs, models_root):
    model = _load("vbridge/restore.safetensors", strength=0.5, memory="offload")
    path, curve, grid, info = _train(model, pairs, "my_drift", mode="drift_correction", conditioning=None,
                                     settings=_settings(validation_fraction=0.0))
    lf = read_lora(path)
    assert lf.role == "drift_correction" and Path(path).parent == (models_root / "loras" / "vbridge").resolve()
    src = read_lora(models_root / "loras" / "vbridge" / "restore.safetensors")
    assert torch.equal(lf.prompt_embeds, src.prompt_embeds.float())  # the restoration LoRA's own prompt
    assert torch.equal(lf.negative_prompt_embeds, src.negative_prompt_embeds.float())
    assert lf.metadata.get("vbridge.restoration_lora") == "restore.safetensors"
    assert lf.metadata.get("vbridge.prompt") == "tiny prompt"
    assert "validation: none" in info and grid.shape[0] == 1
    assert model.adapters["restoration"]["strength"] == 0.5  # the user's strength is kept
    assert model.offload is True  # offload is suspended while training only


class _Interrupted(Exception):
    """Stand-in for ComfyUI's InterruptProcessingException."""


def test_cancel_leaves_a_resumable_checkpoint_and_resume_continues(bare_model, pairs, models_root, monkeypatch):
    settings = _settings(validation_fraction=0.0)
    polls = {"n": 0}

    def pressed_after_two_steps() -> bool:
        polls["n"] += 1
        return polls["n"] > 2

    def throw() -> None:
        raise _Interrupted()

    monkeypatch.setattr(comfy_bridge, "interrupt_requested", pressed_after_two_steps)
    monkeypatch.setattr(comfy_bridge, "throw_if_interrupted", throw)
    out = models_root / "loras" / "vbridge" / "cancelled.safetensors"
    with pytest.raises(_Interrupted):
        _train(bare_model, pairs, "cancelled", stages="32:5", settings=settings)
    assert not out.exists()  # no partial LoRA
    found = list_checkpoints(checkpoint_dir(out))
    assert [s for s, _ in found] == [2]
    assert (checkpoint_dir(out) / "lora-step000002.safetensors").is_file()  # the step-2 LoRA can be tried
    assert not any(p.name.startswith(".") or p.suffix == ".tmp" for p in out.parent.rglob("*"))

    # Queue again (Cancel no longer pressed): continues from step 2 to 5, same as an uninterrupted run.
    monkeypatch.setattr(comfy_bridge, "interrupt_requested", lambda: False)
    path, _, _, info = _train(bare_model, pairs, "cancelled", stages="32:5", settings=settings)
    assert Path(path) == out.resolve() and "steps: 5" in info
    assert list_checkpoints(checkpoint_dir(out)) == []
    ref_path, _, _, _ = _train(bare_model, pairs, "uninterrupted", stages="32:5", settings=settings)
    a, b = read_lora(path), read_lora(ref_path)
    assert set(a.weights) == set(b.weights)
    for k in a.weights:
        assert torch.allclose(a.weights[k].up, b.weights[k].up, atol=1e-6)
        assert torch.allclose(a.weights[k].down, b.weights[k].down, atol=1e-6)


def test_resume_off_starts_over_and_changed_settings_explain_the_fix(bare_model, pairs, models_root, monkeypatch):
    settings = _settings(validation_fraction=0.0)
    polls = {"n": 0}

    def pressed_after_one_step() -> bool:
        polls["n"] += 1
        return polls["n"] > 1

    monkeypatch.setattr(comfy_bridge, "interrupt_requested", pressed_after_one_step)
    monkeypatch.setattr(comfy_bridge, "throw_if_interrupted", lambda: None)  # outside ComfyUI: ours propagates
    from vbridge_core.errors import Cancelled

    with pytest.raises(Cancelled):
        _train(bare_model, pairs, "restart", stages="32:4", settings=settings)
    ckdir = checkpoint_dir(models_root / "loras" / "vbridge" / "restart.safetensors")
    assert [s for s, _ in list_checkpoints(ckdir)] == [1]
    monkeypatch.setattr(comfy_bridge, "interrupt_requested", lambda: False)
    with pytest.raises(InputError, match="resume.*false"):
        _train(bare_model, pairs, "restart", stages="32:4", seed=5, settings=settings)
    _, _, _, info = _train(bare_model, pairs, "restart", stages="32:4", seed=5, settings=settings, resume=False)
    assert "steps: 4" in info and "seed 5" in info
    assert list(ckdir.glob("*-step*")) == []


def test_bridge_cancel_helpers_with_a_fake_comfyui(monkeypatch, tmp_path):
    """interrupt_requested peeks at ComfyUI's flag; the training progress bar swallows the hook's raise
    but leaves Cancel pending, so the trainer still sees it and writes its checkpoint."""
    import sys
    import types

    state = {"flag": False, "hook_calls": 0}

    class InterruptProcessingException(Exception):
        pass

    mm = types.ModuleType("comfy.model_management")
    mm.InterruptProcessingException = InterruptProcessingException
    mm.processing_interrupted = lambda: state["flag"]
    mm.interrupt_current_processing = lambda value=True: state.__setitem__("flag", value)

    def throw():
        if state["flag"]:
            state["flag"] = False
            raise InterruptProcessingException()

    mm.throw_exception_if_processing_interrupted = throw

    class ComfyBar:  # comfy.utils.ProgressBar with main.py's hook, which checks the interrupt
        def __init__(self, total):
            self.total = total

        def update_absolute(self, value, total=None, preview=None):
            state["hook_calls"] += 1
            throw()

    utils = types.ModuleType("comfy.utils")
    utils.ProgressBar = ComfyBar
    comfy = types.ModuleType("comfy")
    fp = types.ModuleType("folder_paths")
    fp.models_dir = str(tmp_path / "models")
    fp.get_folder_paths = lambda name: [str(tmp_path / "models" / name)]
    for name, mod in (("comfy", comfy), ("comfy.model_management", mm), ("comfy.utils", utils), ("folder_paths", fp)):
        monkeypatch.setitem(sys.modules, name, mod)

    assert comfy_bridge.in_comfyui()
    assert comfy_bridge.lora_output_dir() == tmp_path / "models" / "loras" / "vbridge"
    bar = comfy_bridge.ProgressBar(5)
    bar.update_keep_interrupt(1)
    assert not comfy_bridge.interrupt_requested()
    state["flag"] = True  # the user presses Cancel
    bar.update_keep_interrupt(2)  # the hook raised: swallowed, flag set again
    assert state["hook_calls"] == 2 and comfy_bridge.interrupt_requested()
    with pytest.raises(InterruptProcessingException):
        comfy_bridge.throw_if_interrupted()  # what the node raises after the checkpoint
    assert not comfy_bridge.interrupt_requested()
