"""``RestoreTrajectory`` and ``DriftCorrect``: run the V-Bridge pipeline on a ComfyUI IMAGE batch.

The nodes only convert between ComfyUI types and the pipeline's tensors, report per-step progress
(with a latent preview of the last frame inside ComfyUI) and let ComfyUI's Cancel stop sampling
within one step: the pipeline polls ``comfy_bridge.throw_if_interrupted`` before every step, and
ComfyUI's interrupt exception propagates unchanged.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

from . import comfy_bridge

logger = logging.getLogger(__name__)

CATEGORY = "V-Bridge"
SOLVERS = ["unipc", "euler", "x0_renoise"]
SIGMA_GRIDS = ["diffusers", "official"]
MAX_SEED = 0xFFFFFFFFFFFFFFFF

_MODEL_TIP = "The model from 'V-Bridge Load Model'."
_IMAGE_TIP = "Degraded image(s) to restore. All images of one batch share a size (ComfyUI batches do)."
_FRAMES_TIP = ("Frames of the pseudo-video from the degraded image (frame 0) to the restored one (last frame): "
               "4k+1, at least 5. Use what the LoRA was trained with (5 in the paper); more frames cost more time.")
_STEPS_TIP = "Sampling steps (50 as in the paper; fewer is faster and usually a little softer)."
_SEED_TIP = "Noise seed. Image i of the batch uses seed + i, so results do not depend on the batch size."
_SIGMAS_TIP = ("Optional explicit noise schedule, descending in (0, 1], e.g. 1.0, 0.757, 0.522 (FastWan's "
               "published 3 steps, with solver x0_renoise and a FastWan accelerator LoRA). Replaces steps and shift; "
               "empty = the usual schedule from steps.")
_START_SIGMA_TIP = ("Start from the degraded image noised to this level instead of pure noise (1.0 = pure noise, "
                    "as usual). Lower values keep more of the input and need fewer steps; the schedule then covers "
                    "only noise levels up to it.")
_CACHE_TIP = ("Step caching of the model for the 50-step modes: none (exact), fbc (First Block Cache, threshold "
              "0.05), fbc:0.1 (more skipping, larger deviation) or mag:FILE.json (MagCache, calibrated with "
              "`python -m vbridge_core cache-calibrate`). The info output reports how many passes were skipped.")


def parse_sigmas(text: str) -> Optional[list[float]]:
    """The node's ``sigmas`` text (``"1.0, 0.757, 0.522"``) as a list; empty text: ``None`` (use steps)."""
    from vbridge_core.errors import InputError

    text = (text or "").strip()
    if not text:
        return None
    try:
        return [float(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise InputError(f"sigmas must be comma-separated numbers such as 1.0, 0.757, 0.522 (or empty), got {text!r}") from None


def _frames_input() -> tuple[str, dict[str, Any]]:
    return ("INT", {"default": 5, "min": 5, "max": 81, "step": 4, "tooltip": _FRAMES_TIP})


def _steps_input() -> tuple[str, dict[str, Any]]:
    return ("INT", {"default": 50, "min": 1, "max": 200, "tooltip": _STEPS_TIP})


def _seed_input() -> tuple[str, dict[str, Any]]:
    return ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True, "tooltip": _SEED_TIP})


_PRESET_TIP = ("Sampler recipe. custom: the settings on this node. fast: guidance 1 on diffusers' grid. paper: the "
               "authors' release (official Wan sigma grid, 50 UniPC steps, shift 5, guidance 6 without the negative "
               "pass in the last 15% of steps, inputs larger than 1440x2560 resized as the release does). A named "
               "preset replaces steps, shift, solver, guidance, sigma_grid and guidance_skip_tail; frames and seed "
               "always come from this node (frames must match the LoRA).")
_GRID_TIP = ("Sigma grid (custom preset): diffusers' UniPC flow grid, or the official Wan grid the paper used "
             "(they differ by up to 4e-3).")
_SKIP_TIP = ("Fraction of the last steps run without the negative pass when guidance > 1 (custom preset; the "
             "paper uses 0.15, i.e. 7 of 50 steps).")


def _sampler_floats(shift: Any, guidance: Any, guidance_skip_tail: Any) -> tuple[float, float, float]:
    """The node's float sampler inputs checked to be finite and in range (ComfyUI's own min/max checks let
    NaN through over the API, since every comparison with NaN is false)."""
    from vbridge_core.validate import finite_float

    return (finite_float("shift", shift, min=0, min_inclusive=False, hint="Wan default 5.0"),
            finite_float("guidance", guidance, min=1, hint="1.0 = no negative-prompt pass"),
            finite_float("guidance_skip_tail", guidance_skip_tail, min=0, max=1, max_inclusive=False))


