"""PSNR and SSIM with the definitions restoration papers use.

Inputs are RGB tensors in ``0..1`` shaped ``[B, C, H, W]`` (one value per image is returned, shape
``[B]``) or ``[C, H, W]`` (a 0-dim tensor). Everything is computed in float64 so results do not
depend on the input precision. Inputs are *not* quantized: pass images loaded from 8-bit files
(or rounded to multiples of 1/255) to reproduce scripts that work on uint8 arrays.

Definitions
-----------
* **Y channel**: ITU-R BT.601 luma exactly as MATLAB's ``rgb2ycbcr`` (and basicsr's
  ``rgb2ycbcr(y_only=True)``): ``Y = 16/255 + (65.481 R + 128.553 G + 24.966 B) / 255`` on 0..1
  RGB, i.e. the 16..235 range scaled by 1/255. Not rounded. ``data_range`` stays 1.
* **PSNR**: ``10 log10(data_range^2 / MSE)``; identical images give ``inf``.
  ``channel="rgb"`` takes the MSE over all channels and pixels (basicsr, pyiqa);
  ``channel="rgb_mean"`` averages the three per-channel PSNRs (the release's ``eval.py``);
  ``channel="y"`` uses the Y channel.
* **SSIM**: Wang et al. 2004 with MATLAB's constants: 11x11 Gaussian window (sigma 1.5,
  normalised), ``K1 = 0.01``, ``K2 = 0.03``, ``C = (K * data_range)^2``, statistics from *valid*
  filtering only (the map is ``(H-10) x (W-10)``), mean of the map. This is basicsr's
  ``calculate_ssim`` and the release's ``matlab_style_ssim`` (which filters with zero borders and
  then discards the 5-pixel rim, the same thing). ``channel="rgb"`` averages per-channel SSIM.
  Images need at least 11x11 pixels (after ``crop_border``).

* **pyiqa's Y** (``channel="y_pyiqa"``, FoundIR's tool): the Y of YIQ, ``0.299 R + 0.587 G + 0.114 B``
  (full range, *not* BT.601's 16..235), scaled to 0..255 and rounded to integers, computed in the
  input's precision before the float64 statistics; SSIM then uses ``data_range = 255`` and clamps the
  contrast-structure term at 0 (``relu``) as ``pyiqa/archs/ssim_arch.py`` does.

Protocols
---------
* ``"foundir"`` -- FoundIR's own tool, pyiqa's default ``psnr`` and ``ssim`` metrics: PSNR on RGB
  (MSE over all channels, ``+1e-8`` in the denominator as pyiqa) and SSIM on pyiqa's rounded YIQ
  luma. ``tests/test_metrics_pyiqa.py`` checks both against pyiqa's own metric code to 1e-4 on real
  photos. (On noisy photos the BT.601 SSIM differs from this by 0.04-0.08.)
* ``"release"`` -- the authors' MATLAB-style script (``V-Bridge/eval.py``): PSNR and SSIM on Y, and
  an "RGB" variant with PSNR averaged over channels and SSIM averaged over channels. Note the
  release scores a frame read back from an H.264 mp4; we score the raw last frame.
"""
from __future__ import annotations

import logging
import math
from typing import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F

from .errors import InputError

log = logging.getLogger(__name__)

__all__ = [
    "rgb_to_y",
    "psnr",
    "ssim",
    "PROTOCOLS",
    "image_metrics",
    "summarize",
    "format_metrics_table",
    "metrics_from_mapping",
]

_Y_WEIGHTS = (65.481 / 255.0, 128.553 / 255.0, 24.966 / 255.0)
_Y_OFFSET = 16.0 / 255.0

#: Which metric variants each evaluation protocol reports: name -> (function, channel).
PROTOCOLS: dict[str, dict[str, tuple]] = {
    "foundir": {"psnr": ("psnr", "rgb", {"eps": 1e-8}), "ssim": ("ssim", "y_pyiqa")},
    "release": {
        "psnr_y": ("psnr", "y"),
        "ssim_y": ("ssim", "y"),
        "psnr_rgb": ("psnr", "rgb_mean"),
        "ssim_rgb": ("ssim", "rgb"),
    },
}


def rgb_to_y(x: torch.Tensor) -> torch.Tensor:
    """BT.601 luma of ``[..., 3, H, W]`` RGB in 0..1, as MATLAB ``rgb2ycbcr`` (range 16/255..235/255).

    Returns ``[..., 1, H, W]`` in the input's floating dtype.
    """
    if x.shape[-3] != 3:
        raise InputError(f"the Y channel needs RGB input (3 channels), got {x.shape[-3]} channels.")
    r, g, b = x[..., 0:1, :, :], x[..., 1:2, :, :], x[..., 2:3, :, :]
    return _Y_OFFSET + _Y_WEIGHTS[0] * r + _Y_WEIGHTS[1] * g + _Y_WEIGHTS[2] * b


