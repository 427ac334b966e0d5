"""'V-Bridge Restore Video' and 'V-Bridge Train Stabilizer', called directly on the tiny model as ComfyUI would.

Model files sit in a temporary ``$VBRIDGE_MODELS_DIR`` laid out like ComfyUI's ``models/`` folder, so
stabilizers land in ``vbridge_stabilizers/`` there. Calls run under ``torch.inference_mode()`` like
ComfyUI's executor. Cancel is simulated by patching ``comfy_bridge.throw_if_interrupted``. CPU only.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import nodes as pack
from nodes import comfy_bridge
from vbridge_core import stabilize as S
from vbridge_core.errors import InputError, ModelFileError
from vbridge_core.images import save_png
from tiny_files import call_node, comfy_models_root, models_dir, procedural_photo

NODES = pack.NODE_CLASS_MAPPINGS
pytestmark = pytest.mark.usefixtures("models_env")
STEPS = 2


def _photo(seed: int, size: int = 64) -> torch.Tensor:
    """A procedural photo ``[3, H, W]``: gradients and discs (edges that move under camera motion)."""
    return procedural_photo(seed, size, discs=5, stripes=False)


@pytest.fixture(scope="module")
def models_root(tmp_path_factory, tiny_model_dir) -> Path:
    return comfy_models_root(tmp_path_factory.mktemp("comfy_models_video"), tiny_model_dir, {
        "restore.safetensors": dict(role="restoration", seed=1, negative_prompt=False)})


_call = call_node  # under torch.inference_mode(), as ComfyUI executes nodes


@pytest.fixture(scope="module")
def model(models_root):
    with models_dir(models_root):
        (pipe,) = _call("LoadVBridge", dit="tiny_dit.safetensors", vae="tiny_vae.safetensors",
                        restoration_lora="vbridge/restore.safetensors", restoration_strength=1.0, drift_lora="none",
                        drift_strength=1.0, precision="bf16", attention="auto", memory="keep on GPU")
    return pipe


@pytest.fixture(scope="module")
def clip() -> torch.Tensor:
    """A flickering 6-frame 32x32 clip as a ComfyUI IMAGE ``[T, H, W, 3]``: camera motion + per-frame noise."""
    clean = S.camera_motion_clip(_photo(3, 96), 6, seed=1, size=32)
    noisy = (clean + 0.08 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(2))).clamp(0, 1)
    return noisy.permute(0, 2, 3, 1).contiguous()


@pytest.fixture(scope="module")
def learned_file(models_root) -> str:
    """A learned stabilizer made by train_stabilizer with a few steps, in models/vbridge_stabilizers/."""
    clips = S.synthesize_clips([_photo(5), _photo(6)], n_frames=6, seed=0, size=32)
    folder = models_root / comfy_bridge.STABILIZER_FOLDER
    S.train_stabilizer(clips, "spatial", steps=3, crop=24, hidden=4, clip_frames=5,
                       out=folder / "tiny_spatial.safetensors")
    return "tiny_spatial.safetensors"


def _video(model, clip, **over: Any) -> tuple:
    kw = dict(vbridge_model=model, frames_in=clip, stabilizer="ema", ema_strength=0.5, stabilizer_file="none",
              batch_frames=8, frames=5, steps=STEPS, seed=3)
    kw.update(over)
    return _call("RestoreVideo", **kw)


# ------------------------------------------------------------------------------------------ contract

def test_node_contract_and_input_order(learned_file):
    for name in ("RestoreVideo", "TrainStabilizer"):
        cls = NODES[name]
        assert cls.CATEGORY == "V-Bridge/video" and len(cls.DESCRIPTION) > 100
        for section, items in cls.INPUT_TYPES().items():
            if section != "hidden":
                assert all(decl[1].get("tooltip") for decl in items.values()), name
    spec = NODES["RestoreVideo"].INPUT_TYPES()["required"]
    assert list(spec) == ["vbridge_model", "frames_in", "stabilizer", "ema_strength", "stabilizer_file",
                          "batch_frames", "frames", "steps", "seed"]
    assert spec["stabilizer"][0] == ["none", "ema", "learned"]
    assert spec["stabilizer_file"][0][0] == "none" and learned_file in spec["stabilizer_file"][0]
    assert spec["batch_frames"][1]["default"] == 8 and spec["ema_strength"][1]["default"] == 0.5
    assert spec["seed"][1]["control_after_generate"]
    assert NODES["RestoreVideo"].RETURN_TYPES == ("IMAGE", "IMAGE", "STRING")
    t = NODES["TrainStabilizer"].INPUT_TYPES()
    assert list(t["required"]) == ["kind", "output_name", "steps", "stability_weight", "clip_frames", "degradation",
                                   "seed"]
    assert list(t["optional"]) == ["photos", "pairs", "folder"]
    assert t["required"]["kind"][0] == ["controlled", "spatial"]
    assert t["required"]["degradation"][0][0] == "none" and "gaussian_noise" in t["required"]["degradation"][0]
    tip = t["required"]["stability_weight"][1]["tooltip"]
    assert "1/2" in tip and "clip_frames - 1" in tip and "refused" in tip
    assert t["required"]["stability_weight"][1]["default"] == 0.4
    assert NODES["TrainStabilizer"].OUTPUT_NODE and NODES["TrainStabilizer"].RETURN_TYPES == ("STRING", "STRING", "IMAGE")


# ------------------------------------------------------------------------------------------ restore

def test_restore_video_none_ema_learned(model, clip, learned_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    none_out, none_raw, none_rep = _video(model, clip, stabilizer="none")
    assert none_out.shape == none_raw.shape == clip.shape and none_out.dtype == torch.float32
    assert torch.equal(none_out, none_raw)
    assert "stabilizer: none" in none_rep
    ema_out, ema_raw, report = _video(model, clip, stabilizer="ema", ema_strength=0.5)
    assert torch.equal(ema_raw, none_raw)  # same seed and settings: the same restorations
    seq = lambda x: x.permute(0, 3, 1, 2)  # noqa: E731
    assert S.temporal_stability(seq(ema_out)) < S.temporal_stability(seq(ema_raw))
    torch.testing.assert_close(seq(ema_out), S.stabilize_sequence(seq(ema_raw), 0.5))
    assert "EMA, b = 0.5" in report and "stability score" in report and "per frame" in report
    assert len([l for l in report.splitlines() if l.startswith("  ")]) == clip.shape[0]
    l_out, l_raw, l_rep = _video(model, clip, stabilizer="learned", stabilizer_file=learned_file)
    assert l_out.shape == clip.shape and torch.isfinite(l_out).all()
    assert torch.equal(l_out[0], l_raw[0]) and not torch.equal(l_out, l_raw)
    assert "learned (spatial)" in l_rep and learned_file in l_rep
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_batching_equals_per_frame_restores(model, clip):
    _, raw_batched, rep = _video(model, clip, stabilizer="none", batch_frames=4)
    assert "2 restore calls" in rep
    _, raw_single, rep1 = _video(model, clip, stabilizer="none", batch_frames=1)
    assert "6 restore calls" in rep1
    torch.testing.assert_close(raw_batched, raw_single, atol=1e-5, rtol=0)
    # ... and equal to restoring each frame on its own with RestoreTrajectory and the same seed
    for t in (0, 5):
        (one, _, _) = _call("RestoreTrajectory", vbridge_model=model, image=clip[t:t + 1], frames=5, steps=STEPS,
                            seed=3, shift=5.0, solver="unipc", guidance=1.0)
        torch.testing.assert_close(raw_batched[t:t + 1], one, atol=1e-5, rtol=0)


def test_progress_counts_frames_times_steps(model, clip, monkeypatch):
    seen = []

    class Bar:
        def __init__(self, total, desc=""):
            self.total = total

        def update_absolute(self, value, preview=None):
            seen.append((value, self.total))

        def close(self):
            pass

    monkeypatch.setattr(comfy_bridge, "ProgressBar", Bar)
    _video(model, clip, batch_frames=4)
    assert seen == [(4, 12), (8, 12), (10, 12), (12, 12)]  # 6 frames x 2 steps, chunks of 4 and 2


class _Interrupted(Exception):
    """Stand-in for ComfyUI's InterruptProcessingException."""


