"""``TrainLoRASettings`` and ``TrainLoRA``: train a V-Bridge restoration or drift-correction LoRA in the graph.

The node converts ComfyUI inputs and reports progress; everything else is in
:mod:`vbridge_core.train_runtime` (output name, settings, prompt, resume) and
:mod:`vbridge_core.training` (the loop). Cancel is handled so that it keeps the work done: the
trainer polls :func:`comfy_bridge.interrupt_requested` before every step and, when Cancel was
pressed, writes a resumable checkpoint and stops; the node then raises ComfyUI's own interrupt so
the run shows as cancelled. The progress bar never raises on Cancel itself
(:meth:`comfy_bridge.ProgressBar.update_keep_interrupt`), otherwise the interrupt would escape
before the checkpoint is written. Queue the graph again with ``resume`` on to continue.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Optional

from . import comfy_bridge

logger = logging.getLogger(__name__)

CATEGORY = "V-Bridge/training"
MODES = ["restoration", "drift_correction", "turbo"]
MAX_SEED = 0xFFFFFFFFFFFFFFFF
#: How many loss-curve previews a run shows on the node at most.
PREVIEWS_PER_RUN = 40


def _defaults() -> dict[str, Any]:
    from vbridge_core.train_runtime import DEFAULT_SETTINGS

    return DEFAULT_SETTINGS


class TrainLoRASettings:
    """The advanced knobs of 'V-Bridge Train LoRA', kept in their own node so the trainer stays readable."""

    DESCRIPTION = (
        "Advanced settings for 'V-Bridge Train LoRA': LoRA size, optimizer and schedule, memory savers, the "
        "pseudo-video objective, augmentation, validation and checkpoints. Without this node the trainer "
        "uses these same defaults (common Wan LoRA practice and the V-Bridge paper).")
    CATEGORY = CATEGORY
    FUNCTION = "settings"
    RETURN_TYPES = ("VBRIDGE_TRAIN_SETTINGS",)
    RETURN_NAMES = ("settings",)
    OUTPUT_TOOLTIPS = ("Training settings for the 'settings' input of 'V-Bridge Train LoRA'.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        """Every setting with its default from ``vbridge_core.train_runtime.DEFAULT_SETTINGS``."""
        from vbridge_core.train_runtime import LR_SCHEDULES, MIXED_PRECISIONS, OPTIMIZERS

        d = _defaults()
        return {
            "required": {
                "rank": ("INT", {"default": d["rank"], "min": 1, "max": 256, "tooltip": (
                    "LoRA rank: capacity of the adapter. 32 suits ~50 pairs of one task; 16 for fewer pairs or a "
                    "smaller file, 64 for several tasks in one LoRA.")}),
                "alpha": ("FLOAT", {"default": d["alpha"], "min": 0.0, "max": 512.0, "step": 1.0, "tooltip": (
                    "LoRA alpha (the update is scaled by alpha / rank). 0 = same as rank (scale 1).")}),
                "target_modules": ("STRING", {"default": d["target_modules"], "tooltip": (
                    "Comma-separated diffusers module names the LoRA wraps in every block: attention projections "
                    "(to_q, to_k, to_v, to_out.0) and the feed-forward layers (ffn.net.0.proj, ffn.net.2).")}),
                "learning_rate": ("FLOAT", {"default": d["learning_rate"], "min": 1e-7, "max": 1e-2, "step": 1e-5,
                                            "round": False, "tooltip": (
                    "AdamW learning rate (1e-4 is the usual Wan LoRA value).")}),
                "optimizer": (list(OPTIMIZERS), {"default": d["optimizer"], "tooltip": (
                    "adamw: PyTorch AdamW. adamw8bit: bitsandbytes 8-bit AdamW (must be installed; saves optimizer "
                    "memory, which is small for a LoRA anyway).")}),
                "lr_schedule": (list(LR_SCHEDULES), {"default": d["lr_schedule"], "tooltip": (
                    "Learning rate after warmup: constant, or decaying to 0 by the last step (cosine / linear).")}),
                "warmup_steps": ("INT", {"default": d["warmup_steps"], "min": 0, "max": 10000, "tooltip": (
                    "Steps of linear learning-rate warmup from 0.")}),
                "batch_size": ("INT", {"default": d["batch_size"], "min": 1, "max": 64, "tooltip": (
                    "Pseudo-videos per micro-step. Memory grows with it; prefer grad_accum on small GPUs.")}),
                "grad_accum": ("INT", {"default": d["grad_accum"], "min": 1, "max": 64, "tooltip": (
                    "Micro-steps whose gradients are summed per optimizer step (effective batch = batch_size x "
                    "grad_accum, at the memory of batch_size).")}),
                "mixed_precision": (list(MIXED_PRECISIONS), {"default": d["mixed_precision"], "tooltip": (
                    "auto / bf16: bf16 autocast on the GPU with fp32 LoRA weights (recommended). fp16: for GPUs "
                    "without bf16. no: the model's own precision. On CPU training runs in fp32.")}),
                "gradient_checkpointing": ("BOOLEAN", {"default": d["gradient_checkpointing"], "tooltip": (
                    "Recompute activations in the backward pass: much less VRAM (about 12 GB instead of 14-26 GB on "
                    "the 5B model), somewhat slower. Leave on unless the GPU has room to spare.")}),
                "frames": ("INT", {"default": d["frames"], "min": 5, "max": 81, "step": 4, "tooltip": (
                    "Frames of the LQ -> HQ pseudo-video (4k+1). 5 as in the paper; restore with the same value.")}),
                "alpha_schedule": ("STRING", {"default": d["alpha_schedule"], "tooltip": (
                    "How the pseudo-video blends from LQ to HQ over the frames: a schedule name (linear) or "
                    "comma-separated blend values, one per frame, from 0 to 1.")}),
                "shift": ("FLOAT", {"default": d["shift"], "min": 0.1, "max": 20.0, "step": 0.1, "tooltip": (
                    "Flow-matching shift of the sampled noise levels (5.0 as Wan; higher trains more at high noise).")}),
                "crops_per_pair": ("INT", {"default": d["crops_per_pair"], "min": 1, "max": 64, "tooltip": (
                    "Random crops (with flips) encoded per pair and curriculum stage; more views = more variety, "
                    "more encoding time and RAM.")}),
                "flip": ("BOOLEAN", {"default": d["flip"], "tooltip": "Random horizontal flips of the training crops."}),
                "validation_fraction": ("FLOAT", {"default": d["validation_fraction"], "min": 0.0, "max": 0.9,
                                                  "step": 0.05, "tooltip": (
                    "Share of each task's pairs held out for validation (before/after grid and PSNR/SSIM). 0 = "
                    "no validation. With 50 pairs, 0.1 holds out 5.")}),
                "validation_every": ("INT", {"default": d["validation_every"], "min": 0, "max": 100000, "tooltip": (
                    "Also validate every N steps during training (0: only before and after).")}),
                "validation_steps": ("INT", {"default": d["validation_steps"], "min": 1, "max": 200, "tooltip": (
                    "Sampling steps of each validation restore.")}),
                "checkpoint_every": ("INT", {"default": d["checkpoint_every"], "min": 0, "max": 100000, "tooltip": (
                    "Write a resumable checkpoint (and a loadable LoRA of that step) every N steps into "
                    "models/vbridge_checkpoints/vbridge/<name>.checkpoints/ (outside models/loras, so LoRA lists show "
                    "finished LoRAs only; 0: only on Cancel).")}),
                "restore_steps": ("INT", {"default": d["restore_steps"], "min": 1, "max": 200, "tooltip": (
                    "Drift-correction mode only: sampling steps of the restoration pass that makes the "
                    "drift-correction inputs (cached, so a resumed run does not restore again).")}),
                "quality_weighting": ("FLOAT", {"default": d["quality_weighting"], "min": 0.0, "max": 10.0,
                                                "step": 0.1, "tooltip": (
                    "Quality-aware loss (Perceive-IR's difficulty-adaptive strategy): each pair's loss is weighted "
                    "by 1 + this x its perceived difficulty (1 - quality score of its LQ, from the built-in "
                    "perceiver), normalised to mean 1. 0 = off; 1 = the hardest pairs count up to about twice.")}),
                "turbo_calls": ("INT", {"default": d["turbo_calls"], "min": 1, "max": 4, "tooltip": (
                    "Turbo mode only: DiT calls per image of the student (1, 2 or 4). Restore with the 'turbo' "
                    "preset: it reads the schedule from the student LoRA.")}),
                "turbo_start_sigma": ("FLOAT", {"default": d["turbo_start_sigma"], "min": 0.0, "max": 0.99,
                                                "step": 0.01, "tooltip": (
                    "Turbo mode only: 0 = the student starts from pure noise; a value in (0, 1) starts from the "
                    "degraded image's latent noised to that level (a shorter path).")}),
                "turbo_solver": (["x0_renoise", "euler"], {"default": d["turbo_solver"], "tooltip": (
                    "Turbo mode only: x0_renoise predicts the clean image at each level and re-noises it to the "
                    "next (as step-distilled Wan models sample); euler takes flow Euler steps.")}),
                "turbo_hq_weight": ("FLOAT", {"default": d["turbo_hq_weight"], "min": 0.0, "max": 10.0,
                                              "step": 0.05, "tooltip": (
                    "Turbo mode only: weight of a direct loss to the HQ images beside the loss to the teacher's "
                    "50-step outputs (0 = imitate the teacher only).")}),
                "teacher_steps": ("INT", {"default": d["teacher_steps"], "min": 1, "max": 200, "tooltip": (
                    "Turbo mode only: sampling steps of the teacher's outputs (sampled once and cached).")}),
            }
        }

    def settings(self, **kwargs: Any) -> tuple[dict[str, Any]]:
        """Return the settings as a dict (checked when training starts)."""
        from vbridge_core.train_runtime import merged_settings

        return (merged_settings(kwargs),)


def _conditioning_tensor(conditioning: Any, model: Any, what: str) -> Optional[Any]:
    from .restore_nodes import _embeds_from_conditioning

    return _embeds_from_conditioning(conditioning, model, what)


class _Progress:
    """Turns the trainer's progress events into ComfyUI's progress bar, node text and loss preview."""

    def __init__(self, node_id: Optional[str]) -> None:
        self.node_id = node_id
        self.bar = comfy_bridge.ProgressBar(1, desc="V-Bridge training")
        self.losses: list[float] = []
        self.previews = comfy_bridge.in_comfyui()

    def _preview(self, step: int, total: int) -> Any:
        if not self.previews or step % max(1, total // PREVIEWS_PER_RUN) and step != total:
            return None
        try:
            from PIL import Image

            from vbridge_core.training.plots import loss_curve_image

            img = loss_curve_image(self.losses, title="loss (this session)")
            arr = (img.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()
            return ("JPEG", Image.fromarray(arr), 640)
        except Exception as e:  # noqa: BLE001 - previews are best effort
            logger.debug("loss preview failed: %s", e)
            self.previews = False
            return None

    def __call__(self, p: Any) -> None:
        if p.kind in ("step", "skipped"):
            self.losses.append(p.loss)
            recent = [v for v in self.losses[-20:] if math.isfinite(v)]
            avg = sum(recent) / len(recent) if recent else float("nan")
            self.bar.update_keep_interrupt(p.step, self._preview(p.step, p.total), total=p.total)
            comfy_bridge.show_text(self.node_id, (
                f"step {p.step}/{p.total} | stage {p.stage + 1} ({p.resolution} px) | loss {p.loss:.4f} "
                f"(avg {avg:.4f}) | lr {p.lr:.2e} | {p.seconds:.0f} s"))
        elif p.kind in ("caching", "restoring", "teacher"):
            self.bar.update_keep_interrupt(p.step, total=max(1, p.total))
            what = {"caching": "encoding training latents", "restoring": "restoring training LQs (drift data)",
                    "teacher": "sampling the teacher's outputs (turbo targets)"}[p.kind]
            where = f" (stage {p.stage + 1}, {p.resolution} px)" if p.kind != "restoring" else ""
            comfy_bridge.show_text(self.node_id, f"{what}: {p.step}/{p.total}{where}")
        elif p.kind == "validation":
            m = p.metrics
            text = f"validation at step {p.step}: PSNR {m.get('psnr', float('nan')):.2f} dB, SSIM {m.get('ssim', float('nan')):.4f}"
            logger.info("%s", text)
            comfy_bridge.show_text(self.node_id, text)
        elif p.kind == "checkpoint":
            comfy_bridge.show_text(self.node_id, f"checkpoint at step {p.step}: {p.path}")

    def close(self) -> None:
        self.bar.close()


class TrainLoRA:
    """Train a V-Bridge LoRA (restoration or drift correction) from LQ/HQ pairs on the loaded model."""

    DESCRIPTION = (
        "Trains a V-Bridge LoRA on the Wan2.2-TI2V-5B model from 'V-Bridge Load Model' with the pairs from "
        "'V-Bridge Load Image Pairs' (about 50 pairs of one degradation are enough), following the paper's "
        "resolution curriculum. Saves models/loras/vbridge/<output_name>.safetensors (with its prompt embedded), "
        "which 'V-Bridge Load Model' lists after a refresh and ComfyUI's LoraLoader also loads.\n\n"
        "mode restoration: learns LQ -> HQ; the prompt comes from 'conditioning' (CLIPLoader type 'wan' + "
        "CLIPTextEncode) or, if not connected, from the restoration LoRA loaded in the model. "
        "mode drift_correction: restores the training LQs with the model's restoration LoRA, then learns "
        "restored -> HQ; no text encoder needed. "
        "mode turbo: distils the model's restoration LoRA (the teacher) into a LoRA that restores in 1-4 DiT "
        "calls (restore it with the 'turbo' preset); the teacher's 50-step outputs are sampled once and cached.\n\n"
        "Progress shows the loss; Cancel writes a resumable checkpoint, and queueing again with 'resume' on "
        "continues from it. Outputs the file path, the loss curve, a validation grid (LQ | before | after | HQ) "
        "and a summary. VRAM: about 12-14 GB with gradient checkpointing at 512-960 px (see the README).")
    CATEGORY = CATEGORY
    FUNCTION = "train"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING", "IMAGE", "IMAGE", "STRING")
    RETURN_NAMES = ("lora_path", "loss_curve", "validation_grid", "info")
    OUTPUT_TOOLTIPS = (
        "Full path of the written LoRA file (models/loras/vbridge/<output_name>.safetensors).",
        "Per-step loss (light) with its moving average (dark); dashed lines mark the curriculum stages.",
        "Held-out pairs as rows of LQ | before training | after training | HQ (a note when there were none).",
        "Summary: file, steps, time, loss and validation PSNR/SSIM before -> after.",
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        """Model, pairs, mode, output name, curriculum, seed and resume; optional settings and prompts."""
        from vbridge_core.train_runtime import DEFAULT_STAGES

        return {
            "required": {
                "vbridge_model": ("VBRIDGE_MODEL", {"tooltip": (
                    "The model from 'V-Bridge Load Model'. For drift_correction it must have the restoration LoRA "
                    "to correct (restoration_lora); for restoration use 'none' or any LoRA (training starts from "
                    "the bare base either way).")}),
                "pairs": ("VBRIDGE_PAIRS", {"tooltip": (
                    "LQ/HQ pairs from 'V-Bridge Load Image Pairs' (about 50 of one degradation; task subfolders "
                    "train one multi-task LoRA).")}),
                "mode": (MODES, {"default": "restoration", "tooltip": (
                    "restoration: learn degraded -> clean. drift_correction: learn the short path from the "
                    "restoration LoRA's own output to clean (train the restoration LoRA first). turbo: distil "
                    "the model's restoration LoRA into one that restores in 1-4 DiT calls (turbo_* settings).")}),
                "output_name": ("STRING", {"default": "my_restoration", "tooltip": (
                    "File name of the LoRA, saved as models/loras/vbridge/<name>.safetensors (overwritten if it "
                    "exists). A plain name: no folders; characters other than letters, digits and . _ - become _.")}),
                "stages": ("STRING", {"default": DEFAULT_STAGES, "tooltip": (
                    "Resolution curriculum as resolution:steps stages, trained in order (the paper: "
                    f"{DEFAULT_STAGES}; 720 becomes 704, a multiple of 32). One stage such as 512:400 is fine for "
                    "a quick test. Images smaller than a stage are upscaled.")}),
                "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True,
                                 "tooltip": (
                    "Seed of the validation split, crops, noise and LoRA init: the same seed and settings give the "
                    "same LoRA. Keep it fixed to resume.")}),
                "resume": ("BOOLEAN", {"default": True, "tooltip": (
                    "On: if an earlier run of this output_name was cancelled (or stopped), continue from its last "
                    "checkpoint (same settings needed). Off: start over and delete that name's old checkpoints.")}),
            },
            "optional": {
                "settings": ("VBRIDGE_TRAIN_SETTINGS", {"tooltip": (
                    "Advanced settings from 'V-Bridge LoRA Training Settings' (rank, optimizer, schedule, memory, "
                    "validation, checkpoints). Defaults when not connected.")}),
                "conditioning": ("CONDITIONING", {"tooltip": (
                    "The training prompt: CLIPTextEncode with CLIPLoader type 'wan' (umt5_xxl_fp8_e4m3fn_scaled). "
                    "It is embedded in the LoRA, so restoring needs no text encoder. If not connected, the prompt "
                    "embedded in the model's restoration LoRA is used (natural for drift_correction).")}),
                "negative": ("CONDITIONING", {"tooltip": (
                    "Optional negative prompt (CLIPLoader type 'wan'), stored in the LoRA for restoring with "
                    "guidance > 1. Not used by training itself.")}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def train(self, vbridge_model: Any, pairs: Any, mode: str, output_name: str, stages: str, seed: int,
              resume: bool, settings: Optional[dict[str, Any]] = None, conditioning: Any = None,
              negative: Any = None, unique_id: Optional[str] = None) -> tuple[str, Any, Any, str]:
        """Train and return ``(lora_path, loss_curve, validation_grid, info)``."""
        from vbridge_core.errors import Cancelled, InputError
        from vbridge_core.images import bchw_to_comfy
        from vbridge_core.train_runtime import (make_train_config, make_turbo_settings, merged_settings,
                                                message_image, output_lora_path, refuse_overwriting_loaded_loras,
                                                run_training, summary, training_prompt)

        from .restore_nodes import _check_model

        _check_model(vbridge_model)
        if not hasattr(pairs, "items") or not hasattr(pairs, "load") or not len(pairs):
            raise InputError("pairs must come from 'V-Bridge Load Image Pairs' and hold at least one pair")
        s = merged_settings(settings)
        config = make_train_config(s, stages=stages, seed=int(seed), role=mode)
        turbo = make_turbo_settings(s, seed=int(seed)) if mode == "turbo" else None
        out_path = output_lora_path(comfy_bridge.lora_output_dir(), output_name)
        refuse_overwriting_loaded_loras(vbridge_model, out_path)
        pos = _conditioning_tensor(conditioning, vbridge_model, "conditioning")
        neg = _conditioning_tensor(negative, vbridge_model, "negative")
        pos, neg, meta = training_prompt(vbridge_model, mode, pos, neg)
        logger.info("V-Bridge: training a %s LoRA on %d pairs -> %s", mode, len(pairs), out_path)
        comfy_bridge.make_room()
        progress = _Progress(unique_id)
        try:
            result = run_training(vbridge_model, pairs, config, out_path, prompt_embeds=pos,
                                  negative_prompt_embeds=neg, metadata=meta, callback=progress,
                                  should_cancel=comfy_bridge.interrupt_requested, resume=bool(resume),
                                  restore_steps=int(s["restore_steps"]), turbo=turbo)
        except Cancelled as e:
            ckpt = getattr(e, "checkpoint", None)
            logger.warning("V-Bridge training cancelled%s", f"; resume from {ckpt}" if ckpt else "")
            comfy_bridge.show_text(unique_id, f"cancelled{f': checkpoint {ckpt.name}' if ckpt else ''} "
                                              "(queue again with resume on to continue)")
            comfy_bridge.throw_if_interrupted()  # ComfyUI's own interrupt: the run shows as cancelled
            raise
        finally:
            progress.close()
        info = summary(result, config)
        comfy_bridge.show_text(unique_id, info)
        logger.info("V-Bridge training done:\n%s", info)
        curve = result.loss_curve if result.loss_curve is not None else message_image("no loss recorded")
        grid = result.validation_grid if result.validation_grid is not None else message_image(
            "no validation pairs held out\n(raise validation_fraction in the settings node, or add pairs)")
        return str(result.path), bchw_to_comfy(curve), bchw_to_comfy(grid), info
