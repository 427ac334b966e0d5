"""Synthetic degradations: make low-quality (LQ) images from clean photos.

Why: V-Bridge is a few-shot method (a handful of LQ/HQ pairs per task). Users who only have clean
photos can synthesise the LQ half here for the paper's tasks (denoising, deblurring, JPEG artefact
removal, dehazing, low-light enhancement, deraining, desnowing) and write the pairs in the folder
layout :mod:`vbridge_core.pairs` reads (``<task>/lq/<stem>.png`` + ``<task>/hq/<stem>.png``).

Conventions (every public function):

* Images are ``torch`` tensors ``[3, H, W]`` or ``[B, 3, H, W]``, floating point, values ``0..1``,
  on any device. The output has the input's shape, dtype and device and is clamped to ``0..1``.
  Work is done in float32 on the input's device; only :func:`jpeg` leaves it (PIL encodes).
* Randomness comes only from the ``seed`` argument: an ``int`` or a ``torch.Generator``. The same
  int seed on the same device gives bit-identical output; different seeds give different output.
  An int seed creates a generator on the image's device, so CPU and CUDA results for one int seed
  differ (their random streams differ). A generator passed in is advanced (its own device is used
  for drawing, the numbers are then moved to the image's device). Deterministic degradations
  (blurs, JPEG) accept ``seed`` for a uniform signature and ignore it.
* In a batch each image gets its own noise/streak/flake pattern (drawn together, so an image in a
  batch does not get the same pattern as the same image degraded alone).
* Parameters are checked against hard limits (:data:`PARAMS`, ``valid``); a value outside raises
  :class:`InputError` stating the rule. :func:`random_degradation` draws from the narrower,
  realistic ``sample`` ranges.

Registry: :data:`DEGRADATIONS` (name -> function), :func:`degrade` (by name or a chain of names),
:func:`random_degradation`, :func:`degrade_sequence` (video frames with per-frame re-drawn patterns,
for flicker) and :func:`make_pairs` (folder of clean photos -> pair folders).
"""
from __future__ import annotations

import hashlib
import io
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InputError

log = logging.getLogger(__name__)

__all__ = [
    "SeedLike",
    "ParamSpec",
    "PARAMS",
    "DEGRADATIONS",
    "gaussian_noise",
    "poisson_noise",
    "gaussian_blur",
    "defocus_blur",
    "motion_blur",
    "jpeg",
    "haze",
    "low_light",
    "rain",
    "snow",
    "degrade",
    "random_degradation",
    "degrade_sequence",
    "make_pairs",
    "derive_seed",
]

SeedLike = int | torch.Generator

#: Kernels with more taps than this are applied by FFT instead of a direct convolution (same
#: result up to float rounding; much faster for long motion/rain kernels and large disks).
_FFT_MIN_TAPS = 400

#: Image suffixes :func:`make_pairs` reads (the same set as the pair loader).
_IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


# --------------------------------------------------------------------------------------------
# Parameter specifications
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ParamSpec:
    """One parameter of a degradation: its default, hard limits and the range random draws use.

    ``valid`` is inclusive ``(lo, hi)``; ``sample`` is the realistic range used by
    :func:`random_degradation` (drawn log-uniformly when ``log``). ``integer`` parameters are
    rounded; ``choices`` replaces the numeric ranges for string options.
    """

    default: Any
    valid: tuple[float, float] | None = None
    sample: tuple[float, float] | None = None
    integer: bool = False
    log: bool = False
    choices: tuple[str, ...] | None = None
    doc: str = ""

    def check(self, fn: str, name: str, value: Any) -> Any:
        """Return ``value`` (as int/float/str) or raise :class:`InputError` stating the rule."""
        if self.choices is not None:
            if value not in self.choices:
                raise InputError(f"{fn}: {name} must be one of {', '.join(map(repr, self.choices))}, got {value!r}.")
            return value
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"{fn}: {name} must be a number, got {value!r}.")
        if not math.isfinite(float(value)):
            raise InputError(f"{fn}: {name} must be finite, got {value!r}.")
        lo, hi = self.valid  # type: ignore[misc]
        if not lo <= value <= hi:
            raise InputError(f"{fn}: {name} must be in {lo:g}..{hi:g} ({self.doc}), got {value!r}.")
        if self.integer:
            if float(value) != int(value):
                raise InputError(f"{fn}: {name} must be a whole number in {lo:g}..{hi:g}, got {value!r}.")
            return int(value)
        return float(value)


