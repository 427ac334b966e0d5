"""Validation during training: restore the held-out pairs and score them.

The held-out pairs are centre-cropped at the validation resolution and restored with the adapter
being trained (or with none, for the "before" row) by the same sampler the pipeline uses. Scores:

- ``psnr`` / ``ssim``: the restored last frame against HQ (the numbers users care about);
- ``latent_mse``: the sampled last latent frame against the last latent frame of the encoded
  LQ -> HQ pseudo-video (the training target itself);
- ``psnr_reachable``: the restored frame against the VAE's own decoding of that target, i.e. the
  best the DiT can do through this VAE.

The last two are what a tiny random-weight model can be judged on: its VAE decodes every latent to
noise-like images, so PSNR against HQ says nothing there, while distances to the target latent and
to the VAE round trip of the target still measure whether the LoRA learnt the trajectory.
"""
from __future__ import annotations

import torch

from .. import trajectory
from ..metrics import psnr, ssim
from ..sampler import SamplerSettings, sample
from ..seeds import seeded_generator, wrap_seed
from .dataset import TrainingPairs, center_view
from .latent_cache import encode_video


class ValidationSet:
    """Centre views of the validation pairs, their condition latents and targets (computed once)."""

    def __init__(self, pipe, pairs: TrainingPairs, resolution: int, config) -> None:
        alphas = trajectory.alpha_schedule(config.alpha_schedule, config.frames)
        self.lqs: list[torch.Tensor] = []
        self.hqs: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []
        self.reachable: list[torch.Tensor] = []
        self.names = pairs.names
        self.config = config
        #: ``f(transformer, cond, noise, prompt, seed) -> latents`` replacing the sampler (turbo students)
        self.sample_fn = None
        for i in range(len(pairs)):
            lq, hq = center_view(*pairs.load(i), resolution, config.crop_mode)
            self.lqs.append(lq)
            self.hqs.append(hq)
            z = encode_video(pipe, trajectory.blend_pairs(lq[None], hq[None], alphas))
            self.targets.append(z)
            self.reachable.append(pipe.decode(z.to(pipe.device))[0, :, -1].cpu())

    def __len__(self) -> int:
        return len(self.lqs)

    @torch.no_grad()
    def run(self, pipe, prompt_embeds: torch.Tensor, seed: int = 0) -> tuple[dict[str, float], list[torch.Tensor]]:
        """Restore every validation LQ with the transformer as it is now; return mean metrics and outputs."""
        settings = SamplerSettings(steps=self.config.validation_steps, shift=self.config.shift)
        n_lat = trajectory.latent_frames(self.config.frames)
        outs, scores = [], {"psnr": [], "ssim": [], "latent_mse": [], "psnr_reachable": []}
        for i, (lq, hq) in enumerate(zip(self.lqs, self.hqs)):
            cond = pipe.encode_condition(lq[None])
            _, c, _, h, w = cond.shape
            noise = torch.randn((1, c, n_lat, h, w), generator=seeded_generator(seed, i)).to(pipe.device)
            if self.sample_fn is not None:
                lat = self.sample_fn(pipe.transformer, cond, noise, prompt_embeds, wrap_seed(seed, i))
            else:
                lat = sample(pipe.transformer, cond, noise, prompt_embeds, settings)
            out = pipe.decode(lat)[0, :, -1].cpu()
            outs.append(out)
            scores["psnr"].append(float(psnr(out, hq)))
            scores["ssim"].append(float(ssim(out, hq)))
            scores["latent_mse"].append(float(((lat[:, :, -1].cpu() - self.targets[i][:, :, -1]) ** 2).mean()))
            scores["psnr_reachable"].append(float(psnr(out, self.reachable[i])))
        return {k: sum(v) / len(v) for k, v in scores.items()}, outs

