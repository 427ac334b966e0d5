"""The built-in perceiver: vocabulary, features, the shipped weights, bad input, CLI perceive / train-perceiver."""
from __future__ import annotations

import json
import math
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
    """The shipped file is bench/train_builtin_perceiver.py's recipe: two train_builtin runs merged into one ensemble
    (README; the script reproduces its weights bit for bit on 2 cores). Their info says which photos and options."""
    assert BUILTIN_PATH.is_file() and BUILTIN_PATH.stat().st_size <= 5 * 1024 * 1024
    p = Perceiver.builtin()
    from bench_perceive import TID2013_PHOTOS
    from perceiver_photos import DEBIAN_PHOTOS, TRAIN_PHOTOS
    from vbridge_core.perceive import train

    a, b = p.info["merged"]
    assert len(p.net.members) == a["members"] + b["members"] == 2 * train.MEMBERS
    for part in (a, b):  # trained by train_builtin on real crops, with the default recipe's seed and size
        assert part["samples"] == train.DEFAULT_SAMPLES and part["seed"] == 0 and part["epochs"] == 120
    # part a: the default recipe plus the nine photos of perceiver_photos.py; its snow probe is the file's
    assert p.probe is not None and a["snow_probe_epochs"] == train.PROBE_EPOCHS
    assert (a["snow_probe_pair_share"], a["snow_probe_decision"], a["snow_probe_hard_share"],
            a["haze_logit_offset"]) == \
        (train.SNOW_PAIR_SHARE, train.PROBE_DECISION, train.HARD_SNOW_SHARE, train.HAZE_LOGIT_OFFSET)
    assert a["extra_photos"] == [*TID2013_PHOTOS, *DEBIAN_PHOTOS]
    assert a["snow_probe_sky_crops"] == round(train.SKY_SHARE * a["samples"])
    # part b: the same plus the 17 photos of --train-groups, haze logit + 3, no probe of its own
    train_names = [n.split("/", 1)[1] for n in TRAIN_PHOTOS]
    assert b["extra_photos"][:9] == a["extra_photos"] and sorted(b["extra_photos"][9:]) == sorted(train_names)
    assert (b["haze_logit_offset"], b["snow_probe_epochs"], b["snow_probe_sky_crops"]) == (3.0, 0, 0)


def test_shipped_snow_probe_sees_large_flakes_on_a_clear_sky():
    """A plain blue gradient (drawn here, not the training's procedural skies): clean, and with large degrade.py flakes.
    The probe without sky crops (v6) called such snow clean (bench/RESULTS.md, stop 22)."""
    from vbridge_core.degrade import snow

    t = torch.linspace(0, 1, 128).view(1, 128, 1)
    zenith, horizon = torch.tensor([0.15, 0.4, 0.8]).view(3, 1, 1), torch.tensor([0.6, 0.75, 0.95]).view(3, 1, 1)
    sky = (zenith * (1 - t) + horizon * t).expand(3, 128, 128)
    sky = (sky * 255).round() / 255
    skies = torch.stack([sky] + [snow(sky, seed=k, density=0.0015, flake_size=3.5, opacity=0.9) for k in range(4)])
    with torch.no_grad():
        p = torch.sigmoid(Perceiver.builtin().probe(skies)).tolist()
    assert p[0] < 0.5 and min(p[1:]) > 0.5, p


def _with_probe_bias(p: Perceiver, bias: float) -> Perceiver:
    import copy

    probe = copy.deepcopy(p.probe)
    with torch.no_grad():
        probe.head.weight.zero_()
        probe.head.bias.fill_(bias)
    return Perceiver(p.net, p.info, probe)


def test_snow_probe_orders_snow_and_clean_only(photo):
    from vbridge_core.degrade import degrade

    p = Perceiver.builtin()
    clean = photo[:, :128, :128]
    base = p.perceive([clean])[0]
    assert base.degradation in ("clean", "snow")
    snowy, plain = _with_probe_bias(p, 20.0), _with_probe_bias(p, -20.0)
    a, b = snowy.perceive([clean])[0], plain.perceive([clean])[0]
    assert (a.degradation, b.degradation) == ("snow", "clean")
    pair = sorted([base.scores["snow"], base.scores["clean"]])
    assert sorted([a.scores["snow"], a.scores["clean"]]) == pytest.approx(pair)  # the values stay, the order follows
    assert a.scores["snow"] >= a.scores["clean"] and b.scores["clean"] >= b.scores["snow"]
    noisy = degrade(clean, "gaussian_noise", seed=0, sigma=50 / 255)
    assert snowy.perceive([noisy])[0].degradation == plain.perceive([noisy])[0].degradation == "noise"


