"""The built-in perceiver: vocabulary, features, the shipped weights, bad input, CLI perceive / train-perceiver."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vbridge_core.cli import main
from vbridge_core.errors import InputError
from vbridge_core.images import save_png
from vbridge_core.perceive.features import FEATURE_NAMES, crop_features
from vbridge_core.perceive.labels import (FAMILIES, LABELS, combined_severity, severity_of, task_families, tier_of)
from vbridge_core.perceive.model import BUILTIN_PATH, Perceiver, PerceptionReport, perceive

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


@pytest.fixture(scope="module")
def photo():
    from vbridge_core.perceive.synth import clean_photos

    return dict(clean_photos("held_out"))["camera.png"][:, 64:256, 64:320].contiguous()


def test_task_names_map_to_families():
    assert task_families("denoise") == ["noise"]
    assert task_families("gaussian_blur") == ["blur"]
    assert task_families("my-derain_v2") == ["rain"]
    assert task_families("lowlight") == ["low_light"] and task_families("low_light") == ["low_light"]
    assert task_families("rain_snow") == ["rain", "snow"]
    assert task_families("dejpeg") == ["jpeg"] and task_families("pairs") == []


def test_severity_grows_with_parameters_and_tiers_cut_it():
    assert severity_of("gaussian_noise", {"sigma": 5 / 255}) < severity_of("gaussian_noise", {"sigma": 40 / 255})
    assert severity_of("jpeg", {"quality": 90}) < severity_of("jpeg", {"quality": 10})
    assert severity_of("low_light", {"gamma": 1.5, "scale": 0.5}) < severity_of("low_light", {"gamma": 3.5, "scale": 0.1})
    assert combined_severity([0.5, 0.5]) == pytest.approx(0.75)
    assert [tier_of(q) for q in (1.0, 0.6, 0.2)] == ["high", "medium", "low"]


def test_features_are_finite_for_odd_sizes_and_flat_images():
    for x in (torch.rand(2, 3, 24, 31), torch.full((1, 3, 64, 64), 0.5), torch.zeros(1, 3, 40, 40)):
        f = crop_features(x)
        assert f.shape == (x.shape[0], len(FEATURE_NAMES)) and torch.isfinite(f).all()


def test_shipped_perceiver_is_small_and_loads():
    assert BUILTIN_PATH.is_file() and BUILTIN_PATH.stat().st_size <= 5 * 1024 * 1024
    p = Perceiver.builtin()
    assert p.info.get("samples", 0) >= 1000  # trained by train_builtin, not a placeholder


def test_clean_and_degraded_photo(photo):
    from vbridge_core.degrade import degrade

    imgs = [photo, degrade(photo, "gaussian_noise", 0, sigma=35 / 255), degrade(photo, "rain", 1),
            degrade(photo, "low_light", 2, gamma=3.0, scale=0.15)]
    reps = perceive(imgs, ["clean", "noise", "rain", "dark"])
    assert [r.degradation for r in reps] == ["clean", "noise", "rain", "low_light"]
    assert reps[0].quality == "high" and reps[3].quality != "high"
    assert reps[1].severity["noise"] > 0.3 and reps[0].quality_score > reps[1].quality_score
    for r in reps:
        assert set(r.scores) == set(LABELS) and set(r.severity) == set(FAMILIES)
        assert all(0.0 <= v <= 1.0 for v in list(r.scores.values()) + list(r.severity.values()))


def test_independent_degradations_mostly_recognised():
    """A small slice of the benchmark's independent set (PIL/numpy degradations, held-out photos)."""
    from bench_perceive import evaluate, make_sets

    _, independent, _ = make_sets(1, seed=7, with_synthetic=False)
    res = evaluate(Perceiver.builtin(), independent)
    assert res["accuracy"] >= 0.6, res["per_family"]


def test_bad_input_is_a_clear_error_and_odd_images_work(photo):
    p = Perceiver.builtin()
    with pytest.raises(InputError, match="too small"):
        p.perceive([torch.rand(3, 10, 40)])
    bad = photo.clone()
    bad[0, 3, 3] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        p.perceive([bad])
    with pytest.raises(InputError, match="channels"):
        p.perceive([torch.rand(2, 32, 32)])
    gray = photo.mean(0, keepdim=True)
    huge = photo.repeat(1, 7, 11)  # 1344 x 2816, perceived on a downscaled copy
    reps = p.perceive([gray, huge, (photo * 255).to(torch.uint8)])
    assert [r.degradation for r in reps] == ["clean", "clean", "clean"]


def test_cli_perceive_table_and_json_schema(tmp_path, photo, capsys):
    from vbridge_core.degrade import degrade

    save_png(photo, tmp_path / "in" / "clean.png")
    save_png(degrade(photo, "rain", 3), tmp_path / "in" / "rainy.png")
    rc = main(["perceive", str(tmp_path / "in"), "--json", str(tmp_path / "r.json")])
    assert rc == 0
    table = capsys.readouterr().out
    assert "rainy.png" in table and "quality" in table
    data = json.loads((tmp_path / "r.json").read_text())
    assert list(data) == ["images"] and len(data["images"]) == 2
    for entry in data["images"]:
        assert list(entry) == ["file", "degradation", "scores", "severity", "quality", "quality_score"]
        assert entry["quality"] in ("high", "medium", "low") and set(entry["scores"]) == set(LABELS)
    assert {Path(e["file"]).name: e["degradation"] for e in data["images"]} == {"clean.png": "clean",
                                                                               "rainy.png": "rain"}


def test_cli_perceive_errors(tmp_path, capsys):
    save_png(torch.rand(3, 12, 12), tmp_path / "tiny.png")
    assert main(["perceive", str(tmp_path / "tiny.png")]) == 2
    assert "too small" in capsys.readouterr().err
    assert main(["perceive", str(tmp_path / "tiny.png"), "--clip-vision", "x.safetensors"]) == 2
    assert "--perceiver" in capsys.readouterr().err


def test_train_perceiver_builtin_small_run(tmp_path):
    out = tmp_path / "p.safetensors"
    assert main(["train-perceiver", "--out", str(out), "--samples", "200", "--epochs", "3", "--seed", "1"]) == 0
    p = Perceiver.load(out)
    assert p.info["samples"] == 200 and p.info["seed"] == 1
    reps = p.perceive([torch.rand(3, 64, 64)])
    assert isinstance(reps[0], PerceptionReport)
    assert main(["train-perceiver", "--out", str(out), "--samples", "10"]) == 2
