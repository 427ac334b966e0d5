"""restore --auto: LoRA task discovery (metadata, sidecar, lora-tasks), the routing rule, auto restore on the
tiny model (library, CLI, node), and the quality-aware loss weights."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vbridge_core.cli import main
from vbridge_core.errors import InputError
from vbridge_core.images import load_image, save_png
from vbridge_core.perceive.labels import FAMILIES, LABELS
from vbridge_core.perceive.model import PerceptionReport
from vbridge_core.perceive.routing import plan_routes, read_lora_tasks, scan_lora_dir, sidecar_path
from tiny_files import random_lora


def _report(top: str, also: tuple[str, ...] = (), name: str = "x.png") -> PerceptionReport:
    scores = {l: (0.9 if l == top else 0.7 if l in also else 0.05) for l in LABELS}
    return PerceptionReport(name, top, scores, {f: 0.5 if f in (top,) + also else 0.0 for f in FAMILIES},
                            "high" if top == "clean" else "low", 0.9 if top == "clean" else 0.3)


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("auto_loras")
    random_lora(d / "denoise.safetensors", seed=1)
    assert main(["lora-tasks", str(d / "denoise.safetensors"), "--set", "denoise"]) == 0
    random_lora(d / "old_rain.safetensors", seed=2)
    assert main(["lora-tasks", str(d / "old_rain.safetensors"), "--set", "derain", "--sidecar"]) == 0
    random_lora(d / "drift.safetensors", role="drift_correction", seed=3)
    return d


@pytest.fixture(scope="module")
def photos():
    from vbridge_core.degrade import degrade
    from vbridge_core.perceive.synth import clean_photos

    clean = dict(clean_photos("held_out"))["camera.png"][:, 64:128, 64:128].contiguous()
    return {"clean.png": clean, "noisy.png": degrade(clean, "gaussian_noise", 0, sigma=0.15),
            "rainy.png": degrade(clean, "rain", 1, density=0.012, intensity=0.8)}


def test_tasks_from_metadata_sidecar_and_stamping(lora_dir, tmp_path, capsys):
    t = read_lora_tasks(lora_dir / "denoise.safetensors")
    assert t.tasks == ["denoise"] and t.families == ["noise"] and t.source == "metadata"
    assert read_lora_tasks(lora_dir / "old_rain.safetensors").source == "sidecar"
    assert sidecar_path(lora_dir / "old_rain.safetensors").is_file()
    assert read_lora_tasks(lora_dir / "drift.safetensors") is None
    assert [l.name for l in scan_lora_dir(lora_dir)] == ["denoise.safetensors", "old_rain.safetensors"]
    # stamping keeps the tensors and the rest of the metadata
    from safetensors.torch import load_file

    before = load_file(str(lora_dir / "denoise.safetensors"))
    random_lora(tmp_path / "x.safetensors", seed=1)
    assert all(torch.equal(before[k], v) for k, v in load_file(str(tmp_path / "x.safetensors")).items())
    capsys.readouterr()
    assert main(["lora-tasks", str(lora_dir)]) == 0
    out = capsys.readouterr().out
    assert "denoise.safetensors: tasks denoise -> families noise [metadata]" in out and "drift-correction" in out
    assert main(["lora-tasks", str(tmp_path / "x.safetensors"), "--set", "holiday"]) == 2


def test_trainer_metadata_tasks_are_read(tmp_path):
    from vbridge_core.lora import write_lora
    from vbridge_core.lora import read_lora

    lf = read_lora(random_lora(tmp_path / "a.safetensors"))
    meta = {"role": "restoration", "tasks": ["pairs"], "degradations": ["gaussian_blur", "jpeg"]}
    write_lora(tmp_path / "multi.safetensors", lf.weights, rank=4, alpha=4, metadata=meta)
    t = read_lora_tasks(tmp_path / "multi.safetensors")
    assert t.families == ["blur", "jpeg"] and t.tasks == ["pairs", "gaussian_blur", "jpeg"]


def test_routing_rule(lora_dir, tmp_path):
    loras = scan_lora_dir(lora_dir)
    r = plan_routes([_report("noise"), _report("rain", ("noise",)), _report("clean")], loras)
    assert [x.lora.name if x.lora else None for x in r] == ["denoise.safetensors", "old_rain.safetensors", None]
    forced = plan_routes([_report("clean", ("noise",))], loras, force=True)
    assert forced[0].lora.name == "denoise.safetensors"
    with pytest.raises(InputError) as e:
        plan_routes([_report("haze", name="foggy.jpg")], loras)
    msg = str(e.value)
    assert "foggy.jpg: haze" in msg and "denoise.safetensors: noise (tasks denoise)" in msg and "derain" in msg
    # a multi-task LoRA is the fallback when no task LoRA covers the degradation
    random_lora(tmp_path / "allround.safetensors", seed=4)
    from vbridge_core.perceive_cli import stamp_lora_tasks

    stamp_lora_tasks(tmp_path / "allround.safetensors", ["denoise", "deblur", "dejpeg"])
    multi = scan_lora_dir(tmp_path)
    assert plan_routes([_report("haze")], loras + multi)[0].lora.name == "allround.safetensors"
    assert plan_routes([_report("noise")], loras + multi)[0].lora.name == "denoise.safetensors"  # specialist first


def test_auto_restore_cli_routes_each_image(tmp_path, tiny_model_dir, lora_dir, photos, capsys):
    for n, x in photos.items():
        save_png(x, tmp_path / "in" / n)
    out = tmp_path / "out"
    rc = main(["restore", str(tmp_path / "in"), "--out", str(out), "--model", str(tiny_model_dir), "--auto",
               "--lora-dir", str(lora_dir), "--steps", "2", "--device", "cpu"])
    assert rc == 0
    rows = {r["file"]: r for r in json.loads((out / "auto_restore_report.json").read_text())["images"]}
    assert rows["clean.png"]["lora"] is None and rows["clean.png"]["perceived"] == "clean"
    assert rows["noisy.png"]["lora"] == "denoise.safetensors" and rows["rainy.png"]["lora"] == "old_rain.safetensors"
    assert {r["quality_before"] for r in rows.values()} <= {"high", "medium", "low"}
    assert torch.equal((load_image(out / "clean.png") * 255).round(), (photos["clean.png"] * 255).round())
    assert not torch.equal(load_image(out / "noisy.png"), load_image(tmp_path / "in" / "noisy.png"))
    assert "(passed through)" in capsys.readouterr().out and (out / "auto_restore_report.txt").is_file()


def test_auto_restore_no_matching_task_fails_before_loading(tmp_path, lora_dir, photos, capsys):
    from vbridge_core.degrade import degrade

    save_png(degrade(photos["clean.png"], "haze", 0, beta=2.5), tmp_path / "foggy.png")
    rc = main(["restore", str(tmp_path / "foggy.png"), "--out", str(tmp_path / "o"), "--auto", "--lora-dir",
               str(lora_dir), "--dit", str(tmp_path / "never_loaded.safetensors")])
    err = capsys.readouterr().err
    assert rc == 2 and "haze" in err and "denoise" in err and "lora-tasks" in err
    assert main(["restore", str(tmp_path / "foggy.png"), "--out", str(tmp_path / "o"), "--auto"]) == 2
    assert "--lora-dir" in capsys.readouterr().err


def test_auto_restore_library_keeps_the_pipelines_own_lora(tiny_model_dir, lora_dir, photos):
    from vbridge_core.perceive.model import Perceiver
    from vbridge_core.perceive.routing import auto_restore
    from vbridge_core.pipeline import VBridgePipeline

    own = random_lora(lora_dir.parent / "own.safetensors", seed=9)
    pipe = VBridgePipeline.from_files(tiny_model_dir, lora=own, device="cpu")
    names = list(photos)
    res = auto_restore(pipe, list(photos.values()), names, scan_lora_dir(lora_dir), Perceiver.builtin().perceive,
                       steps=1)
    assert [r["lora"] for r in res.rows] == [None, "denoise.safetensors", "old_rain.safetensors"]
    assert torch.equal(res.images[0], photos["clean.png"])
    assert pipe.adapters["restoration"]["file"].path == own
    assert "quality before -> after" in res.table()


def test_quality_weights_and_weighted_loss():
    from vbridge_core.perceive.weighting import difficulty_weights
    from vbridge_core.training.flow_matching import flow_matching_loss  # noqa: F401 (signature below)

    w = difficulty_weights(torch.tensor([0.0, 0.5, 1.0]), 1.0)
    assert w.mean() == pytest.approx(1.0) and w[0] < w[1] < w[2] and w[2] / w[0] == pytest.approx(2.0)
    assert torch.allclose(difficulty_weights(torch.tensor([0.2, 0.9]), 0.0), torch.ones(2))
    with pytest.raises(InputError):
        difficulty_weights(torch.zeros(2), -1.0)


def test_weighted_flow_matching_loss_reduces_to_plain(tiny_model_dir, tiny_prompt):
    from vbridge_core.models import load_transformer
    from vbridge_core.training.flow_matching import flow_matching_loss

    t = load_transformer(tiny_model_dir / "transformer", dtype=torch.float32, device="cpu")
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, t.config.in_channels, 3, 4, 4, generator=g)
    n = torch.randn(z.shape, generator=g)
    s = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        plain = flow_matching_loss(t, z, tiny_prompt, s, n)
        ones = flow_matching_loss(t, z, tiny_prompt, s, n, torch.ones(2))
        first = flow_matching_loss(t, z, tiny_prompt, s, n, torch.tensor([2.0, 0.0]))
        only0 = flow_matching_loss(t, z[:1], tiny_prompt, s[:1], n[:1])
    assert ones == pytest.approx(float(plain), rel=1e-5) and first == pytest.approx(float(only0), rel=1e-4)


def test_train_lora_with_quality_weighting_records_it(tmp_path, caplog):
    import logging

    from vbridge_core.lora import read_lora
    from vbridge_core.pipeline import VBridgePipeline
    from vbridge_core.tiny import build_tiny_transformer, build_tiny_vae, tiny_prompt_embeds
    from vbridge_core.training.trainer import TrainConfig, train_lora
    from vbridge_core.degrade import gaussian_noise
    from vbridge_core.perceive.synth import clean_photos

    photo = dict(clean_photos("held_out"))["rocket.jpg"][:, :64, :64]
    pairs = [(f"p{i}", gaussian_noise(photo, i, sigma=s), photo) for i, s in enumerate((0.01, 0.2))]
    pipe = VBridgePipeline(build_tiny_transformer(0), build_tiny_vae(1), device="cpu", dtype=torch.float32)
    cfg = TrainConfig(steps=2, resolution=32, rank=4, alpha=4.0, crops_per_pair=1, validation_fraction=0.0,
                      quality_weighting=1.0)
    with caplog.at_level(logging.INFO, logger="vbridge_core.perceive.weighting"):
        res = train_lora(pipe, pairs, cfg, tmp_path / "q.safetensors", prompt_embeds=tiny_prompt_embeds(),
                         write_plots=False)
    assert "quality-aware loss (strength 1)" in caplog.text
    assert read_lora(res.path).metadata["vbridge.train_config"]["quality_weighting"] == 1.0
    with pytest.raises(InputError, match="quality_weighting"):
        TrainConfig(quality_weighting=-1).validate()
