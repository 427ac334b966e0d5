"""The flow-matching sampling loop with first-frame conditioning (Wan2.2 TI2V).

Frame 0 of the pseudo-video is the degraded image. Its latent is the condition and stays clean:
before every DiT call the first latent frame is replaced by the condition, its tokens get timestep
0 while all others get the current timestep, and after the last step the condition is imposed once
more. This is exactly what diffusers' ``WanImageToVideoPipeline(expand_timesteps=True)`` and the
official ``wan/textimage2video.py`` do; ``tests/test_reference_equivalence.py`` holds us to it.

Schedulers are diffusers' own (UniPC multistep in flow mode, as diffusers' Wan default, or flow
matching Euler). Two sigma grids are offered:

* ``"diffusers"``: ``UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=shift)`` as shipped
  with the diffusers Wan2.2 pipelines (reference equivalence holds on this grid);
* ``"official"``: the official Wan grid (``FlowUniPCMultistepScheduler(shift=1)`` then
  ``set_timesteps(steps, shift=shift)``): sigmas ``linspace(0.999, 0, steps + 1)[:-1]`` shifted,
  with integer timesteps fed to the DiT. This is what the V-Bridge release runs.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from .errors import Cancelled, InputError

logger = logging.getLogger(__name__)

SOLVERS = ("unipc", "euler")
SIGMA_GRIDS = ("diffusers", "official")
NUM_TRAIN_TIMESTEPS = 1000


@dataclass
class SamplerSettings:
    """How to integrate the flow from noise to the pseudo-video.

    ``guidance`` 1.0 runs one DiT call per step; above 1 a negative-prompt pass is added
    (classifier-free guidance) except in the last ``guidance_skip_tail`` fraction of the steps
    (the V-Bridge release skips the last 15%).
    """

    steps: int = 50
    shift: float = 5.0
    solver: str = "unipc"
    sigma_grid: str = "diffusers"
    guidance: float = 1.0
    guidance_skip_tail: float = 0.0

    def validate(self) -> "SamplerSettings":
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise InputError(f"steps must be a positive integer, got {self.steps!r}")
        if not (self.shift > 0 and math.isfinite(self.shift)):
            raise InputError(f"shift must be a positive number (Wan default 5.0), got {self.shift!r}")
        if self.solver not in SOLVERS:
            raise InputError(f"unknown solver {self.solver!r}; use one of {SOLVERS}")
        if self.sigma_grid not in SIGMA_GRIDS:
            raise InputError(f"unknown sigma grid {self.sigma_grid!r}; use one of {SIGMA_GRIDS}")
        if not (self.guidance >= 1.0 and math.isfinite(self.guidance)):
            raise InputError(f"guidance must be >= 1.0 (1.0 = no negative-prompt pass), got {self.guidance!r}")
        if not (0.0 <= self.guidance_skip_tail < 1.0):
            raise InputError(f"guidance_skip_tail is a fraction of the steps in [0, 1), got {self.guidance_skip_tail!r}")
        return self

    def guided_steps(self) -> int:
        """Number of leading steps that run the negative-prompt pass."""
        if self.guidance <= 1.0:
            return 0
        return sum(1 for i in range(self.steps) if i < self.steps * (1.0 - self.guidance_skip_tail))


@dataclass
class StepInfo:
    """What a per-step callback sees. ``denoised`` is the current estimate of the clean latents
    (``x_t - sigma_t * v``), useful for previews; ``latents`` the current noisy state."""

    step: int
    total: int
    timestep: float
    sigma: float
    latents: torch.Tensor
    denoised: torch.Tensor
    extra: dict = field(default_factory=dict)


StepCallback = Callable[[StepInfo], None]


def make_scheduler(settings: SamplerSettings, device: torch.device | str = "cpu"):
    """Build a diffusers scheduler and set its timesteps for ``settings``.

    Returns ``(scheduler, model_timesteps)``: the scheduler's own timesteps drive ``step``;
    ``model_timesteps`` are the values the DiT sees (integers on the official grid, as the
    official code casts them to int64).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    settings.validate()
    official = settings.sigma_grid == "official"
    if settings.solver == "unipc":
        sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        num_train_timesteps=NUM_TRAIN_TIMESTEPS, flow_shift=settings.shift)
        if official:
            base = np.linspace(1.0 - 1.0 / NUM_TRAIN_TIMESTEPS, 0.0, settings.steps + 1)[:-1]
            sched.set_timesteps(sigmas=base, device=device)
        else:
            sched.set_timesteps(settings.steps, device=device)
    else:
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=settings.shift)
        if official:
            base = np.linspace(1.0 - 1.0 / NUM_TRAIN_TIMESTEPS, 0.0, settings.steps + 1)[:-1]
            # FlowMatchEuler applies its own shift to the sigmas it is given.
            sched.set_timesteps(sigmas=base, device=device)
        else:
            sched.set_timesteps(settings.steps, device=device)
    timesteps = sched.timesteps
    model_timesteps = torch.floor(timesteps) if official else timesteps
    return sched, model_timesteps


