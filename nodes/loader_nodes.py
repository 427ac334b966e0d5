"""``LoadVBridge``: load the Wan2.2-TI2V-5B DiT + VAE and the V-Bridge LoRAs as one model handle.

The handle (``VBRIDGE_MODEL``) is the :class:`vbridge_core.pipeline.VBridgePipeline` itself.
Loading twice with the same settings (and unchanged files) returns the same object: a module-level
table holds *weak* references only, so the model lives exactly as long as ComfyUI keeps the node's
output in its execution cache. ComfyUI's "Unload models" / "Free model and node cache" buttons
(``/free``) reset that cache, which drops the last reference and frees the model.
"""
from __future__ import annotations

import logging
import weakref
from typing import Any

from . import comfy_bridge

logger = logging.getLogger(__name__)

CATEGORY = "V-Bridge"
#: The file names ComfyUI users have (same as ``vbridge_core.models.DIT_FILE_NAME`` / ``VAE_FILE_NAME``;
#: repeated here so building the node list does not import torch).
DEFAULT_DIT = "wan2.2_ti2v_5B_fp16.safetensors"
DEFAULT_VAE = "wan2.2_vae.safetensors"
PRECISIONS = ["bf16", "fp16", "fp8_e4m3fn"]
ATTENTIONS = ["auto", "sdpa", "flash", "sage"]
MEMORY_MODES = ["keep on GPU", "offload"]
NONE = "none"

#: settings key -> weak reference to a loaded pipeline.
_CACHE: dict[tuple, "weakref.ReferenceType[Any]"] = {}
_lora_folder_registered = False


def _combo(options: list[str], preferred: str | None = None, **extra: Any) -> tuple[list[str], dict[str, Any]]:
    opts = dict(extra)
    if preferred is not None and preferred in options:
        opts["default"] = preferred
    return options, opts


def _ensure_lora_folder() -> None:
    """Register ``models/loras/vbridge`` once, and only inside ComfyUI (it may create the folder)."""
    global _lora_folder_registered
    if not _lora_folder_registered and comfy_bridge.in_comfyui():
        comfy_bridge.register_lora_folder()
    _lora_folder_registered = True


def _resolve(folder: str, name: str) -> Any:
    return comfy_bridge.full_path(folder, name)


def cache_size() -> int:
    """Number of loaded models still alive in the reuse table (for tests and logs)."""
    return sum(1 for r in _CACHE.values() if r() is not None)


_ROLE_CACHE: dict[str, tuple[Any, str | None]] = {}


def _lora_role(name: str) -> str | None:
    """The V-Bridge role written in a listed LoRA's header (cached per file signature), or None."""
    from vbridge_core.lora import read_lora_role
    from vbridge_core.runtime import file_signature

    path = comfy_bridge.full_path("loras", name)
    sig = file_signature(path)
    hit = _ROLE_CACHE.get(name)
    if hit is not None and hit[0] == sig:
        return hit[1]
    role = read_lora_role(path) if sig is not None else None
    _ROLE_CACHE[name] = (sig, role)
    return role


def _ordered(names: list[str], roles: dict[str, str | None], first: str) -> list[str]:
    """``none``, then the LoRAs of role ``first``, then those of the other V-Bridge role, then the rest."""
    rank = {"restoration": 1, "drift_correction": 1}
    rank[first] = 0
    return [NONE] + sorted(names, key=lambda n: (rank.get(roles.get(n) or "", 2), n))