def _preset_inputs(guidance_default: float = 1.0) -> dict[str, Any]:
    """The recipe widgets shared by RestoreTrajectory and DriftCorrect (appended after the older ones)."""
    from vbridge_core.presets import CUSTOM, preset_choices

    return {
        "preset": (preset_choices(), {"default": CUSTOM, "tooltip": _PRESET_TIP}),
        "sigma_grid": (SIGMA_GRIDS, {"default": "diffusers", "tooltip": _GRID_TIP}),
        "guidance_skip_tail": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": _SKIP_TIP}),
    }


def _settings(preset: str, model: Any, **custom: Any) -> dict[str, Any]:
    """Sampler kwargs for the pipeline from the preset choice and the node's own widget values (the turbo
    preset takes the schedule a loaded turbo-distilled restoration LoRA names)."""
    from vbridge_core.presets import resolve_settings

    lora = model.adapter_file("restoration") if hasattr(model, "adapter_file") else None
    return resolve_settings(preset, custom, lora=lora)


def _check_model(model: Any) -> None:
    from vbridge_core.errors import InputError

    if not (hasattr(model, "run") and hasattr(model, "adapters")):
        raise InputError(f"vbridge_model must come from 'V-Bridge Load Model', got {type(model).__name__}")


def _embeds_from_conditioning(conditioning: Any, model: Any, what: str) -> Optional[Any]:
    """The prompt embedding tensor of a ComfyUI CONDITIONING (``[[tensor [1, L, 4096], {...}], ...]``)."""
    from vbridge_core.errors import InputError
    from vbridge_core.runtime import prepare_prompt_embeds

    if conditioning is None:
        return None
    try:
        tensor = conditioning[0][0]
    except (TypeError, IndexError, KeyError):
        raise InputError(f"{what}: expected a CONDITIONING from CLIPTextEncode (CLIPLoader type 'wan')") from None
    if len(conditioning) > 1:
        logger.warning("%s holds %d entries; V-Bridge uses the first one", what, len(conditioning))
    return prepare_prompt_embeds(tensor, int(model.transformer.config.text_dim), what)


def _prompt_kwargs(model: Any, conditioning: Any, negative: Any, settings: dict[str, Any]) -> dict[str, Any]:
    """``prompt_embeds`` / ``negative_prompt_embeds`` from the optional CONDITIONING inputs."""
    guided = float(settings.get("guidance", 1.0)) > 1.0
    pos = _embeds_from_conditioning(conditioning, model, "conditioning")
    neg = _embeds_from_conditioning(negative, model, "negative") if guided else None
    if negative is not None and not guided:
        logger.info("negative conditioning ignored: guidance is 1.0 (no negative pass)")
    return {"prompt_embeds": pos, "negative_prompt_embeds": neg}


def run_on_comfy_images(model: Any, image: Any, role: str, **settings: Any) -> tuple[Any, Any, Any]:
    """Run ``model`` (restore or drift-correct per ``role``) on a ComfyUI IMAGE batch.

    Returns ``(final IMAGE [B, H, W, 3], trajectory IMAGE [B*F, H, W, 3], RestoreResult)``.
    Progress goes to ComfyUI's progress bar (tqdm outside ComfyUI); Cancel stops within one step.
    """
    import torch

    from vbridge_core.images import bchw_to_comfy, comfy_to_bchw

    _check_model(model)
    x = comfy_to_bchw(image)
    from vbridge_core.sampler import SamplerSettings

    steps = SamplerSettings(steps=int(settings["steps"]), sigmas=settings.get("sigmas"),
                            start_sigma=settings.get("start_sigma"), solver=settings.get("solver", "unipc"),
                            shift=float(settings.get("shift", 5.0))).total_steps()
    bar = comfy_bridge.ProgressBar(steps * x.shape[0], desc=f"V-Bridge {role}")
    preview = comfy_bridge.latent_previewer()

    def should_cancel() -> bool:
        comfy_bridge.throw_if_interrupted()  # raises ComfyUI's interrupt exception itself
        return False

    def callback(info: Any) -> None:
        shot = preview(info.denoised) if preview is not None else None
        bar.update_absolute(int(info.extra.get("overall_step", info.step)), shot)

    comfy_bridge.make_room()
    if hasattr(model, "maybe_compile"):
        model.maybe_compile(None)  # regional compile on CUDA (falls back to eager, logged, if it cannot)
    try:
        fn = model.restore if role == "restoration" else model.drift_correct
        result = fn(x, return_trajectory=True, callback=callback, should_cancel=should_cancel, **settings)
    finally:
        bar.close()
    final = bchw_to_comfy(torch.stack(result.final))
    traj = bchw_to_comfy(torch.cat(result.trajectory))
    return final, traj, result


