"""Bad-input battery, security (issue 9 item 1): no resume path ever unpickles a file.

A pickle planted as ``--resume FILE``, as ``state-step*.pt`` for ``--resume auto``, disguised under
the new ``state-step*.safetensors`` name, or in the TrainLoRA node's checkpoint folder must be
refused with a message saying what to do, and its payload (``os.system("touch marker")``) must never
run. Training state is now safetensors + JSON and resumes bit for bit (test_training_resume.py).
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from vbridge_core.errors import InputError
from vbridge_core.tiny import tiny_prompt_embeds
from vbridge_core.training import state_file
from vbridge_core.training.checkpoint import checkpoint_dir, find_resume, load_checkpoint
from vbridge_core.training.trainer import train_lora

from bad_input_kit import assert_one_error, digest, plant_pickle, plant_raw_pickle, run_cli, write_train_files
from test_training import _fast, _pairs, _pipe

ROOT = Path(__file__).resolve().parents[1]


def test_planted_payload_is_live(tmp_path):
    """Control: the planted file really runs its payload when unpickled the old way."""
    marker = tmp_path / "pwned"
    f = plant_pickle(tmp_path / "state-step000005.pt", marker)
    torch.load(str(f), weights_only=False)
    assert marker.exists()


@pytest.fixture
def cli_files(tmp_path):
    return write_train_files(tmp_path)


def _train_argv(root: Path, *extra: str) -> list[str]:
    return ["train", "--pairs", root / "pairs", "--prompt-embeds", root / "emb.safetensors", "--out",
            root / "out" / "x.safetensors", "--model", root / "no_model_needed", "--steps", "1", *extra]


def test_cli_resume_file_is_never_unpickled(cli_files, capsys):
    marker = cli_files / "pwned"
    evil = plant_pickle(cli_files / "downloads" / "state-step000100.pt", marker)
    before = digest(cli_files)
    rc, err = run_cli(_train_argv(cli_files, "--resume", evil), capsys)
    assert_one_error(rc, err, "old pickle format", "Start the run afresh", str(evil))
    assert not marker.exists() and digest(cli_files) == before


def test_cli_resume_auto_refuses_old_states(cli_files, capsys):
    marker = cli_files / "pwned"
    plant_pickle(checkpoint_dir(cli_files / "out" / "x.safetensors") / "state-step000003.pt", marker)
    before = digest(cli_files)
    for resume in ("auto", str(checkpoint_dir(cli_files / "out" / "x.safetensors"))):
        rc, err = run_cli(_train_argv(cli_files, "--resume", resume), capsys)
        assert_one_error(rc, err, "old pickle format", "state-step000003.pt")
    assert not marker.exists() and digest(cli_files) == before


def test_disguised_pickle_is_parsed_not_executed(tmp_path):
    """A pickle under the new state name (or any name) fails to parse as safetensors; nothing runs."""
    marker = tmp_path / "pwned"
    out = tmp_path / "x.safetensors"
    for name in ("state-step000009.safetensors", "state-step000010.safetensors"):
        plant_raw_pickle(checkpoint_dir(out) / name, marker)
    plant_pickle(tmp_path / "zipped.safetensors", marker)
    for f in (checkpoint_dir(out) / "state-step000009.safetensors", tmp_path / "zipped.safetensors"):
        with pytest.raises(InputError, match="not a V-Bridge training state"):
            load_checkpoint(f)
    with pytest.raises(InputError, match="not a V-Bridge training state"):
        train_lora(_pipe(), _pairs(1, size=32), _fast(steps=1), out, prompt_embeds=tiny_prompt_embeds(),
                   resume="auto")
    assert not marker.exists() and not out.exists()


def test_state_codec_keeps_types_exactly(tmp_path):
    """Int dict keys, tuples, non-finite floats, generator bytes and 0-d tensors survive unchanged."""
    g = torch.Generator().manual_seed(4)
    obj = {"optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3)}},
                         "param_groups": [{"betas": (0.9, 0.999), "lr": 1e-4, "params": [0], "foreach": None}]},
           "generator": g.get_state(), "losses": [0.1, float("nan"), float("inf"), 1 / 3], "config": {"seed": 2 ** 63}}
    state_file.save_state(obj, tmp_path / "s.safetensors")
    back = state_file.load_state(tmp_path / "s.safetensors")
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert list(back["optimizer"]["state"]) == [0]
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"], obj["optimizer"]["state"][0]["exp_avg"])
    assert back["optimizer"]["state"][0]["step"].shape == ()
    assert torch.equal(back["generator"], obj["generator"])
    assert back["losses"][0] == 0.1 and back["losses"][1] != back["losses"][1] and back["losses"][2] == float("inf")
    assert back["losses"][3] == 1 / 3 and back["config"]["seed"] == 2 ** 63


def test_node_checkpoint_folder_is_never_unpickled(tmp_path, tiny_model_dir):
    """The TrainLoRA node (resume on by default) refuses an old state in models/loras/vbridge/<name>.checkpoints."""
    from vbridge_core import train_runtime
    from vbridge_core.pipeline import VBridgePipeline

    marker = tmp_path / "pwned"
    out = tmp_path / "loras" / "vbridge" / "evil.safetensors"
    plant_pickle(checkpoint_dir(out) / "state-step000001.pt", marker)
    pipe = VBridgePipeline(*_pipe_parts(), device="cpu", dtype=torch.float32)
    cfg = train_runtime.make_train_config({"rank": 4, "crops_per_pair": 1, "validation_fraction": 0.0,
                                           "gradient_checkpointing": False}, stages="32:1", seed=0, role="restoration")
    before = digest(tmp_path)
    with pytest.raises(InputError) as ei:
        train_runtime.run_training(pipe, _pairs(1, size=32), cfg, out, prompt_embeds=tiny_prompt_embeds(), resume=True)
    msg = str(ei.value)
    assert "old pickle format" in msg and "set 'resume' to false" in msg
    assert not marker.exists() and digest(tmp_path) == before
    # resume off: the old state (our own naming) is removed unopened and the run starts afresh
    train_runtime.run_training(pipe, _pairs(1, size=32), cfg, out, prompt_embeds=tiny_prompt_embeds(), resume=False)
    assert out.is_file() and not list(checkpoint_dir(out).glob("*.pt")) and not marker.exists()


def _pipe_parts():
    from vbridge_core.tiny import build_tiny_transformer, build_tiny_vae

    return build_tiny_transformer(0), build_tiny_vae(1)


UNPICKLING = re.compile(r"weights_only\s*=\s*False|pickle\.loads?\(|allow_pickle\s*=\s*True|cPickle|dill\.load|"
                        r"joblib\.load|torch\.load\((?![^)]*weights_only\s*=\s*True)")


def test_no_unpickling_in_the_code():
    """Nothing in the pack unpickles: torch.load only with weights_only=True (model weights), no pickle/np pickles."""
    hits = []
    for p in list((ROOT / "vbridge_core").rglob("*.py")) + list((ROOT / "nodes").rglob("*.py")) + \
            list((ROOT / "bench").rglob("*.py")) + [ROOT / "__init__.py"]:
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#")[0]
            if UNPICKLING.search(code) and "``" not in code:
                hits.append(f"{p.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not hits, hits