#: Parameters of every degradation: ``PARAMS[name][param]`` is a :class:`ParamSpec`.
PARAMS: dict[str, dict[str, ParamSpec]] = {
    "gaussian_noise": {
        "sigma": ParamSpec(25 / 255, (0.0, 1.0), (5 / 255, 50 / 255),
                           doc="noise standard deviation on the 0..1 scale; 15/255..50/255 is the usual denoising range"),
    },
    "poisson_noise": {
        "peak": ParamSpec(30.0, (0.1, 1e5), (5.0, 100.0), log=True,
                          doc="photon count of a white pixel; lower = noisier (5 very noisy, 100 mild)"),
    },
    "gaussian_blur": {
        "sigma": ParamSpec(2.0, (0.0, 30.0), (0.5, 4.0), doc="Gaussian standard deviation in pixels; 0 = no blur"),
    },
    "defocus_blur": {
        "radius": ParamSpec(4.0, (0.0, 50.0), (1.5, 8.0), doc="disk (out-of-focus) radius in pixels; 0 = no blur"),
    },
    "motion_blur": {
        "length": ParamSpec(15.0, (0.0, 201.0), (5.0, 31.0), doc="blur path length in pixels; 0 = no blur"),
        "angle": ParamSpec(0.0, (-360.0, 360.0), (0.0, 180.0), doc="direction in degrees, 0 = horizontal, counter-clockwise"),
    },
    "jpeg": {
        "quality": ParamSpec(30, (1, 100), (10, 95), integer=True,
                             doc="PIL JPEG quality; 10 = heavy blocking, 95 = nearly clean"),
    },
    "haze": {
        "beta": ParamSpec(1.5, (0.0, 10.0), (0.5, 2.5), doc="scattering coefficient; transmission t = exp(-beta * depth)"),
        "airlight": ParamSpec(0.85, (0.0, 1.0), (0.7, 1.0), doc="atmospheric light A (gray level of the haze)"),
        "depth": ParamSpec("random", choices=("random", "gradient"), sample=None,
                           doc="'random': smooth random depth field; 'gradient': far at the top, near at the bottom"),
    },
    "low_light": {
        "gamma": ParamSpec(2.0, (1.0, 5.0), (1.5, 3.5), doc="darkening exponent applied to 0..1 values (1 = none)"),
        "scale": ParamSpec(0.3, (0.01, 1.0), (0.1, 0.5), doc="brightness multiplier after the gamma"),
        "shot_noise": ParamSpec(0.004, (0.0, 0.1), (0.001, 0.01), log=True,
                                doc="signal-dependent noise variance per unit intensity (Poisson-like)"),
        "read_noise": ParamSpec(0.01, (0.0, 0.2), (0.002, 0.02), log=True, doc="signal-independent noise std"),
    },
    "rain": {
        "density": ParamSpec(0.006, (0.0, 0.2), (0.002, 0.015), doc="fraction of pixels that start a streak"),
        "length": ParamSpec(20.0, (1.0, 201.0), (10.0, 40.0), doc="streak length in pixels"),
        "angle": ParamSpec(-10.0, (-80.0, 80.0), (-30.0, 30.0), doc="streak tilt in degrees from vertical"),
        "width": ParamSpec(0.6, (0.0, 5.0), (0.3, 1.0), doc="Gaussian softening of streaks across, in pixels"),
        "intensity": ParamSpec(0.6, (0.0, 1.0), (0.3, 0.8), doc="streak brightness added to the image"),
    },
    "snow": {
        "density": ParamSpec(0.003, (0.0, 0.1), (0.0005, 0.005), log=True, doc="fraction of pixels holding a flake"),
        "flake_size": ParamSpec(2.5, (0.5, 20.0), (1.5, 4.0), doc="radius of the largest flakes in pixels"),
        "opacity": ParamSpec(0.9, (0.0, 1.0), (0.5, 1.0), doc="maximum flake opacity (each flake draws its own below this)"),
        "motion_length": ParamSpec(0.0, (0.0, 101.0), (0.0, 12.0), doc="motion blur of the flakes in pixels; 0 = none"),
        "angle": ParamSpec(-60.0, (-360.0, 360.0), (-120.0, -60.0),
                           doc="flake motion direction in degrees, 0 = horizontal, -90 = straight down"),
    },
}


# --------------------------------------------------------------------------------------------
# Helpers: inputs, seeds, convolution
# --------------------------------------------------------------------------------------------

