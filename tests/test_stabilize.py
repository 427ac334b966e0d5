"""Causal temporal stabilizers: causality, the stability/accuracy trade-off, collapse, files, errors, CLI.

CPU only, synthetic clips (procedural photos, smooth camera motion, simulated flickering restorer),
tiny stabilizers. Training runs single-threaded: on a shared 2-core machine that is the fastest.
"""
from __future__ import annotations

import pytest
import torch

from vbridge_core import stabilize as S
from vbridge_core.errors import InputError, ModelFileError
from tiny_files import procedural_photo

FAST = dict(steps=150, crop=32, batch_size=4, hidden=16, clip_frames=5, learning_rate=5e-3)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def train_clips():
    photos = [procedural_photo(s) for s in range(3)]
    return S.synthesize_clips(photos, n_frames=8, seed=0, size=48, clips_per_photo=2)


@pytest.fixture(scope="module")
def test_clips():
    photos = [procedural_photo(s) for s in range(10, 12)]
    return S.synthesize_clips(photos, n_frames=12, seed=7, size=48)


@pytest.fixture(scope="module")
def controlled(train_clips):
    return S.train_stabilizer(train_clips, "controlled", stability_weight=0.4, **FAST).stabilizer


def evaluate(stab, clips) -> tuple[float, float]:
    """Mean PSNR and mean temporal stability over clips."""
    p, s = [], []
    for c in clips:
        out = S.stabilize_sequence(c.restored, stab, inputs=c.inputs)
        m = S.sequence_metrics(out, c.target)
        p.append(m["psnr"])
        s.append(m["stability"])
    return sum(p) / len(p), sum(s) / len(s)


# --------------------------------------------------------------------------------------- causality
@pytest.mark.parametrize("kind", ["ema", "controlled", "spatial"])
def test_causal_output_never_depends_on_later_frames(kind):
    torch.manual_seed(0)
    z, x = torch.rand(7, 3, 20, 24), torch.rand(7, 3, 20, 24)
    st = S.EMAStabilizer(0.4) if kind == "ema" else S.LearnedStabilizer(S.StabilizerConfig(kind=kind, hidden=8))
    with torch.no_grad():  # make the random net's output depend strongly on its inputs
        for p in st.parameters():
            p.add_(0.3 * torch.randn_like(p))
    base = S.stabilize_sequence(z, st, inputs=x)
    for k in range(1, 6):
        z2, x2 = z.clone(), x.clone()
        z2[k + 1:] = torch.rand_like(z2[k + 1:])
        x2[k + 1:] = torch.rand_like(x2[k + 1:])
        out = S.stabilize_sequence(z2, st, inputs=x2)
        assert torch.equal(out[:k + 1], base[:k + 1])
        assert not torch.equal(out[k + 1:], base[k + 1:])
    assert torch.equal(base[0], z[0])  # first frame passed through
    # streaming in uneven chunks gives the same frames as one call
    stream = S.StreamingStabilizer(st)
    parts = [stream.push(z[a:b], x[a:b]) for a, b in [(0, 1), (1, 4), (4, 7)]]
    torch.testing.assert_close(torch.cat(parts), base, rtol=0, atol=1e-6)


def test_ema_formula():
    z = torch.rand(4, 3, 5, 5)
    out = S.stabilize_sequence(z, 0.3)
    ref = [z[0]]
    for t in range(1, 4):
        ref.append(0.3 * z[t] + 0.7 * ref[-1])
    torch.testing.assert_close(out, torch.stack(ref))
    assert torch.equal(S.stabilize_sequence(z, None), z)
    assert torch.equal(S.stabilize_sequence(z, 1.0), z)


def test_spatial_fusion_matches_moved_content():
    """A 'spatial' stabilizer whose kernel picks the pixel one step left reproduces a shift exactly."""
    st = S.LearnedStabilizer(S.StabilizerConfig(kind="spatial", kernel_size=3, hidden=4))
    prev = torch.rand(1, 3, 8, 8)
    w = torch.zeros(1, 9, 8, 8)
    w[:, 3] = 1.0  # offset (0, -1): the left neighbour
    fused = st.fuse(prev, w)
    torch.testing.assert_close(fused[..., 1:], prev[..., :-1])