def test_restore_video_cancel_stops_within_one_step(model, clip, monkeypatch):
    calls = {"check": 0, "dit": 0}

    def fake_throw():
        calls["check"] += 1
        if calls["check"] >= 2:  # Cancel pressed during step 1
            raise _Interrupted()

    monkeypatch.setattr(comfy_bridge, "throw_if_interrupted", fake_throw)
    hook = model.transformer.register_forward_hook(lambda *a: calls.__setitem__("dit", calls["dit"] + 1))
    try:
        with pytest.raises(_Interrupted):
            _video(model, clip, steps=20, batch_frames=2)
    finally:
        hook.remove()
    assert calls["dit"] == 1


def test_restore_video_bad_inputs(model, clip):
    with pytest.raises(InputError, match="at least 2 frames"):
        _video(model, clip[:1])
    with pytest.raises(InputError, match="needs a stabilizer_file"):
        _video(model, clip, stabilizer="learned", stabilizer_file="none")
    with pytest.raises(ModelFileError, match="not found in models/vbridge_stabilizers"):
        _video(model, clip, stabilizer="learned", stabilizer_file="missing.safetensors")
    with pytest.raises(InputError, match="V-Bridge Load Model"):
        _video("not a model", clip)


# ------------------------------------------------------------------------------------------ training