def test_shipped_snow_probe_tells_flakes_from_the_clean_photo(photo):
    from vbridge_core.degrade import snow

    probe = Perceiver.builtin().probe
    clean = photo[:, :128, :128]
    snowy = snow(clean, seed=3, density=0.004, flake_size=3.0, opacity=0.9)
    with torch.no_grad():
        p_clean, p_snow = torch.sigmoid(probe(torch.stack([clean, snowy]))).tolist()
    assert p_clean < 0.5 < p_snow


def test_snow_probe_sees_detail_not_brightness():
    from vbridge_core.perceive.model import SnowProbe

    torch.manual_seed(0)
    probe = SnowProbe().eval()
    ramp = torch.linspace(0.2, 0.6, 80).expand(2, 3, 64, 80)
    x = ramp + 0.05 * torch.rand(2, 3, 64, 80)
    flakes = x.clone()
    for cy, cx in ((10, 20), (30, 50), (50, 12)):
        flakes[:, :, cy:cy + 2, cx:cx + 2] = 1.0
    with torch.no_grad():
        a, b, c = probe(x), probe(x + 0.1), probe(flakes)
    assert a.shape == (2,)
    assert torch.allclose(a, b, atol=1e-5)  # a brighter exposure of the same scene looks the same to it
    assert (a - c).abs().min() > 1e-4  # a few small bright spots do (untrained weights: a small change)


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


def test_benchmark_reports_accuracy_without_the_images_the_training_calls_invisible():
    """``bench_perceive.py`` keeps the applied family as the label of every synthetic image, and also reports
    the accuracy without those whose degradation the training labels clean (too weak, or an overlay that
    changed too few pixels), so a reader sees how much of the miss is such images."""
    from bench_perceive import evaluate, make_sets
    from vbridge_core.perceive.synth import PERCEPTIBLE

    invisible: list = []
    synthetic, _, _ = make_sets(3, seed=7, invisible=invisible)
    assert len(invisible) == len(synthetic) == 3 * len(LABELS)
    for (_, lab, sev), inv in zip(synthetic, invisible):
        assert not (lab == "clean" and inv)
        if lab != "clean" and sev[lab] < PERCEPTIBLE:
            assert inv
    items = synthetic[:8]
    reps = Perceiver.builtin().perceive([x for x, _, _ in items])
    ok = [r.degradation == lab for r, (_, lab, _) in zip(reps, items)]
    mask = [i % 3 == 0 for i in range(len(items))]  # any mask: evaluate must leave out exactly those
    res = evaluate(Perceiver.builtin(), items, mask)
    assert res["n_invisible"] == sum(mask) and res["accuracy"] == pytest.approx(sum(ok) / len(ok))
    kept = [o for o, m in zip(ok, mask) if not m]
    assert res["visible_accuracy"] == pytest.approx(sum(kept) / len(kept))
    assert "visible_accuracy" not in evaluate(Perceiver.builtin(), items)


def test_benchmark_draws_from_a_folder_or_the_tid2013_photos_pyiqa_ships(monkeypatch, tmp_path, photo):
    """``bench_perceive.py --photos DIR|tid2013``: the same crop recipe on a folder of clean photos, or on the five
    TID2013 references (pyiqa is installed by .ci/run); without them the error names the files, the folder and
    the pip command."""
    import importlib.util

    from bench_perceive import TID2013_PHOTOS, make_sets, tid2013_photos
    from vbridge_core.images import save_png

    save_png(photo.repeat(1, 2, 2), tmp_path / "mine.png")
    mine, _, _ = make_sets(1, seed=7, with_synthetic=False, photos=str(tmp_path))
    assert len(mine) == len(LABELS) and mine[-1][1] == "clean"
    assert all(160 <= min(x.shape[-2:]) and max(x.shape[-2:]) <= 256 for x, _, _ in mine)
    save_png(photo, tmp_path / "small.png")  # 256 x 192: a test crop may need 256 px on both sides
    with pytest.raises(InputError, match="small.png is 256x192 px"):
        make_sets(1, seed=7, photos=str(tmp_path))
    with pytest.raises(InputError, match="neither held_out nor tid2013 nor a folder"):
        make_sets(1, seed=7, photos=str(tmp_path / "missing"))

    if importlib.util.find_spec("pyiqa") is None:
        pytest.skip("pyiqa is not installed (.ci/run installs it)")
    photos = tid2013_photos()
    assert [n for n, _ in photos] == [f"tid2013:{n}" for n in TID2013_PHOTOS]
    assert all(tuple(p.shape) == (3, 384, 512) for _, p in photos)
    tid, _, _ = make_sets(1, seed=7, with_synthetic=False, photos="tid2013")
    old, _, _ = make_sets(1, seed=7, with_synthetic=False)
    assert len(tid) == len(old) == len(LABELS)
    assert all(160 <= min(x.shape[-2:]) and max(x.shape[-2:]) <= 256 for x, _, _ in tid)
    assert not torch.equal(tid[0][0][:, :160, :160], old[0][0][:, :160, :160])
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(InputError, match="I03.bmp.*pip install --no-deps pyiqa"):
        tid2013_photos()


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


