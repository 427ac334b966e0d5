"""The command line end to end on the tiny model saved to disk: outputs, settings, help and errors."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vbridge_core.cli import build_parser, main
from vbridge_core.images import save_png
from tiny_files import random_lora

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_in")
    g = torch.Generator().manual_seed(0)
    save_png(torch.rand(3, 40, 56, generator=g), d / "a.png")
    save_png(torch.rand(3, 32, 32, generator=g), d / "b.png")
    return d


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_loras")
    return random_lora(d / "r.safetensors", "restoration", 1), random_lora(d / "d.safetensors", "drift_correction", 2)


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["restore", "--help"])
    text = capsys.readouterr().out
    for flag in ("--out", "--dit", "--vae", "--model", "--lora", "--drift-lora", "--frames", "--steps", "--seed",
                 "--shift", "--solver", "--guidance", "--prompt", "--save-trajectory", "--preset", "--sigma-grid"):
        assert flag in text
    assert "default" in text


def test_help_shows_zero_defaults(capsys):
    """A default of 0 equals False; the formatter used to hide it (train --seed showed no default)."""
    import re

    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = re.sub(r"\s+", " ", capsys.readouterr().out)
    assert "--seed SEED seed (default: 0)" in text and "warmup steps (default: 0)" in text
    assert "--no-flip no random horizontal flips output:" in text  # store_true flags stay without "(default: False)"


def test_restore_with_drift_writes_pngs_and_settings(tmp_path, tiny_model_dir, inputs, loras):
    out = tmp_path / "out"
    rc = main(["restore", str(inputs), "--out", str(out), "--model", str(tiny_model_dir), "--lora", str(loras[0]),
               "--drift-lora", str(loras[1]), "--steps", "3", "--seed", "5", "--save-trajectory"])
    assert rc == 0
    names = sorted(p.name for p in out.iterdir())
    for stem in ("a", "b"):
        for suffix in ("", "_base", "_trajectory", "_base_trajectory"):
            assert f"{stem}{suffix}.png" in names
    assert len(list((out / "a_trajectory").glob("frame_*.png"))) == 5
    from vbridge_core.images import load_image

    assert load_image(out / "a.png").shape == (3, 40, 56)
    assert load_image(out / "a_trajectory.png").shape == (3, 40, 56 * 5)
    settings = json.loads((out / "vbridge_settings.json").read_text())
    assert settings["sampler"]["steps"] == 3 and settings["sampler"]["seed"] == 5
    assert settings["restore_info"]["adapters"] == {"restoration": 1.0, "drift_correction": 1.0}
    assert not [p for p in out.rglob("*.tmp*")]


def test_single_files_and_paper_preset(tmp_path, tiny_model_dir, inputs, loras):
    # the DiT and VAE given as files/folders explicitly, and the paper recipe (guidance 6, skipped tail)
    out = tmp_path / "out"
    rc = main(["restore", str(inputs / "b.png"), "--out", str(out), "--dit", str(tiny_model_dir / "transformer"),
               "--vae", str(tiny_model_dir / "vae"), "--lora", str(loras[0]), "--preset", "paper", "--steps", "4"])
    assert rc == 0
    settings = json.loads((out / "vbridge_settings.json").read_text())
    s = settings["restore_info"]
    assert s["guidance"] == 6.0 and s["sigma_grid"] == "official" and s["guidance_skip_tail"] == 0.15
    assert settings["preset"] == "paper" and settings["lora_strength"] == 1.0 and settings["drift_strength"] is None


@pytest.mark.parametrize("extra,needle", [
    (["--frames", "6"], "4k+1"),
    (["--dit", "/nonexistent/wan2.2_ti2v_5B_fp16.safetensors"], "wan2.2_ti2v_5B_fp16.safetensors"),
    (["--device", "foo"], "unknown device"),
    (["--device", "cuda:99"], "cuda:99"),  # no GPU, or not 100 of them: an error line, not a torch traceback
    (["--lora-strength", "nan"], "strength"),
])
def test_errors_are_one_line(tmp_path, tiny_model_dir, inputs, loras, capsys, extra, needle):
    args = ["restore", str(inputs / "b.png"), "--out", str(tmp_path / "o"), "--lora", str(loras[0]), "--steps", "2"]
    if "--dit" not in extra:
        args += ["--model", str(tiny_model_dir)]
    else:
        args += ["--vae", str(tiny_model_dir / "vae")]
    assert main(args + extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err and "Traceback" not in err
    assert not list((tmp_path / "o").glob("*.png")) if (tmp_path / "o").exists() else True


def test_missing_input_unwritable_out_and_foreign_lora(tmp_path, tiny_model_dir, inputs, loras, capsys):
    assert main(["restore", str(tmp_path / "nope.png"), "--out", str(tmp_path / "o"), "--model",
                 str(tiny_model_dir)]) == 2
    assert "does not exist" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["restore", str(inputs / "b.png"), "--out", str(blocker / "sub"), "--model",
                 str(tiny_model_dir)]) == 2
    assert "output directory" in capsys.readouterr().err
    big = random_lora(tmp_path / "big.safetensors", "restoration", 3, dim=5120, layers=1)
    assert main(["restore", str(inputs / "b.png"), "--out", str(tmp_path / "o2"), "--model", str(tiny_model_dir),
                 "--lora", str(big)]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "5120" in err


def test_cancel_leaves_no_output(tmp_path, tiny_model_dir, inputs, loras):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "vbridge_core", "restore", str(inputs / "a.png"), "--out", str(out),
                             "--model", str(tiny_model_dir), "--lora", str(loras[0]), "--steps", "5000"],
                            stderr=subprocess.PIPE, text=True, env=env, cwd=str(ROOT),
                            # a test run started in the background (nohup ... &) has SIGINT ignored, and Python
                            # then never raises KeyboardInterrupt: give the child the default, as a terminal would
                            preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)) if os.name == "posix" else None)
    deadline = time.time() + 120
    for line in proc.stderr:
        if "restore: step" in line:
            proc.send_signal(signal.SIGINT)
            break
        assert time.time() < deadline
    rest = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, rest
    assert "cancelled" in rest
    assert not list(out.rglob("*.png")) and not list(out.rglob("*.tmp*"))


def test_cancel_during_drift_pass_leaves_no_base_outputs(tmp_path, tiny_model_dir, inputs, loras, monkeypatch):
    """The *_base.png files used to be written before the drift pass, so a Ctrl-C there left them behind
    while the CLI said "no partial output was written"."""
    from vbridge_core.pipeline import VBridgePipeline

    def interrupted(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(VBridgePipeline, "drift_correct", interrupted)
    out = tmp_path / "out"
    assert main(["restore", str(inputs), "--out", str(out), "--model", str(tiny_model_dir), "--lora", str(loras[0]),
                 "--drift-lora", str(loras[1]), "--steps", "1", "--save-trajectory"]) == 130
    assert not list(out.rglob("*.png"))


def test_eval(tmp_path, capsys):
    g = torch.Generator().manual_seed(3)
    for d in ("r", "h"):
        (tmp_path / d).mkdir()
    x = torch.rand(3, 32, 32, generator=g)
    save_png(x, tmp_path / "h" / "one.png")
    save_png((x + 0.05).clamp(0, 1), tmp_path / "r" / "one.png")
    assert main(["eval", str(tmp_path / "r"), str(tmp_path / "h")]) == 0
    out = capsys.readouterr().out
    assert "PSNR" in out and "mean" in out


def test_demo_runs_offline(tmp_path, capsys):
    rc = main(["demo", "--out", str(tmp_path / "demo"), "--train-steps", "6", "--steps", "3"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "SMOKE TEST" in out
    report = json.loads((tmp_path / "demo" / "demo_report.json").read_text())
    assert report["pairs"] == 6
    assert len(list((tmp_path / "demo").glob("*_compare.png"))) == 6
    assert (tmp_path / "demo" / "loras" / "demo_drift_correction.safetensors").exists()


def test_eval_protocols_and_json(tmp_path, capsys):
    from vbridge_core.metrics import image_metrics, psnr, ssim

    g = torch.Generator().manual_seed(4)
    for d in ("r", "h"):
        (tmp_path / d).mkdir()
    xs = {}
    for name in ("one", "two"):
        x = torch.rand(3, 32, 40, generator=g)
        save_png(x, tmp_path / "h" / f"{name}.png")
        save_png((x + 0.1 * torch.randn(3, 32, 40, generator=g)).clamp(0, 1), tmp_path / "r" / f"{name}.png")
    from vbridge_core.images import load_image

    pairs = {n: (load_image(tmp_path / "r" / f"{n}.png"), load_image(tmp_path / "h" / f"{n}.png")) for n in ("one", "two")}
    for protocol in ("foundir", "release"):
        j = tmp_path / f"{protocol}.json"
        assert main(["eval", str(tmp_path / "r"), str(tmp_path / "h"), "--protocol", protocol, "--json", str(j)]) == 0
        rep = json.loads(j.read_text())
        assert rep["protocol"] == protocol and rep["count"] == 2 and [i["name"] for i in rep["images"]] == ["one", "two"]
        for i in rep["images"]:
            want = image_metrics(*pairs[i["name"]], protocol)
            assert set(want) <= set(i) and all(abs(i[k] - float(v)) < 1e-12 for k, v in want.items())
        assert set(rep["mean"]) == set(want)
        assert rep["mean"][next(iter(want))] == pytest.approx(sum(i[next(iter(want))] for i in rep["images"]) / 2)
    j = tmp_path / "custom.json"
    assert main(["eval", str(tmp_path / "r"), str(tmp_path / "h"), "--psnr-channel", "y", "--ssim-channel", "rgb",
                 "--json", str(j)]) == 0
    rep = json.loads(j.read_text())
    assert rep["protocol"] == "custom"
    assert rep["images"][0]["psnr"] == float(psnr(*pairs["one"], channel="y"))
    assert rep["images"][0]["ssim"] == float(ssim(*pairs["one"], channel="rgb"))
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "r"), str(tmp_path / "h"), "--protocol", "foundir", "--ssim-channel", "y"]) == 2
    assert "--protocol custom" in capsys.readouterr().err