def rgb_to_y_pyiqa(x: torch.Tensor) -> torch.Tensor:
    """pyiqa's luma: ``round(255 * (0.299 R + 0.587 G + 0.114 B))`` of ``[B, 3, H, W]`` 0..1 RGB.

    Computed in the input's floating precision (float32 for uint8 input), as pyiqa computes it on
    the tensors it loads, so the rounding matches; returns ``[B, 1, H, W]`` on the 0..255 scale.
    """
    if x.shape[-3] != 3:
        raise InputError(f"the Y channel needs RGB input (3 channels), got {x.shape[-3]} channels.")
    if not x.dtype.is_floating_point:
        x = x.to(torch.float32)
    r, g, b = x[..., 0:1, :, :], x[..., 1:2, :, :], x[..., 2:3, :, :]
    return ((_YIQ_WEIGHTS[0] * r + _YIQ_WEIGHTS[1] * g + _YIQ_WEIGHTS[2] * b) * 255.0).round()


_YIQ_WEIGHTS = (0.299, 0.587, 0.114)
_PYIQA_RANGE = 255.0


def _prepare(a: torch.Tensor, b: torch.Tensor, crop_border: int, channel: str) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Check shapes, batch, crop and select the channel; returns float64 [B, C, H, W] pairs."""
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise InputError("metrics expect torch tensors (use images.to_rgb_tensor to convert arrays).")
    if a.shape != b.shape:
        raise InputError(f"images to compare differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}. "
                         "Resize or crop the restored image to the reference size first.")
    if a.ndim not in (3, 4):
        raise InputError(f"metrics expect [B, C, H, W] or [C, H, W], got shape {tuple(a.shape)}.")
    single = a.ndim == 3
    a = a.unsqueeze(0) if single else a
    b = (b.unsqueeze(0) if single else b).to(a.device)
    if channel == "y_pyiqa":  # luma in the input precision first (pyiqa rounds it there)
        a, b = rgb_to_y_pyiqa(a), rgb_to_y_pyiqa(b)
    a, b = a.to(torch.float64), b.to(torch.float64)
    if crop_border < 0:
        raise InputError(f"crop_border must be >= 0, got {crop_border}.")
    if crop_border:
        h, w = a.shape[-2:]
        if h <= 2 * crop_border or w <= 2 * crop_border:
            raise InputError(f"crop_border {crop_border} removes the whole {h}x{w} image.")
        a = a[..., crop_border:-crop_border, crop_border:-crop_border]
        b = b[..., crop_border:-crop_border, crop_border:-crop_border]
    if channel == "y":
        a, b = rgb_to_y(a), rgb_to_y(b)
    elif channel not in ("rgb", "rgb_mean", "y_pyiqa"):
        raise InputError(f"unknown metric channel {channel!r}; use 'rgb', 'rgb_mean', 'y' or 'y_pyiqa'.")
    return a, b, single


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0, channel: str = "rgb",
         crop_border: int = 0, eps: float = 0.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image (float64; ``inf`` for identical images when ``eps`` is 0).

    ``channel``: ``"rgb"`` (MSE over all channels), ``"rgb_mean"`` (mean of per-channel PSNRs, as
    the release's ``eval.py``), ``"y"`` (BT.601 luma) or ``"y_pyiqa"`` (pyiqa's rounded luma, data
    range 255). ``crop_border`` pixels are removed from each side first (a super-resolution
    convention; 0 for restoration). ``eps`` is added to the MSE (pyiqa uses 1e-8).
    """
    a, b, single = _prepare(a, b, crop_border, channel)
    if channel == "y_pyiqa":
        a, b = a / _PYIQA_RANGE, b / _PYIQA_RANGE
    if channel == "rgb_mean":
        mse = (a - b).pow(2).mean(dim=(-2, -1))  # [B, C]
        val = (10.0 * torch.log10(data_range ** 2 / (mse + eps))).mean(dim=1)
    else:
        mse = (a - b).pow(2).mean(dim=(-3, -2, -1))
        val = 10.0 * torch.log10(data_range ** 2 / (mse + eps))
    return val[0] if single else val