def _photo_crops(count: int) -> list[torch.Tensor]:
    """``count`` random 128 px crops (float, 0..1) of three training photos, seeded: the small probe runs' data."""
    from vbridge_core.perceive.synth import clean_photos

    photos = [p for n, p in clean_photos("train") if n in ("chelsea.png", "astronaut.png", "motorcycle_left.png")]
    gen = torch.Generator().manual_seed(0)
    crops = []
    for k in range(count):
        p = photos[k % len(photos)]
        t, l = (int(torch.randint(s - 128 + 1, (1,), generator=gen)) for s in p.shape[-2:])
        crops.append(p[:, t:t + 128, l:l + 128])
    return crops


def test_snow_pairs_teach_a_probe_from_clean_crops_alone():
    """Clean crops only: no probe without pairs; with pairs (degrade.py snow on the same crops) it learns snow."""
    from vbridge_core.degrade import snow
    from vbridge_core.perceive.train import _add_snow_pairs, fit_snow_probe, to_uint8

    crops = [to_uint8(c) for c in _photo_crops(56)]
    train, held = crops[:40], crops[40:]
    labels = np.zeros((len(train), len(LABELS)), np.float32)
    labels[:, LABELS.index("clean")] = 1
    assert fit_snow_probe(train, {"labels": labels}, seed=0, epochs=1, batch=16, pair_share=0.0) is None  # no snow
    x, y = _add_snow_pairs(torch.stack(train), torch.zeros(len(train)), 0.5, seed=0)
    assert x.shape == (60, 3, 128, 128) and x.dtype == torch.uint8 and torch.equal(x[:40], torch.stack(train))
    assert y[:40].sum() == 0 and 10 <= y[40:].sum() <= 20  # labelled as training crops are: invisible snow is clean
    x2, y2 = _add_snow_pairs(torch.stack(train), torch.zeros(len(train)), 0.5, seed=0)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    probe = fit_snow_probe(train, {"labels": labels}, seed=0, epochs=30, batch=16, pair_share=1.0, decision=0.5)
    snowy = torch.stack([snow(c.float() / 255, seed=k, density=0.004, flake_size=2.5) for k, c in enumerate(held)])
    with torch.no_grad():
        l_snow, l_clean = probe(snowy), probe(torch.stack(held).float() / 255)
    # the same held-back crop scores higher with flakes than without: the probe learned flakes, not backgrounds
    assert (l_snow > l_clean).float().mean() >= 0.85 and (l_snow - l_clean).mean() > 0.2, (l_snow, l_clean)
    # the decision probability moves the probe's verdict boundary, nothing else: logits shift by logit(0.8)
    strict = fit_snow_probe(train, {"labels": labels}, seed=0, epochs=30, batch=16, pair_share=1.0, decision=0.8)
    with torch.no_grad():
        assert torch.allclose(probe(snowy) - strict(snowy), torch.full((len(held),), math.log(4.0)), atol=1e-5)


