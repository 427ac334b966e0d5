"""Glue between an in-app front end (the ComfyUI ``TrainLoRA`` node) and :mod:`vbridge_core.training`.

What the node needs beyond :func:`training.loop.train_lora` / :func:`training.drift.train_drift_lora`:

- a safe output file from a user-typed name (:func:`sanitize_output_name`, :func:`output_lora_path`):
  a plain file name only, never a path, so nothing is written outside the LoRA folder;
- one table of setting defaults (:data:`DEFAULT_SETTINGS`, what the settings node offers) and its
  conversion into a :class:`~vbridge_core.training.config.TrainConfig` (:func:`make_train_config`);
- the training prompt: an explicit embedding (CLIPTextEncode) wins, else the one embedded in the
  model's loaded restoration LoRA, else a clear error (:func:`training_prompt`);
- resume semantics that suit a graph that is simply queued again (:func:`run_training`): with
  ``resume`` the newest checkpoint of the same output name is continued; without it old checkpoints
  of that name are removed first; after a finished run the (large) optimizer states are deleted,
  the per-checkpoint LoRA files stay;
- a short text summary and a picture with that message when there is no validation set.

This module imports torch only inside functions, so front ends can read the defaults cheaply.
"""
from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional

from .errors import InputError
from .fileio import safe_output_name, safe_output_path

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .training.config import TrainConfig, TrainProgress, TrainResult

logger = logging.getLogger(__name__)

ROLES = ("restoration", "drift_correction")
#: What the node's ``mode`` offers: the LoRA roles, and ``turbo`` (a few-step student of the loaded restoration LoRA).
MODES = ROLES + ("turbo",)
#: The paper's resolution curriculum (720 is rounded down to 704 by the curriculum parser).
DEFAULT_STAGES = "512:400,720:300,960:300"
LORA_SUFFIX = ".safetensors"
#: What the output-name errors say about LoRA files (see :func:`vbridge_core.fileio.safe_output_name`).
_LORA_NAME_HINTS = dict(what="LoRA", example="my_restoration", folder_hint="models/loras/vbridge/", suffix=LORA_SUFFIX)

#: Defaults of every training setting a front end offers (the settings node's widgets, in order).
#: ``alpha`` 0 means "same as rank" (scale 1). ``restore_steps`` only matters in drift-correction mode.
DEFAULT_SETTINGS: dict[str, Any] = {
    "rank": 32,
    "alpha": 0.0,
    "target_modules": "to_q,to_k,to_v,to_out.0,ffn.net.0.proj,ffn.net.2",
    "learning_rate": 1e-4,
    "optimizer": "adamw",
    "lr_schedule": "constant",
    "warmup_steps": 0,
    "batch_size": 1,
    "grad_accum": 1,
    "mixed_precision": "auto",
    "gradient_checkpointing": True,
    "frames": 5,
    "alpha_schedule": "linear",
    "shift": 5.0,
    "crops_per_pair": 4,
    "flip": True,
    "validation_fraction": 0.1,
    "validation_every": 0,
    "validation_steps": 20,
    "checkpoint_every": 100,
    "restore_steps": 30,
    "quality_weighting": 0.0,
    "turbo_calls": 4,
    "turbo_start_sigma": 0.0,
    "turbo_solver": "x0_renoise",
    "turbo_hq_weight": 0.0,
    "teacher_steps": 50,
}
OPTIMIZERS = ("adamw", "adamw8bit")
LR_SCHEDULES = ("constant", "cosine", "linear")
MIXED_PRECISIONS = ("auto", "bf16", "fp16", "no")


# --------------------------------------------------------------------------------------------
# Output file
# --------------------------------------------------------------------------------------------


def sanitize_output_name(name: Any) -> str:
    """A safe LoRA file stem from a user-typed ``name``; raises :class:`InputError` for unusable names.

    Surrounding blanks and a trailing ``.safetensors`` are dropped. Folders are refused outright
    (``a/b``, ``..\\x``, ``../evil``), as are names starting with a dot, so the file always lands in
    the LoRA folder itself. Other unusual characters (spaces, ``:``, ``*`` ...) become ``_``.
    """
    return safe_output_name(name, **_LORA_NAME_HINTS)


def output_lora_path(folder: str | Path, name: Any) -> Path:
    """``folder/<sanitised name>.safetensors``, checked to lie directly inside ``folder``."""
    return safe_output_path(folder, name, **_LORA_NAME_HINTS)


# --------------------------------------------------------------------------------------------
# Settings -> TrainConfig
# --------------------------------------------------------------------------------------------