@pytest.fixture(autouse=False)
def one_thread():
    """The small stabilizer trains fastest single-threaded on a shared CPU (as in test_stabilize)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _train(**over: Any) -> tuple:
    photos = torch.stack([_photo(7), _photo(8)]).permute(0, 2, 3, 1).contiguous()
    kw = dict(kind="controlled", output_name="node_stab", steps=4, stability_weight=0.4, clip_frames=5,
              degradation="gaussian_noise", seed=0, photos=photos, unique_id="7")
    kw.update(over)
    return _call("TrainStabilizer", **kw)


def test_train_stabilizer_writes_a_loadable_file(models_root, one_thread):
    path, report, preview = _train()
    p = Path(path)
    assert p == (models_root / "vbridge_stabilizers" / "node_stab.safetensors").resolve() and p.is_file()
    st = S.load_stabilizer(p)
    assert st.kind == "controlled" and st.use_inputs
    assert st.metadata["stability_weight"] == 0.4 and st.metadata["collapse_bound"] == 4.0
    assert st.metadata["source"] and st.metadata["node"] == "TrainStabilizer"
    assert "PSNR vs clean" in report and "stability score" in report and "held-out" in report
    assert preview.ndim == 4 and preview.shape[-1] == 3 and preview.shape[0] >= 2
    assert preview.shape[2] > 2 * preview.shape[1]  # raw | stabilized | clean side by side
    assert "node_stab.safetensors" in NODES["RestoreVideo"].INPUT_TYPES()["required"]["stabilizer_file"][0]
    assert not list(p.parent.glob("*.tmp*"))


def test_train_stabilizer_names_are_sanitised(models_root, one_thread):
    path, _, _ = _train(output_name="  my stab:1.safetensors ", steps=1)
    assert Path(path).name == "my_stab_1.safetensors" and Path(path).parent == (models_root / "vbridge_stabilizers").resolve()
    for bad in ("../evil", "a/b", ".hidden", "", "x\\y"):
        with pytest.raises(InputError, match="output_name"):
            _train(output_name=bad, steps=1)
    assert not (models_root / "evil.safetensors").exists()


def test_train_stabilizer_refuses_the_collapse_bound():
    with pytest.raises(InputError, match=r"collapse bound 4 \(clip_frames - 1\)"):
        _train(stability_weight=4.0)
    with pytest.raises(InputError, match="collapse bound 2"):
        _train(stability_weight=2.5, clip_frames=3)


def test_train_stabilizer_sources_and_errors(models_root, tmp_path, one_thread):
    with pytest.raises(InputError, match="no training data"):
        _train(photos=None)
    with pytest.raises(InputError, match="does not exist"):
        _train(photos=None, folder=str(tmp_path / "nope"))
    # a folder of photos, spatial kind, no degradation
    for i in range(2):
        save_png(_photo(10 + i), tmp_path / "photos" / f"p{i}.png")
    path, report, _ = _train(photos=None, folder=str(tmp_path / "photos"), kind="spatial", degradation="none",
                             steps=2, output_name="from_folder")
    assert S.load_stabilizer(path).kind == "spatial" and "2 photo(s)" in report
    # real clips: restored/ hq/ lq/ frame folders; the last clip is held out
    for c in range(2):
        seq = S.camera_motion_clip(_photo(20 + c), 5, size=24)
        noisy = S.simulate_restorer(seq, seed=c)
        for t in range(5):
            save_png(noisy[t], tmp_path / "clips" / f"c{c}" / "restored" / f"f{t:03d}.png")
            save_png(seq[t], tmp_path / "clips" / f"c{c}" / "hq" / f"f{t:03d}.png")
            save_png(seq[t], tmp_path / "clips" / f"c{c}" / "lq" / f"f{t:03d}.png")
    path, report, preview = _train(photos=None, folder=str(tmp_path / "clips"), steps=2, output_name="real")
    assert "real clips" in report and "held-out clip c1" in report and preview.shape[0] >= 2
    with pytest.raises(InputError, match="not mixed"):
        _train(folder=str(tmp_path / "clips"), steps=1)


def test_train_stabilizer_cancel_stops_within_one_step(models_root, monkeypatch, one_thread):
    calls = {"check": 0}

    def fake_throw():
        calls["check"] += 1
        if calls["check"] >= 2:
            raise _Interrupted()

    monkeypatch.setattr(comfy_bridge, "throw_if_interrupted", fake_throw)
    with pytest.raises(_Interrupted):
        _train(steps=50, output_name="cancelled")
    assert calls["check"] == 2  # stopped after step 2 of 50
    assert not (models_root / "vbridge_stabilizers" / "cancelled.safetensors").exists()


def test_learned_stabilizer_runs_on_the_pipeline_device(model, clip, learned_file, monkeypatch):
    seen = {}
    real = S.load_stabilizer

    def spy(path, device=None):
        seen["device"] = device
        return real(path, device=device)

    monkeypatch.setattr(S, "load_stabilizer", spy)
    _video(model, clip[:3], stabilizer="learned", stabilizer_file=learned_file, steps=1)
    assert seen["device"] == model.device