# ------------------------------------------------------------------------------------- trade-off
def test_stabilizers_lower_the_flicker(controlled, test_clips):
    p0, s0 = evaluate(None, test_clips)
    ref = sum(S.temporal_stability(c.target) for c in test_clips) / len(test_clips)
    assert s0 > 3 * ref  # the simulated restorer flickers well above the clip's real motion
    _, s_ema = evaluate(0.5, test_clips)
    p_l, s_l = evaluate(controlled, test_clips)
    assert s_ema < 0.6 * s0
    assert s_l < 0.6 * s0
    assert p_l > p0
    assert S.count_parameters(controlled) < 1_000_000
    # static-region score: only pixels where the clean clip does not change
    c = test_clips[0]
    raw_static = S.temporal_stability(c.restored, mask="static", reference=c.target)
    stab_static = S.temporal_stability(S.stabilize_sequence(c.restored, controlled, inputs=c.inputs),
                                       mask="static", reference=c.target)
    assert stab_static < 0.6 * raw_static


def test_learned_beats_ema_at_matched_stability(controlled, test_clips):
    p_l, s_l = evaluate(controlled, test_clips)
    lo, hi = 0.02, 1.0  # stability falls as b falls: bisect for the EMA with the learned one's stability
    for _ in range(25):
        mid = 0.5 * (lo + hi)
        if evaluate(mid, test_clips)[1] > s_l:
            hi = mid
        else:
            lo = mid
    b = 0.5 * (lo + hi)
    p_e, s_e = evaluate(b, test_clips)
    assert abs(s_e - s_l) < 0.01 * s_l, (s_e, s_l)  # same stability ...
    assert p_l > p_e + 0.2, (p_l, p_e, b)  # ... and the learned stabilizer is more accurate


# -------------------------------------------------------------------------------------- collapse
def test_collapse_bound_refused_and_collapse_above_it(train_clips, test_clips):
    tau = FAST["clip_frames"]
    assert S.collapse_bound(tau) == tau - 1
    with pytest.raises(InputError, match="collapse bound"):
        S.train_stabilizer(train_clips, "controlled", stability_weight=tau, **FAST)
    lam = 20 * S.collapse_bound(tau)
    res = S.train_stabilizer(train_clips, "controlled", stability_weight=lam, allow_collapse=True, **FAST)
    _, s0 = evaluate(None, test_clips)
    _, s_c = evaluate(res.stabilizer, test_clips)
    assert s_c < 0.1 * s0, (s_c, s0)  # the output hardly changes any more ...
    for c in test_clips:
        out = S.stabilize_sequence(c.restored, res.stabilizer, inputs=c.inputs)
        drift = (out - out[0]).abs().mean().item()
        motion = (c.target - c.target[0]).abs().mean().item()
        assert drift < 0.25 * motion, (drift, motion)  # ... it freezes near the first frame despite the motion


# ----------------------------------------------------------------------------------------- files
def test_save_load_round_trip(tmp_path, controlled, test_clips):
    path = S.save_stabilizer(controlled, tmp_path / "stab.safetensors", metadata={"note": "x"})
    back = S.load_stabilizer(path)
    c = test_clips[0]
    assert torch.equal(S.stabilize_sequence(c.restored, back, inputs=c.inputs),
                       S.stabilize_sequence(c.restored, controlled, inputs=c.inputs))
    meta = S.read_stabilizer_metadata(path)
    assert meta["format"] == "vbridge_stabilizer" and meta["version"] == S.FORMAT_VERSION
    assert meta["kind"] == "controlled" and meta["config"]["kernel_size"] == 5
    assert meta["stability_weight"] == 0.4 and meta["collapse_bound"] == 4.0 and meta["oracle_bound"] == 0.5
    assert meta["note"] == "x" and meta["parameters"] == S.count_parameters(controlled)
    # spatial and EMA files
    sp = S.LearnedStabilizer(S.StabilizerConfig(kind="spatial", kernel_size=3, hidden=6, use_inputs=False))
    sp2 = S.load_stabilizer(S.save_stabilizer(sp, tmp_path / "sp.safetensors"))
    assert sp2.kind == "spatial" and sp2.k == 3 and not sp2.use_inputs
    assert torch.equal(S.stabilize_sequence(c.restored, sp2), S.stabilize_sequence(c.restored, sp))
    ema = S.load_stabilizer(S.save_stabilizer(S.EMAStabilizer(0.35), tmp_path / "ema.safetensors"))
    assert isinstance(ema, S.EMAStabilizer) and ema.b == pytest.approx(0.35)
    # a path works wherever a stabilizer does
    assert torch.equal(S.stabilize_sequence(c.restored, str(path), inputs=c.inputs),
                       S.stabilize_sequence(c.restored, back, inputs=c.inputs))


