"""``train --full``: the whole tiny DiT trained with FSDP over two CPU processes (gloo) equals a
one-process run with the same global batch, rank 0 alone writes, a cancelled or resumed run equals
the uninterrupted one, and the written DiT (one file, shards + index, diffusers folder) loads."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vbridge_core.cli import main
from vbridge_core.images import save_png
from vbridge_core.models import load_transformer
from vbridge_core.tiny import tiny_prompt_embeds

ROOT = Path(__file__).resolve().parents[1]
LR = 1e-4


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("full_ft")
    save_file({"prompt_embeds": tiny_prompt_embeds()}, str(root / "prompt.safetensors"))
    g = torch.Generator().manual_seed(0)
    for t in ("denoise", "deblur"):
        for i in range(2):
            hq = torch.rand(3, 32, 32, generator=g)
            save_png(hq, root / "pairs" / t / "hq" / f"img{i}.png")
            save_png((hq * 0.5).clamp(0, 1), root / "pairs" / t / "lq" / f"img{i}.png")
    return root


def _args(model, data, out, *extra):
    return ["train", "--full", "--pairs", str(data / "pairs"), "--model", str(model), "--prompt-embeds",
            str(data / "prompt.safetensors"), "--out", str(out), "--steps", "2", "--resolution", "32",
            "--crops-per-pair", "1", "--val-fraction", "0", "--save-dtype", "fp32", "--lr", str(LR), *extra]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_transformer(path, dtype=torch.float32).state_dict()


def test_fsdp_two_processes_equal_one_and_resume(tmp_path, tiny_model_dir, data):
    two = tmp_path / "two" / "dit.safetensors"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(29700 + os.getpid() % 1000), "-m", "vbridge_core",
                           *_args(tiny_model_dir, data, two, "--batch-size", "1", "--checkpoint-every", "1",
                                  "--val-pairs", str(data / "pairs"), "--val-steps", "1", "--val-resolution", "32")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "2 process(es), FSDP full sharding" in proc.stderr
    # rank 0 alone writes: one DiT, one curve and grid, one state folder, nothing else
    files = sorted(str(p.relative_to(two.parent)) for p in two.parent.rglob("*") if p.is_file())
    assert files == ["dit.checkpoints/state-step000001/model.safetensors",
                     "dit.checkpoints/state-step000001/optimizer.safetensors",
                     "dit.checkpoints/state-step000001/state.safetensors", "dit.loss.png", "dit.safetensors",
                     "dit.validation.png"], files
    from vbridge_core.training.full_files import load_state

    state = load_state(two.parent / "dit.checkpoints" / "state-step000001")
    assert state["config"]["global_batch"] == 2 and len(state["losses"]) == 1
    assert [h["label"] for h in state["validation"]] == ["base"]

    # one process, the same global batch (2 per step): the same weights up to float reduction order
    one = tmp_path / "one" / "dit.safetensors"
    assert main(_args(tiny_model_dir, data, one, "--batch-size", "2", "--checkpoint-every", "1")) == 0
    base = load_file(str(tiny_model_dir / "transformer" / "diffusion_pytorch_model.safetensors"))
    w1, w2 = _weights(one), _weights(two)
    d1 = torch.cat([(w1[k] - base[k]).flatten() for k in base])
    d2 = torch.cat([(w2[k] - base[k]).flatten() for k in base])
    assert d1.abs().max() > LR and d1.norm() > 0  # it trained (Adam moves each weight by up to lr per step)
    # Adam divides by sqrt(v): where a gradient is ~0 the reduction-order noise of the sum is
    # amplified, so a few elements differ by a fraction of one lr; the update as a whole agrees to 1e-3
    assert (d1 - d2).norm() / d1.norm() < 1e-3
    assert (d1 - d2).abs().max() <= 0.2 * LR

    # resume the sharded run's state in one process (another world size, same global batch)
    three = tmp_path / "three" / "dit.safetensors"
    assert main(_args(tiny_model_dir, data, three, "--batch-size", "2", "--resume",
                      str(two.parent / "dit.checkpoints"))) == 0
    w3 = _weights(three)
    d3 = torch.cat([(w3[k] - base[k]).flatten() for k in base])
    assert (d3 - d2).norm() / d2.norm() < 1e-3

    # exact resume: one process from its own step-1 state equals its uninterrupted run, bit for bit;
    # written as shards + index and a diffusers folder this time
    four = tmp_path / "four" / "dit.safetensors"
    four.parent.mkdir()
    import shutil

    shutil.copytree(one.parent / "dit.checkpoints", four.parent / "dit.checkpoints")
    assert main(_args(tiny_model_dir, data, four, "--batch-size", "2", "--resume", "auto", "--max-shard-size", "4MB",
                      "--save-diffusers", str(tmp_path / "four" / "transformer"))) == 0
    index = json.loads((four.parent / "dit.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and "blocks.0.self_attn.q.weight" in index["weight_map"]
    w4 = _weights(four.parent / sorted(set(index["weight_map"].values()))[0])  # one shard loads the whole set
    w4d = _weights(tmp_path / "four" / "transformer")
    for k in w1:
        assert torch.equal(w1[k], w4[k]) and torch.equal(w1[k], w4d[k]), k


def test_full_flags_errors(tmp_path, tiny_model_dir, data, capsys):
    assert main(_args(tiny_model_dir, data, tmp_path / "x.ckpt")) == 2
    assert ".safetensors" in capsys.readouterr().err
    assert main(_args(tiny_model_dir, data, tmp_path / "x.safetensors", "--train-blocks", "0-7")) == 2
    assert "blocks run from 0 to 1" in capsys.readouterr().err
    assert main(_args(tiny_model_dir, data, tmp_path / "x.safetensors", "--max-shard-size", "lots")) == 2
    assert "size" in capsys.readouterr().err
    assert main(_args(tiny_model_dir, data, tmp_path / "x.safetensors", "--cpu-offload")) == 2
    assert "several processes" in capsys.readouterr().err
    from vbridge_core.errors import InputError
    from vbridge_core.training.config import TrainConfig
    from vbridge_core.training.full import make_full_optimizer

    with pytest.raises(InputError, match="--cpu-offload"):  # bitsandbytes cannot step FSDP shards
        make_full_optimizer([torch.nn.Parameter(torch.zeros(2))], TrainConfig(optimizer="adamw8bit"), sharded=True)


def test_cancel_writes_a_state_and_no_dit(tmp_path, tiny_model_dir, data):
    from accelerate import Accelerator

    from vbridge_core.pairs import scan_pairs
    from vbridge_core.pipeline import VBridgePipeline
    from vbridge_core.training.config import TrainConfig
    from vbridge_core.training.full import FullOptions, train_full
    from vbridge_core.training.full_files import list_states, load_state
    from vbridge_core.training.loop import TrainingCancelled

    pipe = VBridgePipeline.from_files(tiny_model_dir, device="cpu")
    cfg = TrainConfig(steps=3, resolution=32, crops_per_pair=1, validation_fraction=0.0)
    calls = iter([False, True])
    out = tmp_path / "c.safetensors"
    with pytest.raises(TrainingCancelled) as e:
        train_full(pipe, scan_pairs(data / "pairs"), cfg, FullOptions(train_blocks="1"), out,
                   prompt_embeds=tiny_prompt_embeds(), accelerator=Accelerator(cpu=True),
                   should_cancel=lambda: next(calls))
    assert not out.exists() and [s for s, _ in list_states(out.with_name("c.checkpoints"))] == [1]
    state = load_state(e.value.checkpoint)
    assert state["step"] == 1 and state["config"]["train_blocks"] == "1"
    assert set(state["model"]) and all(k.startswith("blocks.1.") for k in state["model"])  # chosen blocks only


@pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason="opt-in: set COMFYUI_PATH (and COMFYUI_PYTHON)")
def test_comfyui_loads_the_written_dit(tmp_path):
    """ComfyUI's own loader (what UNETLoader calls) reads our original-layout file as a Wan2.2 model."""
    from vbridge_core.tiny import build_tiny_transformer
    from vbridge_core.training.full_files import write_dit

    model = build_tiny_transformer(0)
    path = write_dit(model.state_dict(), tmp_path / "full.safetensors", dtype=torch.bfloat16, config=dict(model.config),
                     metadata={})[0]
    code = ("import sys; sys.argv = ['x', '--cpu']\n"
            "import comfy.options; comfy.options.enable_args_parsing(); import comfy.sd\n"
            f"m = comfy.sd.load_diffusion_model({str(path)!r}); print('MODEL', type(m.model).__name__)")
    comfy = os.environ["COMFYUI_PATH"]
    py = os.environ.get("COMFYUI_PYTHON", sys.executable)
    proc = subprocess.run([py, "-c", code], cwd=comfy, env=dict(os.environ, PYTHONPATH=comfy), capture_output=True,
                          text=True, timeout=600)
    assert "MODEL WAN22" in proc.stdout, proc.stderr[-3000:]
