"""Training and evaluation data for the perceiver: clean photos, degraded by :mod:`vbridge_core.degrade`.

Clean sources: scikit-image's bundled sample photos (shipped inside the ``scikit-image`` wheel,
no download), the pack's own procedural samples (``vbridge_core/assets/samples/*/hq``) and seeded
procedural scenes (:func:`procedural_photos`). Images
that are themselves degraded (``clock_motion`` is motion-blurred, ``hubble_deep_field`` is a dark
JPEG) or not photos (``horse`` is binary, ``logo`` has an alpha cut-out) are left out. The photos
are split into a training set and a held-out set (:data:`HELD_OUT_PHOTOS`) that the benchmark
reports on.

A sample is a random crop (random scale, size, flip and mild exposure / contrast / colour change) that stays clean (25 %), gets one
degradation (50 %) or a mixture of two or three families (25 %), applied in the physical order
blur -> haze -> low light -> rain/snow -> noise -> JPEG with parameters drawn by
:func:`vbridge_core.degrade.random_degradation` from the realistic ``sample`` ranges.
"""
from __future__ import annotations

import colorsys
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError
from .labels import FAMILIES, combined_severity, family_of, severity_of

logger = logging.getLogger(__name__)

#: scikit-image sample files used as clean photos (all ship inside the wheel).
SKIMAGE_PHOTOS: tuple[str, ...] = (
    "astronaut.png", "chelsea.png", "coffee.png", "ihc.png", "motorcycle_left.png", "motorcycle_right.png",
    "retina.jpg", "rocket.jpg", "brick.png", "camera.png", "cell.png", "coins.png", "grass.png", "gravel.png",
    "microaneurysms.png", "moon.png", "page.png", "text.png", "color.png",
)
#: Photos kept out of training (the benchmark's held-out set).
HELD_OUT_PHOTOS: tuple[str, ...] = ("coffee.png", "rocket.jpg", "camera.png", "gravel.png")

#: Family -> the degrade names it draws from.
FAMILY_NAMES: dict[str, tuple[str, ...]] = {
    "noise": ("gaussian_noise", "poisson_noise"),
    "blur": ("gaussian_blur", "defocus_blur", "motion_blur"),
    "jpeg": ("jpeg",), "haze": ("haze",), "low_light": ("low_light",), "rain": ("rain",), "snow": ("snow",),
}
#: Application order of a mixture (a camera blurs, the atmosphere hazes, the sensor adds noise, the codec compresses).
APPLY_ORDER: tuple[str, ...] = ("blur", "haze", "low_light", "rain", "snow", "noise", "jpeg")


def clean_photos(split: str = "train") -> list[tuple[str, torch.Tensor]]:
    """Clean photos ``[(name, [3, H, W])]``: ``split`` is ``"train"``, ``"held_out"`` or ``"all"``.

    Training adds the pack's procedural samples. Needs scikit-image (in requirements.txt).
    """
    from ..images import load_image

    try:
        import skimage.data
    except ImportError:
        raise InputError("training the built-in perceiver needs scikit-image for its bundled photos: "
                         "pip install scikit-image") from None
    if split not in ("train", "held_out", "all"):
        raise InputError(f"split must be train, held_out or all, got {split!r}")
    folder = Path(skimage.data.__file__).parent
    names = [n for n in SKIMAGE_PHOTOS
             if split == "all" or (n in HELD_OUT_PHOTOS) == (split == "held_out")]
    out = [(n, load_image(folder / n)) for n in names if (folder / n).is_file()]
    if split in ("train", "all"):
        samples = Path(__file__).resolve().parents[1] / "assets" / "samples"
        out += [(f"sample:{p.parent.parent.name}/{p.name}", load_image(p)) for p in sorted(samples.glob("*/hq/*.png"))]
        out += procedural_photos(PROCEDURAL_COUNT)
    if not out:
        raise InputError(f"no clean photos found in {folder}")
    return out


