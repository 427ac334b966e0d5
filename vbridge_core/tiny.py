"""Tiny random-weight Wan2.2-TI2V models with the real architectures (diffusers classes, shrunk).

Used by the tests, the benchmark's ``--tiny`` mode and ``python -m vbridge_core demo``. The shapes
keep every rule of the real 5B model that our code relies on: 48 latent channels, patch (1, 2, 2),
head dim 128 (ComfyUI reads heads as dim / 128), text dim 4096, a Wan2.2 VAE with 16x spatial and
4x temporal compression and a residual (patchified) encoder. Only widths and depths are small.

A tiny model restores nothing: it is a smoke test of the code paths, not of image quality.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

TINY_TRANSFORMER_CONFIG: dict[str, Any] = dict(
    patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=128, in_channels=48, out_channels=48,
    text_dim=4096, freq_dim=256, ffn_dim=512, num_layers=2, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None,
    rope_max_seq_len=1024, pos_embed_seq_len=None,
)

TINY_VAE_CONFIG: dict[str, Any] = dict(
    base_dim=16, decoder_base_dim=24, z_dim=48, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
    temperal_downsample=[False, True, True], dropout=0.0, is_residual=True, in_channels=12, out_channels=12,
    patch_size=2, scale_factor_temporal=4, scale_factor_spatial=16,
    latents_mean=[round(0.05 * ((i * 7) % 11 - 5), 4) for i in range(48)],
    latents_std=[round(0.8 + 0.02 * ((i * 5) % 13), 4) for i in range(48)],
)

#: Text sequence length used for tiny prompt embeddings (the real model uses 512 umt5 tokens).
TINY_TEXT_LEN = 16


def build_tiny_transformer(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A random-weight diffusers ``WanTransformer3DModel`` with the tiny config.

    Weights are drawn with a wider spread than diffusers' init (which zero-initialises some output
    layers) so every block contributes and tests can tell models apart.
    """
    from diffusers import WanTransformer3DModel

    g = torch.Generator().manual_seed(seed)
    model = WanTransformer3DModel(**TINY_TRANSFORMER_CONFIG)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    return model.to(dtype).eval() if dtype != torch.float32 else model.eval()


def build_tiny_vae(seed: int = 1, dtype: torch.dtype = torch.float32):
    """A random-weight diffusers ``AutoencoderKLWan`` (Wan2.2 layout) with the tiny config."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    model = AutoencoderKLWan(**TINY_VAE_CONFIG)
    return model.to(dtype).eval()


def tiny_prompt_embeds(seed: int = 2, length: int = TINY_TEXT_LEN) -> torch.Tensor:
    """A deterministic stand-in for a umt5 prompt embedding, shape [1, length, 4096]."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, length, TINY_TRANSFORMER_CONFIG["text_dim"], generator=g) * 0.1


def save_tiny_diffusers_folder(path: str | os.PathLike, seed: int = 0) -> Path:
    """Write a diffusers-style model folder (``transformer/``, ``vae/``) with tiny random weights.

    The folder loads through the same public loaders as the real Wan2.2-TI2V-5B-Diffusers folder.
    """
    root = Path(path)
    build_tiny_transformer(seed).save_pretrained(root / "transformer", safe_serialization=True)
    build_tiny_vae(seed + 1).save_pretrained(root / "vae", safe_serialization=True)
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "WanImageToVideoPipeline", "_diffusers_version": "0.42.1", "expand_timesteps": True,
        "transformer": ["diffusers", "WanTransformer3DModel"], "vae": ["diffusers", "AutoencoderKLWan"],
    }, indent=2))
    return root