class LoadVBridge:
    """Load the V-Bridge model: Wan2.2-TI2V-5B DiT + Wan2.2 VAE + restoration / drift-correction LoRAs."""

    DESCRIPTION = (
        "Loads the Wan2.2-TI2V-5B diffusion transformer and the Wan2.2 VAE from ComfyUI's model folders, "
        "and attaches a V-Bridge restoration LoRA and (optionally) a drift-correction LoRA on the same base, "
        "optionally over a step-distilled accelerator LoRA (FastWan) for the 'turbo' preset. "
        "Both LoRAs carry the prompt they were trained with, so no text encoder is needed.\n\n"
        "Files: models/diffusion_models/wan2.2_ti2v_5B_fp16.safetensors and models/vae/wan2.2_vae.safetensors "
        "(Hugging Face Comfy-Org/Wan_2.2_ComfyUI_Repackaged); LoRAs in models/loras/vbridge/.\n\n"
        "The same settings reuse the already loaded model. 'Unload models' in ComfyUI frees it.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("VBRIDGE_MODEL",)
    RETURN_NAMES = ("vbridge_model",)
    OUTPUT_TOOLTIPS = ("The loaded V-Bridge model (DiT + VAE + LoRAs) for the V-Bridge restore nodes.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        """Model files from ComfyUI's folders plus precision, attention and memory options."""
        _ensure_lora_folder()
        names = [n for n in comfy_bridge.filename_list("loras") if ".checkpoints/" not in n]
        roles = {n: _lora_role(n) for n in names}
        loras = [NONE] + names
        strength = dict(default=1.0, min=-2.0, max=2.0, step=0.05)
        return {
            "required": {
                "dit": _combo(comfy_bridge.filename_list("diffusion_models"), DEFAULT_DIT, tooltip=(
                    f"The Wan2.2-TI2V-5B diffusion transformer from models/diffusion_models (default {DEFAULT_DIT}; "
                    "fp16/bf16/fp8 files and full V-Bridge fine-tunes work).")),
                "vae": _combo(comfy_bridge.filename_list("vae"), DEFAULT_VAE, tooltip=(
                    f"The Wan2.2 VAE from models/vae (default {DEFAULT_VAE}). The Wan2.1 VAE does not fit the 5B model.")),
                "restoration_lora": (_ordered(names, roles, "restoration"), {"default": NONE, "tooltip": (
                    "V-Bridge restoration LoRA (models/loras/vbridge/...), trained for one degradation; "
                    "restoration LoRAs are listed first, then drift-correction ones, then other LoRAs. "
                    "'none' runs the bare base model (or a full fine-tune picked as dit).")}),
                "restoration_strength": ("FLOAT", dict(strength, tooltip="Strength of the restoration LoRA (1.0 = as trained).")),
                "drift_lora": (_ordered(names, roles, "drift_correction"), {"default": NONE, "tooltip": (
                    "Optional drift-correction LoRA, needed by 'V-Bridge Drift Correct' to refine restored images; "
                    "drift-correction LoRAs are listed first.")}),
                "drift_strength": ("FLOAT", dict(strength, tooltip="Strength of the drift-correction LoRA (1.0 = as trained).")),
                "precision": (PRECISIONS, {"default": "bf16", "tooltip": (
                    "Weight precision on the GPU. bf16: best quality (~10 GB for the DiT). fp16: for GPUs without "
                    "bf16. fp8_e4m3fn: DiT weights stored in fp8 and computed in bf16 (about half the VRAM). "
                    "On CPU fp32 is used automatically.")}),
                "attention": (ATTENTIONS, {"default": "auto", "tooltip": (
                    "Attention kernel. auto/sdpa: PyTorch SDPA. flash / sage: FlashAttention / SageAttention when "
                    "installed (falls back to SDPA with a warning otherwise).")}),
                "memory": (MEMORY_MODES, {"default": "keep on GPU", "tooltip": (
                    "keep on GPU: fastest. offload: keep the models in RAM and move each to the GPU only while it "
                    "works (peak VRAM is one model, not two).")}),
            },
            "optional": {
                "accelerator_lora": (loras, {"default": NONE, "tooltip": (
                    "Optional step-distilled base as a LoRA, e.g. Kijai's Wan2_2_5B_FastWanFullAttn_lora_rank_128_bf16"
                    ".safetensors (FastWan, 3-step DMD). Always active under the V-Bridge LoRAs; use it with the "
                    "'turbo' preset of the restore node (3 model calls instead of 50).")}),
                "accelerator_strength": ("FLOAT", dict(strength, tooltip="Strength of the accelerator LoRA (1.0 = as distilled).")),
                "allow_partial_lora": ("BOOLEAN", {"default": False, "tooltip": (
                    "Off: a LoRA with keys that fit no layer of Wan2.2-TI2V-5B is refused with the list of them. "
                    "On: apply the part that fits and list the rest in the console and in the restore info "
                    "(e.g. LoHa/LoKr/DoRA keys, or layers of another model size).")}),
            },
        }

    @classmethod
    def IS_CHANGED(cls, dit: str, vae: str, restoration_lora: str, drift_lora: str, accelerator_lora: str = NONE,
                   **_: Any) -> str:
        """Re-run when a chosen file is replaced on disk (same name, new contents)."""
        from vbridge_core.runtime import file_signature

        sigs = [file_signature(_resolve(f, n)) for f, n in (("diffusion_models", dit), ("vae", vae),
                                                             ("loras", restoration_lora), ("loras", drift_lora),
                                                             ("loras", accelerator_lora))
                if n and n != NONE]
        return repr(sigs)

    def load(self, dit: str, vae: str, restoration_lora: str, restoration_strength: float, drift_lora: str,
             drift_strength: float, precision: str, attention: str, memory: str, accelerator_lora: str = NONE,
             accelerator_strength: float = 1.0, allow_partial_lora: bool = False) -> tuple[Any]:
        """Load (or reuse) the pipeline for these settings."""
        from vbridge_core.errors import InputError
        from vbridge_core.pipeline import default_device
        from vbridge_core.runtime import file_signature, load_pipeline

        from vbridge_core.validate import finite_float

        if memory not in MEMORY_MODES:
            raise InputError(f"unknown memory mode {memory!r}; use one of {MEMORY_MODES}")
        # before any model loads: NaN/inf strengths would turn every output into NaN
        restoration_strength = finite_float("restoration_strength", restoration_strength, hint="1.0 = as trained")
        drift_strength = finite_float("drift_strength", drift_strength, hint="1.0 = as trained")
        accelerator_strength = finite_float("accelerator_strength", accelerator_strength, hint="1.0 = as distilled")
        device = comfy_bridge.torch_device()
        if device is None:
            device = default_device()
        dit_path = _resolve("diffusion_models", dit)
        vae_path = _resolve("vae", vae)
        lora_path = _resolve("loras", restoration_lora) if restoration_lora and restoration_lora != NONE else None
        drift_path = _resolve("loras", drift_lora) if drift_lora and drift_lora != NONE else None
        accel_path = _resolve("loras", accelerator_lora) if accelerator_lora and accelerator_lora != NONE else None
        key = (str(device), precision, attention, memory,
               str(dit_path), file_signature(dit_path), str(vae_path), file_signature(vae_path),
               str(lora_path), file_signature(lora_path), float(restoration_strength) if lora_path else None,
               str(drift_path), file_signature(drift_path), float(drift_strength) if drift_path else None,
               str(accel_path), file_signature(accel_path), float(accelerator_strength) if accel_path else None,
               bool(allow_partial_lora))
        for k in [k for k, r in _CACHE.items() if r() is None]:
            del _CACHE[k]
        ref = _CACHE.get(key)
        pipe = ref() if ref is not None else None
        if pipe is not None:
            logger.info("V-Bridge: reusing the loaded model (same files and settings)")
            return (pipe,)
        comfy_bridge.make_room()
        pipe = load_pipeline(dit=dit_path, vae=vae_path, lora=lora_path, lora_strength=restoration_strength,
                             drift_lora=drift_path, drift_strength=drift_strength, precision=precision,
                             attention=attention, offload=memory == "offload", device=device,
                             accelerator_lora=accel_path, accelerator_strength=accelerator_strength,
                             allow_partial_lora=bool(allow_partial_lora))
        _CACHE[key] = weakref.ref(pipe)
        return (pipe,)
