"""LoRA training on LQ -> HQ pseudo-videos (flow matching, frame 0 clean), written in our LoRA format.

This is the compact single-stage trainer the demo and the tests use; the pseudo-video latents are
encoded once and cached (the VAE does no work inside the loop) and only the LoRA parameters train.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from .. import trajectory
from ..errors import Cancelled, InputError
from .flow_matching import flow_matching_loss, sample_sigmas

logger = logging.getLogger(__name__)

#: diffusers module names of the attention projections and the feed-forward layers of every block.
DEFAULT_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2")
TRAIN_ADAPTER = "vbridge_training"


@dataclass
class TrainConfig:
    """Hyper-parameters of one LoRA training run (defaults follow common Wan LoRA practice)."""

    steps: int = 400
    rank: int = 32
    alpha: float = 32.0
    learning_rate: float = 1e-4
    weight_decay: float = 1e-2
    warmup_steps: int = 0
    frames: int = 5
    alpha_schedule: Any = "linear"
    shift: float = 5.0
    batch_size: int = 1
    resolution: Optional[int] = None
    seed: int = 0
    role: str = "restoration"
    target_modules: Sequence[str] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))

    def validate(self) -> "TrainConfig":
        trajectory.check_frames(self.frames)
        trajectory.alpha_schedule(self.alpha_schedule, self.frames)
        for name in ("steps", "rank", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"{name} must be a positive integer, got {v!r}")
        if not (self.learning_rate > 0):
            raise InputError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.resolution is not None and (self.resolution < 32 or self.resolution % 32):
            raise InputError(f"resolution must be a multiple of 32 (>= 32), got {self.resolution}")
        if self.role not in ("restoration", "drift_correction"):
            raise InputError(f"role must be 'restoration' or 'drift_correction', got {self.role!r}")
        return self


@dataclass
class TrainResult:
    path: Path
    losses: list[float]
    seconds: float


def _center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top:top + size, left:left + size]


def _check_pairs(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
    if not pairs:
        raise InputError("no training pairs: give at least one LQ/HQ pair")
    for i, (lq, hq) in enumerate(pairs):
        if lq.shape != hq.shape:
            raise InputError(f"pair {i}: LQ {tuple(lq.shape)} and HQ {tuple(hq.shape)} differ in size; "
                             "both images of a pair must have the same size")


@torch.no_grad()
def encode_pseudo_videos(pipe, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], frames: int,
                         schedule: Any, resolution: Optional[int]) -> list[torch.Tensor]:
    """VAE latents (normalised, ``[1, C, T, h, w]``) of each pair's pseudo-video, centre-cropped."""
    alphas = trajectory.alpha_schedule(schedule, frames)
    out = []
    for lq, hq in pairs:
        size = resolution or min(512, min(lq.shape[-2:]) // 32 * 32)
        if min(lq.shape[-2:]) < size or size < 32:
            raise InputError(f"training images must be at least {max(size, 32)} px on each side, got {tuple(lq.shape[-2:])}")
        video = trajectory.blend_pairs(_center_crop(lq, size)[None], _center_crop(hq, size)[None], alphas)
        vae_dtype = next(pipe.vae.parameters()).dtype
        z = pipe.vae.encode((video * 2 - 1).to(pipe.device, vae_dtype)).latent_dist.mode().float()
        out.append(((z - pipe._lat_mean.to(z.device)) / pipe._lat_std.to(z.device)).cpu())
    return out


def train_lora(pipe, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], config: TrainConfig, out_path: str | Path,
               *, prompt_embeds: torch.Tensor, negative_prompt_embeds: Optional[torch.Tensor] = None,
               metadata: Optional[dict[str, Any]] = None, callback: Optional[Callable[[int, float], None]] = None,
               should_cancel: Optional[Callable[[], bool]] = None) -> TrainResult:
    """Train a LoRA on ``pipe.transformer`` for ``pairs`` ([3,H,W] 0..1 tensors) and write it to ``out_path``.

    The adapter is trained on the bare base (other adapters of ``pipe`` are switched off meanwhile)
    and removed again afterwards, so the pipeline is left as it was.
    """
    from peft import LoraConfig

    from ..lora import lora_state_from_peft, remove_lora, set_active_loras, write_lora

    config.validate()
    _check_pairs(pairs)
    transformer = pipe.transformer
    latents = encode_pseudo_videos(pipe, pairs, config.frames, config.alpha_schedule, config.resolution)
    pipe._activate(None)
    transformer.add_adapter(LoraConfig(r=config.rank, lora_alpha=config.alpha,
                                       target_modules=list(config.target_modules), init_lora_weights=True),
                            adapter_name=TRAIN_ADAPTER)
    set_active_loras(transformer, {TRAIN_ADAPTER: 1.0})
    params = [p for n, p in transformer.named_parameters() if TRAIN_ADAPTER in n]
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    warm = max(0, config.warmup_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
    gen = torch.Generator().manual_seed(config.seed)
    losses: list[float] = []
    t0 = time.perf_counter()
    was_training = transformer.training
    transformer.train()
    try:
        with torch.enable_grad():
            for step in range(config.steps):
                if should_cancel is not None and should_cancel():
                    raise Cancelled(f"training cancelled at step {step} of {config.steps}")
                idx = torch.randint(len(latents), (config.batch_size,), generator=gen).tolist()
                z = torch.cat([latents[i] for i in idx]).to(pipe.device)
                sig = sample_sigmas(len(idx), config.shift, gen)
                noise = torch.randn(z.shape, generator=gen).to(pipe.device)
                loss = flow_matching_loss(transformer, z, prompt_embeds, sig.to(pipe.device), noise)
                if not math.isfinite(loss.item()):
                    logger.warning("step %d: non-finite loss, step skipped", step + 1)
                    opt.zero_grad(set_to_none=True)
                    continue
                loss.backward()
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                losses.append(loss.item())
                if callback is not None:
                    callback(step + 1, losses[-1])
        state = lora_state_from_peft(transformer, TRAIN_ADAPTER)
        meta = dict(role=config.role, frames=config.frames, alpha_schedule=config.alpha_schedule,
                    steps=config.steps, base_model="Wan2.2-TI2V-5B",
                    train_config={k: v for k, v in asdict(config).items() if k != "target_modules"})
        meta.update(metadata or {})
        path = write_lora(out_path, state, rank=config.rank, alpha=config.alpha, metadata=meta,
                          prompt_embeds=prompt_embeds.cpu(), negative_prompt_embeds=
                          negative_prompt_embeds.cpu() if negative_prompt_embeds is not None else None)
    finally:
        transformer.train(was_training)
        remove_lora(transformer, TRAIN_ADAPTER)
        for p in transformer.parameters():
            p.requires_grad_(False)
        pipe._activate(None)
    secs = time.perf_counter() - t0
    logger.info("trained %s LoRA: %d steps in %.1f s, loss %.4f -> %.4f", config.role, config.steps, secs,
                losses[0] if losses else float("nan"), losses[-1] if losses else float("nan"))
    return TrainResult(path=Path(path), losses=losses, seconds=secs)
