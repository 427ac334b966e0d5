"""The flow-matching sampling loop with first-frame conditioning (Wan2.2 TI2V), and few-step samplers.

Frame 0 of the pseudo-video is the degraded image. Its latent is the condition and stays clean:
before every DiT call the first latent frame is replaced by the condition, its tokens get timestep
0 while all others get the current timestep, and after the last step the condition is imposed once
more. This is exactly what diffusers' ``WanImageToVideoPipeline(expand_timesteps=True)`` and the
official ``wan/textimage2video.py`` do; ``tests/test_reference_equivalence.py`` holds us to it.
Every solver below keeps this rule.

Solvers
-------
* ``"unipc"`` / ``"euler"``: diffusers' own schedulers (UniPC multistep in flow mode, as diffusers'
  Wan default, or flow-matching Euler). Two generated sigma grids are offered:

  - ``"diffusers"``: ``UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=shift)`` as shipped
    with the diffusers Wan2.2 pipelines (reference equivalence holds on this grid);
  - ``"official"``: the official Wan grid (``FlowUniPCMultistepScheduler(shift=1)`` then
    ``set_timesteps(steps, shift=shift)``): sigmas ``linspace(0.999, 0, steps + 1)[:-1]`` shifted,
    with integer timesteps fed to the DiT. This is what the V-Bridge release runs.

* ``"x0_renoise"``: the sampler of DMD-distilled Wan bases. At each listed sigma ``s_i`` the DiT
  (timestep ``1000 * s_i``) predicts the velocity ``v``; the clean latent is ``x0 = x - s_i * v``;
  unless it is the last step, ``x0`` is re-noised to the next sigma with *fresh* Gaussian noise:
  ``x = (1 - s_{i+1}) * x0 + s_{i+1} * eps``. The last step returns ``x0``. Sources (read, not
  copied): hao-ai-lab/FastVideo ``fastvideo/pipelines/basic/wan/stages/dmd.py`` (``DmdDenoisingStage``,
  the ``"sde"`` branch: ``pred_noise_to_pred_video`` then ``scheduler.add_noise`` at the next
  timestep) with ``FastWan2_2_TI2V_5B_Config.dmd_denoising_steps = [1000, 757, 522]`` in
  ``fastvideo/configs/pipelines/wan.py``; FastVideo's own test
  (``test_dmd_denoising_stage_preserves_legacy_scheduler_space_steps``) pins those labels to sigmas
  ``[1.0, 0.757, 0.522]`` (sigma = timestep / 1000, no further shift). quanhaol/Wan2.2-TI2V-5B-Turbo
  ``pipeline/wan22_fewstep_inference.py`` runs the same rule with ``configs/inference/wan22.yaml``
  ``denoising_step_list: [1000, 750, 500, 250]``, sigma looked up as the nearest entry of a dense
  shifted table whose timesteps are ``1000 * sigma`` (so again sigma = timestep / 1000 to < 5e-4),
  re-imposing the image latent after every re-noise, as we do.

Schedules
---------
``SamplerSettings.sigmas`` gives an explicit descending sigma list in (0, 1] (the terminal 0 is
implied; ``steps`` becomes its length); shift and sigma grid are then ignored. Without it the grid
is generated from ``steps``/``shift``/``sigma_grid`` as above.

``SamplerSettings.start_sigma = s`` starts from the LQ image instead of pure noise (SDEdit-style):
latent frames >= 1 start as ``(1 - s) * lq + s * noise`` where ``lq`` is the condition latent
repeated over time, and the schedule covers only sigmas <= s:

* an explicit ``sigmas`` list is *truncated*: entries above ``s`` are dropped, and ``s`` itself is
  prepended when the first remaining entry is below it (so the first DiT call is at ``s``); e.g.
  ``sigmas=(1.0, 0.757, 0.522), start_sigma=0.6`` runs ``(0.6, 0.522)``;
* a generated grid is *rescaled*: the ``steps``-step grid (shift and grid type as usual) is
  multiplied by ``s / sigma_0`` so it starts exactly at ``s`` and keeps all ``steps`` steps.

``SamplerSettings.plan()`` returns the sigmas actually run (``None`` for the default generated grid
with no start sigma, which keeps the scheduler's own ``set_timesteps(steps)`` numerics bit for bit).

Classifier-free guidance
------------------------
With ``guidance > 1`` the conditional and unconditional passes of a guided step run as one batched
DiT call (``batch_cfg=True``, the default; equal to two calls to float rounding) unless the two
prompt embeddings differ in shape. :class:`SampleStats` counts DiT noise predictions per image
(conditional and unconditional separately, even when batched) and physical forward passes.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from .cache import cache_context
from .errors import Cancelled, InputError

logger = logging.getLogger(__name__)

SOLVERS = ("unipc", "euler", "x0_renoise")
SIGMA_GRIDS = ("diffusers", "official")
NUM_TRAIN_TIMESTEPS = 1000
_SIGMA_TOL = 1e-9


@dataclass
class SamplerSettings:
    """How to integrate the flow from noise (or the noised LQ image) to the pseudo-video.

    ``guidance`` 1.0 runs one DiT call per step; above 1 a negative-prompt pass is added
    (classifier-free guidance) except in the last ``guidance_skip_tail`` fraction of the steps
    (the V-Bridge release skips the last 15%). ``sigmas``, ``start_sigma`` and the ``x0_renoise``
    solver are described in the module docstring; ``batch_cfg`` runs both guidance passes in one
    batched DiT call.
    """

    steps: int = 50
    shift: float = 5.0
    solver: str = "unipc"
    sigma_grid: str = "diffusers"
    guidance: float = 1.0
    guidance_skip_tail: float = 0.0
    sigmas: Optional[Sequence[float]] = None
    start_sigma: Optional[float] = None
    batch_cfg: bool = True

    def validate(self) -> "SamplerSettings":
        """Check every field (raising :class:`InputError` with what to change); with ``sigmas`` given,
        normalise it to a tuple of floats and set ``steps`` to its length. Returns ``self``."""
        if self.sigmas is not None:
            self.sigmas = _check_sigmas(self.sigmas)
            self.steps = len(self.sigmas)
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
        if self.start_sigma is not None:
            s = self.start_sigma
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not (0.0 < float(s) <= 1.0):
                raise InputError(f"start_sigma must be a number in (0, 1] (the noise level the LQ image is "
                                 f"noised to; 1 = pure noise), got {s!r}")
            self.start_sigma = float(s)
        return self

    def plan(self) -> Optional[list[float]]:
        """The sigmas actually run, in order, without the implied terminal 0; ``None`` means the
        default generated grid (the scheduler's own ``set_timesteps(steps)``, see module docstring)."""
        self.validate()
        if self.sigmas is not None:
            sig = list(self.sigmas)
            if self.start_sigma is not None:
                s = self.start_sigma
                sig = [x for x in sig if x <= s + _SIGMA_TOL]
                if not sig or sig[0] < s - _SIGMA_TOL:
                    sig = [s] + sig
            return sig
        if self.start_sigma is None and self.solver != "x0_renoise":
            return None
        base = generated_sigmas(self.steps, self.shift, self.sigma_grid, self.solver)
        if self.start_sigma is not None:
            scale = self.start_sigma / base[0]
            base = [x * scale for x in base]
        return base

    def total_steps(self) -> int:
        """Number of sampling steps (= DiT calls per image without guidance)."""
        planned = self.plan()
        return self.steps if planned is None else len(planned)

    def guided_steps(self) -> int:
        """Number of leading steps that run the negative-prompt pass."""
        if self.guidance <= 1.0:
            return 0
        n = self.total_steps()
        return sum(1 for i in range(n) if i < n * (1.0 - self.guidance_skip_tail))

    def dit_calls_per_image(self) -> int:
        """DiT noise predictions per image this recipe costs (conditional and unconditional counted
        separately, also when they run batched): fast 50 steps = 50, paper = 50 + 43 = 93."""
        return self.total_steps() + self.guided_steps()


def _check_sigmas(sigmas: Sequence[float]) -> tuple[float, ...]:
    """``sigmas`` as a tuple of floats, checked to be a non-empty, strictly descending list in (0, 1]."""
    if isinstance(sigmas, (str, bytes)):
        raise InputError(f"sigmas must be a list of numbers such as 0.999,0.9,0.5, got {sigmas!r}")
    try:
        vals = tuple(float(x) for x in sigmas)
    except (TypeError, ValueError):
        raise InputError(f"sigmas must be a list of numbers such as 0.999,0.9,0.5, got {sigmas!r}") from None
    if not vals:
        raise InputError("sigmas is empty: give at least one sigma in (0, 1] (the terminal 0 is implied)")
    bad = [x for x in vals if not (math.isfinite(x) and 0.0 < x <= 1.0)]
    if bad:
        raise InputError(f"every sigma must lie in (0, 1] (the terminal 0 is implied, do not list it); got {bad[:5]}")
    if any(b >= a for a, b in zip(vals, vals[1:])):
        raise InputError(f"sigmas must be strictly descending (from noisy to clean), got {list(vals)}")
    return vals


def generated_sigmas(steps: int, shift: float, sigma_grid: str = "diffusers", solver: str = "unipc") -> list[float]:
    """The ``steps`` sigmas (without the terminal 0) of a generated grid, as the schedulers build it."""
    s = SamplerSettings(steps=steps, shift=shift, sigma_grid=sigma_grid,
                        solver="euler" if solver == "euler" else "unipc")
    sched, _ = make_scheduler(s)
    return [float(x) for x in sched.sigmas[:-1]]


@dataclass
class SampleStats:
    """What one :func:`sample` call cost. ``dit_calls_per_image``: DiT noise predictions per image
    (conditional and unconditional counted separately, also when batched into one call);
    ``forward_passes``: physical DiT forward calls; ``sigmas``: the sigmas the DiT saw."""

    dit_calls_per_image: int = 0
    forward_passes: int = 0
    sigmas: list[float] = field(default_factory=list)


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
Generators = Union[torch.Generator, Sequence[torch.Generator], None]


def make_scheduler(settings: SamplerSettings, device: torch.device | str = "cpu"):
    """Build a diffusers scheduler and set its timesteps for ``settings`` (``unipc``/``euler``).

    Returns ``(scheduler, model_timesteps)``: the scheduler's own timesteps drive ``step``;
    ``model_timesteps`` are the values the DiT sees (integers on the official grid, as the
    official code casts them to int64). With an explicit or start-sigma schedule
    (:meth:`SamplerSettings.plan`) the scheduler runs exactly those sigmas (no further shift).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    settings.validate()
    if settings.solver == "x0_renoise":
        raise InputError("the x0_renoise solver has no diffusers scheduler; sample() runs it directly")
    planned = settings.plan()
    if planned is not None:
        if settings.solver == "unipc":
            sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                            num_train_timesteps=NUM_TRAIN_TIMESTEPS, flow_shift=1.0)
        else:
            sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=1.0)
        sched.set_timesteps(sigmas=np.asarray(planned, dtype=np.float64), device=device)
        _start_at_first_step(sched)
        return sched, sched.timesteps
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
    _start_at_first_step(sched)
    timesteps = sched.timesteps
    model_timesteps = torch.floor(timesteps) if official else timesteps
    return sched, model_timesteps


def _start_at_first_step(sched) -> None:
    """Pin the scheduler's first step index to 0.

    UniPC stores integer timesteps; with many steps (over ~200 at shift 5) neighbouring sigmas share
    one integer timestep, and diffusers then starts at the *second* match of the first timestep
    (its img2img rule), skips a sigma and fails with an AssertionError on the last step. Every run
    here starts at the first entry of its own grid, so the index is set explicitly.
    """
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(0)


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


def _draw_noise(shape: tuple[int, ...], generator: Generators) -> torch.Tensor:
    """fp32 CPU Gaussian noise of ``shape`` (``[B, ...]``): one draw per batch item from its own generator
    when a list is given (so an image's noise does not depend on its batch), else one draw."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, dtype=torch.float32)
    gens = list(generator)
    if len(gens) != shape[0]:
        raise InputError(f"{len(gens)} noise generators given for a batch of {shape[0]}")
    return torch.cat([torch.randn((1, *shape[1:]), generator=g, dtype=torch.float32) for g in gens])


def sample(
    transformer: torch.nn.Module,
    condition: torch.Tensor,
    noise: torch.Tensor,
    prompt_embeds: torch.Tensor,
    settings: SamplerSettings,
    negative_prompt_embeds: Optional[torch.Tensor] = None,
    callback: Optional[StepCallback] = None,
    should_cancel: Optional[Callable[[], bool]] = None,
    generator: Generators = None,
    stats: Optional[SampleStats] = None,
) -> torch.Tensor:
    """Integrate from ``noise`` to clean latents, with latent frame 0 held at ``condition``.

    ``condition`` is the normalised latent of the LQ image ``[B, C, 1, h, w]`` and ``noise`` the
    starting noise ``[B, C, T, h, w]``; ``prompt_embeds`` is ``[1 or B, L, D]``. Returns fp32 latents with
    frame 0 equal to the condition. ``should_cancel`` is polled before every step and
    ``callback`` runs after every step (it may raise to stop); both stop within one step.
    ``generator`` (one, or one per batch item) draws the fresh noise of the ``x0_renoise`` solver
    (CPU, fp32); ``stats``, when given, is filled with the DiT calls this sampling cost.
    """
    settings.validate()
    if condition.ndim != 5 or condition.shape[2] != 1 or condition.shape[:2] != noise.shape[:2] \
            or condition.shape[3:] != noise.shape[3:]:
        raise InputError(f"condition {tuple(condition.shape)} must be one latent frame of noise {tuple(noise.shape)}")
    device = noise.device
    batch = noise.shape[0]
    model_dtype = compute_dtype(transformer)
    patch = tuple(transformer.config.patch_size)
    mask = first_frame_mask(tuple(noise.shape), device)
    cond = condition.to(device=device, dtype=torch.float32)
    latents = noise.to(torch.float32)
    if settings.start_sigma is not None:
        # start from the LQ latent (the condition repeated over time) noised to start_sigma
        s0 = settings.start_sigma
        latents = (1.0 - s0) * cond.expand_as(latents) + s0 * latents
    stats = stats if stats is not None else SampleStats()

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
    batched_cfg = bool(settings.batch_cfg) and neg is not None and neg.shape == pos.shape
    both = torch.cat([pos, neg]) if batched_cfg else None

    def predict(i: int, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Velocity for step ``i`` (classifier-free guided on the leading guided steps), frame 0 re-imposed."""
        model_in = ((1 - mask) * cond + mask * latents).to(model_dtype)
        ts = token_timesteps(mask, t, batch, patch)
        if i >= guided:
            stats.dit_calls_per_image += 1
            stats.forward_passes += 1
            with cache_context(transformer, "cond", i):
                return transformer(hidden_states=model_in, timestep=ts, encoder_hidden_states=pos, return_dict=False)[0]
        stats.dit_calls_per_image += 2
        if batched_cfg:
            stats.forward_passes += 1
            with cache_context(transformer, "cond_uncond", i):
                out = transformer(hidden_states=torch.cat([model_in, model_in]), timestep=torch.cat([ts, ts]),
                                  encoder_hidden_states=both, return_dict=False)[0]
            pred, uncond = out.chunk(2)
        else:
            stats.forward_passes += 2
            with cache_context(transformer, "cond", i):
                pred = transformer(hidden_states=model_in, timestep=ts, encoder_hidden_states=pos, return_dict=False)[0]
            with cache_context(transformer, "uncond", i):
                uncond = transformer(hidden_states=model_in, timestep=ts, encoder_hidden_states=neg, return_dict=False)[0]
        return uncond + settings.guidance * (pred - uncond)

    if settings.solver == "x0_renoise":
        latents = _run_x0_renoise(settings, latents, cond, mask, predict, generator, callback, should_cancel, stats)
    else:
        latents = _run_scheduler(settings, latents, cond, mask, predict, callback, should_cancel, stats)
    return (1 - mask) * cond + mask * latents


def _run_scheduler(settings, latents, cond, mask, predict, callback, should_cancel, stats) -> torch.Tensor:
    """UniPC / Euler through diffusers' scheduler ``step`` on the (default, explicit or truncated) grid."""
    scheduler, model_timesteps = make_scheduler(settings, latents.device)
    total = len(scheduler.timesteps)
    for i, t in enumerate(scheduler.timesteps):
        if should_cancel is not None and should_cancel():
            raise Cancelled(f"cancelled at step {i + 1} of {total}")
        pred = predict(i, latents, model_timesteps[i])
        sigma = float(scheduler.sigmas[i])
        stats.sigmas.append(sigma)
        if callback is not None:
            denoised = (1 - mask) * cond + mask * (latents - sigma * pred.float())
        # fp32 velocity: FlowMatchEuler casts its result to the model output's dtype, which would round the
        # whole latent state to bf16/fp16 after every step with a half-precision DiT
        latents = scheduler.step(pred.float(), t, latents, return_dict=False)[0]
        if callback is not None:
            callback(StepInfo(step=i + 1, total=total, timestep=float(t), sigma=sigma, latents=latents,
                              denoised=denoised))
    return latents


def _run_x0_renoise(settings, latents, cond, mask, predict, generator, callback, should_cancel, stats) -> torch.Tensor:
    """DMD few-step sampling: predict x0 at each listed sigma, re-noise it to the next with fresh noise."""
    sigmas = settings.plan()
    total = len(sigmas)
    x0 = latents
    for i, sigma in enumerate(sigmas):
        if should_cancel is not None and should_cancel():
            raise Cancelled(f"cancelled at step {i + 1} of {total}")
        # the DiT sees timestep 1000 * sigma (FastWan: 1000, 757, 522), in float32 like the other grids
        t = torch.tensor(sigma * NUM_TRAIN_TIMESTEPS, dtype=torch.float32, device=latents.device)
        pred = predict(i, latents, t)
        stats.sigmas.append(float(sigma))
        x0 = latents - sigma * pred.float()
        if i + 1 < total:
            nxt = sigmas[i + 1]
            eps = _draw_noise(tuple(latents.shape), generator).to(latents.device)
            latents = (1.0 - nxt) * x0 + nxt * eps
        else:
            latents = x0
        if callback is not None:
            callback(StepInfo(step=i + 1, total=total, timestep=float(t), sigma=float(sigma), latents=latents,
                              denoised=(1 - mask) * cond + mask * x0))
    return latents