def test_not_a_stabilizer_file(tmp_path):
    from safetensors.torch import save_file

    save_file({"lora_A": torch.zeros(2, 2)}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(ModelFileError, match="not a V-Bridge stabilizer"):
        S.load_stabilizer(tmp_path / "lora.safetensors")
    with pytest.raises(ModelFileError, match="does not exist"):
        S.load_stabilizer(tmp_path / "missing.safetensors")


# ------------------------------------------------------------------------------------- bad input
def test_bad_input_messages():
    with pytest.raises(InputError, match="at least 2 frames"):
        S.stabilize_sequence(torch.rand(1, 3, 8, 8), 0.5)
    with pytest.raises(InputError, match="at least 2 frames"):
        S.temporal_stability(torch.rand(1, 3, 8, 8))
    with pytest.raises(InputError, match="one size"):
        S.stabilize_sequence([torch.rand(3, 8, 8), torch.rand(3, 8, 9)], 0.5)
    stream = S.StreamingStabilizer(0.5)
    stream.push(torch.rand(2, 3, 8, 8))
    with pytest.raises(InputError, match="frame size changed"):
        stream.push(torch.rand(1, 3, 9, 8))
    learned = S.LearnedStabilizer(S.StabilizerConfig(hidden=4, use_inputs=True))
    with pytest.raises(InputError, match="inputs="):
        S.stabilize_sequence(torch.rand(3, 3, 8, 8), learned)
    with pytest.raises(InputError, match="3-channel"):
        S.stabilize_sequence(torch.rand(3, 4, 8, 8), learned, inputs=torch.rand(3, 4, 8, 8))
    with pytest.raises(InputError, match=r"\(0, 1\]"):
        S.stabilize_sequence(torch.rand(3, 3, 8, 8), 1.5)
    with pytest.raises(InputError, match="differ"):
        S.train_stabilizer([(torch.rand(4, 3, 8, 8), torch.rand(4, 3, 8, 9))], steps=1)
    with pytest.raises(InputError, match="at least 2 frames"):
        S.train_stabilizer([(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))], steps=1)


def test_train_on_clips_of_different_lengths_and_sizes_and_bad_settings():
    """Real clips differ in length and size; windows of one batch used to be cut per clip and crashed in
    torch.stack. steps=0 wrote an untrained file ("final loss nan")."""
    g = torch.Generator().manual_seed(0)
    clips = [(torch.rand(5, 3, 40, 52, generator=g), torch.rand(5, 3, 40, 52, generator=g)),
             (torch.rand(3, 3, 80, 90, generator=g), torch.rand(3, 3, 80, 90, generator=g))]
    res = S.train_stabilizer(clips, "controlled", steps=3, hidden=4, batch_size=4, crop=64)
    assert len(res.losses) == 3 and all(l == l for l in res.losses)
    for bad in (dict(steps=0), dict(batch_size=0), dict(crop=0), dict(learning_rate=0.0)):
        with pytest.raises(InputError, match="must be (a )?positive"):
            S.train_stabilizer(clips, "controlled", hidden=4, **bad)


def test_latents_with_ema_and_48_channel_stabilizer():
    lat = torch.randn(4, 48, 6, 6)
    assert S.stabilize_sequence(lat, 0.5).shape == lat.shape
    st = S.LearnedStabilizer(S.StabilizerConfig(channels=48, hidden=8, use_inputs=False))
    assert S.stabilize_sequence(lat, st).shape == lat.shape


