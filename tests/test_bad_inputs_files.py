"""Bad-input battery, files (issue 9 items 2-7, 9, 10): nothing of the user's is lost or overwritten.

Every refusal is checked for its one ``error:`` line, exit code 2, and that no file under the test
folder changed (a hash of every file before and after): the run was refused before any work, and
the output folder was not even created. The cheap cases point ``--model`` at a folder that does not
exist: they show the refusal happens before any model loads.
"""
from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest
import torch

from vbridge_core.errors import InputError, OutputError
from vbridge_core.images import save_png
from vbridge_core.outputs import OutputLog, clean_stale_temporaries, plan_outputs, restore_output_names
from vbridge_core.seeds import SEED_MODULUS, seeded_generator, wrap_seed
from vbridge_core.tiny import tiny_prompt_embeds

from bad_input_kit import assert_one_error, digest, run_cli, write_train_files
from tiny_files import random_lora


@pytest.fixture
def photos(tmp_path):
    """A folder of two photos, plus a restoration and a drift LoRA beside it."""
    g = torch.Generator().manual_seed(0)
    for name in ("a", "b"):
        save_png(torch.rand(3, 32, 32, generator=g), tmp_path / "photos" / f"{name}.png")
    random_lora(tmp_path / "r.safetensors", "restoration", 1)
    random_lora(tmp_path / "d.safetensors", "drift_correction", 2)
    return tmp_path


def _restore(root: Path, *args) -> list:
    return ["restore", *args, "--model", root / "no_model_here", "--lora", root / "r.safetensors", "--steps", "2"]


# ---------------------------------------------------------------------------------- item 2
def test_out_folder_holding_the_inputs_is_refused(photos, capsys):
    before = digest(photos)
    rc, err = run_cli(_restore(photos, photos / "photos", "--out", photos / "photos"), capsys)
    assert_one_error(rc, err, "holds the input", "a.png", "Choose another output folder")
    rc, err = run_cli(_restore(photos, photos / "photos" / "b.png", "--out", photos / "photos"), capsys)
    assert_one_error(rc, err, "holds the input", "b.png")
    assert digest(photos) == before


# ---------------------------------------------------------------------------------- item 3
def test_colliding_output_names_are_refused_before_any_work(photos, capsys):
    save_png(torch.rand(3, 32, 32), photos / "photos" / "a_base.png")
    before = digest(photos)
    rc, err = run_cli(_restore(photos, photos / "photos", "--out", photos / "out", "--drift-lora",
                               photos / "d.safetensors", "--save-trajectory"), capsys)
    assert_one_error(rc, err, "a.png", "a_base.png", "would both write", "a_base")
    assert digest(photos) == before and not (photos / "out").exists()


def test_output_plan_is_case_insensitive_and_counts_trajectory_folders():
    names = restore_output_names("a", base=True, trajectory=True)
    assert names == ["a.png", "a_trajectory.png", "a_trajectory/", "a_base.png", "a_base_trajectory.png",
                     "a_base_trajectory/"]
    with pytest.raises(InputError, match="would both write"):
        plan_outputs({"x/A.png": ["A.png"], "y/a.jpg": ["a.png"]}, "out")
    with pytest.raises(InputError, match="a_trajectory"):  # an input named like another's trajectory strip
        plan_outputs({"a.png": restore_output_names("a", base=False, trajectory=True),
                      "a_trajectory.png": restore_output_names("a_trajectory", base=False, trajectory=False)}, "out")


# ---------------------------------------------------------------------------------- item 4
@pytest.fixture
def train_files(tmp_path):
    return write_train_files(tmp_path, lora=True)


def _train(root: Path, out: Path, *extra) -> list:
    return ["train", "--pairs", root / "pairs", "--prompt-embeds", root / "emb.safetensors", "--out", out,
            "--model", root / "no_model_here", "--steps", "1", *extra]