def merged_settings(settings: Optional[Mapping[str, Any]]) -> dict[str, Any]:
    """:data:`DEFAULT_SETTINGS` overridden by ``settings``; unknown keys are an error."""
    out = dict(DEFAULT_SETTINGS)
    if settings:
        unknown = sorted(set(settings) - set(DEFAULT_SETTINGS))
        if unknown:
            raise InputError(f"unknown training settings {unknown}; known: {sorted(DEFAULT_SETTINGS)}")
        out.update(settings)
    return out


def refuse_overwriting_loaded_loras(pipe: Any, out_path: Path) -> None:
    """Refuse an output LoRA path that is one of the LoRAs loaded in ``pipe`` (the restoration LoRA a
    drift or turbo run starts from, the drift or accelerator LoRA): training would replace it (issue 9).
    Also removes the temporaries a killed earlier run left beside the output and in its checkpoints."""
    from .outputs import refuse_overwriting_inputs

    loaded = {f"the loaded {role.replace('_', '-')} LoRA": getattr(ad.get("file"), "path", None)
              for role, ad in getattr(pipe, "adapters", {}).items()}
    refuse_overwriting_inputs({"output_name": out_path}, loaded)
    from .outputs import clean_stale_temporaries
    from .training.checkpoint import checkpoint_dir

    for folder in (out_path.parent, checkpoint_dir(out_path)):  # what a killed earlier run left
        clean_stale_temporaries(folder, recursive=False)


def make_train_config(settings: Optional[Mapping[str, Any]], *, stages: str, seed: int, role: str) -> "TrainConfig":
    """A validated :class:`TrainConfig` from front-end settings, the stage string, the seed and the role."""
    from .training.config import TrainConfig
    from .trajectory import parse_schedule

    if role not in MODES:
        raise InputError(f"mode must be one of {MODES}, got {role!r}")
    s = merged_settings(settings)
    if not isinstance(stages, str) or not stages.strip():
        raise InputError(f"stages is empty: give the resolution curriculum as resolution:steps stages, e.g. "
                         f"{DEFAULT_STAGES} (or 512:400 for one stage)")
    modules = [m.strip() for m in str(s["target_modules"]).split(",") if m.strip()]
    rank = int(s["rank"])
    alpha = float(s["alpha"]) if float(s["alpha"]) > 0 else float(rank)
    cfg = TrainConfig(
        stages=stages.strip(), rank=rank, alpha=alpha, target_modules=modules,
        learning_rate=float(s["learning_rate"]), optimizer=str(s["optimizer"]), lr_schedule=str(s["lr_schedule"]),
        warmup_steps=int(s["warmup_steps"]), batch_size=int(s["batch_size"]), grad_accum=int(s["grad_accum"]),
        mixed_precision=str(s["mixed_precision"]), gradient_checkpointing=bool(s["gradient_checkpointing"]),
        frames=int(s["frames"]), alpha_schedule=parse_schedule(str(s["alpha_schedule"])), shift=float(s["shift"]),
        seed=int(seed), role="restoration" if role == "turbo" else role, crops_per_pair=int(s["crops_per_pair"]), flip=bool(s["flip"]),
        validation_fraction=float(s["validation_fraction"]), validation_every=int(s["validation_every"]),
        validation_steps=int(s["validation_steps"]), checkpoint_every=int(s["checkpoint_every"]),
        quality_weighting=float(s["quality_weighting"]))
    cfg.validate()
    if role != "turbo":  # a turbo student copies its teacher's modules
        from .training.targets import check_target_modules

        check_target_modules(cfg.target_modules)
    return cfg


def make_turbo_settings(settings: Optional[Mapping[str, Any]], *, seed: int) -> Any:
    """The :class:`~vbridge_core.training.turbo.TurboSettings` of the front-end settings (start sigma 0 = pure noise)."""
    from .training.turbo import TurboSettings

    s = merged_settings(settings)
    start = float(s["turbo_start_sigma"])
    return TurboSettings(calls=int(s["turbo_calls"]), start_sigma=start if start > 0 else None,
                         solver=str(s["turbo_solver"]), hq_weight=float(s["turbo_hq_weight"]),
                         teacher_steps=int(s["teacher_steps"]), teacher_seed=int(seed)).validate()


# --------------------------------------------------------------------------------------------
# Prompt
# --------------------------------------------------------------------------------------------


def restoration_lora_file(pipe: Any) -> Optional[Path]:
    """The file of the restoration LoRA loaded on ``pipe`` (``None`` when there is none)."""
    entry = getattr(pipe, "adapters", {}).get("restoration")
    lf = entry.get("file") if entry else None
    path = getattr(lf, "path", None)
    return Path(path) if path is not None else None