class RestoreTrajectory:
    """Restore images by generating the LQ -> HQ pseudo-video and keeping its last frame."""

    DESCRIPTION = (
        "V-Bridge restoration: the degraded image becomes frame 0 of a short pseudo-video and the "
        "restoration LoRA makes Wan2.2-TI2V-5B generate the path to the clean image; the last frame is the "
        "result.\n\nOutputs the restored images, every frame of every trajectory (B x frames images, in "
        "order) and a text with the settings, time and peak memory. The prompt embedded in the LoRA is used "
        "unless 'conditioning' is connected.")
    CATEGORY = CATEGORY
    FUNCTION = "restore"
    RETURN_TYPES = ("IMAGE", "IMAGE", "STRING")
    RETURN_NAMES = ("restored", "trajectory", "info")
    OUTPUT_TOOLTIPS = (
        "Restored images, same batch size and size as the input.",
        "All frames of each trajectory, image after image (B x frames images): frame 0 is the input, the last the result.",
        "Settings, seconds and peak GPU memory of this run.",
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        """Model, images and sampler settings; optional text conditioning overrides the LoRA's prompt."""
        return {
            "required": {
                "vbridge_model": ("VBRIDGE_MODEL", {"tooltip": _MODEL_TIP}),
                "image": ("IMAGE", {"tooltip": _IMAGE_TIP}),
                "frames": _frames_input(),
                "steps": _steps_input(),
                "seed": _seed_input(),
                "shift": ("FLOAT", {"default": 5.0, "min": 0.1, "max": 20.0, "step": 0.1, "tooltip": (
                    "Flow-matching timestep shift (Wan default 5.0). Higher spends more steps at high noise.")}),
                "solver": (SOLVERS, {"default": "unipc", "tooltip": (
                    "unipc: Wan's default multistep solver. euler: first-order flow-matching Euler. x0_renoise: the "
                    "few-step sampler of step-distilled bases (predict the clean image, re-noise, repeat).")}),
                "guidance": ("FLOAT", {"default": 1.0, "min": 1.0, "max": 20.0, "step": 0.1, "tooltip": (
                    "Classifier-free guidance. 1.0 = one model call per step (fast, the V-Bridge default); above 1 "
                    "adds a negative-prompt pass (the LoRA's embedded negative prompt, or 'negative').")}),
            },
            "optional": {
                "conditioning": ("CONDITIONING", {"tooltip": (
                    "Optional prompt from CLIPTextEncode with a umt5-xxl text encoder (CLIPLoader type 'wan'); "
                    "overrides the prompt embedded in the LoRA. Needed with a full fine-tune (no LoRA): the paper "
                    "preset then wants the release's prompt here and its negative prompt in 'negative'.")}),
                "negative": ("CONDITIONING", {"tooltip": (
                    "Optional negative prompt (CLIPLoader type 'wan'), used when guidance > 1; overrides the "
                    "LoRA's embedded negative prompt.")}),
                "cache": ("STRING", {"default": "none", "tooltip": _CACHE_TIP}),
                "sigmas": ("STRING", {"default": "", "tooltip": _SIGMAS_TIP}),
                "start_sigma": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01,
                                          "tooltip": _START_SIGMA_TIP}),
                **_preset_inputs(),
            },
        }

    def restore(self, vbridge_model: Any, image: Any, frames: int, steps: int, seed: int, shift: float, solver: str,
                guidance: float, conditioning: Any = None, negative: Any = None, cache: str = "none",
                sigmas: str = "", start_sigma: float = 1.0, preset: str = "custom", sigma_grid: str = "diffusers",
                guidance_skip_tail: float = 0.0) -> tuple[Any, Any, str]:
        """Restore ``image`` and return ``(restored, trajectory, info)``."""
        from vbridge_core.runtime import format_info
        from vbridge_core.validate import finite_float

        _check_model(vbridge_model)
        shift, guidance, guidance_skip_tail = _sampler_floats(shift, guidance, guidance_skip_tail)
        start_sigma = finite_float("start_sigma", start_sigma, min=0, max=1, min_inclusive=False, hint="1 = pure noise")
        kw = _settings(preset, vbridge_model, frames=int(frames), steps=int(steps), seed=int(seed), shift=shift,
                       solver=solver, guidance=guidance, sigma_grid=sigma_grid,
                       guidance_skip_tail=guidance_skip_tail, sigmas=parse_sigmas(sigmas),
                       start_sigma=None if start_sigma >= 1.0 else start_sigma)
        final, traj, result = run_on_comfy_images(vbridge_model, image, "restoration", cache=cache, **kw,
                                                  **_prompt_kwargs(vbridge_model, conditioning, negative, kw))
        result.info["preset"] = preset
        return final, traj, format_info(result.info, getattr(vbridge_model, "runtime", None))


