"""Bad-input battery, errors (issue 9 items 11, 12, 8, 13, 15, 16).

- 11: NaN/inf (and out-of-range) floats are refused by every CLI float option and by the nodes, with
  one ``error:`` line naming the option and its range; LoRA and stabilizer files holding NaN/inf
  weights are refused on load, naming the file;
- 12: Ctrl-C prints a non-empty reason and exits 130;
- 8: UniPC runs more than 200 steps (diffusers' integer timesteps repeat there);
- 13: ``train-stabilizer --clips`` takes the folder ``restore-video --save-raw`` wrote;
- 15: the ``vbridge`` console script works from any folder after ``pip install -e .``;
- 16: the demo writes under the temp dir; drift-mode training logs its restoration pass; no log
  line repeats per run.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import pytest
import torch

from vbridge_core.errors import InputError, ModelFileError
from vbridge_core.images import save_png
from vbridge_core.tiny import tiny_prompt_embeds

from bad_input_kit import assert_one_error, digest, run_cli
from tiny_files import procedural_photo, random_lora

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# item 11: non-finite numbers
# --------------------------------------------------------------------------------------------


def _float_options() -> list[tuple[str, str]]:
    """``(command, --option)`` for every option of the real parser whose type is a float check."""
    from vbridge_core.cli import build_parser

    found = []
    for name, sub in build_parser()._subparsers._group_actions[0].choices.items():  # noqa: SLF001
        for act in sub._actions:  # noqa: SLF001
            t = act.type
            if t is float:
                found.append((name, act.option_strings[0], "plain float"))
            elif getattr(t, "__name__", "") in ("float", "float list") and t is not float:
                found.append((name, act.option_strings[0], "checked"))
    return found


def test_no_cli_option_parses_plain_floats():
    """Every float option goes through vbridge_core.validate (a plain ``type=float`` accepts nan)."""
    opts = _float_options()
    assert len(opts) >= 25, opts  # restore, drift-correct, train, train-stabilizer, restore-video, ...
    assert [o for o in opts if o[2] == "plain float"] == []


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN"])
def test_every_cli_float_option_refuses_non_finite(tmp_path, capsys, value):
    """Each float option of each command: one error line naming the option, exit 2, nothing written."""
    before = digest(tmp_path)
    opts = _float_options()
    for command, opt, _ in opts:
        # the value is checked as argparse reads it, before it looks for missing positionals
        argv = [command, f"{opt}={value}", "--out", str(tmp_path / "out")]
        rc, err = run_cli(argv, capsys)
        assert_one_error(rc, err, opt, "finite number", "NaN and infinity are not allowed")
    assert digest(tmp_path) == before and not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv,needles", [
    (["--shift", "0"], ["--shift", "positive finite number", "got 0"]),
    (["--guidance", "0.5"], ["--guidance", ">= 1"]),
    (["--start-sigma", "1.5"], ["--start-sigma", "in (0, 1]"]),
    (["--guidance-skip-tail", "1"], ["--guidance-skip-tail", "in [0, 1)"]),
    (["--sigmas", "1.0,0.5,nan"], ["--sigmas", "NaN", "1.0,0.5,nan"]),
    (["--sigmas", "1.0,x"], ["--sigmas", "'x'"]),
    (["--lora-strength", "abc"], ["--lora-strength", "'abc'"]),
])
def test_cli_float_ranges(tmp_path, capsys, argv, needles):
    rc, err = run_cli(["restore", tmp_path / "in", "--out", tmp_path / "out", *argv], capsys)
    assert_one_error(rc, err, *needles)


def test_train_stabilizer_nan_weight_writes_nothing(tmp_path, capsys):
    """The reported case: exit 0 and a stabilizer of NaN weights. Now refused before any work."""
    save_png(procedural_photo(1, 48), tmp_path / "photos" / "p.png")
    out = tmp_path / "models" / "s.safetensors"
    before = digest(tmp_path)
    for opt in ("--stability-weight", "--restorer-error", "--lr"):
        for v in ("nan", "inf"):
            rc, err = run_cli(["train-stabilizer", "--photos", tmp_path / "photos", "--out", out, opt, v,
                               "--steps", "2", "--frames", "3", "--size", "24", "--crop", "16", "--hidden", "4"], capsys)
            assert_one_error(rc, err, opt, "finite number")
    assert digest(tmp_path) == before and not out.exists()


def test_core_apis_refuse_non_finite():
    """The library entry points the nodes call check too (ComfyUI's min/max checks let NaN through)."""
    from vbridge_core import stabilize as S
    from vbridge_core.sampler import SamplerSettings
    from vbridge_core.training.config import TrainConfig
    from vbridge_core.trajectory import alpha_schedule

    clip = S.StabilizerClip(torch.rand(3, 3, 16, 16), torch.rand(3, 3, 16, 16))
    for kw in (dict(stability_weight=math.nan), dict(stability_weight=math.inf), dict(learning_rate=math.inf)):
        with pytest.raises(InputError, match="finite number"):
            S.train_stabilizer([clip], "controlled", steps=1, crop=8, hidden=4, **kw)
    with pytest.raises(InputError, match="restorer error"):
        S.synthesize_clips([procedural_photo(0, 32)], n_frames=3, size=16, restorer_amplitude=math.nan)
    for kw in (dict(learning_rate=math.inf), dict(weight_decay=math.nan), dict(max_grad_norm=math.nan),
               dict(alpha=math.inf), dict(validation_fraction=math.nan), dict(quality_weighting=math.nan)):
        with pytest.raises(InputError, match=list(kw)[0]):
            TrainConfig(steps=1, resolution=32, **kw).validate()
    with pytest.raises(InputError, match="alpha schedule"):
        alpha_schedule([0, math.nan, 0.5, 0.7, 1], 5)
    for kw in (dict(shift=math.nan), dict(guidance=math.nan), dict(guidance_skip_tail=math.nan),
               dict(start_sigma=math.nan)):
        with pytest.raises(InputError):
            SamplerSettings(**kw).validate()


def _nan_stabilizer(path: Path) -> Path:
    """A stabilizer file whose weights are NaN (what the NaN stability weight used to write)."""
    from vbridge_core import stabilize as S

    st = S.LearnedStabilizer(S.StabilizerConfig(kind="controlled", channels=3, hidden=4, kernel_size=3))
    with torch.no_grad():
        for p in st.parameters():
            p.fill_(math.nan)
    return S.save_stabilizer(st, path)


def test_nan_stabilizer_file_is_refused_before_any_frame(tmp_path, capsys, tiny_model_dir):
    from vbridge_core import stabilize as S

    bad = _nan_stabilizer(tmp_path / "bad.safetensors")
    with pytest.raises(ModelFileError, match="NaN/inf"):
        S.load_stabilizer(bad)
    for t in range(2):
        save_png(procedural_photo(t, 32), tmp_path / "frames" / f"f{t:03d}.png")
    before = digest(tmp_path)
    rc, err = run_cli(["restore-video", tmp_path / "frames", "--out", tmp_path / "out", "--model", tiny_model_dir,
                       "--stabilizer", bad, "--steps", "1"], capsys)
    assert_one_error(rc, err, str(bad), "NaN/inf", "retrain it")
    assert digest(tmp_path) == before and not (tmp_path / "out" / "f000.png").exists()


def test_nan_lora_file_is_refused(tmp_path, capsys, tiny_model_dir):
    from safetensors.torch import load_file, save_file

    from vbridge_core.lora import read_lora

    good = random_lora(tmp_path / "good.safetensors", "restoration", 1)
    tensors = load_file(str(good))
    key = sorted(k for k in tensors if k.endswith("lora_down.weight") or k.endswith("lora_A.weight"))[0]
    tensors[key][0, 0] = math.inf
    from safetensors import safe_open

    with safe_open(str(good), framework="pt") as f:
        meta = f.metadata()
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    read_lora(good)
    with pytest.raises(ModelFileError, match="NaN/inf"):
        read_lora(bad)
    save_png(procedural_photo(0, 32), tmp_path / "in" / "a.png")
    before = digest(tmp_path)
    rc, err = run_cli(["restore", tmp_path / "in", "--out", tmp_path / "out", "--model", tiny_model_dir,
                       "--lora", bad, "--steps", "1"], capsys)
    assert_one_error(rc, err, str(bad), "NaN/inf", "retrain it")
    assert digest(tmp_path) == before and not (tmp_path / "out" / "a.png").exists()


def test_nodes_refuse_non_finite_floats(tmp_path, monkeypatch):
    """Train Stabilizer with stability_weight NaN (ComfyUI's API lets it through) is refused before work."""
    import nodes as pack
    from tiny_files import call_node

    monkeypatch.setenv("VBRIDGE_MODELS_DIR", str(tmp_path / "models"))
    photos = procedural_photo(0, 48).permute(1, 2, 0)[None]
    for w in (math.nan, math.inf):
        with pytest.raises(InputError, match="stability_weight.*finite number"):
            call_node("TrainStabilizer", kind="controlled", output_name="s", steps=1, stability_weight=w,
                      clip_frames=3, degradation="none", seed=0, photos=photos)
    assert not (tmp_path / "models").exists() or not list((tmp_path / "models").rglob("*.safetensors"))
    loader = pack.NODE_CLASS_MAPPINGS["LoadVBridge"]()
    with pytest.raises(InputError, match="restoration_strength"):
        loader.load(dit="x", vae="y", restoration_lora="none", restoration_strength=math.nan, drift_lora="none",
                    drift_strength=1.0, precision="bf16", attention="auto", memory="keep on GPU")
    from nodes import restore_nodes

    monkeypatch.setattr(restore_nodes, "_check_model", lambda m: None)  # the floats are checked before any work
    restore = pack.NODE_CLASS_MAPPINGS["RestoreTrajectory"]()
    for kw, needle in ((dict(shift=math.nan), "shift"), (dict(guidance=math.inf), "guidance"),
                       (dict(start_sigma=math.nan), "start_sigma")):
        args = dict(vbridge_model=None, image=photos, frames=5, steps=1, seed=0, shift=5.0, solver="unipc",
                    guidance=1.0)
        args.update(kw)
        with pytest.raises(InputError, match=needle):
            restore.restore(**args)


# --------------------------------------------------------------------------------------------
# item 12: Ctrl-C
# --------------------------------------------------------------------------------------------


def test_ctrl_c_prints_a_reason(tmp_path, capsys, monkeypatch):
    import vbridge_core.cli as cli

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_collect_inputs", interrupted)
    before = digest(tmp_path)
    capsys.readouterr()
    rc = cli.main(["restore", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--model", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 130
    lines = [ln for ln in err.splitlines() if ln.startswith("cancelled:")]
    assert len(lines) == 1 and "cancelled: ;" not in lines[0] and "interrupted (Ctrl-C)" in lines[0], err
    assert "Traceback" not in err and digest(tmp_path) == before


# --------------------------------------------------------------------------------------------
# item 8: UniPC with many steps
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps,shift,grid", [(201, 20.0, "diffusers"), (1000, 5.0, "diffusers"),
                                              (1000, 5.0, "official")])
def test_unipc_runs_more_than_200_steps(steps, shift, grid):
    """diffusers' UniPC stores integer timesteps; past ~200 steps the first one repeats, the scheduler
    started at its second match, skipped a sigma and hit an AssertionError on the last step."""
    from vbridge_core.sampler import SamplerSettings, make_scheduler

    sched, _ = make_scheduler(SamplerSettings(steps=steps, shift=shift, sigma_grid=grid))
    x = torch.zeros(1, 4)
    for t in sched.timesteps:  # a constant velocity of 1 integrates from x to x - (sigma_0 - 0)
        x = sched.step(torch.ones(1, 4), t, x, return_dict=False)[0]
    assert sched.step_index == steps
    assert torch.allclose(x, torch.full_like(x, -float(sched.sigmas[0])), atol=1e-4)


def test_unipc_many_steps_through_the_sampling_loop():
    """The pipeline's own scheduler loop (what restore runs per image) with a stand-in DiT, 201 steps."""
    from vbridge_core.sampler import SampleStats, SamplerSettings, _run_scheduler

    settings = SamplerSettings(steps=201, shift=20.0).validate()
    lat = torch.zeros(1, 2, 1, 2, 2)
    stats, seen = SampleStats(), []
    out = _run_scheduler(settings, lat, torch.zeros_like(lat), torch.ones_like(lat),
                         lambda i, x, t: torch.ones_like(x), lambda info: seen.append(info.step), None, stats)
    assert seen == list(range(1, 202)) and len(stats.sigmas) == 201
    assert torch.isfinite(out).all()


# --------------------------------------------------------------------------------------------
# item 13: train-stabilizer --clips on restore-video --save-raw output
# --------------------------------------------------------------------------------------------


def test_train_stabilizer_takes_restore_video_output(tmp_path, capsys, tiny_model_dir):
    """README: clips "as written by restore-video --save-raw". That exact output folder trains."""
    from vbridge_core import stabilize as S

    clip = tmp_path / "clip"
    clean = S.camera_motion_clip(procedural_photo(4, 64), 3, size=32)
    noisy = S.simulate_restorer(clean, seed=1, amplitude=0.1)
    for t in range(3):
        save_png(clean[t], clip / "hq" / f"f{t:03d}.png")
        save_png(noisy[t], clip / "lq" / f"f{t:03d}.png")
    lora = random_lora(tmp_path / "r.safetensors", "restoration", 1)
    rc, err = run_cli(["restore-video", clip / "lq", "--out", clip / "restored", "--model", tiny_model_dir, "--lora",
                       lora, "--ema", "0.5", "--steps", "1", "--save-raw"], capsys)
    assert rc == 0, err
    before = digest(tmp_path)
    small = ["--steps", "2", "--crop", "16", "--hidden", "4", "--kind", "controlled"]
    for i, src in enumerate((clip / "restored", clip, tmp_path)):  # the output itself, its clip, the clips' parent
        out = tmp_path / "stab" / f"s{i}.safetensors"
        rc, err = run_cli(["train-stabilizer", "--clips", src, "--out", out, *small], capsys)
        assert rc == 0, err
        st = S.load_stabilizer(out)
        assert st.use_inputs  # the LQ frames were found through the recorded input folder (or clip/lq)
    # it learns from the restorer's own frames (raw/), not the EMA-stabilized ones next to them
    from vbridge_core.images import load_image
    from vbridge_core.stabilize_cli import load_clip_folders

    raw = torch.stack([load_image(clip / "restored" / "raw" / f"f{t:03d}.png") for t in range(3)])
    for src in (clip / "restored", clip):
        (c,) = load_clip_folders([str(src)])
        assert torch.equal(c.restored, raw) and c.inputs is not None
    after = digest(tmp_path, skip=[tmp_path / "stab"])
    assert after == before
    # without clean frames: one error line saying where to put them
    (clip / "hq").rename(tmp_path / "elsewhere")
    before = digest(tmp_path)
    rc, err = run_cli(["train-stabilizer", "--clips", clip / "restored", "--out", tmp_path / "x.safetensors", *small],
                      capsys)
    assert_one_error(rc, err, "no clean frames", str(clip / "hq"))
    assert digest(tmp_path) == before


# --------------------------------------------------------------------------------------------
# item 15: the console script
# --------------------------------------------------------------------------------------------


def _pip_install_ready() -> str:
    """Why the install test cannot run here ('' when it can): it needs pip and setuptools>=77 offline."""
    from importlib.metadata import PackageNotFoundError, version

    try:  # not imported: importing setuptools inside pytest trips its distutils hack
        v = version("setuptools")
        version("pip")
    except PackageNotFoundError as e:
        return f"pip/setuptools not installed ({e})"
    if int(v.split(".")[0]) < 77:
        return f"setuptools {v} < 77 (pyproject's build requirement)"
    return ""


@pytest.mark.skipif(bool(_pip_install_ready()), reason=_pip_install_ready() or "ready")
def test_console_script_from_any_folder(tmp_path):
    """``pip install -e .`` (offline, into a throwaway venv that sees this environment's packages) gives a
    ``vbridge`` command and ``python -m vbridge_core`` that work from any folder, and installs no top-level
    ``nodes`` package (it would shadow ComfyUI's own ``nodes`` module); the wheel carries the package data."""
    import shutil
    import subprocess
    import sys
    import sysconfig
    import venv
    import zipfile

    src = tmp_path / "src"  # a copy: building writes build/ and *.egg-info next to pyproject.toml
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "__init__.py"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("vbridge_core", "nodes"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "parent_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # torch, diffusers, setuptools
    pip = [sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-build-isolation",
           "--no-index"]
    r = subprocess.run([*pip, "-e", str(src)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([str(env_dir / "bin" / "vbridge"), "restore", "--help"], cwd=elsewhere, capture_output=True,
                       text=True, timeout=120, env=env)
    assert r.returncode == 0 and "usage: vbridge restore" in r.stdout, r.stderr
    r = subprocess.run([str(env_dir / "bin" / "vbridge"), "restore", "x", "--out", "o", "--guidance", "nan"],
                       cwd=elsewhere, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2 and r.stderr.startswith("error: --guidance"), r.stderr
    r = subprocess.run([str(py), "-c", "import vbridge_core, importlib.util as u; print(vbridge_core.__file__); "
                        "print(u.find_spec('nodes'))"], cwd=elsewhere, capture_output=True, text=True, env=env)
    assert r.returncode == 0 and str(src / "vbridge_core") in r.stdout and r.stdout.split()[-1] == "None", r.stdout
    assert list(elsewhere.iterdir()) == []
    # the wheel (a plain pip install) holds only vbridge_core, with its configs, assets and perceiver weights
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                        "-w", str(tmp_path / "whl"), str(src)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    names = zipfile.ZipFile(next((tmp_path / "whl").glob("*.whl"))).namelist()
    assert {n.split("/")[0] for n in names if not n.startswith("comfyui_vbridge-")} == {"vbridge_core"}
    for want in ("vbridge_core/configs/wan22_vae.json", "vbridge_core/perceive/perceiver.safetensors",
                 "vbridge_core/assets/README.md", "vbridge_core/validate.py"):
        assert want in names, want
    assert any(n.startswith("vbridge_core/assets/samples/") for n in names)


# --------------------------------------------------------------------------------------------
# item 16: demo folder, drift-mode progress
# --------------------------------------------------------------------------------------------


def test_demo_writes_under_the_temp_folder_not_the_current_one(tmp_path, monkeypatch, caplog):
    import tempfile

    import vbridge_core.demo as demo
    from vbridge_core.cli import main

    seen = []
    monkeypatch.setattr(demo, "run_demo", lambda out, **kw: seen.append(Path(out)) or {})
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "systmp"))
    cwd = tmp_path / "repo"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    with caplog.at_level("INFO", logger="vbridge_core"):
        assert main(["demo", "--train-steps", "1", "--steps", "1"]) == 0
    assert seen == [tmp_path / "systmp" / "vbridge_demo"] and list(cwd.iterdir()) == []
    assert any(str(seen[0]) in r.getMessage() for r in caplog.records)  # it says where
    assert "vbridge_demo/" in (ROOT / ".gitignore").read_text().splitlines()


def test_drift_training_logs_its_restoration_pass(tmp_path, capsys, caplog, tiny_model_dir):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    for i in range(3):
        save_png(torch.rand(3, 32, 32, generator=g), tmp_path / "pairs" / "hq" / f"p{i}.png")
        save_png(torch.rand(3, 32, 32, generator=g), tmp_path / "pairs" / "lq" / f"p{i}.png")
    save_file({"prompt_embeds": tiny_prompt_embeds()}, str(tmp_path / "emb.safetensors"))
    lora = random_lora(tmp_path / "r.safetensors", "restoration", 1)
    with caplog.at_level("INFO", logger="vbridge_core"):
        rc, err = run_cli(["train", "--mode", "drift", "--restoration-lora", lora, "--pairs", tmp_path / "pairs",
                           "--prompt-embeds", tmp_path / "emb.safetensors", "--out", tmp_path / "out" / "d.safetensors",
                           "--model", tiny_model_dir, "--steps", "1", "--resolution", "32", "--restore-steps", "1",
                           "--val-fraction", "0", "--device", "cpu"], capsys)
    assert rc == 0, err
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("drift data: restored")]
    assert [ln.split(" (")[0] for ln in lines] == [f"drift data: restored {k}/3 training LQs" for k in (1, 2, 3)]
