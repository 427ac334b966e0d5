"""The flow-matching objective of Wan2.2 TI2V, with frame 0 held clean as the image condition.

For clean normalised latents ``z`` of a pseudo-video, noise ``e`` and a noise level ``s`` drawn with
the same shift as at inference, the DiT sees ``x = (1 - s) z + s e`` on latent frames 1.. and the
clean ``z`` on frame 0 (timestep 0 for its tokens), and learns the velocity ``e - z``. The loss is
the mean squared error on the noised frames only: frame 0 is a condition, not a target.
"""
from __future__ import annotations

import torch

from ..sampler import NUM_TRAIN_TIMESTEPS, compute_dtype, first_frame_mask, token_timesteps


def sample_sigmas(batch: int, shift: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Noise levels ``[batch]`` in (0, 1): uniform, then shifted as the sampler's sigma grid is."""
    u = torch.rand(batch, generator=generator).clamp(1e-3, 1 - 1e-3)
    return shift * u / (1 + (shift - 1) * u)


def flow_matching_loss(transformer: torch.nn.Module, latents: torch.Tensor, prompt_embeds: torch.Tensor,
                       sigmas: torch.Tensor, noise: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """MSE between the predicted and the true velocity on latent frames 1.. of ``latents``.

    ``latents`` ``[B, C, T, h, w]`` (T >= 2), ``sigmas`` ``[B]``, ``noise`` like ``latents``,
    ``prompt_embeds`` ``[1 or B, L, D]``. Runs in the transformer's dtype; the loss is fp32.
    ``weights`` ``[B]`` (optional) weight each sample's mean squared error (quality-aware training).
    """
    b = latents.shape[0]
    dtype = compute_dtype(transformer)
    s = sigmas.view(b, 1, 1, 1, 1).to(latents)
    mask = first_frame_mask(tuple(latents.shape), latents.device)
    noisy = (1 - s) * latents + s * noise
    model_in = (1 - mask) * latents + mask * noisy
    patch = tuple(transformer.config.patch_size)
    ts = torch.cat([token_timesteps(mask, sigmas[i] * NUM_TRAIN_TIMESTEPS, 1, patch) for i in range(b)])
    ctx = prompt_embeds.expand(b, -1, -1) if prompt_embeds.shape[0] == 1 and b > 1 else prompt_embeds
    pred = transformer(hidden_states=model_in.to(dtype), timestep=ts.to(latents.device),
                       encoder_hidden_states=ctx.to(latents.device, dtype), return_dict=False)[0]
    target = noise - latents
    if weights is not None:
        per = (pred[:, :, 1:].float() - target[:, :, 1:].float()).pow(2).flatten(1).mean(1)
        return (per * weights.to(per)).mean()
    return torch.nn.functional.mse_loss(pred[:, :, 1:].float(), target[:, :, 1:].float())