def test_train_out_equal_to_an_input_is_refused(train_files, capsys):
    before = digest(train_files)
    lora = train_files / "r.safetensors"
    rc, err = run_cli(_train(train_files, lora, "--mode", "drift", "--restoration-lora", lora), capsys)
    assert_one_error(rc, err, "--restoration-lora", "would replace that file")
    # the same file under another spelling
    rc, err = run_cli(_train(train_files, train_files / "." / "r.safetensors", "--mode", "drift",
                             "--restoration-lora", lora), capsys)
    assert_one_error(rc, err, "--restoration-lora")
    rc, err = run_cli(_train(train_files, train_files / "emb.safetensors"), capsys)
    assert_one_error(rc, err, "--prompt-embeds", "would replace that file")
    assert digest(train_files) == before


# ---------------------------------------------------------------------------------- item 5
def test_train_out_that_is_a_folder_is_refused_before_training(train_files, capsys):
    (train_files / "loras").mkdir()
    before = digest(train_files)
    rc, err = run_cli(_train(train_files, train_files / "loras"), capsys)
    assert_one_error(rc, err, "is an existing folder", "give a file name inside it")
    rc, err = run_cli(_train(train_files, train_files / "x.pt"), capsys)
    assert_one_error(rc, err, ".safetensors")
    assert digest(train_files) == before


def test_final_save_failure_keeps_the_weights_in_the_checkpoint_folder(tmp_path):
    """The output path turns into a folder while training runs (as a full disk or a permission change
    would make the final write fail): the trained LoRA lands in the checkpoint folder, and the error
    says where."""
    from vbridge_core.lora import read_lora
    from vbridge_core.training.checkpoint import checkpoint_dir
    from vbridge_core.training.trainer import train_lora
    from test_training import _fast, _pairs, _pipe

    out = tmp_path / "loras" / "x.safetensors"

    def block_output(p):
        if p.kind == "step" and p.step == p.total:
            out.mkdir(parents=True)  # os.replace onto a folder fails
    with pytest.raises(OutputError) as e:
        train_lora(_pipe(), _pairs(2, size=32), _fast(steps=2, resolution=32), out,
                   prompt_embeds=tiny_prompt_embeds(), callback=block_output, write_plots=False)
    kept = checkpoint_dir(out) / "lora-step000002.safetensors"
    assert str(kept) in str(e.value) and "copy it where you want it" in str(e.value)
    assert read_lora(kept).metadata.get("vbridge.steps") == 2


# ---------------------------------------------------------------------------------- item 6
def test_stale_temporaries_of_killed_runs_are_removed_and_live_ones_kept(tmp_path):
    old = time.time() - 3600 * 2
    dead = tmp_path / "sub" / f".a.png.{2 ** 22 + 12345}.abcd1234.tmp.png"  # no such process id
    live = tmp_path / f".b.png.{os.getpid()}.abcd1234.tmp.png"
    fresh = tmp_path / f".c.png.{2 ** 22 + 12346}.abcd1234.tmp.png"  # dead, but written a second ago
    legacy = tmp_path / ".d.png.k2j4h5g6.tmp.png"
    foreign = tmp_path / ".e.png.tmp"  # not our naming: never touched
    for p in (dead, live, fresh, legacy, foreign):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"partial")
    for p in (dead, live, legacy, foreign):
        os.utime(p, (old, old))
    removed = clean_stale_temporaries(tmp_path)
    assert sorted(removed) == sorted([dead, legacy])
    assert live.exists() and fresh.exists() and foreign.exists()


def test_atomic_writes_name_their_process(tmp_path, monkeypatch):
    """The temporary a write uses carries the writer's pid (what the cleanup above reads)."""
    from vbridge_core import fileio

    seen = []
    real = os.replace

    def spy(src, dst):
        seen.append(Path(src).name)
        real(src, dst)
    monkeypatch.setattr(fileio.os, "replace", spy)
    fileio.write_text_atomic(tmp_path / "x.txt", "hi")
    from vbridge_core.outputs import TEMP_RE

    m = TEMP_RE.match(seen[0])
    assert m and int(m.group("pid")) == os.getpid()


