"""Named sampler recipes and the prompt pair of the V-Bridge release.

``paper`` reproduces the authors' inference script (``Zhengsh123/V-Bridge: V-Bridge/inference.py``):
F=5, 50 UniPC steps, shift 5 on the official Wan sigma grid, guidance 6 with the unconditional
pass skipped for the last 15% of the steps. ``fast`` is the restoration setting we default to:
guidance 1 (one DiT call per step) on diffusers' grid.
"""
from __future__ import annotations

from typing import Any

from .errors import InputError

#: The release's restoration prompt (quoted from its inference script).
PAPER_PROMPT = (
    "A restoration-focused video strictly based on the input image. "
    "The camera is completely static with no movement, no zoom, and no rotation. "
    "The original composition, objects, layout, and perspective are preserved exactly. "
    "Focus on visual restoration and enhancement: remove noise, reduce blur, eliminate rain artifacts, "
    "remove compression artifacts, and improve clarity, sharpness, and fine details while maintaining "
    "natural textures, accurate colors, and balanced lighting. "
    "Only extremely subtle and natural temporal consistency is allowed. "
    "The video should appear stable, clean, and realistic, as if the input image has been gently restored over time."
)

#: The release's negative prompt (quoted from its inference script).
PAPER_NEGATIVE_PROMPT = (
    "camera movement, panning, tilting, zooming, rotation, "
    "scene change, object movement, new objects, object deformation, "
    "style change, artistic style, illustration, painting, cartoon, "
    "over-saturated colors, overexposure, underexposure, "
    "motion blur, jitter, flickering, shaking, "
    "low quality, worst quality, noise, blur, rain, fog, "
    "compression artifacts, jpeg artifacts, aliasing, "
    "text, subtitles, watermark, logo, "
    "distorted anatomy, extra limbs, duplicated objects, "
    "exaggerated motion, creative animation"
)

PRESETS: dict[str, dict[str, Any]] = {
    "fast": dict(frames=5, steps=50, shift=5.0, solver="unipc", sigma_grid="diffusers", guidance=1.0,
                 guidance_skip_tail=0.0),
    "paper": dict(frames=5, steps=50, shift=5.0, solver="unipc", sigma_grid="official", guidance=6.0,
                  guidance_skip_tail=0.15),
}


def preset(name: str) -> dict[str, Any]:
    """A copy of the named sampler settings (keyword arguments of ``VBridgePipeline.restore``)."""
    try:
        return dict(PRESETS[name])
    except KeyError:
        raise InputError(f"unknown preset {name!r}; use one of {sorted(PRESETS)}") from None
