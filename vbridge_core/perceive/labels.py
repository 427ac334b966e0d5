"""The perceiver's vocabulary: degradation families, severities, quality tiers, task-name aliases.

Families group the :mod:`vbridge_core.degrade` names the way a user thinks of them (and the way a
restoration LoRA is usually trained): ``noise`` (gaussian_noise, poisson_noise), ``blur``
(gaussian_blur, defocus_blur, motion_blur), ``jpeg``, ``haze``, ``low_light``, ``rain``, ``snow``.
``clean`` is the eighth label (no degradation present).

Severity is a number in 0..1 per family, defined from the degradation's parameters so that the
sampling ranges of :data:`vbridge_core.degrade.PARAMS` map to roughly 0.05..1 (the formulas are in
:func:`severity_of`). The quality tier follows Perceive-IR's three levels, cut on the combined
severity ``S = 1 - prod(1 - s_f)`` of all families present: ``high`` when ``S < 0.25``, ``medium``
below ``0.6``, ``low`` above; the quality score is ``1 - S``.
"""
from __future__ import annotations

import math
import re
from typing import Any, Iterable, Mapping

from ..errors import InputError

#: The seven degradation families, in the order of the perceiver's outputs.
FAMILIES: tuple[str, ...] = ("noise", "blur", "jpeg", "haze", "low_light", "rain", "snow")
#: The perceiver's labels: the families plus ``clean``.
LABELS: tuple[str, ...] = FAMILIES + ("clean",)
#: Quality tiers, best first (Perceive-IR's three levels).
TIERS: tuple[str, ...] = ("high", "medium", "low")
#: Combined severity below which an image is ``high`` quality, and below which it is ``medium``.
TIER_CUTS: tuple[float, float] = (0.25, 0.6)

#: ``vbridge_core.degrade`` name -> family.
DEGRADATION_FAMILY: dict[str, str] = {
    "gaussian_noise": "noise", "poisson_noise": "noise",
    "gaussian_blur": "blur", "defocus_blur": "blur", "motion_blur": "blur",
    "jpeg": "jpeg", "haze": "haze", "low_light": "low_light", "rain": "rain", "snow": "snow",
}

#: Words in task folder names (or ``--degradations`` entries) that name a family. A task name is
#: split at ``_ - . space`` and each word looked up, so ``denoise_sidd``, ``my-deblur`` and
#: ``lowlight`` all resolve.
_TASK_WORDS: dict[str, str] = {
    **{w: "noise" for w in ("noise", "noisy", "denoise", "denoising", "gaussian_noise", "poisson_noise", "sidd",
                            "grain", "dn")},
    **{w: "blur" for w in ("blur", "blurry", "deblur", "deblurring", "defocus", "motion", "gopro", "sharpen",
                           "gaussian_blur", "defocus_blur", "motion_blur", "db")},
    **{w: "jpeg" for w in ("jpeg", "jpg", "dejpeg", "compression", "artifact", "artifacts", "artefact",
                           "artefacts", "car", "deblock", "deblocking", "blocking")},
    **{w: "haze" for w in ("haze", "hazy", "dehaze", "dehazing", "fog", "foggy", "defog", "reside")},
    **{w: "low_light" for w in ("low_light", "lowlight", "dark", "lol", "enhance", "enhancement", "llie",
                                "underexposed", "underexposure", "night")},
    **{w: "rain" for w in ("rain", "rainy", "derain", "deraining", "rain100l", "rain100h", "streak", "streaks")},
    **{w: "snow" for w in ("snow", "snowy", "desnow", "desnowing", "snow100k")},
}


def family_of(name: str) -> str:
    """The family of a :mod:`vbridge_core.degrade` name (``"motion_blur"`` -> ``"blur"``)."""
    if name not in DEGRADATION_FAMILY:
        raise InputError(f"unknown degradation {name!r}; choose from {', '.join(DEGRADATION_FAMILY)}.")
    return DEGRADATION_FAMILY[name]