def test_a_restore_run_cleans_its_output_folder(photos, capsys):
    out = photos / "out"
    stale = out / f".a.png.{2 ** 22 + 999}.zzzz9999.tmp.png"
    stale.parent.mkdir()
    stale.write_bytes(b"half")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    rc, err = run_cli(_restore(photos, photos / "photos", "--out", out), capsys)
    assert rc == 2 and "no_model_here" in err  # the run still fails at the (missing) model ...
    assert not stale.exists()  # ... but the leftover of the killed run is gone


def test_partial_batch_failure_says_which_outputs_were_written(tmp_path):
    log = OutputLog(["a.png", "b.png", "c.png"], tmp_path)
    with log.item("a.png"):
        save_png(torch.rand(3, 8, 8), tmp_path / "a.png")
    with pytest.raises(OutputError) as e:
        with log.item("b.png"):
            raise OSError(errno.ENOSPC, "No space left on device")
    msg = str(e.value)
    assert "No space left on device" in msg and "1 of 3 outputs were written" in msg
    assert "(a.png)" in msg and "not written: b.png, c.png" in msg


# ---------------------------------------------------------------------------------- item 7
def test_seeds_wrap_modulo_2_to_the_64():
    top = SEED_MODULUS - 1
    assert wrap_seed(top, 1) == 0 and wrap_seed(-1) == top and wrap_seed(top) == top
    a = torch.randn(4, generator=seeded_generator(top, 2))
    b = torch.randn(4, generator=seeded_generator(1))
    assert torch.equal(a, b)
    with pytest.raises(InputError, match="whole number"):
        wrap_seed(1.5)


def test_cli_seed_at_the_top_wraps_per_image(photos, tiny_model_dir, capsys):
    """Image 2 of a run at seed 2^64 - 1 uses seed 0: the same output as restoring it alone at seed 0."""
    from PIL import Image
    import numpy as np

    common = ["--model", tiny_model_dir, "--lora", photos / "r.safetensors", "--steps", "2"]
    rc, err = run_cli(["restore", photos / "photos", "--out", photos / "o1", "--seed", str(SEED_MODULUS - 1),
                       *common], capsys)
    assert rc == 0, err
    rc, err = run_cli(["restore", photos / "photos" / "b.png", "--out", photos / "o2", "--seed", "0", *common], capsys)
    assert rc == 0, err
    assert np.array_equal(np.asarray(Image.open(photos / "o1" / "b.png")), np.asarray(Image.open(photos / "o2" / "b.png")))


def test_training_config_wraps_the_seed_and_derived_seeds_stay_valid():
    from vbridge_core.train_runtime import make_train_config
    from vbridge_core.training.dataset import TrainingPairs, random_view  # noqa: F401  (import check)

    cfg = make_train_config(None, stages="32:1", seed=SEED_MODULUS - 1, role="restoration")
    assert cfg.seed == SEED_MODULUS - 1
    torch.randn(2, generator=seeded_generator(cfg.seed, 7919))  # the view and noise generators of training
    torch.randn(2, generator=seeded_generator(int(cfg.seed) * 1000, 17))


# ---------------------------------------------------------------------------------- item 9
def test_target_modules_that_match_nothing_are_refused_with_the_names_that_exist(train_files, capsys):
    rc, err = run_cli(_train(train_files, train_files / "o.safetensors", "--target-modules", "to_q,to_qkv"), capsys)
    assert_one_error(rc, err, "to_qkv", "matches no layer", "attn1.to_q", "ffn.net.0.proj")
    assert "no_model_here" not in err  # refused before the model path was even looked at