def test_sky_backgrounds_join_the_snow_probes_clean_crops():
    """Procedural skies: deterministic 8-bit daylight skies (blue above, paler toward the horizon); as backgrounds they
    are clean crops of the probe (with their share of snow pairs), and none leaves the probe untouched by them."""
    from vbridge_core.perceive.synth import sky_photos
    from vbridge_core.perceive.train import fit_snow_probe, sky_crops, to_uint8

    skies = sky_photos(3, size=96)
    again = sky_photos(3, size=96)
    assert [n for n, _ in skies] == ["sky:0", "sky:1", "sky:2"]
    for (_, a), (_, b) in zip(skies, again):
        assert a.shape == (3, 96, 96) and torch.equal(a, b)
        assert torch.equal(a, (a * 255).round() / 255) and 0 <= float(a.min()) and float(a.max()) <= 1
    top = torch.stack([x[:, :8].mean((1, 2)) for _, x in skies])  # the zenith: blue over red in every sky
    assert (top[:, 2] > top[:, 0]).all(), top
    bg = sky_crops(0.25, 24, seed=0)
    assert len(bg) == 6 and bg[0].shape == (3, 128, 128) and bg[0].dtype == torch.uint8 and sky_crops(0, 36000, 0) == []
    assert all(torch.equal(a, b) for a, b in zip(bg, sky_crops(0.25, 24, seed=0)))
    crops = [to_uint8(c) for c in _photo_crops(24)]
    labels = np.zeros((len(crops), len(LABELS)), np.float32)
    labels[:, LABELS.index("clean")] = 1
    kw = dict(seed=0, epochs=1, batch=16, pair_share=1.0, decision=0.5)
    plain, with_sky = fit_snow_probe(crops, {"labels": labels}, **kw), fit_snow_probe(crops, {"labels": labels},
                                                                                      backgrounds=bg, **kw)
    same = fit_snow_probe(crops, {"labels": labels}, backgrounds=[], **kw)
    x = torch.stack(crops[:4]).float() / 255
    with torch.no_grad():
        assert torch.equal(plain(x), same(x)) and not torch.equal(plain(x), with_sky(x))


def test_cli_perceive_errors(tmp_path, capsys):
    save_png(torch.rand(3, 12, 12), tmp_path / "tiny.png")
    assert main(["perceive", str(tmp_path / "tiny.png")]) == 2
    assert "too small" in capsys.readouterr().err
    assert main(["perceive", str(tmp_path / "tiny.png"), "--clip-vision", "x.safetensors"]) == 2
    assert "--perceiver" in capsys.readouterr().err


def test_train_perceiver_builtin_small_run(tmp_path):
    out = tmp_path / "p.safetensors"
    assert main(["train-perceiver", "--out", str(out), "--samples", "600", "--epochs", "3", "--seed", "1",
                 "--probe-epochs", "1", "--hard-snow-share", "0.5", "--snow-pair-share", "0.25",
                 "--sky-share", "0.1"]) == 0
    p = Perceiver.load(out)
    assert p.info["samples"] == 600 and p.info["seed"] == 1
    assert p.probe is not None and p.info["snow_probe_epochs"] == 1 and p.info["snow_probe_hard_share"] == 0.5
    from vbridge_core.perceive.train import PROBE_DECISION

    assert p.info["snow_probe_pair_share"] == 0.25 and p.info["snow_probe_decision"] == PROBE_DECISION  # the default
    assert p.info["snow_probe_sky_crops"] == 60  # 0.1 x 600 samples
    from vbridge_core.perceive.train import HAZE_LOGIT_OFFSET

    assert p.info["haze_logit_offset"] == HAZE_LOGIT_OFFSET  # the default
    reps = p.perceive([torch.rand(3, 64, 64), torch.rand(3, 300, 200)])  # crops of 64 and 128 px
    assert isinstance(reps[0], PerceptionReport) and len(reps) == 2
    stats_only = tmp_path / "s.safetensors"
    assert main(["train-perceiver", "--out", str(stats_only), "--samples", "200", "--epochs", "2",
                 "--probe-epochs", "0"]) == 0
    s = Perceiver.load(stats_only)
    assert s.probe is None and s.info["snow_probe_epochs"] == 0
    shifted = tmp_path / "h.safetensors"  # same seed and data, haze logit raised: only that output moves
    assert main(["train-perceiver", "--out", str(shifted), "--samples", "200", "--epochs", "2",
                 "--probe-epochs", "0", "--haze-offset", "1.5"]) == 0
    h = Perceiver.load(shifted)
    assert h.info["haze_logit_offset"] == 1.5
    f = crop_features(torch.rand(4, 3, 64, 64))
    with torch.no_grad():
        d = h.net(f)[0] - s.net(f)[0]
    assert torch.allclose(d[:, LABELS.index("haze")], torch.full((4,), 1.5 - s.info["haze_logit_offset"]), atol=1e-4)
    assert torch.allclose(d[:, LABELS.index("clean")], torch.zeros(4), atol=1e-6)
    assert s.perceive([torch.rand(3, 64, 64)])[0].degradation in LABELS
    assert main(["train-perceiver", "--out", str(out), "--samples", "10"]) == 2
    assert main(["train-perceiver", "--out", str(out), "--probe-epochs", "-1"]) == 2
    assert main(["train-perceiver", "--out", str(out), "--hard-snow-share", "1.5"]) == 2
    assert main(["train-perceiver", "--out", str(out), "--snow-pair-share", "-0.1"]) == 2
    assert main(["train-perceiver", "--out", str(out), "--probe-decision", "1"]) == 2
    assert main(["train-perceiver", "--out", str(out), "--sky-share", "-0.1"]) == 2
    assert main(["train-perceiver", "--out", str(out), "--haze-offset", "nan"]) == 2
    assert main(["train-perceiver", "--out", str(out), "--haze-offset", "11"]) == 2


