"""The CLIP perceiver on a tiny random CLIP vision model built from transformers' real config class.

The tiny model is saved as a single safetensors file in the transformers key layout that ComfyUI's
``clip_vision_h.safetensors`` uses, and loaded back through ``load_clip_vision`` (architecture read
from the tensor shapes). Its random features carry little meaning, so the tests check the learning
machinery (prompts fit the few-shot examples they were given), the file format, the CLI and the
errors, not accuracy on unseen images.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vbridge_core.cli import main
from vbridge_core.errors import InputError, ModelFileError
from vbridge_core.images import save_png
from vbridge_core.perceive.clip import (ClipPerceiver, examples_from_task_folders, hf_clip_embedder, load_clip_vision,
                                        train_clip_perceiver)
from vbridge_core.perceive.labels import LABELS


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory) -> Path:
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1,
                           image_size=32, patch_size=8, projection_dim=24, hidden_act="gelu", layer_norm_eps=1e-5)
    model = CLIPVisionModelWithProjection(cfg)
    path = tmp_path_factory.mktemp("clip") / "clip_vision_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def task_folders(tmp_path_factory) -> Path:
    from vbridge_core.degrade import degrade
    from tiny_files import procedural_photo

    root = tmp_path_factory.mktemp("tasks")
    for t, (name, params) in {"denoise": ("gaussian_noise", {"sigma": 0.25}),
                              "derain": ("rain", {"density": 0.02, "intensity": 0.9})}.items():
        for i in range(3):
            hq = procedural_photo(10 * i + len(t), size=64)
            save_png(hq, root / t / "hq" / f"p{i}.png")
            save_png(degrade(hq, name, i, **params), root / t / "lq" / f"p{i}.png")
    return root


def test_load_single_file_matches_the_saved_model(clip_file):
    m = load_clip_vision(clip_file)
    assert m.config.hidden_size == 64 and m.config.num_hidden_layers == 2 and m.config.image_size == 32
    assert m.config.projection_dim == 24
    e = hf_clip_embedder(m)(torch.rand(2, 3, 50, 70))
    assert e.shape == (2, 24) and torch.isfinite(e).all()


def test_few_shot_from_task_folders_fits_its_examples(clip_file, task_folders, tmp_path):
    emb = hf_clip_embedder(load_clip_vision(clip_file))
    images, labels, sev, qual = examples_from_task_folders(task_folders)
    assert len(images) == 12 and labels.count(["clean"]) == 6 and ["noise"] in labels and ["rain"] in labels
    model = train_clip_perceiver(emb, images, labels, sev, qual, steps=150, seed=0)
    path = model.save(tmp_path / "clip_perc.safetensors")
    loaded = ClipPerceiver.load(path)
    reps = loaded.perceive(images, emb, [f"x{i}" for i in range(len(images))])
    top = [r.degradation for r in reps]
    want = [l[0] for l in labels]
    assert sum(a == b for a, b in zip(top, want)) >= 10, (top, want)  # the examples it learned from
    assert all(set(r.scores) == set(LABELS) and r.quality in ("high", "medium", "low") for r in reps)
    assert reps[1].quality == "high"  # an HQ image


def test_cli_train_and_perceive_with_clip(clip_file, task_folders, tmp_path, capsys):
    out = tmp_path / "c.safetensors"
    assert main(["train-perceiver", "--kind", "clip", "--clip-vision", str(clip_file), "--tasks", str(task_folders),
                 "--steps", "30", "--out", str(out)]) == 0
    assert json.loads(__import__("safetensors").safe_open(str(out), "pt").metadata()["info"])["examples"] == 12
    rc = main(["perceive", str(task_folders / "derain" / "lq"), "--perceiver", str(out), "--clip-vision",
               str(clip_file), "--json", str(tmp_path / "r.json")])
    assert rc == 0 and len(json.loads((tmp_path / "r.json").read_text())["images"]) == 3
    capsys.readouterr()
    assert main(["perceive", str(task_folders / "derain" / "lq"), "--perceiver", str(out)]) == 2
    assert "--clip-vision" in capsys.readouterr().err
    assert main(["train-perceiver", "--kind", "clip", "--out", str(out)]) == 2


def test_clip_errors(clip_file, tmp_path, task_folders):
    with pytest.raises(ModelFileError, match="not found"):
        load_clip_vision(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ModelFileError, match="CLIP vision"):
        load_clip_vision(tmp_path / "other.safetensors")
    emb = hf_clip_embedder(load_clip_vision(clip_file))
    with pytest.raises(InputError, match="at least 2"):
        train_clip_perceiver(emb, [torch.rand(3, 32, 32)], [["noise"]], [{}], [0.5])
    with pytest.raises(InputError, match="unknown label"):
        train_clip_perceiver(emb, [torch.rand(3, 32, 32)] * 2, [["fog"], []], [{}, {}], [0.5, 1.0])
    model = ClipPerceiver(16)
    with pytest.raises(InputError, match="24-d embeddings"):
        model.perceive([torch.rand(3, 32, 32)], emb)
    bad = task_folders.parent / "bad_tasks"
    for sub in ("lq", "hq"):
        save_png(torch.rand(3, 32, 32), bad / "holiday" / sub / "a.png")
    with pytest.raises(InputError, match="holiday"):
        examples_from_task_folders(bad)
