"""Synthetic degradations: direction of each effect, range/shape/dtype, seeding, registry, pairs."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from vbridge_core import degrade as D
from vbridge_core.errors import InputError


def _photo(h: int = 64, w: int = 64, seed: int = 0, batch: int | None = None) -> torch.Tensor:
    """A photo-like test image: smooth shading, edges and some texture, values well inside 0..1."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    base = torch.stack([0.3 + 0.3 * xx, 0.25 + 0.3 * yy, 0.4 + 0.2 * torch.sin(6 * xx)])
    squares = ((torch.floor(xx * 8) + torch.floor(yy * 8)) % 2)[None] * 0.2
    tex = F.avg_pool2d(torch.rand(1, 3, h, w, generator=g), 3, 1, 1)[0] * 0.15
    img = (base + squares + tex).clamp(0.05, 0.95)
    if batch is not None:
        img = torch.stack([img.roll(i * 5, dims=-1) for i in range(batch)])
    return img


def _grad_energy(x: torch.Tensor) -> float:
    return float((x[..., 1:, :] - x[..., :-1, :]).pow(2).mean() + (x[..., :, 1:] - x[..., :, :-1]).pow(2).mean())


def _highpass_energy(x: torch.Tensor) -> float:
    xb = x if x.ndim == 4 else x[None]
    return float((xb - F.avg_pool2d(xb, 3, 1, 1, count_include_pad=False)).pow(2).mean())


IMG = _photo()


@pytest.mark.parametrize("name", list(D.DEGRADATIONS))
def test_range_shape_dtype_and_defaults(name):
    for x in (IMG, _photo(40, 56, batch=2), IMG.to(torch.float64)):
        y = D.degrade(x, name, 1)
        assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
        assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
        assert bool(torch.isfinite(y).all())
    assert not torch.equal(D.degrade(IMG, name, 1), IMG), f"{name} left the image unchanged"


@pytest.mark.parametrize("name", list(D.DEGRADATIONS))
def test_seed_reproducible_and_sensitive(name):
    a = D.degrade(IMG, name, 123)
    b = D.degrade(IMG, name, 123)
    assert torch.equal(a, b)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(D.degrade(IMG, name, g1), D.degrade(IMG, name, g2))
    if name in ("gaussian_blur", "defocus_blur", "motion_blur", "jpeg"):
        assert torch.equal(a, D.degrade(IMG, name, 124))  # deterministic: seed ignored
    else:
        assert not torch.equal(a, D.degrade(IMG, name, 124))


def test_gaussian_noise_std_matches_sigma():
    flat = torch.full((3, 96, 96), 0.5)
    for s in (15 / 255, 50 / 255):
        d = D.gaussian_noise(flat, 0, sigma=s) - flat
        assert abs(float(d.std()) - s) < 0.1 * s
        assert abs(float(d.mean())) < 0.01
    y = D.gaussian_noise(IMG, 0, sigma=25 / 255)
    assert _highpass_energy(y) > 3 * _highpass_energy(IMG)
    assert torch.equal(D.gaussian_noise(IMG, 0, sigma=0.0), IMG)


def test_poisson_noise_is_signal_dependent_and_scales_with_peak():
    dark, bright = torch.full((3, 64, 64), 0.1), torch.full((3, 64, 64), 0.8)
    sd = lambda x, p: float((D.poisson_noise(x, 0, peak=p) - x).std())
    assert sd(bright, 30) > 2 * sd(dark, 30)
    assert abs(sd(bright, 30) - math.sqrt(0.8 / 30)) < 0.15 * math.sqrt(0.8 / 30)
    assert sd(bright, 5) > 2 * sd(bright, 100)
    assert abs(float(D.poisson_noise(bright, 0, peak=30).mean()) - 0.8) < 0.01


@pytest.mark.parametrize("name,params", [
    ("gaussian_blur", {"sigma": 2.0}), ("defocus_blur", {"radius": 3.0}), ("motion_blur", {"length": 15, "angle": 30}),
])
def test_blurs_lower_gradient_energy_and_keep_mean(name, params):
    y = D.degrade(IMG, name, 0, **params)
    assert _grad_energy(y) < 0.5 * _grad_energy(IMG)
    assert abs(float(y.mean() - IMG.mean())) < 0.01
    stronger = {k: (v * 2 if k != "angle" else v) for k, v in params.items()}
    assert _grad_energy(D.degrade(IMG, name, 0, **stronger)) < _grad_energy(y)