def training_prompt(pipe: Any, role: str, prompt_embeds: Optional["torch.Tensor"] = None,
                    negative_prompt_embeds: Optional["torch.Tensor"] = None
                    ) -> tuple["torch.Tensor", Optional["torch.Tensor"], dict[str, Any]]:
    """``(prompt, negative or None, metadata)`` to train with.

    Precedence: the given embeddings (from a text encoder) > the prompt embedded in the model's
    loaded restoration LoRA > :class:`InputError`. Tensors are cloned outside inference mode (ComfyUI
    runs nodes under ``torch.inference_mode()``, whose tensors cannot be used for training).
    """
    import torch

    meta: dict[str, Any] = {}
    pos, neg = prompt_embeds, negative_prompt_embeds
    lf = getattr(pipe, "adapters", {}).get("restoration", {}).get("file")
    if pos is not None:
        meta["prompt"] = "(embedding from the conditioning input)"
    elif lf is not None and lf.prompt_embeds is not None:
        pos = lf.prompt_embeds
        neg = neg if neg is not None else lf.negative_prompt_embeds
        for k in ("prompt", "negative_prompt"):
            v = lf.metadata.get(f"vbridge.{k}")
            if v is not None:
                meta[k] = v
        meta.setdefault("prompt", f"(embedding from {lf.path.name if lf.path else 'the restoration LoRA'})")
        logger.info("training prompt: the one embedded in the restoration LoRA %s", lf.path or "")
    else:
        hint = ("connect 'conditioning' from CLIPTextEncode fed by CLIPLoader (type 'wan', "
                "umt5_xxl_fp8_e4m3fn_scaled.safetensors) with the training prompt, e.g. the V-Bridge release prompt "
                "(in the shipped train_restoration_lora workflow they are bypassed: select both and press Ctrl+B)")
        if role == "drift_correction":
            raise InputError(f"no training prompt: the restoration LoRA carries no prompt embedding; {hint}")
        raise InputError(f"no training prompt: {hint}; or load a V-Bridge restoration LoRA that embeds its prompt "
                         "in 'V-Bridge Load Model'")
    with torch.inference_mode(False):
        pos = pos.detach().clone().float()
        neg = neg.detach().clone().float() if neg is not None else None
    return pos, neg, meta


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def remove_checkpoints(out_path: str | Path, *, states_only: bool = False) -> int:
    """Delete the checkpoints of the run writing ``out_path`` (only the state files with ``states_only``).

    Only files named like checkpoints (``state-stepNNNNNN.safetensors``, ``lora-stepNNNNNN.safetensors``,
    and the pickled ``state-stepNNNNNN.pt`` of earlier versions, which are never opened) are touched.
    Returns how many files were removed.
    """
    from .training.checkpoint import LEGACY_STATE_RE, checkpoint_dir, list_checkpoints, lora_path

    folder = checkpoint_dir(out_path)
    removed = 0
    for step, state in list_checkpoints(folder) + list_checkpoints(folder, LEGACY_STATE_RE):
        for f in ([state] if states_only else [state, lora_path(folder, step)]):
            try:
                f.unlink()
                removed += 1
            except OSError:
                pass
    if not states_only and folder.is_dir():
        for f in folder.glob("lora-step*.safetensors"):
            try:
                f.unlink()
                removed += 1
            except OSError:
                pass
    return removed


@contextlib.contextmanager
def models_on_device(pipe: Any):
    """Training needs the DiT on the compute device the whole time: a pipeline loaded with ``offload``
    (models parked in RAM) gets both models moved there and offload switched off for the block, then
    parked again. No-op for pipelines without offload."""
    import torch

    if not getattr(pipe, "offload", False):
        yield
        return
    pipe.offload = False
    pipe.transformer.to(pipe.device)
    pipe.vae.to(pipe.device)
    logger.info("memory 'offload' is suspended while training: the DiT stays on %s", pipe.device)
    try:
        yield
    finally:
        pipe.transformer.to("cpu")
        pipe.vae.to("cpu")
        pipe.offload = True
        if pipe.device.type == "cuda":
            torch.cuda.empty_cache()