def test_train_perceiver_extra_photos_join_the_training_photos(tmp_path, photo, capsys):
    """``train-perceiver --extra-photos``: the user's clean photos are sampled like the bundled ones and named in the
    file's metadata; photos too small for a training crop, empty folders and the CLIP kind are clear errors."""
    from vbridge_core.images import save_png
    from vbridge_core.perceive.synth import clean_photos, extra_photos
    from vbridge_core.perceive.train import build_training_set

    mine = tmp_path / "mine"
    mine.mkdir()
    save_png(photo, mine / "a.png")
    save_png(photo.flip(-1)[:, :130, :140], mine / "b.png")
    added = extra_photos([mine])
    assert [n for n, _ in added] == ["extra:a.png", "extra:b.png"] and torch.equal(added[0][1], photo)
    base = clean_photos("train")
    f0, _ = build_training_set(48, seed=3, photos=base)
    f1, _ = build_training_set(48, seed=3, photos=base + added)
    f2, _ = build_training_set(48, seed=3, photos=added)
    assert not torch.equal(f0, f1) and not torch.equal(f1, f2)
    out = tmp_path / "x.safetensors"
    assert main(["train-perceiver", "--out", str(out), "--samples", "200", "--epochs", "1", "--probe-epochs", "0",
                 "--extra-photos", str(mine)]) == 0
    info = Perceiver.load(out).info
    assert info["extra_photos"] == ["a.png", "b.png"] and info["photos"].endswith("+ 2 extra photos")
    save_png(photo[:, :100, :], mine / "c.png")
    capsys.readouterr()
    assert main(["train-perceiver", "--out", str(out), "--extra-photos", str(mine)]) == 2
    assert "c.png is 256x100 px" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["train-perceiver", "--out", str(out), "--extra-photos", str(tmp_path / "empty")]) == 2
    assert main(["train-perceiver", "--out", str(out), "--extra-photos", str(tmp_path / "nope.png")]) == 2
    assert main(["train-perceiver", "--kind", "clip", "--out", str(out), "--extra-photos", str(mine)]) == 2
    assert "--extra-photos is for the built-in perceiver" in capsys.readouterr().err


def _feat(x: torch.Tensor, name: str) -> torch.Tensor:
    return crop_features(x)[:, FEATURE_NAMES.index(name)]


def _disks(base: torch.Tensor, centres, radius: float, value: float) -> torch.Tensor:
    out = base.clone()
    yy, xx = torch.meshgrid(torch.arange(base.shape[-2]), torch.arange(base.shape[-1]), indexing="ij")
    for cy, cx in centres:
        out[:, ((yy - cy) ** 2 + (xx - cx) ** 2) <= radius ** 2] = value
    return out


def test_flake_features_respond_to_small_isolated_spots_not_to_a_large_bright_region():
    g = torch.Generator().manual_seed(0)
    base = 0.3 + 0.05 * torch.rand(3, 128, 128, generator=g)
    centres = [tuple(int(v) for v in torch.randint(6, 122, (2,), generator=g)) for _ in range(30)]
    flakes = _disks(base, centres, 2.0, 0.95)
    big = base.clone()
    big[:, 30:90, 30:90] = 0.95  # one large bright region (sky, smoke): not snow
    stones = _disks(base, centres[:6], 12.0, 0.95)  # a few big bright stones: not snow either
    x = torch.stack([base, flakes, big, stones])
    for name in ("flk6_d15", "flk3_d15", "flk6_cells"):
        v = _feat(x, name)
        assert v[1] > v[0] + 1e-3 and v[1] > v[2] + 1e-3 and v[1] > v[3] + 1e-3, (name, v)
    assert _feat(x, "flk6_q")[1] > 0.4 > 0.1 > float(_feat(x, "flk6_q")[2])