# ------------------------------------------------------------------------------------ video + CLI
class FakePipe:
    """Restores by adding seed-dependent noise (image i of a call: seed + i, or seed with same_seed), like the pipeline."""

    def __init__(self):
        self.seeds = []
        self.calls = []

    def restore(self, images, seed=0, same_seed=False, batch_size=1, **kw):
        from vbridge_core.pipeline import RestoreResult

        self.calls.append((len(images), batch_size))
        out = []
        for i, im in enumerate(images):
            s = seed if same_seed else seed + i
            self.seeds.append(s)
            g = torch.Generator().manual_seed(s)
            out.append((im + 0.1 * torch.randn(im.shape, generator=g)).clamp(0, 1))
        return RestoreResult(final=out)


def test_restore_video_same_seed_chunks_and_stabilizer():
    frames = procedural_photo(3, 32).expand(5, -1, -1, -1).clone()
    pipe = FakePipe()
    res = S.restore_video(pipe, frames, stabilizer=0.5, batch_frames=2, seed=9, steps=3)
    assert pipe.seeds == [9] * 5
    assert pipe.calls == [(2, 2), (2, 2), (1, 2)]  # chunks of batch_frames, each one batched restore call
    assert res.frames.shape == res.raw.shape == frames.shape
    assert S.temporal_stability(res.raw) < 1e-7  # fixed noise: a static video restores without flicker
    torch.testing.assert_close(res.frames, S.stabilize_sequence(res.raw, 0.5))
    assert res.info["stabilizer"] == "ema" and res.info["ema_strength"] == 0.5


def test_restore_video_tiny_pipeline():
    from vbridge_core.pipeline import VBridgePipeline
    from vbridge_core.tiny import build_tiny_transformer, build_tiny_vae, tiny_prompt_embeds

    pipe = VBridgePipeline(build_tiny_transformer(11), build_tiny_vae(12), device="cpu", dtype=torch.float32,
                           prompt_embeds=tiny_prompt_embeds(1))
    frames = torch.rand(3, 3, 32, 32)
    st = S.LearnedStabilizer(S.StabilizerConfig(kind="spatial", hidden=4))
    res = S.restore_video(pipe, frames, stabilizer=st, batch_frames=2, steps=2)
    assert res.frames.shape == (3, 3, 32, 32)
    assert torch.equal(res.frames[0], res.raw[0])


def test_restore_video_batches_dit_calls_with_per_frame_results():
    """batch_frames=3 runs one DiT forward per step for 3 frames and matches one restore call per frame."""
    from vbridge_core.pipeline import VBridgePipeline
    from vbridge_core.tiny import build_tiny_transformer, build_tiny_vae, tiny_prompt_embeds

    pipe = VBridgePipeline(build_tiny_transformer(11), build_tiny_vae(12), device="cpu", dtype=torch.float32,
                           prompt_embeds=tiny_prompt_embeds(1))
    frames = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    forwards = []
    hook = pipe.transformer.register_forward_hook(
        lambda m, a, kw, o: forwards.append((a[0] if a else kw["hidden_states"]).shape[0]), with_kwargs=True)
    steps = []
    try:
        res = S.restore_video(pipe, frames, stabilizer=None, batch_frames=3, seed=5, steps=2,
                              step_callback=lambda done, total, info: steps.append((done, total)))
    finally:
        hook.remove()
    assert forwards == [3, 3, 1, 1]  # 2 steps x (a chunk of 3 frames, then 1)
    assert steps == [(3, 8), (6, 8), (7, 8), (8, 8)]
    assert res.info["restore_calls"] == 2
    single = torch.stack([pipe.restore([f], seed=5, steps=2).final[0] for f in frames])
    torch.testing.assert_close(res.raw, single, atol=1e-5, rtol=0)
    torch.testing.assert_close(res.frames, res.raw, atol=0, rtol=0)  # no stabilizer