def test_blur_zero_is_identity_and_flat_image_unchanged():
    assert torch.equal(D.gaussian_blur(IMG, sigma=0), IMG)
    assert torch.equal(D.defocus_blur(IMG, radius=0), IMG)
    assert torch.equal(D.motion_blur(IMG, length=0), IMG)
    flat = torch.full((3, 20, 20), 0.4)
    for name in ("gaussian_blur", "defocus_blur", "motion_blur"):
        assert torch.allclose(D.degrade(flat, name, 0), flat, atol=1e-5)  # borders replicated: no dark rim


def test_motion_blur_direction():
    """A horizontal kernel leaves horizontal stripes alone and smears vertical ones (and vice versa)."""
    yy, xx = torch.meshgrid(torch.arange(48.0), torch.arange(48.0), indexing="ij")
    h_stripes = ((yy // 3) % 2).expand(3, 48, 48).clone()
    v_stripes = ((xx // 3) % 2).expand(3, 48, 48).clone()
    horiz = {"length": 12, "angle": 0}
    assert _grad_energy(D.motion_blur(h_stripes, **horiz)) > 0.9 * _grad_energy(h_stripes)
    assert _grad_energy(D.motion_blur(v_stripes, **horiz)) < 0.3 * _grad_energy(v_stripes)
    vert = {"length": 12, "angle": 90}
    assert _grad_energy(D.motion_blur(v_stripes, **vert)) > 0.9 * _grad_energy(v_stripes)


def test_fft_path_matches_direct_convolution():
    x = _photo(30, 37)[None]
    k = D._line_kernel(25, 20, x.device)  # large kernel
    assert k.numel() >= D._FFT_MIN_TAPS
    direct = F.conv2d(F.pad(x, (k.shape[1] // 2,) * 2 + (k.shape[0] // 2,) * 2, mode="replicate").reshape(3, 1, *[
        s + k.shape[i] - 1 for i, s in enumerate(x.shape[-2:])]), k[None, None]).reshape(x.shape)
    assert torch.allclose(D._filter(x, k), direct, atol=1e-5)


def test_jpeg_low_quality_differs_more():
    err = lambda q: float((D.jpeg(IMG, quality=q) - IMG).abs().mean())
    assert err(10) > 2 * err(95)
    assert err(95) < 0.02


def test_haze_brightens_and_lowers_contrast():
    for depth in ("random", "gradient"):
        y = D.haze(IMG, 0, beta=1.5, airlight=0.9, depth=depth)
        assert float(y.mean()) > float(IMG.mean()) + 0.05
        assert float(y.std()) < float(IMG.std())
    g = D.haze(IMG, 0, depth="gradient")
    assert float((g - IMG)[:, :8].mean()) > float((g - IMG)[:, -8:].mean())  # top is farther: hazier
    assert torch.equal(D.haze(IMG, 0, beta=0.0), IMG)


def test_low_light_darkens():
    y = D.low_light(IMG, 0)
    assert float(y.mean()) < 0.5 * float(IMG.mean())
    assert float(D.low_light(IMG, 0, gamma=3, scale=0.1).mean()) < float(y.mean())
    clean = D.low_light(IMG, 0, shot_noise=0, read_noise=0)
    assert torch.allclose(clean, 0.3 * IMG ** 2, atol=1e-6)
    assert _highpass_energy(y) > _highpass_energy(clean)


@pytest.mark.parametrize("name", ["rain", "snow"])
def test_rain_and_snow_add_bright_structures(name):
    y = D.degrade(IMG, name, 2)
    d = y - IMG
    assert float(d.min()) >= -1e-6  # they only ever brighten
    assert float((d > 0.15).float().mean()) > 0.005  # visible bright structures
    assert float((d > 0.01).float().mean()) < 0.6  # ... but not a uniform veil
    more = D.degrade(IMG, name, 2, density=D.PARAMS[name]["density"].default * 3)
    assert float((more - IMG).mean()) > float(d.mean())


def test_rain_streaks_follow_angle():
    black = torch.zeros(3, 96, 96)
    vertical = D.rain(black, 0, angle=0, length=30, density=0.003, width=0.3)[0]
    dy = float((vertical[1:] - vertical[:-1]).abs().mean())
    dx = float((vertical[:, 1:] - vertical[:, :-1]).abs().mean())
    assert dx > 3 * dy  # vertical streaks: little change along a column


def test_snow_motion_blur_smears_flakes():
    black = torch.zeros(3, 64, 64)
    still = D.snow(black, 4, motion_length=0)
    moving = D.snow(black, 4, motion_length=10, angle=-90)
    assert _grad_energy(moving) < _grad_energy(still)


def test_batch_gets_distinct_patterns():
    x = IMG.expand(3, -1, -1, -1).clone()
    y = D.gaussian_noise(x, 0)
    assert not torch.equal(y[0], y[1])
    assert torch.equal(y, D.gaussian_noise(x, 0))


def test_chain_and_unknown_names():
    y = D.degrade(IMG, ["gaussian_blur", "gaussian_noise", "jpeg"], 7, jpeg={"quality": 20})
    assert torch.equal(y, D.degrade(IMG, ["gaussian_blur", "gaussian_noise", "jpeg"], 7, jpeg={"quality": 20}))
    with pytest.raises(InputError, match="gaussian_noise"):
        D.degrade(IMG, "fog", 0)
    with pytest.raises(InputError, match="choose from"):
        D.degrade(IMG, ["gaussian_blur", "blurr"], 0)
    with pytest.raises(InputError, match="per name"):
        D.degrade(IMG, ["gaussian_blur", "jpeg"], 0, quality=20)


@pytest.mark.parametrize("name,params,rule", [
    ("gaussian_noise", {"sigma": 1.5}, "0..1"),
    ("gaussian_noise", {"sigma": -0.1}, "0..1"),
    ("jpeg", {"quality": 0}, "1..100"),
    ("jpeg", {"quality": 50.5}, "whole number"),
    ("haze", {"depth": "sky"}, "random"),
    ("low_light", {"gamma": 0.5}, "1..5"),
    ("rain", {"angle": 90}, "-80..80"),
    ("motion_blur", {"length": float("nan")}, "finite"),
    ("snow", {"size": 3}, "unknown parameter"),
    ("poisson_noise", {"peak": "high"}, "number"),
])
def test_bad_parameters(name, params, rule):
    with pytest.raises(InputError, match=rule):
        D.degrade(IMG, name, 0, **params)


@pytest.mark.parametrize("bad", [
    torch.zeros(3, 0, 5), torch.zeros(0, 3, 4, 4), torch.zeros(1, 8, 8), torch.zeros(8, 8),
    torch.zeros(3, 8, 8, dtype=torch.uint8), "image.png",
])
def test_bad_images(bad):
    with pytest.raises(InputError):
        D.gaussian_noise(bad, 0)


def test_bad_seed():
    with pytest.raises(InputError, match="seed"):
        D.gaussian_noise(IMG, 1.5)
    with pytest.raises(InputError, match="seed"):
        D.gaussian_noise(IMG, None)


def test_random_degradation_draws_in_range_and_replays():
    seen = set()
    for s in range(40):
        y, info = D.random_degradation(IMG, s)
        seen.add(info["name"])
        for k, v in info["params"].items():
            spec = D.PARAMS[info["name"]][k]
            if spec.choices:
                assert v in spec.choices
            else:
                assert spec.sample[0] <= v <= spec.sample[1]
        assert torch.equal(y, D.degrade(IMG, info["name"], info["seed"], **info["params"]))
        json.dumps(info)  # loggable
    assert len(seen) >= 8
    y1, i1 = D.random_degradation(IMG, 3, names=["rain", "snow"])
    y2, i2 = D.random_degradation(IMG, 3, names=["rain", "snow"])
    assert i1 == i2 and torch.equal(y1, y2) and i1["name"] in ("rain", "snow")
    _, fixed = D.random_degradation(IMG, 3, names=["jpeg"], fixed={"quality": 12})
    assert fixed["params"]["quality"] == 12
    with pytest.raises(InputError):
        D.random_degradation(IMG, 0, names=["nope"])
    with pytest.raises(InputError):
        D.random_degradation(IMG, 0, names=[])


def test_degrade_sequence_redraws_per_frame():
    frames = IMG.expand(4, -1, -1, -1).clone()
    flick = D.degrade_sequence(frames, "gaussian_noise", 9, sigma=0.1)
    assert flick.shape == frames.shape
    assert not torch.equal(flick[0], flick[1]) and not torch.equal(flick[1], flick[3])
    assert torch.equal(flick, D.degrade_sequence(frames, "gaussian_noise", 9, sigma=0.1))
    assert not torch.equal(flick, D.degrade_sequence(frames, "gaussian_noise", 10, sigma=0.1))
    static = D.degrade_sequence(frames, "rain", 9, redraw_per_frame=False)
    assert all(torch.equal(static[0], static[t]) for t in range(4))
    rainy = D.degrade_sequence(frames, "rain", 9)
    assert not torch.equal(rainy[0], rainy[1])
    # parameters are fixed: every frame's noise has the requested strength
    for t in range(4):
        assert abs(float((flick[t] - frames[t]).std()) - 0.1) < 0.02
    with pytest.raises(InputError):
        D.degrade_sequence(IMG, "rain", 0)
    with pytest.raises(InputError):
        D.degrade_sequence(frames, "drizzle", 0)


def test_make_pairs_layout(tmp_path):
    from PIL import Image

    from vbridge_core.images import load_image, save_png

    clean = tmp_path / "clean"
    clean.mkdir()
    save_png(_photo(32, 40, seed=1), clean / "a.png")
    Image.fromarray((_photo(24, 24, seed=2).permute(1, 2, 0).numpy() * 255).astype("uint8")).save(clean / "b.jpg")
    (clean / "notes.txt").write_text("not an image")
    out = tmp_path / "pairs"
    recs = D.make_pairs(clean, out, ["gaussian_noise", "jpeg"], seed=4, params={"jpeg": {"quality": 15}})
    assert len(recs) == 4
    for task in ("gaussian_noise", "jpeg"):
        lq = sorted(p.name for p in (out / task / "lq").iterdir())
        hq = sorted(p.name for p in (out / task / "hq").iterdir())
        assert lq == hq == ["a.png", "b.png"]
        assert torch.allclose(load_image(out / task / "hq" / "a.png"), load_image(clean / "a.png"))
        assert not torch.equal(load_image(out / task / "lq" / "a.png"), load_image(out / task / "hq" / "a.png"))
        logged = json.loads((out / task / "degradations.json").read_text())
        assert {r["stem"] for r in logged} == {"a", "b"}
    assert all(r["params"]["quality"] == 15 for r in recs if r["task"] == "jpeg")
    leftovers = [p for p in out.rglob("*") if p.name.startswith(".") or ".tmp" in p.name]
    assert leftovers == []
    # reproducible
    first = (out / "gaussian_noise" / "lq" / "a.png").read_bytes()
    D.make_pairs(clean, tmp_path / "again", ["gaussian_noise"], seed=4)
    assert (tmp_path / "again" / "gaussian_noise" / "lq" / "a.png").read_bytes() == first
    # the pair loader reads the layout
    pairs = pytest.importorskip("vbridge_core.pairs")
    assert len(pairs.scan_pairs(out)) == 4
    # several per image
    D.make_pairs(clean, tmp_path / "multi", ["rain"], seed=0, per_image=2)
    assert sorted(p.name for p in (tmp_path / "multi" / "rain" / "lq").iterdir()) == ["a_0.png", "a_1.png",
                                                                                       "b_0.png", "b_1.png"]


def test_make_pairs_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        D.make_pairs(tmp_path / "missing", tmp_path / "o", ["jpeg"], 0)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no images"):
        D.make_pairs(empty, tmp_path / "o", ["jpeg"], 0)
    with pytest.raises(InputError, match="choose from"):
        D.make_pairs(empty, tmp_path / "o", ["jpg"], 0)
    with pytest.raises(InputError, match="per_image"):
        D.make_pairs(empty, tmp_path / "o", ["jpeg"], 0, per_image=0)
    from vbridge_core.images import save_png

    save_png(_photo(16, 16), empty / "x.png")
    save_png(_photo(16, 16), empty / "x.tif")
    with pytest.raises(InputError, match="stem"):
        D.make_pairs(empty, tmp_path / "o", ["jpeg"], 0)