def run_training(pipe: Any, pairs: Any, config: "TrainConfig", out_path: str | Path, *,
                 prompt_embeds: "torch.Tensor", negative_prompt_embeds: Optional["torch.Tensor"] = None,
                 metadata: Optional[dict[str, Any]] = None,
                 callback: Optional[Callable[["TrainProgress"], None]] = None,
                 should_cancel: Optional[Callable[[], bool]] = None, resume: bool = True,
                 restore_steps: int = 30, turbo: Any = None) -> "TrainResult":
    """Train ``config.role``'s LoRA into ``out_path`` (see the module docstring for resume and clean-up).

    Drift-correction mode uses the restoration LoRA loaded on ``pipe`` (error if none) to make its
    inputs; with ``turbo`` (:class:`~vbridge_core.training.turbo.TurboSettings`) that LoRA is the teacher of
    a few-step student. The pipeline's adapters are left as they were. Runs outside inference mode.
    :class:`~vbridge_core.training.loop.TrainingCancelled` propagates with its checkpoint.
    """
    import torch

    from .training.checkpoint import checkpoint_dir

    out_path = Path(out_path)
    if config.role == "drift_correction" and restoration_lora_file(pipe) is None:
        raise InputError("drift-correction training needs the restoration LoRA it corrects: pick it as "
                         "'restoration_lora' in 'V-Bridge Load Model' (train one first with mode 'restoration')")
    if turbo is not None and restoration_lora_file(pipe) is None:
        raise InputError("turbo training distils the restoration LoRA loaded in the model: pick it as "
                         "'restoration_lora' in 'V-Bridge Load Model' (train one first with mode 'restoration')")
    if not resume:
        n = remove_checkpoints(out_path)
        if n:
            logger.info("resume is off: removed %d old checkpoint file(s) of %s", n, out_path.name)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if getattr(pipe, "compiled", None) and hasattr(pipe, "uncompile"):
        # the restore nodes compile the DiT blocks on CUDA (inference only); training runs them eagerly
        logger.info("dropping the compiled DiT blocks for training (restoring compiles them again)")
        pipe.uncompile()
    saved_strengths = {r: a.get("strength") for r, a in getattr(pipe, "adapters", {}).items()}
    kw: dict[str, Any] = dict(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                              metadata=metadata, callback=callback, should_cancel=should_cancel,
                              resume="auto" if resume else None)
    try:
        with torch.inference_mode(False), models_on_device(pipe):
            if config.role == "drift_correction":
                from .training.drift import train_drift_lora

                lora = restoration_lora_file(pipe)
                lf = pipe.adapters["restoration"]["file"]
                frames = int(lf.metadata.get("vbridge.frames", 5))  # restore as the restoration LoRA was trained
                result = train_drift_lora(pipe, pairs, lora, config, out_path,
                                          restore_settings=dict(steps=int(restore_steps), seed=config.seed,
                                                                frames=frames),
                                          cache_dir=checkpoint_dir(out_path) / "cache", **kw)
            elif turbo is not None:
                from .training.turbo import train_turbo_lora

                result = train_turbo_lora(pipe, pairs, restoration_lora_file(pipe), config, out_path, turbo=turbo,
                                          cache_dir=checkpoint_dir(out_path) / "cache", **kw)
            else:
                from .training.loop import train_lora

                result = train_lora(pipe, pairs, config, out_path, **kw)
    except InputError as e:
        if "cannot resume" in str(e):
            raise InputError(f"{e}. In the node: set 'resume' to false to start over (this name's old checkpoints "
                             "are removed), or choose another output_name") from None
        raise
    finally:
        # drift data generation reloads the restoration LoRA at strength 1: put the user's strengths back
        for role, strength in saved_strengths.items():
            if role in pipe.adapters and strength is not None:
                pipe.adapters[role]["strength"] = strength
    n = remove_checkpoints(out_path, states_only=True)
    if n:
        logger.info("training finished: removed %d resumable state file(s) (the LoRA is complete)", n)
    return result


def summary(result: "TrainResult", config: "TrainConfig") -> str:
    """A few lines about a finished run: file, steps, time, loss, validation before/after."""
    fin = [v for v in result.losses if math.isfinite(v)]
    lines = [f"LoRA: {result.path}",
             f"mode: {config.role}, stages {','.join(str(s) for s in config.curriculum())}, "
             f"rank {config.rank}, alpha {config.alpha:g}, seed {config.seed}",
             f"steps: {len(result.losses)} in {result.seconds:.1f} s ({len(result.skipped_steps)} skipped)"]
    if fin:
        k = max(1, min(10, len(fin) // 10 or 1))
        lines.append(f"loss: {sum(fin[:k]) / k:.4f} (first {k}) -> {sum(fin[-k:]) / k:.4f} (last {k})")
    base = next((v for v in result.validation if v.get("label") == "base"), None)
    final = next((v for v in reversed(result.validation) if v.get("label") == "final"), None)
    if base and final:
        lines.append(f"validation PSNR {base['psnr']:.2f} -> {final['psnr']:.2f} dB, "
                     f"SSIM {base['ssim']:.4f} -> {final['ssim']:.4f}")
    elif not result.validation:
        lines.append("validation: none (no held-out pairs; raise validation_fraction or add pairs)")
    return "\n".join(lines)


def message_image(text: str, width: int = 512, height: int = 128) -> "torch.Tensor":
    """A ``[3, H, W]`` grey picture with ``text`` (for an IMAGE output that has nothing to show)."""
    import numpy as np
    import torch
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), (235, 235, 235))
    ImageDraw.Draw(img).multiline_text((12, 12), text, fill=(40, 40, 40))
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255.0