def _as_batch(image: torch.Tensor, fn: str) -> tuple[torch.Tensor, bool]:
    """Validate ``image`` and return it as float32 ``[B, 3, H, W]`` plus "was unbatched"."""
    if not isinstance(image, torch.Tensor):
        raise InputError(f"{fn}: expected a torch tensor image, got {type(image).__name__}.")
    if image.ndim not in (3, 4) or image.shape[-3] != 3:
        raise InputError(f"{fn}: expected an image [3, H, W] or a batch [B, 3, H, W], got shape {tuple(image.shape)}.")
    if not image.is_floating_point():
        raise InputError(f"{fn}: expected a float image with values 0..1, got dtype {image.dtype} "
                         "(convert with vbridge_core.images.to_rgb_tensor).")
    if image.numel() == 0:
        raise InputError(f"{fn}: image is empty (shape {tuple(image.shape)}).")
    single = image.ndim == 3
    x = image.unsqueeze(0) if single else image
    return x.to(torch.float32), single


def _finish(y: torch.Tensor, like: torch.Tensor, single: bool) -> torch.Tensor:
    y = y.clamp(0.0, 1.0).to(like.dtype)
    return y[0] if single else y


def _generator(seed: SeedLike, device: torch.device, fn: str) -> torch.Generator:
    if isinstance(seed, torch.Generator):
        return seed
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise InputError(f"{fn}: seed must be an int or a torch.Generator, got {seed!r}.")
    g = torch.Generator(device=device)
    g.manual_seed(int(seed) % (2 ** 63))
    return g