def extra_photos(paths: Sequence[str | Path], min_side: int = 128) -> list[tuple[str, torch.Tensor]]:
    """The user's own clean photos for training ``[(name, [3, H, W])]``: image files or folders of them.

    Each must be at least ``min_side`` px on both sides (the largest training crop) and should be truly clean
    (no visible noise, blur, compression, haze, rain or snow): the perceiver learns that what it sees in them
    is ``clean``. Content the bundled photos lack (architecture, fences, water, ...) is what they add."""
    from ..cli_common import collect_inputs
    from ..images import load_image

    out = []
    for f in (f for p in paths for f in collect_inputs([str(p)])):  # one by one: two folders may share file names
        x = load_image(f)
        h, w = x.shape[-2:]
        if min(h, w) < min_side:
            raise InputError(f"photo {f} is {w}x{h} px: its crops need at least {min_side} px on each "
                             "side; use a larger photo or leave it out")
        out.append((f"extra:{f.name}", x))
    return out


#: Procedural clean scenes added to the training photos (:func:`procedural_photos`).
PROCEDURAL_COUNT = 24


def _power_field(rng: np.random.Generator, n: int, exponent: float) -> np.ndarray:
    """A smooth random field [n, n] with amplitude spectrum 1/f**exponent, scaled to 0..1."""
    fy = np.fft.fftfreq(n)[:, None]
    fx = np.fft.rfftfreq(n)[None, :]
    f = np.sqrt(fy ** 2 + fx ** 2)
    f[0, 0] = 1.0
    spec = (rng.normal(size=f.shape) + 1j * rng.normal(size=f.shape)) / f ** exponent
    spec[0, 0] = 0
    x = np.fft.irfft2(spec, s=(n, n))
    return (x - x.min()) / max(1e-8, x.max() - x.min())


def _dead_leaves(rng: np.random.Generator, n: int, rmin: float, rmax: float, gray: bool, bright: float) -> np.ndarray:
    """Occluding shaded disks and rectangles (radius power law rmin..rmax px) on a smooth background [n, n, 3]."""
    img = np.repeat(_power_field(rng, n, 2.0)[..., None], 3, -1) * 0.5 + 0.25
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    count = int(np.clip(3.0 * n * n / (rmin * rmax * np.pi), 30, 2500))
    for _ in range(count):
        r = rmin * (rmax / rmin) ** rng.random() ** 1.5
        cy, cx = rng.uniform(-r, n + r, 2)
        y0, y1, x0, x1 = (max(0, int(cy - r)), min(n, int(cy + r) + 2), max(0, int(cx - r)), min(n, int(cx + r) + 2))
        if y0 >= y1 or x0 >= x1:
            continue
        py, px = yy[y0:y1, x0:x1] - cy, xx[y0:y1, x0:x1] - cx
        if rng.random() < 0.6:
            m = py ** 2 + px ** 2 <= r * r
        else:
            a = rng.uniform(0, np.pi)
            u, v = np.cos(a) * px + np.sin(a) * py, -np.sin(a) * px + np.cos(a) * py
            m = (np.abs(u) <= r) & (np.abs(v) <= r * rng.uniform(0.2, 1.0))
        level = rng.uniform(0.05, bright)
        col = np.full(3, level) if gray else np.clip(level * (1 + rng.uniform(-0.6, 0.6, 3)), 0, 1)
        shade = 1.0 + rng.uniform(-0.35, 0.35) * (py * rng.normal() + px * rng.normal()) / (r * 2)
        img[y0:y1, x0:x1][m] = np.clip(col[None, :] * shade[m][:, None], 0, 1)
    return img