def task_families(task: str) -> list[str]:
    """Families a task name covers (``"denoise"`` -> ``["noise"]``, ``"rain_snow"`` -> ``["rain", "snow"]``).

    A family name or a degrade name matches whole; otherwise every word of the name is looked up.
    Unknown names give ``[]``.
    """
    t = str(task).strip().lower()
    if t in LABELS:
        return [t] if t != "clean" else []
    if t in _TASK_WORDS:
        return [_TASK_WORDS[t]]
    words = [w for w in re.split(r"[_\-.\s+]+", t) if w]
    joined = ["_".join(words[i:i + 2]) for i in range(len(words) - 1)]
    found = [_TASK_WORDS[w] for w in joined + words if w in _TASK_WORDS]
    return list(dict.fromkeys(found))


def _clip01(v: float) -> float:
    return float(min(1.0, max(0.0, v)))


def severity_of(name: str, params: Mapping[str, Any]) -> float:
    """Severity 0..1 of one :mod:`vbridge_core.degrade` application with ``params``.

    * noise: effective standard deviation (Poisson: at mid gray, ``sqrt(0.5 / peak)``) / (50/255);
    * blur: equivalent Gaussian sigma / 4 px (disk: radius/2, motion: length/sqrt(12));
    * jpeg: ``(100 - quality) / 90``;
    * haze: ``beta / 2.5`` scaled by the airlight;
    * low_light: ``-log2(brightness ratio at mid gray) / 6`` with ratio ``scale * 0.5 ** (gamma - 1)``;
    * rain: ``sqrt(density * length * intensity / 0.3)``;
    * snow: ``sqrt(density * flake_size**2 * opacity / 0.06)``.
    """
    p = dict(params)
    if name == "gaussian_noise":
        return _clip01(float(p["sigma"]) / (50 / 255))
    if name == "poisson_noise":
        return _clip01(math.sqrt(0.5 / float(p["peak"])) / (50 / 255))
    if name == "gaussian_blur":
        return _clip01(float(p["sigma"]) / 4.0)
    if name == "defocus_blur":
        return _clip01(float(p["radius"]) / 2.0 / 4.0)
    if name == "motion_blur":
        return _clip01(float(p["length"]) / math.sqrt(12.0) / 4.0)
    if name == "jpeg":
        return _clip01((100 - float(p["quality"])) / 90.0)
    if name == "haze":
        return _clip01(float(p["beta"]) / 2.5 * (0.5 + 0.5 * float(p.get("airlight", 0.85))))
    if name == "low_light":
        ratio = float(p["scale"]) * 0.5 ** (float(p["gamma"]) - 1.0)
        return _clip01(-math.log2(max(ratio, 1e-6)) / 6.0)
    if name == "rain":
        return _clip01(math.sqrt(float(p["density"]) * float(p["length"]) * float(p["intensity"]) / 0.3))
    if name == "snow":
        return _clip01(math.sqrt(float(p["density"]) * float(p["flake_size"]) ** 2 * float(p["opacity"]) / 0.06))
    raise InputError(f"unknown degradation {name!r}; choose from {', '.join(DEGRADATION_FAMILY)}.")


def combined_severity(severities: Iterable[float]) -> float:
    """``1 - prod(1 - s)``: several mild degradations add up to a worse image than one."""
    keep = 1.0
    for s in severities:
        keep *= 1.0 - _clip01(float(s))
    return 1.0 - keep


def tier_of(quality_score: float) -> str:
    """The tier of a quality score ``1 - S`` (``S`` the combined severity)."""
    s = 1.0 - float(quality_score)
    return TIERS[0] if s < TIER_CUTS[0] else TIERS[1] if s < TIER_CUTS[1] else TIERS[2]


def tier_index(quality_score: float) -> int:
    """Index of :func:`tier_of` in :data:`TIERS`."""
    return TIERS.index(tier_of(quality_score))