def test_cli_train_stabilizer(tmp_path):
    from vbridge_core.cli import main
    from vbridge_core.images import save_png

    photos = tmp_path / "photos"
    for i in range(2):
        save_png(procedural_photo(i, 64), photos / f"p{i}.png")
    out = tmp_path / "stab.safetensors"
    deg = []
    try:
        import vbridge_core.degrade  # noqa: F401
    except ImportError:
        deg = ["--degradation", "none"]
    args = ["train-stabilizer", "--photos", str(photos), "--out", str(out), "--steps", "3", "--size", "32",
            "--crop", "24", "--frames", "5", "--clips-per-photo", "1", "--hidden", "4"]
    assert main(args + deg) == 0 and out.is_file()
    assert S.load_stabilizer(out).kind == "spatial"
    assert main(args + deg + ["--stability-weight", "9"]) == 2  # above the collapse bound of 5-frame windows
    # real clips: restored/ hq/ lq/ folders
    clip = tmp_path / "clips" / "c0"
    seq = S.camera_motion_clip(procedural_photo(5, 64), 5, size=24)
    noisy = S.simulate_restorer(seq, seed=1)
    for t in range(5):
        save_png(noisy[t], clip / "restored" / f"f{t:03d}.png")
        save_png(seq[t], clip / "hq" / f"f{t:03d}.png")
        save_png(seq[t], clip / "lq" / f"f{t:03d}.png")
    out2 = tmp_path / "c.safetensors"
    assert main(["train-stabilizer", "--clips", str(tmp_path / "clips"), "--out", str(out2), "--kind", "controlled",
                 "--steps", "2", "--crop", "16", "--hidden", "4"]) == 0
    assert S.load_stabilizer(out2).use_inputs
    (clip / "restored").rename(clip / "old")
    assert main(["train-stabilizer", "--clips", str(clip), "--out", str(out2), "--steps", "1"]) == 2


def test_cli_restore_video(tmp_path, tiny_model_dir, monkeypatch):
    """restore-video: same seed, --batch-frames batching, EMA, raw frames and settings written."""
    import json

    from vbridge_core.cli import main
    from vbridge_core.images import load_image, save_png
    from vbridge_core.lora import LoraLayer, write_lora
    from vbridge_core.tiny import tiny_prompt_embeds

    g = torch.Generator().manual_seed(0)
    lora = write_lora(tmp_path / "r.safetensors", {"blocks.0.attn1.to_q": LoraLayer(
        torch.randn(4, 256, generator=g) * 0.05, torch.randn(256, 4, generator=g) * 0.05, 4.0)}, rank=4, alpha=4,
        metadata={"role": "restoration", "frames": 5}, prompt_embeds=tiny_prompt_embeds(1))
    clip = S.camera_motion_clip(procedural_photo(4, 64), 3, size=32)
    for t in range(3):
        save_png(clip[t], tmp_path / "frames" / f"f{t}.png")
    out = tmp_path / "out"
    assert main(["restore-video", str(tmp_path / "frames"), "--out", str(out), "--model", str(tiny_model_dir),
                 "--lora", str(lora), "--ema", "0.5", "--batch-frames", "2", "--steps", "2", "--frames", "5",
                 "--save-raw"]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["f0.png", "f1.png", "f2.png"]
    assert len(list((out / "raw").glob("*.png"))) == 3
    settings = json.loads((out / "vbridge_video_settings.json").read_text())
    info = settings["info"]
    assert info["restore_calls"] == 2 and info["ema_strength"] == 0.5
    # the pseudo-video length, seed and LoRA are part of the settings (F was dropped before)
    assert settings["sampler"]["frames"] == 5 and settings["sampler"]["seed"] == 0
    assert settings["lora"] == str(lora) and settings["lora_strength"] == 1.0
    # --compile is honoured (it was accepted and ignored)
    from vbridge_core.pipeline import VBridgePipeline

    calls = []
    monkeypatch.setattr(VBridgePipeline, "compile", lambda self, *a, **k: calls.append(1))
    assert main(["restore-video", str(tmp_path / "frames"), "--out", str(tmp_path / "out_c"), "--model",
                 str(tiny_model_dir), "--lora", str(lora), "--steps", "1", "--compile"]) == 0
    assert calls == [1]
    # per-image flags restore-video cannot honour are not offered (they were accepted and silently ignored)
    for flag in (["--save-trajectory"], ["--batch-size", "2"]):
        with pytest.raises(SystemExit):
            main(["restore-video", str(tmp_path / "frames"), "--out", str(out), "--model", str(tiny_model_dir), *flag])
    assert torch.allclose(load_image(out / "f0.png"), load_image(out / "raw" / "f0.png"))