def _segment(img: np.ndarray, p0, p1, width: float, col: np.ndarray) -> None:
    """Draw an anti-aliased straight segment of ``width`` px into ``img`` [n, n, 3] (in place)."""
    n = img.shape[0]
    (y0, x0), (y1, x1) = p0, p1
    ya, yb = int(max(0, min(y0, y1) - width - 1)), int(min(n, max(y0, y1) + width + 2))
    xa, xb = int(max(0, min(x0, x1) - width - 1)), int(min(n, max(x0, x1) + width + 2))
    if ya >= yb or xa >= xb:
        return
    yy, xx = np.mgrid[ya:yb, xa:xb].astype(np.float32)
    dy, dx = y1 - y0, x1 - x0
    t = np.clip(((yy - y0) * dy + (xx - x0) * dx) / max(1e-6, dy * dy + dx * dx), 0, 1)
    d = np.hypot(yy - (y0 + t * dy), xx - (x0 + t * dx))
    a = np.clip(width / 2 + 0.5 - d, 0, 1)[..., None]
    img[ya:yb, xa:xb] = img[ya:yb, xa:xb] * (1 - a) + col * a


def _lines_scene(rng: np.random.Generator, n: int) -> np.ndarray:
    """Thin structures that are not rain: a tiled wall (mortar lines) or many long thin bright and dark lines and
    curves (wires, whiskers, grass blades, masts) in every direction over a textured background."""
    base = _power_field(rng, n, rng.uniform(1.2, 2.0))[..., None] * rng.uniform(0.2, 0.5) + rng.uniform(0.1, 0.5)
    img = np.clip(base * (1 + rng.uniform(-0.4, 0.4, 3)), 0, 1).astype(np.float32)
    if rng.random() < 0.5:  # tiles / bricks: a regular grid of light or dark joints at a random angle
        a = rng.uniform(-0.5, 0.5) + (np.pi / 2 if rng.random() < 0.5 else 0)
        bw, bh = rng.uniform(30, 120), rng.uniform(14, 50)
        yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
        u, v = np.cos(a) * xx + np.sin(a) * yy, -np.sin(a) * xx + np.cos(a) * yy
        row = np.floor(v / bh)
        du = np.abs(((u + (row % 2) * bw / 2) % bw) - bw / 2)
        dv = np.abs((v % bh) - bh / 2)
        w = rng.uniform(2, 6)
        joint = np.clip(np.maximum(w / 2 + 0.5 - (bw / 2 - du), w / 2 + 0.5 - (bh / 2 - dv)), 0, 1)[..., None]
        tone = rng.uniform(0.6, 0.95) if rng.random() < 0.7 else rng.uniform(0.02, 0.2)
        img = img * (1 - joint) + tone * joint
    for _ in range(int(rng.integers(20, 120))):
        y0, x0 = rng.uniform(0, n, 2)
        ang = rng.uniform(0, np.pi)
        length = rng.uniform(20, 400)
        bend = rng.uniform(-0.4, 0.4)
        col = np.full(3, rng.uniform(0.6, 1.0) if rng.random() < 0.6 else rng.uniform(0.0, 0.25))
        width = rng.uniform(1.5, 4.0)
        pts = 4
        for k in range(pts):
            a0, a1 = ang + bend * k / pts, ang + bend * (k + 1) / pts
            y1, x1 = y0 + length / pts * np.cos(a0), x0 + length / pts * np.sin(a0)
            _segment(img, (y0, x0), (y1, x1), width, col)
            y0, x0 = y1, x1
    return img


