"""Accuracy of the built-in perceiver on held-out photos: degrade.py degradations and an independent set.

Two test sets, both made from the held-out scikit-image photos (never seen in training,
:data:`vbridge_core.perceive.synth.HELD_OUT_PHOTOS`), as random crops of 160..256 px at random
scales, perceived through the same ``Perceiver.perceive`` path users run:

* **synthetic**: one family per image (or clean), drawn by ``vbridge_core.degrade`` with random
  parameters from its ``sample`` ranges; plus a mixture set (two families) for the multi-label score;
* **independent**: the same families made by the code in this file (PIL / numpy operations written
  independently of ``degrade.py``: PIL Gaussian and box blurs, a shifted-copies motion blur, a numpy
  8x8-DCT JPEG-like quantiser with the standard tables and no chroma subsampling, a linear-depth
  haze, PIL brightness plus numpy sensor noise, PIL-drawn rain lines and snow dots).

``--photos tid2013`` draws the same sets from a second, independent group of held-out photos: the five
TID2013 reference images (Kodak scans, 512 x 384, uncompressed BMP) that pyiqa ships in its wheel
(``site-packages/ResultsCalibra/ref_dir``; ``.ci/run`` installs pyiqa). They are not in the development
splits; since v6 the shipped perceiver trains on them (``bench/perceiver_photos.py``), so this group measures
perceivers trained without them. ``--photos DIR`` draws them from a folder of your own clean photos (for
example the kind of content you restore), to see how the perceiver does on it.

Reports family accuracy (top label == the applied family, or ``clean``), per-family accuracy, the
confusion matrix, tier accuracy against the tier of the applied severity, and for mixtures how
often both families are detected (probability >= 0.5). ``--tiny`` uses 6 images per family.

    python bench/bench_perceive.py [--per-family 60] [--perceiver FILE] [--photos held_out|tid2013|DIR] [--json OUT] [--tiny]
"""
from __future__ import annotations

import argparse
import io
import json
import math
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vbridge_core.errors import InputError  # noqa: E402
from vbridge_core.images import load_image  # noqa: E402
from vbridge_core.perceive.labels import FAMILIES, LABELS, TIERS, combined_severity, tier_of  # noqa: E402
from vbridge_core.perceive.model import Perceiver  # noqa: E402
from vbridge_core.perceive.synth import PERCEPTIBLE, clean_photos, degrade_with, extra_photos  # noqa: E402


# ------------------------------------------------------------------------------------------------
# Independent degradations (numpy / PIL; nothing from vbridge_core.degrade)
# ------------------------------------------------------------------------------------------------

def _to_pil(x: np.ndarray):
    from PIL import Image

    return Image.fromarray((np.clip(x, 0, 1) * 255).round().astype(np.uint8))


def _from_pil(im) -> np.ndarray:
    return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0