def compute_dtype(transformer: torch.nn.Module) -> torch.dtype:
    """The dtype the DiT computes in (what its inputs must be cast to).

    Not simply the first parameter's dtype: diffusers keeps some modules in fp32 (Wan's
    ``scale_shift_table``, the first parameter, among them) when the model is loaded in bf16/fp16,
    and fp8 layerwise casting stores weights in fp8 but computes in bf16. diffusers' own
    ``ModelMixin.dtype`` accounts for both; other modules fall back to the first floating parameter.
    """
    dt = getattr(transformer, "dtype", None)
    if isinstance(dt, torch.dtype):
        return dt
    return next(p.dtype for p in transformer.parameters() if p.is_floating_point())


def first_frame_mask(latent_shape: tuple[int, ...], device, dtype=torch.float32) -> torch.Tensor:
    """``[1, 1, T, h, w]`` mask: 0 on latent frame 0 (the clean condition), 1 elsewhere."""
    _, _, t, h, w = latent_shape
    mask = torch.ones(1, 1, t, h, w, device=device, dtype=dtype)
    mask[:, :, 0] = 0
    return mask


def token_timesteps(mask: torch.Tensor, t: torch.Tensor, batch: int, patch: tuple[int, int, int]) -> torch.Tensor:
    """Per-token timesteps ``[B, tokens]``: 0 for the condition frame's tokens, ``t`` elsewhere."""
    pt, ph, pw = patch
    ts = (mask[0, 0][::pt, ::ph, ::pw] * t).flatten()
    return ts.unsqueeze(0).expand(batch, -1)


def sample(
    transformer: torch.nn.Module,
    condition: torch.Tensor,
    noise: torch.Tensor,
    prompt_embeds: torch.Tensor,
    settings: SamplerSettings,
    negative_prompt_embeds: Optional[torch.Tensor] = None,
    callback: Optional[StepCallback] = None,
    should_cancel: Optional[Callable[[], bool]] = None,
) -> torch.Tensor:
    """Integrate from ``noise`` to clean latents, with latent frame 0 held at ``condition``.

    ``condition`` is the normalised latent of the LQ image ``[B, C, 1, h, w]`` and ``noise`` the
    starting noise ``[B, C, T, h, w]``; ``prompt_embeds`` is ``[1 or B, L, D]``. Returns fp32 latents with
    frame 0 equal to the condition. ``should_cancel`` is polled before every step and
    ``callback`` runs after every step (it may raise to stop); both stop within one step.
    """
    settings.validate()
    if condition.ndim != 5 or condition.shape[2] != 1 or condition.shape[:2] != noise.shape[:2] \
            or condition.shape[3:] != noise.shape[3:]:
        raise InputError(f"condition {tuple(condition.shape)} must be one latent frame of noise {tuple(noise.shape)}")
    device = noise.device
    batch = noise.shape[0]
    model_dtype = compute_dtype(transformer)
    patch = tuple(transformer.config.patch_size)
    scheduler, model_timesteps = make_scheduler(settings, device)
    mask = first_frame_mask(tuple(noise.shape), device)
    cond = condition.to(device=device, dtype=torch.float32)
    latents = noise.to(torch.float32)

    def expand(e: torch.Tensor) -> torch.Tensor:
        e = e.to(device=device, dtype=model_dtype)
        return e.expand(batch, -1, -1) if e.shape[0] == 1 and batch > 1 else e

    pos = expand(prompt_embeds)
    guided = settings.guided_steps()
    neg = None
    if guided:
        if negative_prompt_embeds is None:
            raise InputError("guidance > 1 needs a negative prompt embedding (from the LoRA file or --negative-prompt)")
        neg = expand(negative_prompt_embeds)

    total = len(scheduler.timesteps)
    for i, t in enumerate(scheduler.timesteps):
        if should_cancel is not None and should_cancel():
            raise Cancelled(f"cancelled at step {i + 1} of {total}")
        model_in = ((1 - mask) * cond + mask * latents).to(model_dtype)
        ts = token_timesteps(mask, model_timesteps[i], batch, patch)
        pred = transformer(hidden_states=model_in, timestep=ts, encoder_hidden_states=pos, return_dict=False)[0]
        if i < guided:
            uncond = transformer(hidden_states=model_in, timestep=ts, encoder_hidden_states=neg, return_dict=False)[0]
            pred = uncond + settings.guidance * (pred - uncond)
        sigma = float(scheduler.sigmas[i])
        if callback is not None:
            denoised = (1 - mask) * cond + mask * (latents - sigma * pred.float())
        # fp32 velocity: FlowMatchEuler casts its result to the model output's dtype, which would round the
        # whole latent state to bf16/fp16 after every step with a half-precision DiT
        latents = scheduler.step(pred.float(), t, latents, return_dict=False)[0]
        if callback is not None:
            callback(StepInfo(step=i + 1, total=total, timestep=float(t), sigma=sigma, latents=latents,
                              denoised=denoised))
    return (1 - mask) * cond + mask * latents