def _bright_objects(rng: np.random.Generator, n: int) -> np.ndarray:
    """Bright round objects on a darker ground (coins, pebbles, lamps, fruit) with a few small specular highlights."""
    img = np.repeat(_power_field(rng, n, 2.0)[..., None], 3, -1) * rng.uniform(0.1, 0.3) + rng.uniform(0.0, 0.3)
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    tex = _power_field(rng, n, 1.3)
    for _ in range(int(rng.integers(8, 60))):
        r = rng.uniform(10, 70)
        cy, cx = rng.uniform(0, n, 2)
        d = np.hypot(yy - cy, xx - cx)
        a = np.clip(r + 0.5 - d, 0, 1)[..., None]
        level = rng.uniform(0.55, 0.95)
        col = np.clip(level * (1 + rng.uniform(-0.3, 0.3, 3) * (rng.random() < 0.6)), 0, 1)
        body = col * (0.75 + 0.35 * tex[..., None]) * (1 - 0.25 * np.clip(d / r, 0, 1) ** 2)[..., None]
        img = img * (1 - a) + np.clip(body, 0, 1) * a
        if rng.random() < 0.3:  # a specular highlight on the object
            hy, hx = cy - r * rng.uniform(0.2, 0.6), cx - r * rng.uniform(-0.4, 0.4)
            hs = rng.uniform(2.5, 6)
            g = np.exp(-((yy - hy) ** 2 + (xx - hx) ** 2) / (2 * hs * hs))[..., None]
            img = img + (1 - img) * g * rng.uniform(0.5, 0.9)
    return np.clip(img, 0, 1)


def _blue_sky(rng: np.random.Generator, n: int) -> np.ndarray:
    """A clear or partly cloudy daylight sky [n, n, 3]: a smooth gradient from a saturated zenith blue to a paler
    horizon, soft white clouds over 0..60 % of it, and in half the scenes ground below a ragged horizon."""
    hue, sat, val = rng.uniform(195, 235) / 360, rng.uniform(0.35, 0.85), rng.uniform(0.55, 0.95)
    zenith = np.array(colorsys.hsv_to_rgb(hue, sat, val))
    horizon = zenith + (1.0 - zenith) * rng.uniform(0.3, 0.8)
    t = np.linspace(0.0, 1.0, n)[:, None, None] ** rng.uniform(0.6, 1.5)
    img = zenith * (1 - t) + horizon * t + np.zeros((1, n, 1))
    cloud = _power_field(rng, n, rng.uniform(1.8, 2.6))
    cover = rng.uniform(0.0, 0.6)
    edge = rng.uniform(0.05, 0.25)  # width of a cloud's soft rim, in field units
    a = np.clip((cloud - np.quantile(cloud, 1 - cover)) / edge, 0, 1)[..., None] * rng.uniform(0.6, 1)
    white = rng.uniform(0.85, 1.0) * (0.8 + 0.2 * cloud[..., None])
    img = img * (1 - a) + white * a
    if rng.random() < 0.5:
        ground = _dead_leaves(rng, n, rng.uniform(6, 12), rng.uniform(60, 200), False, rng.uniform(0.5, 0.9))
        line = n * rng.uniform(0.55, 0.85) + 30 * (_power_field(rng, n, 2.5)[0] - 0.5)
        img = np.where((np.arange(n)[:, None] < line[None, :])[..., None], img, ground)
    return np.clip(img, 0, 1)


#: Procedural blue skies the snow probe sees besides the training photos (:func:`sky_photos`).
SKY_COUNT = 8


def sky_photos(count: int = SKY_COUNT, seed: int = 20261202, size: int = 384) -> list[tuple[str, torch.Tensor]]:
    """Clean procedural daylight skies ``[(name, [3, size, size])]`` (deterministic; :func:`_blue_sky`, rendered
    at 2x and area-downscaled). The training photos hold almost no blue sky, and white flakes on one were read as
    clean (the snow probe had learnt white blobs on a sky as clouds); these give it clean skies to compare with."""
    rng = np.random.default_rng(seed)
    return [(f"sky:{i}", _render_2x(_blue_sky(rng, size * 2))) for i in range(count)]


def quantise_8bit(image: torch.Tensor) -> torch.Tensor:
    """``image`` clamped to 0..1 and rounded to the 256 levels of an 8-bit file (still float)."""
    return (image.clamp(0, 1) * 255).round() / 255