def _rand(shape: Sequence[int], gen: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(tuple(shape), generator=gen, device=gen.device).to(device)


def _randn(shape: Sequence[int], gen: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.randn(tuple(shape), generator=gen, device=gen.device).to(device)


def derive_seed(seed: SeedLike, *keys: object) -> int:
    """A 63-bit seed derived from ``seed`` and ``keys`` (stable across runs and platforms).

    Used to give each chain step / frame / file its own reproducible stream. A generator seed is
    advanced by one draw (the keys are then mixed in).
    """
    if isinstance(seed, torch.Generator):
        base = int(torch.randint(0, 2 ** 62, (1,), generator=seed, device=seed.device).item())
    elif isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise InputError(f"seed must be an int or a torch.Generator, got {seed!r}.")
    else:
        base = int(seed)
    h = hashlib.blake2b(repr((base, *map(str, keys))).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


def _check_param_names(fn: str, given: Mapping[str, Any]) -> None:
    unknown = sorted(set(given) - set(PARAMS[fn]))
    if unknown:
        raise InputError(f"{fn}: unknown parameter(s) {', '.join(unknown)}; it takes {', '.join(PARAMS[fn])}.")


def _params(fn: str, given: Mapping[str, Any]) -> dict[str, Any]:
    specs = PARAMS[fn]
    _check_param_names(fn, given)
    return {k: specs[k].check(fn, k, given.get(k, specs[k].default)) for k in specs}


def _filter(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Correlate every channel of ``x`` [B, C, H, W] with a 2-D ``kernel`` [kh, kw] (odd sizes).

    Borders are replicated (works for any image size, no dark rims). Large kernels go through an
    FFT, small ones through ``conv2d``.
    """
    kh, kw = kernel.shape
    b, c, h, w = x.shape
    xp = F.pad(x, (kw // 2, kw // 2, kh // 2, kh // 2), mode="replicate")
    kernel = kernel.to(device=x.device, dtype=x.dtype)
    if kh * kw < _FFT_MIN_TAPS:
        return F.conv2d(xp.reshape(b * c, 1, *xp.shape[-2:]), kernel[None, None]).reshape(b, c, h, w)
    ph, pw = xp.shape[-2:]
    # correlation = convolution with the flipped kernel; the valid part starts at (kh-1, kw-1)
    spec = torch.fft.rfft2(xp) * torch.fft.rfft2(kernel.flip(0, 1), s=(ph, pw))
    full = torch.fft.irfft2(spec, s=(ph, pw))
    return full[..., kh - 1:kh - 1 + h, kw - 1:kw - 1 + w].contiguous()


def _gaussian_1d(sigma: float, device: torch.device) -> torch.Tensor:
    r = max(1, math.ceil(3.0 * sigma))
    t = torch.arange(-r, r + 1, device=device, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def _gaussian_filter(x: torch.Tensor, sigma: float) -> torch.Tensor:
    if sigma <= 0:
        return x
    k = _gaussian_1d(sigma, x.device)
    x = _filter(x, k[None, :])
    return _filter(x, k[:, None])


def _disk_kernel(radius: float, device: torch.device) -> torch.Tensor:
    """Anti-aliased disk of ``radius`` (pixel weight = coverage ramp over the last pixel), sum 1."""
    r = math.ceil(radius + 0.5)
    t = torch.arange(-r, r + 1, device=device, dtype=torch.float32)
    d = torch.sqrt(t[:, None] ** 2 + t[None, :] ** 2)
    k = (radius + 0.5 - d).clamp(0.0, 1.0)
    return k / k.sum()


def _line_kernel(length: float, angle_deg: float, device: torch.device, normalise: bool = True) -> torch.Tensor:
    """A line segment of ``length`` pixels through the centre at ``angle_deg`` (0 = horizontal,
    counter-clockwise as seen on screen, i.e. positive angles point up), anti-aliased by the
    distance to the segment. Normalised to sum 1, or (``normalise=False``) to a peak of 1."""
    half = max(0.0, length / 2.0)
    r = math.ceil(half) + 1
    t = torch.arange(-r, r + 1, device=device, dtype=torch.float32)
    yy, xx = t[:, None], t[None, :]
    a = math.radians(angle_deg)
    dx, dy = math.cos(a), -math.sin(a)  # image rows grow downwards
    along = (xx * dx + yy * dy).clamp(-half, half)
    dist = torch.sqrt((xx - along * dx) ** 2 + (yy - along * dy) ** 2)
    k = (1.0 - dist).clamp(min=0.0)
    return k / k.sum() if normalise else k / k.max()


# --------------------------------------------------------------------------------------------
# Degradations
# --------------------------------------------------------------------------------------------

def gaussian_noise(image: torch.Tensor, seed: SeedLike = 0, sigma: float = 25 / 255) -> torch.Tensor:
    """Add white Gaussian noise (independent per pixel and channel), then clip to ``0..1``.

    ``sigma``: standard deviation on the 0..1 scale; valid 0..1, sampled 5/255..50/255 (the
    denoising benchmarks use 15, 25 and 50 /255).
    """
    x, single = _as_batch(image, "gaussian_noise")
    p = _params("gaussian_noise", {"sigma": sigma})
    g = _generator(seed, x.device, "gaussian_noise")
    return _finish(x + p["sigma"] * _randn(x.shape, g, x.device), image, single)


def poisson_noise(image: torch.Tensor, seed: SeedLike = 0, peak: float = 30.0) -> torch.Tensor:
    """Photon (shot) noise: ``Poisson(x * peak) / peak``; brighter pixels get more absolute noise.

    ``peak``: photon count of a white pixel; valid 0.1..1e5, sampled log-uniformly 5..100 (5 is
    very noisy, 100 mild).
    """
    x, single = _as_batch(image, "poisson_noise")
    p = _params("poisson_noise", {"peak": peak})
    g = _generator(seed, x.device, "poisson_noise")
    lam = (x.clamp(0.0, 1.0) * p["peak"]).to(g.device)
    y = torch.poisson(lam, generator=g).to(x.device) / p["peak"]
    return _finish(y, image, single)


def gaussian_blur(image: torch.Tensor, seed: SeedLike = 0, sigma: float = 2.0) -> torch.Tensor:
    """Isotropic Gaussian blur (separable, kernel radius ``ceil(3 sigma)``, replicated borders).

    ``sigma``: pixels; valid 0..30 (0 = unchanged), sampled 0.5..4. ``seed`` is ignored.
    """
    x, single = _as_batch(image, "gaussian_blur")
    p = _params("gaussian_blur", {"sigma": sigma})
    return _finish(_gaussian_filter(x, p["sigma"]), image, single)


def defocus_blur(image: torch.Tensor, seed: SeedLike = 0, radius: float = 4.0) -> torch.Tensor:
    """Out-of-focus blur: convolution with an anti-aliased disk (the lens' circle of confusion).

    ``radius``: pixels; valid 0..50 (0 = unchanged), sampled 1.5..8. ``seed`` is ignored.
    """
    x, single = _as_batch(image, "defocus_blur")
    p = _params("defocus_blur", {"radius": radius})
    if p["radius"] <= 0:
        return _finish(x, image, single)
    return _finish(_filter(x, _disk_kernel(p["radius"], x.device)), image, single)


def motion_blur(image: torch.Tensor, seed: SeedLike = 0, length: float = 15.0, angle: float = 0.0) -> torch.Tensor:
    """Linear camera-shake blur: convolution with a normalised anti-aliased line kernel.

    ``length``: blur path in pixels; valid 0..201 (0 = unchanged), sampled 5..31.
    ``angle``: degrees, 0 = horizontal, counter-clockwise; valid -360..360, sampled 0..180.
    ``seed`` is ignored.
    """
    x, single = _as_batch(image, "motion_blur")
    p = _params("motion_blur", {"length": length, "angle": angle})
    if p["length"] <= 0:
        return _finish(x, image, single)
    return _finish(_filter(x, _line_kernel(p["length"], p["angle"], x.device)), image, single)


def jpeg(image: torch.Tensor, seed: SeedLike = 0, quality: int = 30) -> torch.Tensor:
    """JPEG compression artefacts: encode/decode each image in memory with PIL (4:2:0 chroma).

    ``quality``: PIL quality, whole number; valid 1..100, sampled 10..95. The image is rounded to
    8 bits first (JPEG is an 8-bit format), so even quality 100 is not lossless. ``seed`` is
    ignored. The only degradation that leaves the device (PIL runs on the CPU).
    """
    from PIL import Image

    x, single = _as_batch(image, "jpeg")
    p = _params("jpeg", {"quality": quality})
    q8 = (x.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = []
    for arr in q8:
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(arr), mode="RGB").save(buf, format="JPEG", quality=p["quality"])
        buf.seek(0)
        with Image.open(buf) as im:
            out.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
    y = torch.from_numpy(np.stack(out)).to(x.device).permute(0, 3, 1, 2).to(torch.float32) / 255.0
    return _finish(y, image, single)


def _smooth_field(b: int, h: int, w: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """Smooth random field [B, 1, H, W] in 0..1: a coarse uniform grid upsampled bicubically."""
    cells = 4
    gh = max(2, round(cells * h / max(h, w))) + 1
    gw = max(2, round(cells * w / max(h, w))) + 1
    coarse = _rand((b, 1, gh, gw), gen, device)
    f = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True)
    lo = f.amin(dim=(-2, -1), keepdim=True)
    hi = f.amax(dim=(-2, -1), keepdim=True)
    return (f - lo) / (hi - lo).clamp(min=1e-6)


def haze(image: torch.Tensor, seed: SeedLike = 0, beta: float = 1.5, airlight: float = 0.85,
         depth: str = "random") -> torch.Tensor:
    """Haze/fog by the atmospheric scattering model ``I = J * t + A * (1 - t)``, ``t = exp(-beta * d)``.

    ``d`` is a relative depth in ``0..1``: ``depth="random"`` draws a smooth random field (seeded,
    one per image), ``"gradient"`` is a vertical ramp (top of the image far, bottom near, as in
    most outdoor photos). ``beta``: valid 0..10, sampled 0.5..2.5 (higher = denser haze).
    ``airlight`` A: gray level of the haze, valid 0..1, sampled 0.7..1.0.
    """
    x, single = _as_batch(image, "haze")
    p = _params("haze", {"beta": beta, "airlight": airlight, "depth": depth})
    b, _, h, w = x.shape
    if p["depth"] == "gradient":
        d = torch.linspace(1.0, 0.0, h, device=x.device)[None, None, :, None].expand(b, 1, h, w)
    else:
        d = _smooth_field(b, h, w, _generator(seed, x.device, "haze"), x.device)
    t = torch.exp(-p["beta"] * d)
    return _finish(x * t + p["airlight"] * (1.0 - t), image, single)


def low_light(image: torch.Tensor, seed: SeedLike = 0, gamma: float = 2.0, scale: float = 0.3,
              shot_noise: float = 0.004, read_noise: float = 0.01) -> torch.Tensor:
    """Under-exposure: ``y = scale * x ** gamma`` plus signal-dependent sensor noise.

    The noise is the usual heteroscedastic Gaussian model of a camera sensor: variance
    ``shot_noise * y + read_noise ** 2``. ``gamma``: valid 1..5, sampled 1.5..3.5; ``scale``:
    valid 0.01..1, sampled 0.1..0.5; ``shot_noise``: valid 0..0.1, sampled 0.001..0.01
    (log-uniform); ``read_noise``: valid 0..0.2, sampled 0.002..0.02 (log-uniform).
    """
    x, single = _as_batch(image, "low_light")
    p = _params("low_light", {"gamma": gamma, "scale": scale, "shot_noise": shot_noise, "read_noise": read_noise})
    y = p["scale"] * x.clamp(0.0, 1.0) ** p["gamma"]
    std = torch.sqrt(p["shot_noise"] * y + p["read_noise"] ** 2)
    g = _generator(seed, x.device, "low_light")
    return _finish(y + std * _randn(x.shape, g, x.device), image, single)


def rain(image: torch.Tensor, seed: SeedLike = 0, density: float = 0.006, length: float = 20.0,
         angle: float = -10.0, width: float = 0.6, intensity: float = 0.6) -> torch.Tensor:
    """Rain streaks: random seed points stretched into thin lines along one direction, added.

    A sparse map of seed points (each pixel starts a streak with probability ``density``, with a
    random brightness in 0.5..1) is convolved with a line kernel of ``length`` pixels at
    ``angle`` degrees from vertical (positive = top leaning right), softened across by a Gaussian
    of ``width`` and along by a short motion blur, then ``intensity * streaks`` is added to every
    channel (rain is achromatic) and the result clipped. Ranges: ``density`` 0..0.2 (sampled
    0.002..0.015), ``length`` 1..201 (10..40), ``angle`` -80..80 (-30..30), ``width`` 0..5
    (0.3..1), ``intensity`` 0..1 (0.3..0.8).
    """
    x, single = _as_batch(image, "rain")
    p = _params("rain", {"density": density, "length": length, "angle": angle, "width": width,
                         "intensity": intensity})
    b, _, h, w = x.shape
    g = _generator(seed, x.device, "rain")
    u = _rand((b, 1, h, w), g, x.device)
    v = _rand((b, 1, h, w), g, x.device)
    seeds = torch.where(u < p["density"], 0.5 + 0.5 * v, torch.zeros_like(v))
    direction = 90.0 - p["angle"]  # from vertical (clockwise lean) to the kernel's angle convention
    streaks = _filter(seeds, _line_kernel(p["length"], direction, x.device, normalise=False)).clamp(0.0, 1.0)
    streaks = _gaussian_filter(streaks, p["width"])
    streaks = _filter(streaks, _line_kernel(max(2.0, p["length"] / 4), direction, x.device))
    return _finish(x + p["intensity"] * streaks.clamp(0.0, 1.0), image, single)


def snow(image: torch.Tensor, seed: SeedLike = 0, density: float = 0.003, flake_size: float = 2.5,
         opacity: float = 0.9, motion_length: float = 0.0, angle: float = -60.0) -> torch.Tensor:
    """Snowfall: white flakes of three sizes and random opacity, screen-blended over the image.

    Flakes are seed points (probability ``density`` per pixel, split 60/30/10 % between small,
    medium and large flakes of radius 0.35, 0.65 and 1.0 x ``flake_size``) drawn as soft disks
    with a per-flake opacity in ``opacity/2..opacity``; optionally motion-blurred by
    ``motion_length`` pixels towards ``angle`` degrees (0 = horizontal, -90 = falling straight).
    Screen blend ``1 - (1 - I) * (1 - S)`` only ever brightens. Ranges: ``density`` 0..0.1
    (sampled 0.0005..0.005, log-uniform), ``flake_size`` 0.5..20 (1.5..4), ``opacity`` 0..1
    (0.5..1), ``motion_length`` 0..101 (0..12), ``angle`` -360..360 (-120..-60).
    """
    x, single = _as_batch(image, "snow")
    p = _params("snow", {"density": density, "flake_size": flake_size, "opacity": opacity,
                         "motion_length": motion_length, "angle": angle})
    b, _, h, w = x.shape
    g = _generator(seed, x.device, "snow")
    layer = torch.zeros((b, 1, h, w), device=x.device)
    for share, rel in ((0.6, 0.35), (0.3, 0.65), (0.1, 1.0)):
        u = _rand((b, 1, h, w), g, x.device)
        v = _rand((b, 1, h, w), g, x.device)
        pts = torch.where(u < p["density"] * share, p["opacity"] * (0.5 + 0.5 * v), torch.zeros_like(v))
        disk = _disk_kernel(max(0.5, rel * p["flake_size"]), x.device)
        flakes = _filter(pts, disk / disk.max())
        layer = torch.maximum(layer, flakes.clamp(0.0, 1.0))
    if p["motion_length"] > 0:
        layer = _filter(layer, _line_kernel(p["motion_length"], p["angle"], x.device))
    s = layer.clamp(0.0, 1.0)
    return _finish(1.0 - (1.0 - x) * (1.0 - s), image, single)


#: Degradation name -> function ``fn(image, seed=0, **params)``; :data:`PARAMS` holds the parameters.
DEGRADATIONS: dict[str, Callable[..., torch.Tensor]] = {
    "gaussian_noise": gaussian_noise,
    "poisson_noise": poisson_noise,
    "gaussian_blur": gaussian_blur,
    "defocus_blur": defocus_blur,
    "motion_blur": motion_blur,
    "jpeg": jpeg,
    "haze": haze,
    "low_light": low_light,
    "rain": rain,
    "snow": snow,
}


# --------------------------------------------------------------------------------------------
# Registry helpers
# --------------------------------------------------------------------------------------------

def _check_name(name: Any) -> str:
    if not isinstance(name, str) or name not in DEGRADATIONS:
        raise InputError(f"unknown degradation {name!r}; choose from {', '.join(DEGRADATIONS)}.")
    return name


def degrade(image: torch.Tensor, name_or_list: str | Sequence[str], seed: SeedLike = 0,
            **params: Any) -> torch.Tensor:
    """Apply one degradation by name, or a chain of them in order.

    One name: ``params`` are that degradation's parameters, e.g.
    ``degrade(x, "gaussian_noise", 3, sigma=0.1)``. A list: ``params`` maps names in the chain to
    dicts of their parameters, e.g. ``degrade(x, ["gaussian_blur", "jpeg"], 3, jpeg={"quality": 20})``;
    each step gets its own seed derived from ``seed`` and the step index. Unknown names raise
    :class:`InputError` listing the valid ones.
    """
    if isinstance(name_or_list, str):
        name = _check_name(name_or_list)
        _check_param_names(name, params)
        return DEGRADATIONS[name](image, seed, **params)
    names = [_check_name(n) for n in name_or_list]
    if not names:
        raise InputError(f"no degradation given; choose from {', '.join(DEGRADATIONS)}.")
    stray = sorted(set(params) - set(names))
    if stray:
        raise InputError(f"degrade: parameters for a chain are given per name (e.g. jpeg={{'quality': 20}}); "
                         f"{', '.join(stray)} is not a degradation in the chain {names}.")
    out = image
    for i, n in enumerate(names):
        step_params = params.get(n, {})
        if not isinstance(step_params, Mapping):
            raise InputError(f"degrade: parameters for {n} must be a dict, got {step_params!r}.")
        _check_param_names(n, step_params)
        out = DEGRADATIONS[n](out, derive_seed(seed, "chain", i) if not isinstance(seed, torch.Generator) else seed,
                              **step_params)
    return out


def _draw(spec: ParamSpec, gen: torch.Generator) -> Any:
    u = float(torch.rand((1,), generator=gen, device=gen.device).item())
    if spec.choices is not None:
        return spec.choices[min(int(u * len(spec.choices)), len(spec.choices) - 1)]
    lo, hi = spec.sample  # type: ignore[misc]
    if spec.integer:
        return int(min(hi, math.floor(lo + u * (hi - lo + 1))))
    if spec.log and lo > 0:
        return float(math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo))))
    return float(lo + u * (hi - lo))


def random_degradation(image: torch.Tensor, seed: SeedLike = 0, names: Sequence[str] | None = None,
                       fixed: Mapping[str, Any] | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """Pick a degradation (uniformly from ``names``, default all) and draw its parameters.

    Parameters are drawn from the ``sample`` ranges in :data:`PARAMS` (documented on each
    function); ``fixed`` overrides some of them (it must only name parameters of the chosen
    degradation, so pass it with a single name). Returns ``(degraded, info)`` where ``info`` is
    ``{"name": str, "params": dict, "seed": int}``; ``degrade(image, info["name"], info["seed"],
    **info["params"])`` reproduces the output exactly.
    """
    pool = list(DEGRADATIONS) if names is None else [_check_name(n) for n in names]
    if not pool:
        raise InputError(f"random_degradation: names is empty; choose from {', '.join(DEGRADATIONS)}.")
    pgen = torch.Generator().manual_seed(derive_seed(seed, "random_degradation"))
    name = pool[min(int(torch.rand((1,), generator=pgen).item() * len(pool)), len(pool) - 1)]
    params = {k: _draw(spec, pgen) for k, spec in PARAMS[name].items()}
    for k, v in (fixed or {}).items():
        if k not in PARAMS[name]:
            raise InputError(f"random_degradation: {name} has no parameter {k!r}; it takes {', '.join(PARAMS[name])}.")
        params[k] = v
    apply_seed = int(torch.randint(0, 2 ** 62, (1,), generator=pgen).item())
    out = degrade(image, name, apply_seed, **params)
    info = {"name": name, "params": params, "seed": apply_seed}
    log.debug("random degradation %s", info)
    return out, info


def degrade_sequence(frames: torch.Tensor, name: str | Sequence[str], seed: SeedLike = 0,
                     redraw_per_frame: bool = True, **params: Any) -> torch.Tensor:
    """Degrade video frames ``[T, 3, H, W]`` with fixed parameters, re-drawing the random pattern.

    Every frame gets the same degradation and parameters; with ``redraw_per_frame`` (default) each
    frame has its own noise/streak/flake/haze-field pattern (seed derived from ``seed`` and the
    frame index), so the sequence flickers the way a real degraded video does; with ``False``
    every frame uses the frame-0 pattern. Deterministic degradations (blurs, JPEG) give no
    flicker either way. ``name`` and ``params`` as in :func:`degrade`.
    """
    if not isinstance(frames, torch.Tensor) or frames.ndim != 4:
        shape = tuple(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__
        raise InputError(f"degrade_sequence: expected frames [T, 3, H, W], got {shape}.")
    if frames.shape[0] == 0:
        raise InputError("degrade_sequence: no frames (T = 0).")
    base = derive_seed(seed, "sequence")
    out = [degrade(frames[t], name, derive_seed(base, "frame", t if redraw_per_frame else 0), **params)
           for t in range(frames.shape[0])]
    return torch.stack(out)


# --------------------------------------------------------------------------------------------
# Pair folders
# --------------------------------------------------------------------------------------------

def make_pairs(clean_folder: str | os.PathLike, out_folder: str | os.PathLike, names: Sequence[str],
               seed: int = 0, per_image: int = 1,
               params: Mapping[str, Mapping[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Write few-shot pairs: ``out_folder/<name>/lq/<stem>.png`` and ``.../hq/<stem>.png``.

    Every image directly in ``clean_folder`` (``.png .jpg .jpeg .webp .bmp .tif .tiff``) is
    loaded (:func:`~vbridge_core.images.load_image`) and, for each degradation name (one task
    folder each), degraded ``per_image`` times with parameters drawn by
    :func:`random_degradation` (``params[name]`` fixes some of them). With ``per_image > 1`` the
    stems get ``_0``, ``_1``, ... suffixes and the clean image is written under each stem, so
    ``lq/`` and ``hq/`` always match. The seed of each pair depends only on ``seed``, the task,
    the stem and the index, so adding photos does not change the other pairs. PNGs (8-bit) and
    the per-task ``degradations.json`` (the drawn parameters) are written atomically: nothing
    half-written is left under a final name. Returns the records also written to the JSON files.
    """
    from .fileio import write_json_atomic
    from .images import load_image, save_png

    src = Path(clean_folder)
    if not src.is_dir():
        raise InputError(f"pairs from clean photos: clean folder {src} not found or not a folder.")
    tasks = [_check_name(n) for n in ([names] if isinstance(names, str) else names)]
    if not tasks:
        raise InputError(f"pairs from clean photos: no degradation names given; choose from {', '.join(DEGRADATIONS)}.")
    if len(set(tasks)) != len(tasks):
        raise InputError(f"pairs from clean photos: degradation names repeat in {tasks}; each one is a task folder.")
    if isinstance(per_image, bool) or not isinstance(per_image, int) or per_image < 1:
        raise InputError(f"pairs from clean photos: per_image must be a whole number >= 1, got {per_image!r}.")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise InputError(f"pairs from clean photos: seed must be an int, got {seed!r}.")
    for k in (params or {}):
        if k not in tasks:
            raise InputError(f"pairs from clean photos: params given for {k!r}, which is not among the names {tasks}.")
    files = sorted(p for p in src.iterdir()
                   if p.is_file() and p.suffix.lower() in _IMAGE_EXTS and not p.name.startswith("."))
    if not files:
        raise InputError(f"pairs from clean photos: no images ({', '.join(_IMAGE_EXTS)}) in {src}.")
    stems: dict[str, Path] = {}
    for f in files:
        if f.stem in stems:
            raise InputError(f"pairs from clean photos: {stems[f.stem].name} and {f.name} share the stem {f.stem!r}; "
                             "rename one so the pair names stay unique.")
        stems[f.stem] = f

    out_root = Path(out_folder)
    records: list[dict[str, Any]] = []
    for task in tasks:
        task_records = []
        for stem, f in stems.items():
            clean = load_image(f)
            for k in range(per_image):
                out_stem = stem if per_image == 1 else f"{stem}_{k}"
                lq, info = random_degradation(clean, derive_seed(int(seed), task, stem, k), names=[task],
                                              fixed=(params or {}).get(task))
                save_png(clean, out_root / task / "hq" / f"{out_stem}.png")
                save_png(lq, out_root / task / "lq" / f"{out_stem}.png")
                rec = {"task": task, "stem": out_stem, "source": f.name, **info}
                task_records.append(rec)
                log.info("pair %s/%s from %s: %s %s", task, out_stem, f.name, task, info["params"])
        write_json_atomic(out_root / task / "degradations.json", task_records)
        records += task_records
    return records
