"""``python -m vbridge_core train`` on the tiny model saved to disk: restoration then drift mode,
clear errors for bad datasets, a killed run that resumes from its last checkpoint, and a
two-process data-parallel run (torchrun, as ``accelerate launch --multi_gpu`` does)."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vbridge_core.cli import main
from vbridge_core.images import save_png
from vbridge_core.lora import read_lora
from vbridge_core.tiny import tiny_prompt_embeds
from vbridge_core.training.checkpoint import checkpoint_dir, list_checkpoints, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _write_pairs(root: Path, tasks=("denoise", "deblur"), n: int = 2, size: int = 32) -> Path:
    g = torch.Generator().manual_seed(0)
    for t in tasks:
        for i in range(n):
            hq = torch.rand(3, size, size, generator=g)
            save_png(hq, root / t / "hq" / f"img{i}.png")
            save_png((hq * 0.5).clamp(0, 1), root / t / "lq" / f"img{i}.png")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_cli")
    emb = root / "prompt.safetensors"
    from safetensors.torch import save_file

    save_file({"prompt_embeds": tiny_prompt_embeds()}, str(emb))
    return _write_pairs(root / "pairs"), emb


def _base(model_dir, emb, out, *extra):
    return ["train", "--out", str(out), "--model", str(model_dir), "--prompt-embeds", str(emb), "--rank", "4",
            "--crops-per-pair", "1", "--checkpoint-every", "0", "--lr", "1e-3", *extra]


def test_restoration_then_drift(tmp_path, tiny_model_dir, data):
    pairs, emb = data
    rest = tmp_path / "loras" / "vbridge" / "restore.safetensors"
    assert main(_base(tiny_model_dir, emb, rest, "--pairs", str(pairs), "--stages", "32:3,64:2")) == 0
    lf = read_lora(rest)
    assert lf.role == "restoration" and lf.metadata["vbridge.resolution_curriculum"] == "32:3,64:2"
    assert sorted(lf.metadata["vbridge.tasks"]) == ["deblur", "denoise"]
    assert rest.with_name("restore.loss.png").is_file()
    drift = tmp_path / "loras" / "vbridge" / "drift.safetensors"
    assert main(["train", "--mode", "drift", "--pairs", str(pairs), "--restoration-lora", str(rest), "--out", str(drift),
                 "--model", str(tiny_model_dir), "--rank", "4", "--crops-per-pair", "1", "--steps", "3",
                 "--resolution", "32", "--restore-steps", "2", "--checkpoint-every", "0"]) == 0
    d = read_lora(drift)
    assert d.role == "drift_correction" and torch.equal(d.prompt_embeds, tiny_prompt_embeds())


def _bad(tmp_path: Path, kind: str) -> Path:
    root = tmp_path / kind
    if kind == "empty":
        (root / "lq").mkdir(parents=True)
        (root / "hq").mkdir(parents=True)
    elif kind == "stems":
        _write_pairs(root, tasks=("t",), n=1)
        save_png(torch.rand(3, 32, 32), root / "t" / "lq" / "orphan.png")
    elif kind == "sizes":
        _write_pairs(root, tasks=("t",), n=1)
        save_png(torch.rand(3, 32, 48), root / "t" / "hq" / "img0.png")
    elif kind == "unreadable":
        _write_pairs(root, tasks=("t",), n=1)
        (root / "t" / "lq" / "img0.png").write_bytes(b"not a png at all")
    return root


@pytest.mark.parametrize("kind,needle", [("empty", "no images"), ("stems", "orphan"), ("sizes", "same size"),
                                         ("unreadable", "img0.png")])
def test_bad_datasets_give_clear_errors(tmp_path, tiny_model_dir, data, capsys, kind, needle):
    out = tmp_path / "o.safetensors"
    rc = main(_base(tiny_model_dir, data[1], out, "--pairs", str(_bad(tmp_path, kind)), "--steps", "2"))
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and needle in err and "Traceback" not in err, err
    assert not out.exists()


def test_bad_stages_and_missing_arguments(tmp_path, tiny_model_dir, data, capsys):
    pairs, emb = data
    assert main(_base(tiny_model_dir, emb, tmp_path / "o.safetensors", "--pairs", str(pairs), "--stages", "512:x")) == 2
    assert "resolution:steps" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "o.safetensors"), "--model", str(tiny_model_dir)]) == 2
    assert "--pairs" in capsys.readouterr().err
    assert main(_base(tiny_model_dir, emb, tmp_path / "o.safetensors", "--pairs", str(pairs), "--mode", "drift")) == 2
    assert "--restoration-lora" in capsys.readouterr().err
    # no text encoder and no --prompt-embeds: the CLI flags to use, not the Python API's "text_encoder="
    assert main(["train", "--out", str(tmp_path / "o.safetensors"), "--model", str(tiny_model_dir), "--pairs",
                 str(pairs), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "--text-encoder" in err and "--prompt-embeds" in err and "text_encoder=" not in err
    # flags the trainer would silently ignore are not offered
    for flag in ("--offload", "--compile"):
        with pytest.raises(SystemExit):
            main(_base(tiny_model_dir, emb, tmp_path / "o.safetensors", "--pairs", str(pairs), flag))
    capsys.readouterr()
    assert main(_base(tiny_model_dir, emb, tmp_path / "o.safetensors", "--pairs", str(pairs), "--device", "cuda:99")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "cuda:99" in err and "Traceback" not in err


def _cli(*args: str, **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.Popen([*args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=str(ROOT),
                            **kw)


def test_killed_run_resumes_from_its_last_checkpoint(tmp_path, tiny_model_dir, data):
    pairs, emb = data
    out = tmp_path / "k.safetensors"
    # enough steps after the first checkpoints that the run cannot finish before it is killed, even on a
    # loaded machine
    args = _base(tiny_model_dir, emb, out, "--pairs", str(pairs), "--steps", "120", "--resolution", "32")
    args[args.index("--checkpoint-every") + 1] = "4"
    proc = _cli(sys.executable, "-m", "vbridge_core", *args)
    folder = checkpoint_dir(out)
    deadline = time.time() + 120
    while not any(s >= 8 for s, _ in list_checkpoints(folder)):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert not out.exists()
    step, path = list_checkpoints(folder)[-1]
    state = load_checkpoint(path)  # complete: written atomically
    assert state["step"] == step and len(state["losses"]) == step
    assert read_lora(folder / f"lora-step{step:06d}.safetensors").metadata["vbridge.steps"] == step
    assert main(args + ["--resume", "auto"]) == 0
    final = read_lora(out)
    assert final.metadata["vbridge.steps"] == 120


def test_two_process_data_parallel(tmp_path, tiny_model_dir, data):
    pytest.importorskip("accelerate")
    pairs, emb = data
    out = tmp_path / "ddp.safetensors"
    # ``accelerate launch --multi_gpu`` runs torchrun; on CPU-only machines accelerate launch would
    # start a single process, so the test calls torchrun directly (the Accelerator reads the same env).
    proc = _cli(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(29500 + os.getpid() % 1000), "-m", "vbridge_core", *_base(tiny_model_dir, emb, out, "--pairs", str(pairs), "--steps", "4",
                                              "--resolution", "32"))
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stderr[-3000:]
    sums = dict(re.findall(r"process (\d)/2 finished: LoRA checksum (\S+)", stderr))
    assert set(sums) == {"0", "1"} and sums["0"] == sums["1"], stderr[-3000:]
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".safetensors"] == ["ddp.safetensors"]
    assert read_lora(out).metadata["vbridge.steps"] == 4