def _render_2x(img: np.ndarray) -> torch.Tensor:
    """A scene drawn at twice the size [2n, 2n, 3] -> ``[3, n, n]``: 2x area-downscaled (anti-aliased), 8-bit."""
    x = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)).permute(2, 0, 1)
    return quantise_8bit(F.avg_pool2d(x[None], 2)[0].clamp(0, 1))


def procedural_photos(count: int = PROCEDURAL_COUNT, seed: int = 20261201, size: int = 384) -> list[tuple[str, torch.Tensor]]:
    """Clean procedural scenes ``[(name, [3, size, size])]`` (deterministic): dead-leaves (occluding shaded
    shapes, colour or gray stones), smooth 1/f textures, and bright skies / white cloud fields over such
    ground, rendered at 2x and area-downscaled (anti-aliased, sharp, noise-free). They add content the
    bundled photos lack: many bright stones, bright smooth regions and highlights that are not snow."""
    rng = np.random.default_rng(seed)
    out = []
    n = size * 2
    for i in range(count):
        kind = i % 6
        if kind == 0:
            img = _dead_leaves(rng, n, rng.uniform(6, 12), rng.uniform(80, 240), False, rng.uniform(0.7, 1.0))
        elif kind == 1:
            img = _dead_leaves(rng, n, rng.uniform(6, 10), rng.uniform(24, 60), True, rng.uniform(0.75, 1.0))
        elif kind == 2:
            f = np.stack([_power_field(rng, n, rng.uniform(1.1, 1.6)) for _ in range(3)], -1)
            mix = rng.uniform(0.5, 0.9)
            img = f[..., :1] * mix + f * (1 - mix)
            lo, hi = rng.uniform(0.0, 0.3), rng.uniform(0.6, 1.0)
            img = lo + (hi - lo) * img
        elif kind == 4:
            img = _lines_scene(rng, n)
        elif kind == 5:
            img = _bright_objects(rng, n)
        else:
            ground = _dead_leaves(rng, n, rng.uniform(6, 12), rng.uniform(60, 200), False, rng.uniform(0.6, 1.0))
            cloud = _power_field(rng, n, rng.uniform(1.8, 2.6))
            sky = np.clip(0.55 + 0.45 * cloud[..., None] + rng.uniform(-0.1, 0.1, 3), 0, 1)
            horizon = n * rng.uniform(0.3, 0.7) + 40 * (_power_field(rng, n, 2.5)[0] - 0.5)
            m = (np.arange(n)[:, None] < horizon[None, :])[..., None]
            img = np.where(m, sky, ground)
        out.append((f"procedural:{i}", _render_2x(img)))
    return out


@dataclass
class Sample:
    """One degraded crop and its labels."""

    image: torch.Tensor
    families: list[str] = field(default_factory=list)
    severity: dict[str, float] = field(default_factory=dict)
    names: list[str] = field(default_factory=list)
    #: Families applied but not visible in this crop (:func:`visible_overlay`): labelled clean for training.
    hidden: list[str] = field(default_factory=list)

    @property
    def quality(self) -> float:
        return 1.0 - combined_severity(self.severity.values())

    @property
    def label(self) -> str:
        """The dominant family (highest severity), or ``clean``."""
        return max(self.severity, key=self.severity.get) if self.severity else "clean"


def degrade_with(image: torch.Tensor, families: Sequence[str], seed: int,
                 gen: torch.Generator) -> Sample:
    """Apply one random member of each family (in :data:`APPLY_ORDER`) to ``image`` [3, H, W]."""
    from ..degrade import derive_seed, random_degradation

    out = image
    sev: dict[str, float] = {}
    names = []
    hidden = []
    for k, fam in enumerate(sorted(families, key=APPLY_ORDER.index)):
        pool = FAMILY_NAMES[fam]
        name = pool[int(torch.randint(len(pool), (1,), generator=gen))]
        before = out
        out, info = random_degradation(out, derive_seed(seed, k, fam), names=[name])
        sev[fam] = max(sev.get(fam, 0.0), severity_of(name, info["params"]))
        names.append(name)
        if fam in ("rain", "snow") and not visible_overlay(before, out):
            hidden.append(fam)
        assert family_of(name) == fam
    return Sample(out, list(sev), sev, names, hidden)


