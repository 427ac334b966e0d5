"""Building a ready-to-run :class:`~vbridge_core.pipeline.VBridgePipeline` with runtime options.

This is what the ComfyUI loader node (and any script) uses on top of
:meth:`VBridgePipeline.from_files`: a precision name (``bf16``, ``fp16``, ``fp8_e4m3fn``), an
attention backend name (``auto``, ``sdpa``, ``flash``, ``sage``) with a logged SDPA fallback when
the backend is not installed, and the LoRAs attached *after* fp8 storage is enabled so their own
weights stay in the compute dtype. Also small helpers for prompt embeddings coming from other
text-encoding front ends and for printing a run's info dict.

Everything uses diffusers' own switches: ``enable_layerwise_casting`` for fp8 weight storage and
``set_attention_backend`` for the attention kernels.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from .errors import InputError

logger = logging.getLogger(__name__)

#: Precision names, in the order the loader node offers them.
PRECISIONS = ("bf16", "fp16", "fp8_e4m3fn")
#: Attention backend names, in the order the loader node offers them.
ATTENTION_BACKENDS = ("auto", "sdpa", "flash", "sage")
#: Our names -> diffusers ``AttentionBackendName`` values.
_DIFFUSERS_BACKEND = {"sdpa": "native", "flash": "flash", "sage": "sage"}
#: Length of umt5-xxl prompt embeddings as Wan2.2 was trained (diffusers and the official code pad to it).
WAN_TEXT_LEN = 512


def precision_dtypes(precision: str, device: torch.device | str) -> tuple[torch.dtype, Optional[torch.dtype]]:
    """``(compute dtype, fp8 storage dtype or None)`` for a precision name on ``device``.

    On CPU everything runs in fp32 whatever was asked (bf16/fp16 matmuls on CPU are slow and fp8
    storage saves nothing worth the casting there); the choice is logged.
    """
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; use one of {PRECISIONS}")
    dev = torch.device(device)
    if dev.type == "cpu":
        if precision != "bf16":
            logger.info("precision %s ignored on CPU: using fp32", precision)
        return torch.float32, None
    if precision == "fp16":
        return torch.float16, None
    if precision == "fp8_e4m3fn":
        return torch.bfloat16, torch.float8_e4m3fn
    return torch.bfloat16, None


def enable_fp8_storage(transformer: torch.nn.Module, compute_dtype: torch.dtype = torch.bfloat16) -> None:
    """Store the DiT's weights in fp8 (e4m3fn) and compute in ``compute_dtype``.

    diffusers' ``enable_layerwise_casting`` upcasts each layer's weights just before it runs; norms,
    embeddings and the fp32-kept modules stay as they are (diffusers' own skip lists). Call it
    before attaching LoRAs so the adapters are not stored in fp8.
    """
    transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=compute_dtype)
    logger.info("DiT weights stored in fp8_e4m3fn, computed in %s", str(compute_dtype).replace("torch.", ""))


def _active_diffusers_backend() -> Optional[str]:
    try:
        from diffusers.models.attention_dispatch import _AttentionBackendRegistry

        active = _AttentionBackendRegistry.get_active_backend()
        active = active[0] if isinstance(active, tuple) else active
        return getattr(active, "value", None)
    except Exception:  # noqa: BLE001 - private API; unknown means "set it explicitly"
        return None


def set_attention(transformer: torch.nn.Module, attention: str, device: torch.device | str) -> str:
    """Select the attention kernel of ``transformer``; returns the name actually used.

    ``auto`` and ``sdpa`` use PyTorch's scaled-dot-product attention (diffusers' default).
    ``flash`` / ``sage`` need their packages and a CUDA device; when either is missing the model
    keeps SDPA and a warning says why.
    """
    if attention not in ATTENTION_BACKENDS:
        raise InputError(f"unknown attention backend {attention!r}; use one of {ATTENTION_BACKENDS}")
    wanted = "sdpa" if attention == "auto" else attention
    if wanted != "sdpa" and torch.device(device).type != "cuda":
        logger.warning("attention %r needs a CUDA device; using SDPA on %s", wanted, device)
        wanted = "sdpa"
    if wanted != "sdpa":
        try:
            transformer.set_attention_backend(_DIFFUSERS_BACKEND[wanted])
            logger.info("attention backend: %s", wanted)
            return wanted
        except (RuntimeError, ValueError, ImportError) as e:
            logger.warning("attention %r is not available (%s); using SDPA", wanted, e)
    # diffusers keeps a process-wide active backend: reset it if another model changed it.
    if _active_diffusers_backend() not in (None, "native") and hasattr(transformer, "set_attention_backend"):
        transformer.set_attention_backend("native")
    return "sdpa"


def load_pipeline(*, dit: str | os.PathLike, vae: str | os.PathLike, lora: str | os.PathLike | None = None,
                  lora_strength: float = 1.0, drift_lora: str | os.PathLike | None = None,
                  drift_strength: float = 1.0, precision: str = "bf16", attention: str = "auto",
                  offload: bool = False, device: torch.device | str | None = None,
                  accelerator_lora: str | os.PathLike | None = None, accelerator_strength: float = 1.0,
                  allow_partial_lora: bool = False) -> Any:
    """Load a :class:`VBridgePipeline` with a precision name, an attention backend and LoRAs.

    ``accelerator_lora`` is a step-distilled base as a LoRA (FastWan's ComfyUI LoRA), stacked under
    the V-Bridge LoRAs and active in every pass (role ``accelerator``).

    ``device`` defaults to CUDA when available, else CPU. Loading runs outside inference mode (as
    ComfyUI executes nodes inside ``torch.inference_mode()``) so the weights stay usable for LoRA
    training on the same pipeline. The chosen options are recorded in ``pipe.runtime``.
    ``allow_partial_lora=True`` applies what fits of a LoRA and lists the rest (see ``VBridgePipeline.load_lora``).
    """
    from .pipeline import VBridgePipeline, default_device

    dev = torch.device(device) if device is not None else default_device()
    compute, storage = precision_dtypes(precision, dev)
    if attention not in ATTENTION_BACKENDS:
        raise InputError(f"unknown attention backend {attention!r}; use one of {ATTENTION_BACKENDS}")
    with torch.inference_mode(False):
        pipe = VBridgePipeline.from_files(dit=dit, vae=vae, device=dev, dtype=compute, offload=offload)
        if storage is not None:
            enable_fp8_storage(pipe.transformer, compute)
        used = set_attention(pipe.transformer, attention, dev)
        if accelerator_lora:
            pipe.load_lora(accelerator_lora, role="accelerator", strength=accelerator_strength)
        if lora:
            pipe.load_lora(lora, role="restoration", strength=lora_strength, allow_partial=allow_partial_lora)
        if drift_lora:
            pipe.load_lora(drift_lora, role="drift_correction", strength=drift_strength,
                           allow_partial=allow_partial_lora)
    pipe.runtime = dict(precision=precision, compute_dtype=str(compute).replace("torch.", ""),
                        weight_storage=str(storage or compute).replace("torch.", ""), attention=used,
                        offload=bool(offload), device=str(dev), dit=str(dit), vae=str(vae),
                        lora=str(lora) if lora else None, drift_lora=str(drift_lora) if drift_lora else None,
                        accelerator_lora=str(accelerator_lora) if accelerator_lora else None)
    return pipe


def file_signature(path: str | os.PathLike | None) -> Optional[tuple[str, int, int]]:
    """``(resolved path, mtime_ns, size)`` of a file (for a folder: of its newest entry), or None if missing.

    Used to key caches so an edited or replaced file is reloaded.
    """
    if path is None:
        return None
    p = Path(path).expanduser()
    try:
        st = p.stat()
    except OSError:
        return None
    if p.is_dir():
        stats = [q.stat() for q in p.rglob("*") if q.is_file()]
        return (str(p.resolve()), max((s.st_mtime_ns for s in stats), default=st.st_mtime_ns),
                sum(s.st_size for s in stats))
    return str(p.resolve()), st.st_mtime_ns, st.st_size


def prepare_prompt_embeds(embeds: torch.Tensor, text_dim: int, what: str = "conditioning") -> torch.Tensor:
    """Check an external prompt embedding ``[1, L, D]`` (or ``[L, D]``) and zero-pad it to 512 tokens.

    Wan2.2 was trained with umt5-xxl embeddings padded with zeros to 512 tokens (diffusers and the
    official code both do this); longer embeddings are kept as they are. Raises :class:`InputError`
    when ``D`` is not the DiT's text width (another text encoder was used).
    """
    if not isinstance(embeds, torch.Tensor):
        raise InputError(f"{what}: expected a tensor of prompt embeddings, got {type(embeds).__name__}")
    if embeds.ndim == 2:
        embeds = embeds.unsqueeze(0)
    if embeds.ndim != 3:
        raise InputError(f"{what}: expected prompt embeddings [1, tokens, {text_dim}], got shape {tuple(embeds.shape)}")
    if embeds.shape[-1] != text_dim:
        raise InputError(f"{what} has width {embeds.shape[-1]}, but Wan2.2 needs umt5-xxl embeddings of width "
                         f"{text_dim}: encode the prompt with CLIPLoader type 'wan' and a umt5_xxl text encoder")
    embeds = embeds.detach().clone().float()  # clone: tensors made under inference mode stay usable
    return pad_prompt_embeds(embeds)


def pad_prompt_embeds(embeds: torch.Tensor, text_len: int = WAN_TEXT_LEN) -> torch.Tensor:
    """``[B, L, D]`` prompt embeddings zero-padded to ``text_len`` tokens (longer ones are kept as they are).

    The official Wan2.2 model always sees umt5 embeddings padded with zeros to 512 tokens (the text
    encoder's padded positions are zeroed, and both the official code and diffusers' text path pad);
    the zero tokens still take part in cross-attention, so an unpadded embedding changes the output
    (by 2.7e-2 on a tiny model). Every embedding that reaches the DiT goes through here.
    """
    if embeds.ndim == 2:
        embeds = embeds.unsqueeze(0)
    if embeds.shape[1] >= text_len:
        return embeds
    pad = embeds.new_zeros(embeds.shape[0], text_len - embeds.shape[1], embeds.shape[2])
    return torch.cat([embeds, pad], dim=1)


def format_info(info: Mapping[str, Any], runtime: Optional[Mapping[str, Any]] = None) -> str:
    """A readable multi-line summary of a run's info dict (settings, seconds, memory) and the model options."""
    lines = []
    order = ["role", "images", "frames", "steps", "dit_calls_per_image", "seed", "shift", "solver", "sigma_grid", "guidance",
             "guidance_skip_tail", "batch_size", "adapters", "device", "dtype", "offload", "seconds", "peak_memory_gb"]
    keys = [k for k in order if k in info] + [k for k in info if k not in order]
    for k in keys:
        v = info[k]
        if k == "adapters":
            v = ", ".join(f"{r} x{s:g}" for r, s in v.items()) if v else "none (base model)"
        elif k == "seconds":
            k, v = "time", f"{v:.2f} s"
        elif k == "peak_memory_gb":
            k, v = "peak GPU memory", f"{v:.2f} GiB"
        lines.append(f"{k}: {v}")
    if "peak_memory_gb" not in info:
        lines.append("peak GPU memory: n/a (not on CUDA)")
    if runtime:
        for k in ("precision", "weight_storage", "attention"):
            if k in runtime:
                lines.append(f"{k}: {runtime[k]}")
    return "\n".join(lines)
