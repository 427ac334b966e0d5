"""PSNR / SSIM: properties, a hand-computed case, and reference values from independent code.

The reference numbers below were produced by ``tests/make_metric_references.py`` with
scikit-image 0.26 (``peak_signal_noise_ratio``; ``structural_similarity`` with
``gaussian_weights=True, sigma=1.5, use_sample_covariance=False``) and with an OpenCV
re-implementation of the release's ``V-Bridge/eval.py`` formulas, on the seeded pair built by
``make_pair`` (identical here). The two independent tools agree to 1e-14.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vbridge_core.errors import InputError
from vbridge_core.metrics import (PROTOCOLS, format_metrics_table, image_metrics, metrics_from_mapping, psnr,
                                  rgb_to_y, ssim, summarize)

REF = {
    "psnr_rgb": 26.548854529853916,  # skimage peak_signal_noise_ratio, data_range=255
    "psnr_y": 31.318784446351714,  # release formula on MATLAB-rgb2ycbcr Y
    "psnr_rgb_mean": 26.549744533872943,  # release: mean of per-channel PSNRs
    "ssim_y": 0.8651776004420894,  # skimage on Y (release formula: ...0969)
    "ssim_rgb": 0.8023387789542665,  # skimage channel_axis=2 (release formula: ...2706)
}


def make_pair(seed: int = 1234, h: int = 48, w: int = 40) -> tuple[np.ndarray, np.ndarray]:
    rs = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    base = np.stack([128 + 60 * np.sin(xx / 5 + c) + 40 * np.cos(yy / 7 - c) for c in range(3)], -1)
    ref = np.clip(np.rint(base + rs.normal(0, 10, base.shape)), 0, 255).astype(np.uint8)
    dist = np.clip(np.rint(ref + rs.normal(0, 12, base.shape)), 0, 255).astype(np.uint8)
    return ref, dist


def _t(a: np.ndarray, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.from_numpy(a).permute(2, 0, 1).to(dtype) / 255.0


@pytest.fixture(scope="module")
def pair() -> tuple[torch.Tensor, torch.Tensor]:
    ref, dist = make_pair()
    return _t(dist), _t(ref)


def test_reference_values(pair):
    out, ref = pair
    assert float(psnr(out, ref, channel="rgb")) == pytest.approx(REF["psnr_rgb"], abs=1e-9)
    assert float(psnr(out, ref, channel="y")) == pytest.approx(REF["psnr_y"], abs=1e-9)
    assert float(psnr(out, ref, channel="rgb_mean")) == pytest.approx(REF["psnr_rgb_mean"], abs=1e-9)
    assert float(ssim(out, ref, channel="y")) == pytest.approx(REF["ssim_y"], abs=1e-10)
    assert float(ssim(out, ref, channel="rgb")) == pytest.approx(REF["ssim_rgb"], abs=1e-10)


def test_float32_inputs_close_to_reference():
    ref, dist = make_pair()
    out32, ref32 = _t(dist, torch.float32), _t(ref, torch.float32)
    assert float(psnr(out32, ref32)) == pytest.approx(REF["psnr_rgb"], abs=1e-5)
    assert float(ssim(out32, ref32)) == pytest.approx(REF["ssim_y"], abs=1e-6)


def test_reference_pair_is_the_documented_one():
    ref, dist = make_pair()
    # Checksums of the pair the reference values were computed on (RandomState is a frozen stream).
    assert ref.shape == (48, 40, 3) and ref.dtype == np.uint8
    assert int(ref.astype(np.int64).sum()) == 792624 and int(dist.astype(np.int64).sum()) == 793148
    assert ref[0, 0].tolist() == [173, 188, 180] and dist[0, 0].tolist() == [167, 173, 165]


def test_identity_and_symmetry(pair):
    out, ref = pair
    for ch in ("rgb", "y", "rgb_mean"):
        assert math.isinf(float(psnr(ref, ref, channel=ch)))
        assert float(psnr(out, ref, channel=ch)) == pytest.approx(float(psnr(ref, out, channel=ch)), abs=1e-12)
    for ch in ("rgb", "y"):
        assert float(ssim(ref, ref, channel=ch)) == pytest.approx(1.0, abs=1e-12)
        assert float(ssim(out, ref, channel=ch)) == pytest.approx(float(ssim(ref, out, channel=ch)), abs=1e-12)


def test_hand_computed_psnr():
    a = torch.zeros(3, 4, 4, dtype=torch.float64)
    b = torch.full((3, 4, 4), 0.1, dtype=torch.float64)
    # MSE = 0.01 -> PSNR = 10*log10(1/0.01) = 20 dB
    assert float(psnr(a, b)) == pytest.approx(20.0, abs=1e-9)
    # data_range 2 -> +20*log10(2)
    assert float(psnr(a, b, data_range=2.0)) == pytest.approx(20.0 + 20 * math.log10(2), abs=1e-9)
    # one channel off by 0.1, others exact: joint MSE 0.01/3; rgb_mean = mean(20, inf, inf) = inf
    c = a.clone()
    c[0] = 0.1
    assert float(psnr(a, c)) == pytest.approx(10 * math.log10(3 / 0.01), abs=1e-9)
    assert math.isinf(float(psnr(a, c, channel="rgb_mean")))
    # Y channel of a uniform gray offset 0.1: Y differs by 0.1 * 219/255
    assert float(psnr(a, b, channel="y")) == pytest.approx(-20 * math.log10(0.1 * 219 / 255), abs=1e-6)


def test_y_matches_matlab_rgb2ycbcr():
    x = torch.tensor([[[[0.0]], [[0.0]], [[0.0]]], [[[1.0]], [[1.0]], [[1.0]]]], dtype=torch.float64)
    y = rgb_to_y(x)
    assert float(y[0]) == pytest.approx(16 / 255)
    assert float(y[1]) == pytest.approx(235 / 255, abs=1e-5)  # 16 + 219 (rounded constants)
    red = torch.tensor([[[1.0]], [[0.0]], [[0.0]]], dtype=torch.float64)
    assert float(rgb_to_y(red)) == pytest.approx((16 + 65.481) / 255)


def test_batch_shapes_and_ordering(pair):
    out, ref = pair
    batch_out = torch.stack([out, ref, out])
    batch_ref = torch.stack([ref, ref, ref])
    p = psnr(batch_out, batch_ref)
    s = ssim(batch_out, batch_ref)
    assert p.shape == (3,) and s.shape == (3,)
    assert math.isinf(float(p[1])) and float(s[1]) == pytest.approx(1.0)
    assert float(p[0]) == pytest.approx(REF["psnr_rgb"], abs=1e-9)
    assert psnr(out, ref).ndim == 0
    assert p.dtype == torch.float64


def test_worse_degradation_scores_lower(pair):
    _, ref = pair
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(ref.shape, generator=g)
    light = (ref + 0.02 * noise).clamp(0, 1)
    heavy = (ref + 0.1 * noise).clamp(0, 1)
    assert float(psnr(light, ref)) > float(psnr(heavy, ref))
    assert float(ssim(light, ref)) > float(ssim(heavy, ref))
    assert 0.0 < float(ssim(heavy, ref)) < 1.0


def test_crop_border(pair):
    out, ref = pair
    cropped = psnr(out[:, 4:-4, 4:-4], ref[:, 4:-4, 4:-4])
    assert float(psnr(out, ref, crop_border=4)) == pytest.approx(float(cropped), abs=1e-12)
    with pytest.raises(InputError):
        psnr(out, ref, crop_border=20)


def test_errors(pair):
    out, ref = pair
    with pytest.raises(InputError, match="differ in shape"):
        psnr(out, ref[:, :-1])
    with pytest.raises(InputError, match="11x11"):
        ssim(out[:, :8, :8], ref[:, :8, :8])
    with pytest.raises(InputError, match="channel"):
        psnr(out, ref, channel="lab")
    with pytest.raises(InputError, match="3 channels"):
        psnr(out[:1], ref[:1], channel="y")
    assert float(psnr(out[:1], ref[:1])) > 0  # gray works on RGB protocol


def test_protocols(pair):
    out, ref = pair
    f = image_metrics(out, ref, "foundir")
    assert set(f) == {"psnr", "ssim"}
    # pyiqa's definitions (checked against pyiqa itself in test_metrics_pyiqa.py): MSE + 1e-8, rounded YIQ luma
    assert float(f["psnr"]) == pytest.approx(REF["psnr_rgb"], abs=1e-4)
    assert float(f["psnr"]) == float(psnr(out, ref, eps=1e-8))
    assert float(f["ssim"]) == float(ssim(out, ref, channel="y_pyiqa"))
    r = image_metrics(out, ref, "release")
    assert set(r) == set(PROTOCOLS["release"]) == {"psnr_y", "ssim_y", "psnr_rgb", "ssim_rgb"}
    assert float(r["psnr_rgb"]) == pytest.approx(REF["psnr_rgb_mean"], abs=1e-9)
    assert metrics_from_mapping(r)["ssim_rgb"] == pytest.approx(REF["ssim_rgb"], abs=1e-10)
    with pytest.raises(InputError):
        image_metrics(out, ref, "nope")


def test_summarize_and_table():
    assert summarize([1.0, 2.0, 3.0]) == pytest.approx(2.0)
    assert summarize(torch.tensor([1.0, 3.0])) == pytest.approx(2.0)
    assert summarize([torch.tensor([1.0, 2.0]), 3.0]) == pytest.approx(2.0)
    assert math.isnan(summarize([]))
    assert math.isinf(summarize([20.0, float("inf")]))
    table = format_metrics_table(["a.png", "bb.png"], torch.tensor([30.0, 20.0]), [0.9, 0.8], title="denoise")
    lines = table.splitlines()
    assert lines[0] == "denoise"
    assert "PSNR (dB)" in lines[1] and "SSIM" in lines[1]
    assert any(l.startswith("a.png") and "30.00" in l and "0.9000" in l for l in lines)
    assert lines[-1].startswith("mean") and "25.00" in lines[-1] and "0.8500" in lines[-1]
    with pytest.raises(InputError):
        format_metrics_table(["a"], [1.0, 2.0], [0.5])