class DriftCorrect:
    """Refine restored images with the drift-correction LoRA loaded in 'V-Bridge Load Model'."""

    DESCRIPTION = (
        "V-Bridge drift correction: runs a short trajectory from an already restored image with the "
        "drift-correction LoRA, removing the colour and detail drift the first pass can leave. Needs a "
        "drift-correction LoRA chosen in 'V-Bridge Load Model' (drift_lora).")
    CATEGORY = CATEGORY
    FUNCTION = "correct"
    RETURN_TYPES = ("IMAGE", "IMAGE")
    RETURN_NAMES = ("corrected", "trajectory")
    OUTPUT_TOOLTIPS = (
        "Corrected images, same batch size and size as the input.",
        "All frames of each correction trajectory, image after image (B x frames images).",
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        """Model, restored images and the short-trajectory settings."""
        return {
            "required": {
                "vbridge_model": ("VBRIDGE_MODEL", {"tooltip": _MODEL_TIP + " It must have a drift-correction LoRA."}),
                "image": ("IMAGE", {"tooltip": "Restored image(s) to refine, e.g. the output of 'V-Bridge Restore (Trajectory)'."}),
                "frames": _frames_input(),
                "steps": _steps_input(),
                "seed": _seed_input(),
                "shift": ("FLOAT", {"default": 5.0, "min": 0.1, "max": 20.0, "step": 0.1, "tooltip": (
                    "Flow-matching timestep shift (custom preset; Wan default 5.0).")}),
                "solver": (SOLVERS, {"default": "unipc", "tooltip": "ODE solver (custom preset)."}),
                "guidance": ("FLOAT", {"default": 1.0, "min": 1.0, "max": 20.0, "step": 0.1, "tooltip": (
                    "Classifier-free guidance (custom preset); above 1 adds a negative-prompt pass.")}),
                **_preset_inputs(),
            },
            "optional": {
                "conditioning": ("CONDITIONING", {"tooltip": (
                    "Optional prompt (CLIPTextEncode, CLIPLoader type 'wan'); overrides the drift LoRA's embedded "
                    "prompt, and is required for a drift LoRA that carries none.")}),
                "negative": ("CONDITIONING", {"tooltip": "Optional negative prompt, used when guidance > 1."}),
            },
        }

    def correct(self, vbridge_model: Any, image: Any, frames: int, steps: int, seed: int, shift: float = 5.0,
                solver: str = "unipc", guidance: float = 1.0, preset: str = "custom", sigma_grid: str = "diffusers",
                guidance_skip_tail: float = 0.0, conditioning: Any = None, negative: Any = None) -> tuple[Any, Any]:
        """Drift-correct ``image`` and return ``(corrected, trajectory)``."""
        from vbridge_core.errors import InputError

        _check_model(vbridge_model)
        if "drift_correction" not in vbridge_model.adapters:
            raise InputError("this V-Bridge model has no drift-correction LoRA: pick one as 'drift_lora' in "
                             "'V-Bridge Load Model' (a LoRA trained for drift correction, in models/loras/vbridge/)")
        shift, guidance, guidance_skip_tail = _sampler_floats(shift, guidance, guidance_skip_tail)
        kw = _settings(preset, vbridge_model, frames=int(frames), steps=int(steps), seed=int(seed), shift=shift,
                       solver=solver, guidance=guidance, sigma_grid=sigma_grid,
                       guidance_skip_tail=guidance_skip_tail)
        kw.pop("release_size", None)  # the drift pass refines an already restored (already fitted) image
        final, traj, _ = run_on_comfy_images(vbridge_model, image, "drift_correction", **kw,
                                             **_prompt_kwargs(vbridge_model, conditioning, negative, kw))
        return final, traj