def ind_noise(x: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    if rng.random() < 0.5:
        sigma = rng.uniform(8, 45) / 255
        return x + rng.normal(0, sigma, x.shape), sigma / (50 / 255)
    peak = rng.uniform(6, 60)
    return rng.poisson(np.clip(x, 0, 1) * peak) / peak, math.sqrt(0.5 / peak) / (50 / 255)


def ind_blur(x: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    from PIL import ImageFilter

    kind = rng.integers(3)
    if kind == 0:
        r = rng.uniform(1.0, 3.5)
        return _from_pil(_to_pil(x).filter(ImageFilter.GaussianBlur(r))), r / 4
    if kind == 1:
        r = int(rng.integers(2, 5))
        return _from_pil(_to_pil(x).filter(ImageFilter.BoxBlur(r))), (r * 0.58) / 4
    length = int(rng.integers(7, 26))
    ang = rng.uniform(0, math.pi)
    acc = np.zeros_like(x)
    for t in np.linspace(-length / 2, length / 2, length):
        acc += np.roll(x, (int(round(t * math.sin(ang))), int(round(t * math.cos(ang)))), axis=(0, 1))
    return acc / length, length / math.sqrt(12) / 4


_QY = np.array([16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
                14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
                49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99], np.float32).reshape(8, 8)
_QC = np.full((8, 8), 99, np.float32)
_QC[:4, :4] = np.array([17, 18, 24, 47, 18, 21, 26, 66, 24, 26, 56, 99, 47, 66, 99, 99]).reshape(4, 4)


def _dct_mat() -> np.ndarray:
    k = np.arange(8)
    m = np.cos(np.pi * (2 * k[None, :] + 1) * k[:, None] / 16) * np.sqrt(2 / 8)
    m[0] /= np.sqrt(2)
    return m


def ind_jpeg(x: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """Blockwise 8x8 DCT quantisation in YCbCr with the IJG tables scaled by quality (4:4:4)."""
    q = int(rng.integers(8, 60))
    s = 5000 / q if q < 50 else 200 - 2 * q
    tables = [np.clip(np.floor((t * s + 50) / 100), 1, 255) for t in (_QY, _QC, _QC)]
    rgb = np.clip(x, 0, 1) * 255
    ycc = np.stack([0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2],
                    128 - 0.168736 * rgb[..., 0] - 0.331264 * rgb[..., 1] + 0.5 * rgb[..., 2],
                    128 + 0.5 * rgb[..., 0] - 0.418688 * rgb[..., 1] - 0.081312 * rgb[..., 2]], -1)
    h, w = ycc.shape[:2]
    H, W = math.ceil(h / 8) * 8, math.ceil(w / 8) * 8
    ycc = np.pad(ycc, ((0, H - h), (0, W - w), (0, 0)), mode="edge") - 128
    m = _dct_mat()
    out = np.empty_like(ycc)
    for c in range(3):
        b = ycc[..., c].reshape(H // 8, 8, W // 8, 8).transpose(0, 2, 1, 3)
        coef = np.round(m @ b @ m.T / tables[c]) * tables[c]
        out[..., c] = (m.T @ coef @ m).transpose(0, 2, 1, 3).reshape(H, W)
    out = out[:h, :w] + 128
    y, cb, cr = out[..., 0], out[..., 1] - 128, out[..., 2] - 128
    rgb = np.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], -1)
    return np.round(np.clip(rgb, 0, 255)) / 255, (100 - q) / 90


def ind_haze(x: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    h, w = x.shape[:2]
    ang = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    d = (np.cos(ang) * xx + np.sin(ang) * yy)
    d = (d - d.min()) / max(1e-6, d.max() - d.min()) * 0.7 + 0.3
    beta, a = rng.uniform(0.7, 2.5), rng.uniform(0.75, 0.95)
    t = np.exp(-beta * d)[..., None]
    return x * t + a * (1 - t), beta / 2.5 * (0.5 + 0.5 * a)


def ind_low_light(x: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    from PIL import ImageEnhance

    f = rng.uniform(0.06, 0.35)
    dark = _from_pil(ImageEnhance.Brightness(_to_pil(x ** 1.3)).enhance(f))
    noisy = dark + rng.normal(0, rng.uniform(0.004, 0.02), x.shape) * np.sqrt(dark + 0.01)
    return noisy, min(1.0, -math.log2(f * 0.5 ** 0.3) / 6)


def ind_rain(x: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    from PIL import Image, ImageDraw, ImageFilter

    h, w = x.shape[:2]
    layer = Image.new("L", (w, h), 0)
    dr = ImageDraw.Draw(layer)
    n = int(rng.uniform(0.0015, 0.008) * h * w)
    length, tilt = rng.uniform(10, 35), math.radians(rng.uniform(-25, 25))
    for _ in range(n):
        x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
        dr.line([(x0, y0), (x0 + length * math.sin(tilt), y0 + length * math.cos(tilt))],
                fill=int(rng.uniform(150, 255)), width=1)
    layer = layer.filter(ImageFilter.GaussianBlur(0.6))
    a = rng.uniform(0.4, 0.85)
    s = np.asarray(layer, np.float32)[..., None] / 255 * a
    return x + s * (1 - x), min(1.0, math.sqrt(n / (h * w) * length * a / 0.3))


def ind_snow(x: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    from PIL import Image, ImageDraw, ImageFilter

    h, w = x.shape[:2]
    layer = Image.new("L", (w, h), 0)
    dr = ImageDraw.Draw(layer)
    dens = rng.uniform(0.001, 0.006)
    rmax = rng.uniform(1.5, 4.0)
    for _ in range(int(dens * h * w)):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.6, rmax)
        dr.ellipse([cx - r, cy - r, cx + r, cy + r], fill=int(rng.uniform(170, 255)))
    s = np.asarray(layer.filter(ImageFilter.GaussianBlur(0.7)), np.float32)[..., None] / 255
    return np.maximum(x, s), min(1.0, math.sqrt(dens * (rmax * 0.6) ** 2 * 0.85 / 0.06))


INDEPENDENT = {"noise": ind_noise, "blur": ind_blur, "jpeg": ind_jpeg, "haze": ind_haze,
               "low_light": ind_low_light, "rain": ind_rain, "snow": ind_snow}


def independent_degrade(x: torch.Tensor, family: str, rng: np.random.Generator) -> tuple[torch.Tensor, float]:
    """``x`` [3, H, W] degraded by this file's ``family`` operation, quantised to 8 bits -> (image, severity)."""
    y, sev = INDEPENDENT[family](x.permute(1, 2, 0).numpy().astype(np.float64), rng)
    return torch.from_numpy(np.round(np.clip(y, 0, 1) * 255) / 255).permute(2, 0, 1).float(), sev


# ------------------------------------------------------------------------------------------------
# Test images
# ------------------------------------------------------------------------------------------------

#: The TID2013 reference photos in pyiqa's wheel (``--photos tid2013``).
TID2013_PHOTOS: tuple[str, ...] = ("I03.bmp", "I04.bmp", "I06.bmp", "I08.bmp", "I19.bmp")


def tid2013_folder() -> Path:
    """Where pyiqa keeps the five TID2013 reference photos (``site-packages/ResultsCalibra/ref_dir``), checked."""
    import importlib.util

    spec = importlib.util.find_spec("pyiqa")
    folder = Path(spec.origin).parents[1] / "ResultsCalibra" / "ref_dir" if spec and spec.origin else None
    missing = [n for n in TID2013_PHOTOS if folder is None or not (folder / n).is_file()]
    if missing:
        raise InputError(f"the TID2013 reference photos pyiqa ships are needed ({', '.join(missing)} "
                         f"missing in {folder or 'site-packages/ResultsCalibra/ref_dir'}): "
                         "pip install --no-deps pyiqa==0.1.16")
    return folder


def tid2013_photos() -> list[tuple[str, torch.Tensor]]:
    """The five TID2013 reference photos pyiqa installs beside itself -> ``[(name, [3, H, W])]``."""
    folder = tid2013_folder()
    return [(f"tid2013:{n}", load_image(folder / n)) for n in TID2013_PHOTOS]


def folder_photos(folder: str) -> list[tuple[str, torch.Tensor]]:
    """Your own clean photos as a held-out group (``--photos DIR``): every image in ``folder``, >= 256 px a side
    (the largest test crop)."""
    if not Path(folder).is_dir():
        raise InputError(f"--photos {folder!r} is neither {' nor '.join(PHOTO_SOURCES)} nor a folder of clean photos")
    return extra_photos([folder], min_side=256)


#: Photo groups the benchmark can draw its test images from.
PHOTO_SOURCES = {"held_out": lambda: clean_photos("held_out"), "tid2013": tid2013_photos}


def held_out_crop(photos, rng: np.random.Generator) -> torch.Tensor:
    """A random 160..256 px crop of a held-out photo at a random scale, quantised to 8 bits."""
    _, p = photos[int(rng.integers(len(photos)))]
    h, w = p.shape[-2:]
    side = int(rng.integers(160, 257))
    scale = rng.uniform(max(side / min(h, w), 0.4), 1.0)
    if scale < 1.0:
        p = F.interpolate(p[None], size=(max(side, round(h * scale)), max(side, round(w * scale))), mode="area")[0]
    h, w = p.shape[-2:]
    ch, cw = min(h, side), min(w, int(rng.integers(160, 257)))
    t, l = int(rng.integers(h - ch + 1)), int(rng.integers(w - cw + 1))
    return (p[:, t:t + ch, l:l + cw].clamp(0, 1) * 255).round() / 255


def make_sets(per_family: int, seed: int, with_synthetic: bool = True, photos: str = "held_out",
              invisible: Optional[list] = None):
    """(synthetic, independent, mixtures): lists of (image, true label, true severity dict).

    ``with_synthetic=False`` skips the degrade.py sets (their crops are still drawn, so the
    independent set is the same either way). ``photos``: a key of :data:`PHOTO_SOURCES`, or a folder of
    clean photos (each at least 256 px a side). ``invisible``: a list that gets, per synthetic image, whether
    its degradation is one the training calls invisible (severity below ``PERCEPTIBLE``, or a rain/snow overlay
    that changed too few pixels): the label stays the applied family, :func:`evaluate` reports both."""
    photos = PHOTO_SOURCES[photos]() if photos in PHOTO_SOURCES else folder_photos(photos)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    synthetic, independent, mixtures = [], [], []
    hidden: list[bool] = []
    for lab in LABELS:
        for i in range(per_family):
            x = held_out_crop(photos, rng)
            hidden.append(False)
            if lab == "clean":
                synthetic.append((x, "clean", {}))
                independent.append((held_out_crop(photos, rng), "clean", {}))
                continue
            if with_synthetic:
                s = degrade_with(x, [lab], seed * 100_003 + len(synthetic), gen)
                synthetic.append((s.image, lab, s.severity))
                hidden[-1] = s.severity[lab] < PERCEPTIBLE or lab in s.hidden
            else:
                synthetic.append((x, lab, {}))
            yi, sev = independent_degrade(held_out_crop(photos, rng), lab, rng)
            independent.append((yi, lab, {lab: sev}))
    if invisible is not None:
        invisible.extend(hidden)
    for i in range(per_family * 2 if with_synthetic else 0):
        x = held_out_crop(photos, rng)
        fams = [FAMILIES[int(j)] for j in rng.choice(len(FAMILIES), 2, replace=False)]
        s = degrade_with(x, fams, seed * 7_000_003 + i, gen)
        mixtures.append((s.image, fams, s.severity))
    return synthetic, independent, mixtures


def evaluate(perceiver: Perceiver, items, invisible: Optional[Sequence[bool]] = None) -> dict:
    """Accuracy, per-family accuracy, confusion matrix and tier accuracy of single-label items.

    With ``invisible`` (from :func:`make_sets`), also ``visible_accuracy``: the accuracy without the images
    whose degradation the training would call invisible, and how many those are."""
    reps = perceiver.perceive([x for x, _, _ in items])
    conf = np.zeros((len(LABELS), len(LABELS)), int)
    tier_ok = 0
    tier_conf = np.zeros((3, 3), int)
    ok = []
    for r, (_, lab, sev) in zip(reps, items):
        conf[LABELS.index(lab), LABELS.index(r.degradation)] += 1
        ok.append(r.degradation == lab)
        t_true = tier_of(1 - combined_severity(sev.values()))
        tier_conf[TIERS.index(t_true), TIERS.index(r.quality)] += 1
        tier_ok += r.quality == t_true
    per = {lab: float(conf[i, i] / max(1, conf[i].sum())) for i, lab in enumerate(LABELS)}
    deg = [i for i, lab in enumerate(LABELS) if lab != "clean"]
    res = {"accuracy": float(np.trace(conf) / conf.sum()),
           "degraded_accuracy": float(sum(conf[i, i] for i in deg) / conf[deg].sum()),
           "per_family": per, "confusion": conf.tolist(), "tier_accuracy": float(tier_ok / len(items)),
           "tier_confusion": tier_conf.tolist(), "n": len(items)}
    if invisible is not None:
        seen = [o for o, inv in zip(ok, invisible) if not inv]
        res["visible_accuracy"] = float(sum(seen) / len(seen))
        res["n_invisible"] = len(ok) - len(seen)
    return res


def evaluate_mixtures(perceiver: Perceiver, items) -> dict:
    reps = perceiver.perceive([x for x, _, _ in items])
    both = sum(all(r.scores[f] >= 0.5 for f in fams) for r, (_, fams, _) in zip(reps, items))
    top_in = sum(r.degradation in fams for r, (_, fams, _) in zip(reps, items))
    tier = sum(r.quality == tier_of(1 - combined_severity(sev.values())) for r, (_, _, sev) in zip(reps, items))
    return {"both_detected": both / len(items), "top_label_applied": top_in / len(items),
            "tier_accuracy": tier / len(items), "n": len(items)}


def markdown(name: str, res: dict) -> str:
    lines = [f"**{name}**: family accuracy {res['accuracy']:.1%} ({res['n']} images; degraded only "
             f"{res['degraded_accuracy']:.1%}), tier accuracy {res['tier_accuracy']:.1%}", "",
             "| true \\ predicted | " + " | ".join(LABELS) + " | accuracy |",
             "|---|" + "---|" * (len(LABELS) + 1)]
    for i, lab in enumerate(LABELS):
        lines.append(f"| {lab} | " + " | ".join(str(v) for v in res["confusion"][i]) +
                     f" | {res['per_family'][lab]:.0%} |")
    lines += ["", "tier confusion (rows true high/medium/low, columns predicted): " +
              "; ".join(str(r) for r in res["tier_confusion"]), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-family", type=int, default=60, help="test images per label and set")
    ap.add_argument("--perceiver", default=None, help="perceiver file (default: the shipped one)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--photos", default="held_out", metavar="held_out|tid2013|DIR",
                    help="the held-out scikit-image photos, the TID2013 references pyiqa ships, or a folder of "
                    "your own clean photos (never used to train the perceiver you test)")
    ap.add_argument("--json", default=None, help="also write the results as JSON")
    ap.add_argument("--tiny", action="store_true", help="6 images per family (a quick check)")
    a = ap.parse_args(argv)
    n = 6 if a.tiny else a.per_family
    perc = Perceiver.load(a.perceiver) if a.perceiver else Perceiver.builtin()
    t0 = time.perf_counter()
    invisible: list[bool] = []
    synthetic, independent, mixtures = make_sets(n, a.seed, photos=a.photos, invisible=invisible)
    res = {"photos": a.photos, "synthetic": evaluate(perc, synthetic, invisible),
           "independent": evaluate(perc, independent),
           "mixtures": evaluate_mixtures(perc, mixtures), "per_family": n, "seed": a.seed,
           "perceiver": a.perceiver or "builtin", "seconds": round(time.perf_counter() - t0, 1)}
    where = {"held_out": "held-out photos", "tid2013": "TID2013 photos"}.get(a.photos, f"photos in {a.photos}")
    print(markdown(f"{where}, degrade.py (synthetic)", res["synthetic"]))
    syn = res["synthetic"]
    print(f"(leaving out the {syn['n_invisible']} images whose degradation the training calls invisible: "
          f"{syn['visible_accuracy']:.1%})\n")
    print(markdown(f"{where}, independent implementation", res["independent"]))
    m = res["mixtures"]
    print(f"**mixtures of two families** ({m['n']} images): both detected {m['both_detected']:.1%}, top label among "
          f"the applied {m['top_label_applied']:.1%}, tier accuracy {m['tier_accuracy']:.1%}")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
