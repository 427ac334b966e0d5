"""Regenerate the demo sample pairs in ``samples/<task>/{lq,hq}/<name>.png``.

Usage: ``python vbridge_core/assets/make_samples.py [--out DIR] [--size 64]``

The high-quality (HQ) images are drawn procedurally from a fixed seed -- a smooth colour gradient,
a few anti-aliased shapes and a light texture -- so they are original, public-domain content by
construction. The low-quality (LQ) images are degraded copies:

* ``denoise``: HQ + Gaussian noise, sigma 25/255, seeded, clipped and rounded to 8 bits;
* ``deblur``: HQ blurred with a Gaussian of sigma 1.5 (11 taps, mirrored borders), rounded.

Only numpy and Pillow are needed; the output is deterministic (``numpy.random.RandomState`` is a
frozen stream). The PNG bytes may differ between zlib builds, the pixel values do not.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger("make_samples")

TASKS = {
    "denoise": ["shapes", "rings", "tiles"],
    "deblur": ["stripes", "blobs", "mosaic"],
}
NOISE_SIGMA = 25.0 / 255.0
BLUR_SIGMA = 1.5
SUPERSAMPLE = 4


def _gradient(rs: np.random.RandomState, n: int) -> np.ndarray:
    """Bilinear blend of four random corner colours: [n, n, 3] in 0..1."""
    corners = rs.uniform(0.15, 0.85, size=(2, 2, 3))
    t = np.linspace(0.0, 1.0, n)[:, None, None]
    top = corners[0, 0] * (1 - t) + corners[0, 1] * t
    bottom = corners[1, 0] * (1 - t) + corners[1, 1] * t
    return top[None, :, 0, :] * (1 - t) + bottom[None, :, 0, :] * t


def _draw_shapes(rs: np.random.RandomState, img: np.ndarray, count: int, kinds: tuple[str, ...]) -> None:
    n = img.shape[0]
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float64) / n
    for _ in range(count):
        kind = kinds[rs.randint(len(kinds))]
        colour = rs.uniform(0.0, 1.0, size=3)
        cx, cy = rs.uniform(0.2, 0.8, size=2)
        r = rs.uniform(0.1, 0.28)
        if kind == "circle":
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
        elif kind == "ring":
            d = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
            mask = (d <= r) & (d >= 0.6 * r)
        elif kind == "rect":
            mask = (np.abs(xx - cx) <= r) & (np.abs(yy - cy) <= 0.7 * r)
        else:  # triangle
            mask = (yy - cy <= r) & (yy - cy >= -r + 2 * np.abs(xx - cx))
        img[mask] = colour


def _texture(rs: np.random.RandomState, n: int, kind: str) -> np.ndarray:
    """Low-amplitude texture [n, n, 1] around 0."""
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float64) / n
    if kind == "stripes":
        f, a = rs.uniform(10, 18), rs.uniform(0, np.pi)
        return 0.08 * np.sin(2 * np.pi * f * (xx * np.cos(a) + yy * np.sin(a)))[..., None]
    coarse = rs.uniform(-1, 1, size=(9, 9))  # value noise: coarse grid, bilinear upsampling
    g = np.linspace(0, 8, n)
    i0 = np.minimum(g.astype(int), 7)
    fr = g - i0
    rows = coarse[i0] * (1 - fr)[:, None] + coarse[i0 + 1] * fr[:, None]
    vals = rows[:, i0] * (1 - fr)[None, :] + rows[:, i0 + 1] * fr[None, :]
    return 0.06 * vals[..., None]


def make_hq(name: str, seed: int, size: int = 64) -> np.ndarray:
    """One HQ image as uint8 [size, size, 3]; ``name`` picks the composition."""
    rs = np.random.RandomState(seed)
    big = size * SUPERSAMPLE
    img = _gradient(rs, big)
    kinds = {
        "shapes": ("circle", "rect", "triangle"),
        "rings": ("ring", "circle"),
        "tiles": ("rect",),
        "stripes": ("circle", "triangle"),
        "blobs": ("circle",),
        "mosaic": ("rect", "triangle", "ring"),
    }[name]
    _draw_shapes(rs, img, count=3 + rs.randint(3), kinds=kinds)
    img = img.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, 3).mean(axis=(1, 3))  # anti-aliasing
    img = img + _texture(rs, size, "stripes" if name in ("stripes", "tiles") else "noise")
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


def add_noise(hq: np.ndarray, seed: int, sigma: float = NOISE_SIGMA) -> np.ndarray:
    rs = np.random.RandomState(seed)
    noisy = hq.astype(np.float64) / 255.0 + rs.normal(0.0, sigma, size=hq.shape)
    return np.clip(np.rint(noisy * 255.0), 0, 255).astype(np.uint8)


def gaussian_blur(hq: np.ndarray, sigma: float = BLUR_SIGMA) -> np.ndarray:
    radius = int(np.ceil(3 * sigma))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-(x ** 2) / (2 * sigma ** 2))
    k /= k.sum()
    img = hq.astype(np.float64)
    for axis in (0, 1):  # separable, mirrored ("reflect") borders
        pad = [(0, 0)] * 3
        pad[axis] = (radius, radius)
        p = np.pad(img, pad, mode="reflect")
        n = img.shape[axis]
        img = sum(k[i] * np.take(p, np.arange(i, i + n), axis=axis) for i in range(len(k)))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def generate(out: Path, size: int = 64) -> list[Path]:
    written = []
    seed = 2026
    for task, names in TASKS.items():
        for name in names:
            seed += 1
            hq = make_hq(name, seed, size)
            lq = add_noise(hq, seed + 1000) if task == "denoise" else gaussian_blur(hq)
            for kind, arr in (("hq", hq), ("lq", lq)):
                path = out / task / kind / f"{name}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr, mode="RGB").save(path, format="PNG", optimize=True)
                written.append(path)
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "samples")
    ap.add_argument("--size", type=int, default=64)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    paths = generate(args.out, args.size)
    log.info("wrote %d images under %s (%d bytes)", len(paths), args.out, sum(p.stat().st_size for p in paths))


if __name__ == "__main__":
    main()