#: A rain or snow overlay counts as visible when at least this share of the crop's pixels got brighter by
#: more than :data:`VISIBLE_STEP` (about 25 px of a 128 px crop: a few flakes). Sparse flakes on a bright sky
#: or streaks on a white wall change nothing a viewer (or the perceiver) can see.
VISIBLE_SHARE = 0.0015
VISIBLE_STEP = 0.1


def visible_overlay(before: torch.Tensor, after: torch.Tensor) -> bool:
    """Whether a brightening overlay (rain, snow) changed enough pixels enough to be seen."""
    changed = ((after - before).amax(0) > VISIBLE_STEP).float().mean()
    return bool(changed >= VISIBLE_SHARE)


def hard_snow(image: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Snow drawn unlike :func:`vbridge_core.degrade.snow`, for the snow probe's training only.

    ``degrade.snow`` screen-blends soft, half-transparent disks; real snow (and other renderers) also
    shows opaque, hard-edged flakes and short wind streaks. Here each flake is a disk of radius
    0.5..3 px (small ones most common) or, in a third of the images, a segment 2..10 px long in one
    shared wind direction; flakes are painted over the image (alpha 0.75..1, one near-white grey per
    image), with hard edges in half the images and a 0.5 px softening in the rest. ``image`` is
    ``[3, H, W]`` in 0..1; the result is quantised to 8 bits like the other training crops."""
    _, h, w = image.shape

    def u(lo: float = 0.0, hi: float = 1.0, n: int = 1) -> torch.Tensor:
        return torch.empty(n).uniform_(lo, hi, generator=gen)

    density = float(torch.exp(u(np.log(5e-4), np.log(6e-3))))
    n = max(3, int(round(density * h * w)))
    cy, cx = u(-2, h + 2, n), u(-2, w + 2, n)
    radius = 0.5 + 2.5 * u(n=n) ** 2
    alpha = u(0.75, 1.0, n)
    yy = torch.arange(h, dtype=torch.float32).view(1, h, 1)
    xx = torch.arange(w, dtype=torch.float32).view(1, 1, w)
    dy, dx = yy - cy.view(n, 1, 1), xx - cx.view(n, 1, 1)
    if float(u()) < 1 / 3:  # wind: distance to a short segment instead of to a point
        ang = float(u(0, 2 * np.pi))
        ux, uy = float(np.cos(ang)), float(np.sin(ang))
        length = u(2, 10, n).view(n, 1, 1)
        t = torch.minimum((dx * ux + dy * uy).clamp(min=0), length)
        dy, dx = dy - t * uy, dx - t * ux
    dist = (dy * dy + dx * dx).sqrt()
    soft = 0.5 if float(u()) < 0.5 else 0.0
    r = radius.view(n, 1, 1)
    cover = ((r + soft - dist) / (2 * soft)).clamp(0, 1) if soft else (dist <= r).float()
    a = (cover * alpha.view(n, 1, 1)).amax(0)
    grey = float(u(0.85, 1.0))
    return quantise_8bit(image * (1 - a) + grey * a)


def _random_crop(photo: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """A ``size`` px square crop of ``photo`` seen at a random scale 0.35..1 (area-downscaled), 8-bit quantised."""
    h, w = photo.shape[-2:]
    scale = float(torch.empty(1).uniform_(0.35, 1.0, generator=gen))
    src = min(h, w, max(size, int(round(size / scale))))  # source window that becomes the crop
    top = int(torch.randint(h - src + 1, (1,), generator=gen))
    left = int(torch.randint(w - src + 1, (1,), generator=gen))
    crop = photo[:, top:top + src, left:left + src]
    if src != size:
        mode = "area" if src > size else "bilinear"
        crop = F.interpolate(crop[None], size=(size, size), mode=mode,
                             **({} if mode == "area" else {"align_corners": False}))[0]
    if torch.rand(1, generator=gen) < 0.5:
        crop = crop.flip(-1)
    crop = _photometric(crop.clamp(0, 1), gen)
    return quantise_8bit(crop)  # 8-bit like a real file


def _photometric(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mild exposure / contrast / colour variation of a clean crop (half of the crops), so bright high-key,
    flat or gray photos are seen clean too: gamma 0.5..1.4, contrast 0.85..1.25, 20 % desaturated. Kept well
    inside what counts as clean (low light starts at gamma 1.5 with a 0.1..0.5 exposure scale, haze lowers
    contrast far more)."""
    u = torch.rand(4, generator=gen)
    if u[0] < 0.5:
        return x
    gamma = float(torch.exp(torch.log(torch.tensor(0.5)) + u[1] * (torch.log(torch.tensor(1.4)) - torch.log(torch.tensor(0.5)))))
    x = x.clamp(1e-4, 1) ** gamma
    c = 0.85 + 0.4 * float(u[2])
    m = x.mean()
    x = ((x - m) * c + m).clamp(0, 1)
    if u[3] < 0.2:
        x = x.mean(0, keepdim=True).expand_as(x).clone()
    return x


def draw_families(gen: torch.Generator, p_clean: float = 0.25, p_mix: float = 0.25) -> list[str]:
    """A random family set: empty (clean), one family, or a mixture of two or three."""
    u = float(torch.rand(1, generator=gen))
    if u < p_clean:
        return []
    n = 1 if u < 1 - p_mix else (2 if torch.rand(1, generator=gen) < 0.8 else 3)
    perm = torch.randperm(len(FAMILIES), generator=gen)[:n]
    return [FAMILIES[int(i)] for i in perm]


def make_samples(photos: Sequence[tuple[str, torch.Tensor]], count: int, seed: int, size: int,
                 p_clean: float = 0.25, p_mix: float = 0.25, families: Optional[Sequence[str]] = None) -> list[Sample]:
    """``count`` random degraded crops of side ``size`` from ``photos`` (deterministic for a seed).

    ``families`` forces the family set of every sample (e.g. ``[]`` for clean ones).
    """
    gen = torch.Generator().manual_seed(int(seed))
    out = []
    for i in range(count):
        _, photo = photos[int(torch.randint(len(photos), (1,), generator=gen))]
        crop = _random_crop(photo, size, gen)
        fams = list(families) if families is not None else draw_families(gen, p_clean, p_mix)
        out.append(degrade_with(crop, fams, int(seed) * 1_000_003 + i, gen))
    return out


#: Below this severity a degradation is invisible at the perceiver's scale (e.g. snow of a few sub-pixel
#: flakes, JPEG at quality >= 91): the training label says ``clean`` (the severity target keeps the value).
#: Rain and snow overlays that :func:`visible_overlay` finds invisible in the crop are labelled the same way.
PERCEPTIBLE = 0.1


def label_arrays(samples: Sequence[Sample]) -> dict[str, np.ndarray]:
    """Targets of a sample list: multi-hot labels [N, 8], severities [N, 7], quality [N]."""
    from .labels import LABELS

    lab = np.zeros((len(samples), len(LABELS)), np.float32)
    sev = np.zeros((len(samples), len(FAMILIES)), np.float32)
    q = np.zeros(len(samples), np.float32)
    for i, s in enumerate(samples):
        for f, v in s.severity.items():
            lab[i, LABELS.index(f)] = 1.0 if v >= PERCEPTIBLE and f not in s.hidden else 0.0
            sev[i, FAMILIES.index(f)] = v
        if not lab[i].any():
            lab[i, LABELS.index("clean")] = 1.0
        q[i] = s.quality
    return {"labels": lab, "severity": sev, "quality": q}
