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
                  guidance_skip_tail=0.15, release_size=True),
}

#: The choice that takes every sampler setting from the caller (the node's widgets) instead of a recipe.
CUSTOM = "custom"

#: Settings a named preset leaves to the caller: the frame count must match the LoRA, the seed is the user's.
CALLER_SETTINGS = ("frames", "seed")


def preset(name: str) -> dict[str, Any]:
    """A copy of the named sampler settings (keyword arguments of ``VBridgePipeline.restore``)."""
    try:
        return dict(PRESETS[name])
    except KeyError:
        raise InputError(f"unknown preset {name!r}; use one of {sorted(PRESETS)}") from None


def preset_choices() -> list[str]:
    """Every named preset, then ``custom`` (for the nodes' ``preset`` combo; new presets appear by themselves)."""
    return list(PRESETS) + [CUSTOM]


def resolve_settings(name: str, custom: dict[str, Any]) -> dict[str, Any]:
    """Sampler keyword arguments for ``VBridgePipeline.run`` from a preset choice.

    ``custom`` holds the caller's own settings (the node's widgets). With ``name == "custom"`` they
    are used as given; with a named preset the preset's recipe is used and only
    :data:`CALLER_SETTINGS` (frames, seed) are taken from ``custom``.
    """
    if name == CUSTOM:
        return dict(custom)
    out = preset(name)
    out.update({k: custom[k] for k in CALLER_SETTINGS if k in custom})
    return out


def release_prompt_embeds(text_encoder: Any, tokenizer: Any = None, cache_dir: Any = None, device: Any = "cpu",
                          dtype: Any = None) -> tuple[Any, Any]:
    """(prompt, negative prompt) embeddings of the release's prompt pair, ``[1, 512, 4096]`` each.

    Needed with a full fine-tune (the authors' checkpoint), which carries no prompt. The umt5-xxl
    encoder (a single file or a diffusers ``text_encoder/`` folder) is loaded once for both prompts
    and freed; the embeddings are cached on disk, so later calls need no encoder pass.
    """
    import torch

    from .text_encoder import encode_prompts

    pos, neg = encode_prompts([PAPER_PROMPT, PAPER_NEGATIVE_PROMPT], text_encoder, tokenizer=tokenizer,
                              cache_dir=cache_dir, device=device, dtype=dtype or torch.bfloat16)
    return pos, neg
