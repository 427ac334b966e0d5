"""Per-stage cache of pseudo-video VAE latents, so the VAE does no work (and need not be resident)
while the DiT trains.

For each curriculum stage, every training pair gets ``crops_per_pair`` augmented views (random crop
+ flip, seeded by the run seed and the stage index, so a resumed run rebuilds exactly the same
cache); each view becomes the pseudo-video ``I_t = (1 - a_t) LQ + a_t HQ`` and is encoded once.
The latents live on the CPU (normalised with the VAE's mean/std, fp32) and optionally in a
safetensors file under ``cache_dir`` keyed by everything that determines them.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from .. import trajectory
from ..seeds import seeded_generator
from .dataset import TrainingPairs, random_view

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def vae_on(pipe) -> Iterator[None]:
    """Keep the VAE on the compute device inside the block, and park it on the CPU after it.

    On CUDA this frees the VAE's memory for the DiT's activations while training; on the CPU it is
    a no-op.
    """
    if pipe.device.type == "cpu":
        yield
        return
    pipe.vae.to(pipe.device)
    try:
        yield
    finally:
        pipe.vae.to("cpu")
        torch.cuda.empty_cache()


@torch.no_grad()
def encode_video(pipe, video: torch.Tensor) -> torch.Tensor:
    """Normalised latents ``[B, C, T, h, w]`` (fp32, CPU) of pixel videos ``[B, 3, F, H, W]`` in 0..1."""
    vae_dtype = next(pipe.vae.parameters()).dtype
    z = pipe.vae.encode((video * 2 - 1).to(pipe.device, vae_dtype)).latent_dist.mode().float()
    return ((z - pipe._lat_mean.to(z.device)) / pipe._lat_std.to(z.device)).cpu()


def _cache_key(pairs: TrainingPairs, resolution: int, stage_index: int, config, vae) -> str:
    vae_id = hashlib.sha1()
    for name, p in list(vae.state_dict().items())[:8]:
        vae_id.update(name.encode())
        vae_id.update(p.detach().float().flatten()[:64].cpu().numpy().tobytes())
    spec = dict(pairs=pairs.fingerprint(), res=resolution, stage=stage_index, seed=config.seed,
                frames=config.frames, schedule=config.alpha_schedule, crops=config.crops_per_pair,
                mode=config.crop_mode, flip=config.flip, vae=vae_id.hexdigest())
    return hashlib.sha1(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:20]


def build_stage_cache(pipe, pairs: TrainingPairs, resolution: int, stage_index: int, config,
                      progress: Optional[Callable[[int, int], None]] = None) -> list[list[torch.Tensor]]:
    """``cache[pair][view]``: latents ``[1, C, T, h, w]`` of every augmented view of every pair.

    Deterministic in ``(config.seed, stage_index)``. Loads from / saves to ``config.cache_dir`` when set.
    """
    path: Optional[Path] = None
    if config.cache_dir:
        path = Path(config.cache_dir) / f"latents_{_cache_key(pairs, resolution, stage_index, config, pipe.vae)}.safetensors"
        if path.is_file():
            try:
                from safetensors.torch import load_file

                flat = load_file(str(path))
                cache = [[flat[f"{i}.{v}"] for v in range(config.crops_per_pair)] for i in range(len(pairs))]
                logger.info("stage %d: loaded %d cached latents from %s", stage_index + 1,
                            len(pairs) * config.crops_per_pair, path)
                return cache
            except Exception as e:  # a damaged cache is rebuilt, never fatal
                logger.warning("ignoring unreadable latent cache %s: %s", path, e)
    alphas = trajectory.alpha_schedule(config.alpha_schedule, config.frames)
    g = seeded_generator(int(config.seed) * 1000, 17 + stage_index)
    total = len(pairs) * config.crops_per_pair
    cache: list[list[torch.Tensor]] = []
    done = 0
    with vae_on(pipe):
        for i in range(len(pairs)):
            lq, hq = pairs.load(i)
            crops = [random_view(lq, hq, resolution, config.crop_mode, config.flip, g)
                     for _ in range(config.crops_per_pair)]
            videos = trajectory.blend_pairs(torch.stack([c[0] for c in crops]), torch.stack([c[1] for c in crops]),
                                            alphas)
            # one VAE call per pair (its views batched); chunks bound the activation memory at large sizes
            chunk = max(1, (512 * 512 * 4) // (resolution * resolution))
            z = torch.cat([encode_video(pipe, videos[j:j + chunk]) for j in range(0, len(videos), chunk)])
            cache.append([z[v:v + 1].clone() for v in range(len(z))])
            done += len(z)
            if progress is not None:
                progress(done, total)
    if path is not None:
        try:
            from ..fileio import save_safetensors_atomic

            save_safetensors_atomic({f"{i}.{v}": z for i, vs in enumerate(cache) for v, z in enumerate(vs)}, path)
        except Exception as e:
            logger.warning("could not write the latent cache %s (%s); training goes on", path, e)
    logger.info("stage %d: encoded %d pseudo-videos at %d px", stage_index + 1, total, resolution)
    return cache


def cache_bytes(cache: list[list[torch.Tensor]]) -> int:
    """Bytes held by a stage cache (for logging)."""
    return sum(z.numel() * z.element_size() for vs in cache for z in vs)


def describe(cache: list[list[torch.Tensor]]) -> dict[str, Any]:
    z = cache[0][0]
    return dict(pairs=len(cache), views=len(cache[0]), shape=list(z.shape), mb=round(cache_bytes(cache) / 2**20, 1))