def test_stage_and_frame_sizes_above_the_model_limit_are_refused(train_files, photos, capsys):
    rc, err = run_cli(_train(train_files, train_files / "o.safetensors", "--stages", "100000:1"), capsys)
    assert_one_error(rc, err, "100000", "at most 32768 px")
    rc, err = run_cli(_restore(photos, photos / "photos", "--out", photos / "o", "--frames", "4097"), capsys)
    assert_one_error(rc, err, "4097", "at most 4093")
    assert not (photos / "o").exists()


def test_images_above_the_side_limit_are_refused_by_the_pipeline():
    from vbridge_core.limits import MAX_SIDE, check_image_size

    check_image_size(MAX_SIDE, 64)
    with pytest.raises(InputError, match="at most 32768 px"):
        check_image_size(MAX_SIDE + 1, 64)  # pads to 32800


# ---------------------------------------------------------------------------------- item 10
@pytest.mark.parametrize("extra, needle", [
    (["--frames", "6"], "4k+1"),
    (["--steps", "0"], "steps must be a positive integer"),
    (["--sigmas", "0.5,0.9"], "descending"),
    (["--drift-lora", "DRIFT", "--drift-frames", "7"], "4k+1"),
])
def test_settings_are_checked_before_the_model_loads_and_no_folder_is_left(photos, capsys, extra, needle):
    extra = [str(photos / "d.safetensors") if x == "DRIFT" else x for x in extra]
    before = digest(photos)
    rc, err = run_cli(_restore(photos, photos / "photos", "--out", photos / "new" / "out") + extra, capsys)
    assert_one_error(rc, err, needle)
    assert "no_model_here" not in err
    assert not (photos / "new").exists() and digest(photos) == before


def test_a_run_failing_at_the_model_leaves_no_empty_output_folder(photos, capsys):
    rc, err = run_cli(_restore(photos, photos / "photos", "--out", photos / "new"), capsys)
    assert_one_error(rc, err, "no_model_here")
    assert not (photos / "new").exists()


def test_train_node_refuses_to_overwrite_a_loaded_lora(tmp_path):
    """TrainLoRA (drift / turbo) starts from the restoration LoRA picked in Load Model: an output_name
    equal to it would replace it."""
    from vbridge_core.train_runtime import output_lora_path, refuse_overwriting_loaded_loras
    from test_training import _pipe

    lora = random_lora(tmp_path / "loras" / "denoise.safetensors", "restoration", 1, dim=256)
    pipe = _pipe()
    pipe.load_lora(lora)
    with pytest.raises(InputError, match="loaded restoration LoRA"):
        refuse_overwriting_loaded_loras(pipe, output_lora_path(tmp_path / "loras", "denoise"))
    refuse_overwriting_loaded_loras(pipe, output_lora_path(tmp_path / "loras", "denoise_drift"))


def test_report_files_never_replace_inputs_and_video_settings_are_checked_first(photos, capsys):
    before = digest(photos)
    rc, err = run_cli(["perceive", photos / "photos", "--json", photos / "photos" / "a.png"], capsys)
    assert_one_error(rc, err, "--json", "a.png", "would replace that file")
    rc, err = run_cli(["eval", photos / "photos", photos / "photos", "--json", photos / "photos" / "b.png"], capsys)
    assert_one_error(rc, err, "--json", "b.png")
    rc, err = run_cli(["train-stabilizer", "--photos", photos / "photos", "--out", photos / "photos"], capsys)
    assert_one_error(rc, err, "is an existing folder")
    rc, err = run_cli(["restore-video", photos / "photos", "--out", photos / "v", "--model", photos / "no_model_here",
                       "--frames", "6"], capsys)
    assert_one_error(rc, err, "4k+1")
    rc, err = run_cli(["restore-video", photos / "photos", "--out", photos / "photos", "--model",
                       photos / "no_model_here"], capsys)
    assert_one_error(rc, err, "holds the input")
    assert digest(photos) == before and not (photos / "v").exists()