def test_ridge_features_respond_to_thin_near_vertical_lines_not_to_spots_or_horizontal_lines():
    base = torch.full((3, 128, 128), 0.3)
    vertical = base.clone()
    horizontal = base.clone()
    for k in range(8, 120, 12):
        vertical[:, 10:110, k] = 0.9
        horizontal[:, k, 10:110] = 0.9
    spots = _disks(base, [(r, c) for r in range(10, 120, 16) for c in range(10, 120, 16)], 1.5, 0.9)
    x = torch.stack([base, vertical, horizontal, spots])
    ridge, ratio = _feat(x, "ridge_mean"), _feat(x, "ridge_off_ratio")
    assert ridge[1] > ridge[0] + 2 and ridge[1] > ridge[3] + 2, ridge
    assert ratio[1] > 1.0 and ratio[2] < -1.0, ratio


def test_edge_width_separates_a_sharp_step_from_a_blurred_one():
    from vbridge_core.degrade import gaussian_blur

    step = torch.zeros(3, 96, 96)
    step[:, :, 48:] = 0.8
    step[:, 48:, :] = 0.8 - step[:, 48:, :]
    blurred = gaussian_blur(step, sigma=1.2)
    ew = _feat(torch.stack([step, blurred]), "ew_min")
    assert ew[0] > -0.1 and ew[1] < ew[0] - 0.5, ew


def test_procedural_photos_are_deterministic_clean_and_varied():
    from vbridge_core.perceive.synth import procedural_photos

    a, b = procedural_photos(4, size=96), procedural_photos(4, size=96)
    assert [n for n, _ in a] == ["procedural:0", "procedural:1", "procedural:2", "procedural:3"]
    for (_, x), (_, y) in zip(a, b):
        assert x.shape == (3, 96, 96) and torch.equal(x, y) and 0 <= float(x.min()) and float(x.max()) <= 1
        assert float(x.std()) > 0.03
        assert torch.equal(x, (x * 255).round() / 255)  # 8-bit like a file


