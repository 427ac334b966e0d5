"""Training and evaluation data for the perceiver: clean photos, degraded by :mod:`vbridge_core.degrade`.

Clean sources: scikit-image's bundled sample photos (shipped inside the ``scikit-image`` wheel,
no download) and the pack's own procedural samples (``vbridge_core/assets/samples/*/hq``). Images
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
    if not out:
        raise InputError(f"no clean photos found in {folder}")
    return out


@dataclass
class Sample:
    """One degraded crop and its labels."""

    image: torch.Tensor
    families: list[str] = field(default_factory=list)
    severity: dict[str, float] = field(default_factory=dict)
    names: list[str] = field(default_factory=list)

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
    for k, fam in enumerate(sorted(families, key=APPLY_ORDER.index)):
        pool = FAMILY_NAMES[fam]
        name = pool[int(torch.randint(len(pool), (1,), generator=gen))]
        out, info = random_degradation(out, derive_seed(seed, k, fam), names=[name])
        sev[fam] = max(sev.get(fam, 0.0), severity_of(name, info["params"]))
        names.append(name)
        assert family_of(name) == fam
    return Sample(out, list(sev), sev, names)


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
    # 8-bit like a real file
    return (crop.clamp(0, 1) * 255).round() / 255


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
PERCEPTIBLE = 0.1


def label_arrays(samples: Sequence[Sample]) -> dict[str, np.ndarray]:
    """Targets of a sample list: multi-hot labels [N, 8], severities [N, 7], quality [N]."""
    from .labels import LABELS

    lab = np.zeros((len(samples), len(LABELS)), np.float32)
    sev = np.zeros((len(samples), len(FAMILIES)), np.float32)
    q = np.zeros(len(samples), np.float32)
    for i, s in enumerate(samples):
        for f, v in s.severity.items():
            lab[i, LABELS.index(f)] = 1.0 if v >= PERCEPTIBLE else 0.0
            sev[i, FAMILIES.index(f)] = v
        if not lab[i].any():
            lab[i, LABELS.index("clean")] = 1.0
        q[i] = s.quality
    return {"labels": lab, "severity": sev, "quality": q}