def _gaussian_window(size: int = 11, sigma: float = 1.5, dtype=torch.float64, device=None) -> torch.Tensor:
    coords = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2.0
    g = torch.exp(-(coords ** 2) / (2.0 * sigma ** 2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0, channel: str = "y",
         crop_border: int = 0) -> torch.Tensor:
    """Structural similarity per image (float64), Wang et al. 2004 / MATLAB / basicsr definition.

    ``channel``: ``"y"`` (BT.601 luma, the usual restoration protocol), ``"rgb"`` (mean of the
    per-channel SSIMs; ``"rgb_mean"`` is accepted as a synonym) or ``"y_pyiqa"`` (pyiqa's ``ssim``:
    rounded YIQ luma, data range 255, contrast-structure term clamped at 0; ``data_range`` is then
    ignored). Needs at least 11x11 pixels.
    """
    if channel == "rgb_mean":
        channel = "rgb"
    a, b, single = _prepare(a, b, crop_border, channel)
    pyiqa_style = channel == "y_pyiqa"
    if pyiqa_style:
        data_range = _PYIQA_RANGE
    h, w = a.shape[-2:]
    if h < 11 or w < 11:
        raise InputError(f"SSIM needs images of at least 11x11 pixels (its window size), got {h}x{w}.")
    c = a.shape[1]
    win = _gaussian_window(device=a.device)
    if pyiqa_style:  # pyiqa builds the window in float32 (fspecial) and casts it to the images' float64
        win = win.to(torch.float32).to(torch.float64)
    win = win.expand(c, 1, 11, 11).contiguous()
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2

    def filt(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, win, groups=c)  # valid filtering: no padding

    mu_a, mu_b = filt(a), filt(b)
    mu_aa, mu_bb, mu_ab = mu_a * mu_a, mu_b * mu_b, mu_a * mu_b
    s_aa = filt(a * a) - mu_aa
    s_bb = filt(b * b) - mu_bb
    s_ab = filt(a * b) - mu_ab
    cs_map = (2 * s_ab + c2) / (s_aa + s_bb + c2)
    if pyiqa_style:
        cs_map = cs_map.clamp_min(0.0)
    ssim_map = (2 * mu_ab + c1) / (mu_aa + mu_bb + c1) * cs_map
    val = ssim_map.mean(dim=(-2, -1)).mean(dim=1)  # per channel, then over channels
    return val[0] if single else val


def image_metrics(restored: torch.Tensor, reference: torch.Tensor, protocol: str = "foundir",
                  crop_border: int = 0) -> dict[str, torch.Tensor]:
    """All metrics of one protocol (see :data:`PROTOCOLS`): name -> per-image values."""
    if protocol not in PROTOCOLS:
        raise InputError(f"unknown metrics protocol {protocol!r}; use one of {sorted(PROTOCOLS)}.")
    fns = {"psnr": psnr, "ssim": ssim}
    out = {}
    for name, (fn, ch, *extra) in PROTOCOLS[protocol].items():
        out[name] = fns[fn](restored, reference, channel=ch, crop_border=crop_border, **(extra[0] if extra else {}))
    return out


def _flatten(values: Iterable) -> list[float]:
    out: list[float] = []
    for v in values:
        if isinstance(v, torch.Tensor):
            out.extend(float(x) for x in v.detach().reshape(-1).cpu().tolist())
        else:
            out.append(float(v))
    return out


def summarize(values: "Iterable[float] | torch.Tensor") -> float:
    """Mean of per-image metric values (tensors of any shape and plain numbers may be mixed).

    Infinite PSNRs (identical pairs) make the mean infinite, which is the honest answer; NaN is
    returned for an empty input.
    """
    vals = _flatten([values] if isinstance(values, torch.Tensor) else values)
    if not vals:
        return math.nan
    return math.fsum(vals) / len(vals)


def format_metrics_table(names: Sequence[str], psnr: "Sequence[float] | torch.Tensor",
                         ssim: "Sequence[float] | torch.Tensor", title: str | None = None) -> str:
    """A plain-text table: one row per image (PSNR dB with 2 decimals, SSIM with 4) plus a mean row."""
    p, s = _flatten([psnr] if isinstance(psnr, torch.Tensor) else psnr), _flatten(
        [ssim] if isinstance(ssim, torch.Tensor) else ssim)
    names = [str(n) for n in names]
    if not (len(names) == len(p) == len(s)):
        raise InputError(f"metrics table needs one PSNR and one SSIM per name: {len(names)} names, "
                         f"{len(p)} PSNR, {len(s)} SSIM values.")
    rows = [(n, f"{pv:.2f}", f"{sv:.4f}") for n, pv, sv in zip(names, p, s)]
    if rows:
        rows.append(("mean", f"{summarize(p):.2f}", f"{summarize(s):.4f}"))
    width = max([len("image")] + [len(r[0]) for r in rows])
    lines = []
    if title:
        lines.append(title)
    lines.append(f"{'image':<{width}}  {'PSNR (dB)':>9}  {'SSIM':>6}")
    lines.append("-" * (width + 19))
    for i, (n, pv, sv) in enumerate(rows):
        if n == "mean" and i == len(rows) - 1:
            lines.append("-" * (width + 19))
        lines.append(f"{n:<{width}}  {pv:>9}  {sv:>6}")
    return "\n".join(lines)


def metrics_from_mapping(m: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Means of an :func:`image_metrics` result, for logs and JSON reports."""
    return {k: summarize(v) for k, v in m.items()}