def test_loader_refuses_a_file_from_the_old_feature_set(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from vbridge_core.errors import ModelFileError

    with safe_open(str(BUILTIN_PATH), "pt") as f:
        meta = dict(f.metadata())
        state = {k: f.get_tensor(k) for k in f.keys()}
    old = dict(meta, features=json.dumps(list(FEATURE_NAMES[:65])))
    old.pop("feature_version", None)
    save_file(state, str(tmp_path / "old.safetensors"), metadata=old)
    with pytest.raises(ModelFileError, match=r"another feature set \(version 1, 65 features.*retrain"):
        Perceiver.load(tmp_path / "old.safetensors")


def test_shipped_perceiver_is_an_ensemble_of_the_current_feature_set():
    from vbridge_core.perceive.features import FEATURE_VERSION
    from vbridge_core.perceive.model import PerceiverNet

    p = Perceiver.builtin()
    assert len(p.net.members) >= 2 and [part["feature_version"] for part in p.info["merged"]] == [FEATURE_VERSION] * 2
    assert p.net.feat_mean.numel() == len(FEATURE_NAMES)
    # the ensemble's output is the mean of its members'
    feats = p.net.feat_mean[None] + p.net.feat_std[None] * torch.randn(4, len(FEATURE_NAMES))
    with torch.no_grad():
        full = p.net(feats)
        single = [PerceiverNet.combine([_one(p.net, k)])(feats) for k in range(len(p.net.members))]
    for j in range(3):
        assert torch.allclose(full[j], torch.stack([s[j] for s in single]).mean(0), atol=1e-5)


def _one(net, k):
    from vbridge_core.perceive.model import PerceiverNet

    one = PerceiverNet(net.feat_mean.numel(), net.hidden, members=1)
    one.feat_mean.copy_(net.feat_mean)
    one.feat_std.copy_(net.feat_std)
    one.members[0].load_state_dict(net.members[k].state_dict())
    return one.eval()


def test_loader_refuses_weights_that_do_not_match_the_metadata(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from vbridge_core.errors import ModelFileError

    with safe_open(str(BUILTIN_PATH), "pt") as f:
        meta = dict(f.metadata())
        state = {k: f.get_tensor(k) for k in f.keys()}
    save_file(state, str(tmp_path / "bad.safetensors"), metadata=dict(meta, members="9"))
    with pytest.raises(ModelFileError, match="does not hold the weights"):
        Perceiver.load(tmp_path / "bad.safetensors")
    save_file(state, str(tmp_path / "probe.safetensors"), metadata=dict(meta, probe_width="[8, 8, 8]"))
    with pytest.raises(ModelFileError, match="does not hold the weights"):
        Perceiver.load(tmp_path / "probe.safetensors")


def test_invisible_snow_is_labelled_clean_for_training():
    from vbridge_core.degrade import snow
    from vbridge_core.perceive.synth import Sample, label_arrays, visible_overlay

    dark, white = torch.full((3, 96, 96), 0.2), torch.full((3, 96, 96), 0.97)
    assert visible_overlay(dark, snow(dark, 0, density=0.002))
    assert not visible_overlay(white, snow(white, 0, density=0.002))  # flakes on a white sky change nothing
    lab = label_arrays([Sample(torch.empty(0), ["snow"], {"snow": 0.5}, ["snow"]),
                        Sample(torch.empty(0), ["snow"], {"snow": 0.5}, ["snow"], hidden=["snow"])])
    assert lab["labels"][0, LABELS.index("snow")] == 1 and lab["labels"][1, LABELS.index("clean")] == 1
    assert lab["severity"][1, FAMILIES.index("snow")] == pytest.approx(0.5)  # severity target kept


def test_dev_split_uses_training_photos_only_and_is_deterministic():
    import dev_perceive

    from vbridge_core.perceive.synth import HELD_OUT_PHOTOS, clean_photos

    training = {n for n, _ in clean_photos("train")}
    for split, names in dev_perceive.DEV_SPLITS.items():
        assert set(names) <= training, split
        assert not set(names) & set(HELD_OUT_PHOTOS), split  # decisions never see the benchmark's photos
    a, b = dev_perceive.dev_set(1, split="textures"), dev_perceive.dev_set(1, split="textures")
    assert [lab for _, lab in a] == list(LABELS)
    for (x, _), (y, _) in zip(a, b):
        assert torch.equal(x, y) and 160 <= max(x.shape[-2:]) <= 256
    independent = {}
    for split in dev_perceive.DEV_SPLITS:  # every split's photos can be cut into 160..256 px test crops
        assert len(dev_perceive.dev_set(1, split=split)) == len(LABELS)
        independent[split] = dev_perceive.dev_independent_set(1, split=split)
        assert len(independent[split]) == len(LABELS)
    c, d = independent["stones"], dev_perceive.dev_independent_set(1, split="stones")
    assert [lab for _, lab in c] == list(LABELS)
    for (x, _), (y, _) in zip(c, d):
        assert torch.equal(x, y) and 160 <= max(x.shape[-2:]) <= 256 and x.dtype == torch.float32
        assert torch.equal(x, (x * 255).round() / 255)  # 8-bit levels, as a file would hold


def test_shift_label_logit_moves_one_logit_of_the_ensemble_exactly():
    from vbridge_core.perceive.model import PerceiverNet
    from vbridge_core.perceive.train import shift_label_logit

    torch.manual_seed(0)
    net = PerceiverNet(members=3).eval()
    z = torch.randn(5, len(FEATURE_NAMES))
    with torch.no_grad():
        before = net(z)
        after = shift_label_logit(net, "haze", 2.5)(z)
    hi = LABELS.index("haze")
    diff = after[0] - before[0]
    assert torch.allclose(diff[:, hi], torch.full((5,), 2.5), atol=1e-5)
    assert torch.equal(diff[:, [i for i in range(len(LABELS)) if i != hi]], torch.zeros(5, len(LABELS) - 1))
    assert torch.equal(after[1], before[1]) and torch.equal(after[2], before[2])  # severity and quality unchanged


def test_merged_perceivers_keep_every_members_outputs_across_standardisations(tmp_path):
    """Two nets fitted on different features standardise differently; the merged ensemble folds that into each
    member's first layer, so it averages exactly the members' own logits, and it survives a save and a load."""
    from vbridge_core.perceive.model import PerceiverNet, SnowProbe

    torch.manual_seed(0)
    a, b = PerceiverNet(members=3).eval(), PerceiverNet(members=2).eval()
    for net in (a, b):
        net.feat_mean.copy_(torch.randn(len(FEATURE_NAMES)))
        net.feat_std.copy_(torch.rand(len(FEATURE_NAMES)) + 0.1)
    f = torch.randn(6, len(FEATURE_NAMES)) * 2
    with torch.no_grad():
        want = (3 * a(f)[0] + 2 * b(f)[0]) / 5
        same = PerceiverNet.combine([a, a])
        assert torch.equal(same.feat_mean, a.feat_mean) and torch.allclose(same(f)[0], a(f)[0], atol=1e-6)  # not folded
        probe = SnowProbe().eval()
        merged = Perceiver.merged([Perceiver(a, {"name": "A"}), Perceiver(b, {"name": "B"}, probe)])
        assert len(merged.net.members) == 5 and merged.probe is probe
        assert merged.info["merged"] == [{"name": "A"}, {"name": "B"}]
        assert torch.allclose(merged.net(f)[0], want, atol=1e-5)
        back = Perceiver.load(merged.save(tmp_path / "m.safetensors"))
        assert torch.allclose(back.net(f)[0], want, atol=1e-5) and back.probe is not None
    with pytest.raises(InputError, match="at least two"):
        Perceiver.merged([Perceiver(a)])
    with pytest.raises(ValueError, match="widths"):
        PerceiverNet.combine([a, PerceiverNet(hidden=64)])
    with pytest.raises(InputError, match="widths"):
        Perceiver.merged([Perceiver(a), Perceiver(PerceiverNet(hidden=64))])


def test_hard_snow_paints_visible_opaque_flakes_deterministically():
    from vbridge_core.perceive.synth import hard_snow, visible_overlay

    x = torch.rand(1, 128, 128).expand(3, -1, -1) * 0.5  # a mid-grey textured crop
    a = hard_snow(x, torch.Generator().manual_seed(3))
    b = hard_snow(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == x.shape
    assert torch.equal(a, (a * 255).round() / 255) and 0 <= a.min() and a.max() <= 1  # 8-bit, in range
    gen = torch.Generator().manual_seed(4)
    outs = [hard_snow(x, gen) for _ in range(12)]
    assert all(visible_overlay(x, o) for o in outs)
    # flakes are near-white and mostly opaque: the changed pixels are bright, not a faint overlay
    changed = torch.cat([o[0][(o - x).abs().amax(0) > 0.1] for o in outs])
    assert changed.median() > 0.75
    assert len({int(((o - x).abs().amax(0) > 0.1).sum()) for o in outs}) > 6  # density and size vary


def test_hard_snow_share_teaches_the_probe_opaque_flakes():
    """The same small probe run with and without hard_snow positives: only the first learns to call them snow."""
    from vbridge_core.degrade import snow
    from vbridge_core.perceive.synth import hard_snow
    from vbridge_core.perceive.train import fit_snow_probe, to_uint8

    crops, y = [], []
    for k, c in enumerate(_photo_crops(48)):
        is_snow = k % 4 == 0  # a quarter soft degrade.py snow, the rest clean
        crops.append(to_uint8(snow(c, seed=k, density=0.004, flake_size=2.5) if is_snow else c))
        y.append(is_snow)
    labels = np.zeros((len(y), len(LABELS)), np.float32)
    labels[np.arange(len(y)), [LABELS.index("snow" if s else "clean") for s in y]] = 1
    test_gen = torch.Generator().manual_seed(7)
    held = [hard_snow(crops[i].float() / 255, test_gen) for i in range(1, 48, 4)]
    probs = {}
    for share in (0.0, 1.0):
        probe = fit_snow_probe(crops, {"labels": labels}, seed=0, epochs=12, batch=16, hard_share=share,
                               pair_share=0.0, decision=0.5)
        with torch.no_grad():
            probs[share] = torch.sigmoid(probe(torch.stack(held))).mean().item()
    assert probs[1.0] > 0.5 and probs[1.0] > probs[0.0] + 0.2, probs


def test_cli_merge_perceivers_writes_one_ensemble_and_refuses_a_single_file(tmp_path, capsys):
    from vbridge_core.perceive.model import PerceiverNet

    torch.manual_seed(1)
    files = []
    for k in range(2):
        net = PerceiverNet(members=2).eval()
        net.feat_mean.copy_(torch.randn(len(FEATURE_NAMES)) * (k + 1))
        files.append(Perceiver(net, {"part": k}).save(tmp_path / f"p{k}.safetensors"))
    out = tmp_path / "merged.safetensors"
    assert main(["merge-perceivers", str(files[0]), str(files[1]), "--out", str(out)]) == 0
    m = Perceiver.load(out)
    assert len(m.net.members) == 4 and m.info["merged"] == [{"part": 0}, {"part": 1}] and m.probe is None
    f = torch.randn(3, len(FEATURE_NAMES))
    with torch.no_grad():
        want = (Perceiver.load(files[0]).net(f)[0] + Perceiver.load(files[1]).net(f)[0]) / 2
        assert torch.allclose(m.net(f)[0], want, atol=1e-5)
    assert main(["merge-perceivers", str(files[0]), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "at least two" in capsys.readouterr().err and not (tmp_path / "x.safetensors").exists()
    assert main(["merge-perceivers", str(files[0]), str(tmp_path / "missing.safetensors"), "--out", str(out)]) != 0
