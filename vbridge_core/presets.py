"""Named sampler recipes and the prompt pair of the V-Bridge release.

``paper`` reproduces the authors' inference script (``Zhengsh123/V-Bridge: V-Bridge/inference.py``):
F=5, 50 UniPC steps, shift 5 on the official Wan sigma grid, guidance 6 with the unconditional
pass skipped for the last 15% of the steps. ``fast`` is the restoration setting we default to:
guidance 1 (one DiT call per step) on diffusers' grid. ``turbo`` costs at most 4 DiT calls per image:
the x0-predict-and-renoise sampler on a published few-step schedule, for step-distilled bases.
"""
from __future__ import annotations

from typing import Any, Mapping

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

#: FastWan2.2-TI2V-5B's published 3-step DMD schedule: hao-ai-lab/FastVideo
#: ``fastvideo/configs/pipelines/wan.py`` ``FastWan2_2_TI2V_5B_Config.dmd_denoising_steps = [1000, 757, 522]``,
#: scheduler-space labels, i.e. sigmas ``t / 1000`` (FastVideo's test
#: ``test_dmd_denoising_stage_preserves_legacy_scheduler_space_steps`` pins sigmas ``[1.0, 0.757, 0.522, 0.0]``),
#: sampled with x0-predict-and-renoise, no classifier-free guidance.
FASTWAN_SIGMAS: tuple[float, ...] = (1.0, 0.757, 0.522)
#: Wan2.2-TI2V-5B-Turbo's published 4-step schedule: quanhaol/Wan2.2-TI2V-5B-Turbo
#: ``configs/inference/wan22.yaml`` ``denoising_step_list: [1000, 750, 500, 250]`` (sigma = t / 1000, same
#: x0-renoise rule in ``pipeline/wan22_fewstep_inference.py``, no CFG). Non-commercial licence.
WAN22_TURBO_SIGMAS: tuple[float, ...] = (1.0, 0.75, 0.5, 0.25)

#: LoRA metadata a turbo-distilled student (``train --mode turbo``) may carry to name its own schedule.
#: Stored in the file header as ``vbridge.turbo_sigmas`` (JSON list of descending floats in (0, 1]),
#: ``vbridge.turbo_start_sigma`` (float, or null for pure noise) and ``vbridge.turbo_solver``
#: (``x0_renoise``, ``euler`` or ``unipc``); pass the names below without the prefix to ``write_lora``.
TURBO_METADATA_KEYS = ("turbo_sigmas", "turbo_start_sigma", "turbo_solver")

PRESETS: dict[str, dict[str, Any]] = {
    "fast": dict(frames=5, steps=50, shift=5.0, solver="unipc", sigma_grid="diffusers", guidance=1.0,
                 guidance_skip_tail=0.0, sigmas=None, start_sigma=None),
    "paper": dict(frames=5, steps=50, shift=5.0, solver="unipc", sigma_grid="official", guidance=6.0,
                  guidance_skip_tail=0.15, sigmas=None, start_sigma=None, release_size=True),
    # <= 4 DiT calls per image, guidance 1: FastWan's published 3-step x0-renoise schedule. Meant for a
    # step-distilled base (FastWan as accelerator LoRA or as the DiT) or a turbo-distilled student LoRA,
    # whose own schedule (TURBO_METADATA_KEYS) replaces this one when the restoration LoRA carries it.
    "turbo": dict(frames=5, steps=len(FASTWAN_SIGMAS), shift=5.0, solver="x0_renoise", sigma_grid="diffusers",
                  guidance=1.0, guidance_skip_tail=0.0, sigmas=FASTWAN_SIGMAS, start_sigma=None),
}

#: The most DiT calls per image the turbo preset may cost (checked for LoRA-provided schedules too).
TURBO_MAX_CALLS = 4

#: The choice that takes every sampler setting from the caller (the node's widgets) instead of a recipe.
CUSTOM = "custom"

#: Settings a named preset leaves to the caller: the frame count must match the LoRA, the seed is the user's.
CALLER_SETTINGS = ("frames", "seed")


def turbo_from_metadata(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The turbo schedule a LoRA's metadata names (``vbridge.turbo_*`` keys), as sampler keyword
    arguments; ``{}`` when it names none. Raises :class:`InputError` for malformed values."""
    from .sampler import SOLVERS, SamplerSettings

    def get(key: str) -> Any:
        return metadata.get("vbridge." + key, metadata.get(key))

    out: dict[str, Any] = {}
    sig = get("turbo_sigmas")
    if sig is not None:
        settings = SamplerSettings(sigmas=sig).validate()
        out.update(sigmas=tuple(settings.sigmas), steps=len(settings.sigmas))
    start = get("turbo_start_sigma")
    if start is not None:
        out["start_sigma"] = SamplerSettings(start_sigma=start).validate().start_sigma
    solver = get("turbo_solver")
    if solver is not None:
        if solver not in SOLVERS:
            raise InputError(f"the LoRA's turbo_solver {solver!r} is not one of {SOLVERS}")
        out["solver"] = solver
    return out


def preset(name: str, lora: Any = None) -> dict[str, Any]:
    """A copy of the named sampler settings (keyword arguments of ``VBridgePipeline.restore``).

    For ``turbo``, ``lora`` (a :class:`vbridge_core.lora.LoraFile` or its metadata dict) may carry
    its own schedule in :data:`TURBO_METADATA_KEYS`; those values then replace the defaults.
    """
    try:
        kw = dict(PRESETS[name])
    except KeyError:
        raise InputError(f"unknown preset {name!r}; use one of {sorted(PRESETS)}") from None
    if name == "turbo" and lora is not None:
        meta = getattr(lora, "metadata", lora)
        kw.update(turbo_from_metadata(meta or {}))
    return kw


def preset_choices() -> list[str]:
    """Every named preset, then ``custom`` (for the nodes' ``preset`` combo; new presets appear by themselves)."""
    return list(PRESETS) + [CUSTOM]


def resolve_settings(name: str, custom: dict[str, Any], lora: Any = None) -> dict[str, Any]:
    """Sampler keyword arguments for ``VBridgePipeline.run`` from a preset choice.

    ``custom`` holds the caller's own settings (the node's widgets). With ``name == "custom"`` they
    are used as given; with a named preset the preset's recipe is used and only
    :data:`CALLER_SETTINGS` (frames, seed) are taken from ``custom`` (``lora``: see :func:`preset`).
    """
    if name == CUSTOM:
        return dict(custom)
    out = preset(name, lora)
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
