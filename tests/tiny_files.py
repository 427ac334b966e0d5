"""Test helpers shared by several test files (not a test module): tiny LoRA files, a ComfyUI-like
models folder, calling a node as ComfyUI does, procedural photos and spread-out random VAE weights.

The fixtures built on these live in ``conftest.py`` (``models_env``) or in the test files themselves
(each file's module-scoped ``models_root``, kept apart because tests write LoRAs and stabilizers there).
"""
from __future__ import annotations

import contextlib
import math
import shutil
from pathlib import Path
from typing import Any, Iterator, Mapping

import pytest
import torch

from vbridge_core.lora import LoraLayer, write_lora
from vbridge_core.tiny import TINY_TRANSFORMER_CONFIG, tiny_prompt_embeds

#: The tiny official ``wan.modules.vae2_2.WanVAE_`` (random weights) that the VAE tests convert.
TINY_OFFICIAL_VAE = dict(dim=16, dec_dim=24, z_dim=48, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
                         temperal_downsample=[False, True, True], dropout=0.0)


def random_lora(path: Path, role: str = "restoration", seed: int = 0, dim: int = 256, layers: int = 2,
                prompt: str | None = None, negative_prompt: bool = True) -> Path:
    """A rank-4 LoRA for the tiny DiT (q, v, cross-attention k and the FFN output of ``layers`` blocks).

    It carries ``tiny_prompt_embeds(seed)`` as its prompt, plus ``tiny_prompt_embeds(seed + 1)`` as
    the negative one when ``negative_prompt``; ``prompt`` adds a prompt text to the metadata.
    """
    g = torch.Generator().manual_seed(seed)
    w = {}
    for i in range(layers):
        for m in ("attn1.to_q", "attn1.to_v", "attn2.to_k", "ffn.net.2"):
            out_f, in_f = (dim, TINY_TRANSFORMER_CONFIG["ffn_dim"]) if m == "ffn.net.2" else (dim, dim)
            w[f"blocks.{i}.{m}"] = LoraLayer(torch.randn(4, in_f, generator=g) * 0.05,
                                             torch.randn(out_f, 4, generator=g) * 0.05, 4.0)
    metadata: dict[str, Any] = {"role": role, "frames": 5}
    if prompt is not None:
        metadata["prompt"] = prompt
    return write_lora(path, w, rank=4, alpha=4, metadata=metadata, prompt_embeds=tiny_prompt_embeds(seed),
                      negative_prompt_embeds=tiny_prompt_embeds(seed + 1) if negative_prompt else None)


def comfy_models_root(root: Path, tiny_model_dir: Path, loras: Mapping[str, Mapping[str, Any]]) -> Path:
    """A ComfyUI-like models folder in ``root``: the tiny DiT and VAE as single files
    (``diffusion_models/tiny_dit.safetensors``, ``vae/tiny_vae.safetensors``) and, in ``loras/vbridge/``,
    one :func:`random_lora` per ``{file name: its keyword arguments}`` of ``loras``."""
    (root / "diffusion_models").mkdir()
    (root / "vae").mkdir()
    (root / "loras" / "vbridge").mkdir(parents=True)
    shutil.copy(tiny_model_dir / "transformer" / "diffusion_pytorch_model.safetensors",
                root / "diffusion_models" / "tiny_dit.safetensors")
    shutil.copy(tiny_model_dir / "vae" / "diffusion_pytorch_model.safetensors", root / "vae" / "tiny_vae.safetensors")
    for name, kwargs in loras.items():
        random_lora(root / "loras" / "vbridge" / name, **kwargs)
    return root


@contextlib.contextmanager
def models_dir(root: Path) -> Iterator[Path]:
    """``$VBRIDGE_MODELS_DIR`` set to ``root`` for the block (for module-scoped fixtures)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("VBRIDGE_MODELS_DIR", str(root))
    try:
        yield root
    finally:
        mp.undo()


def call_node(name: str, *, inference_mode: bool = True, **kwargs: Any) -> tuple:
    """Run node ``name`` like ComfyUI (under ``torch.inference_mode()`` unless told otherwise) and
    check that it returns one value per output."""
    import nodes as pack

    cls = pack.NODE_CLASS_MAPPINGS[name]
    with torch.inference_mode() if inference_mode else contextlib.nullcontext():
        out = getattr(cls(), cls.FUNCTION)(**kwargs)
    assert isinstance(out, tuple) and len(out) == len(cls.RETURN_TYPES)
    return out


def procedural_photo(seed: int, size: int = 96, discs: int = 6, stripes: bool = True) -> torch.Tensor:
    """A procedural 'photo' ``[3, H, W]``: smooth colour gradients, ``discs`` discs and (with ``stripes``)
    a striped band at the bottom: edges that move under camera motion."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    img = torch.stack([0.3 + 0.4 * xx, 0.3 + 0.4 * yy, 0.5 + 0.2 * (xx - yy)])
    for _ in range(discs):
        cx, cy, r = torch.rand(3, generator=g)
        col = torch.rand(3, 1, 1, generator=g)
        m = ((xx - cx) ** 2 + (yy - cy) ** 2 < (0.05 + 0.15 * r) ** 2).float()
        img = img * (1 - m) + col * m
    if stripes:
        f = 6 + 10 * float(torch.rand(1, generator=g))
        band = (yy > 0.7).float()
        img = img * (1 - band) + (0.2 + 0.6 * (torch.sin(2 * math.pi * f * (xx + 0.5 * yy)) > 0).float()) * band
    return img.clamp(0, 1)


def spread_vae_weights(model: torch.nn.Module, g: torch.Generator) -> torch.nn.Module:
    """Redraw an official Wan VAE's weights from ``g`` so every layer matters (the official init
    zeroes the attention output): norm gains near 1, matrices scaled by fan-in, small biases."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model


#: Original-Wan names of the Linear layers a ComfyUI-extracted Wan LoRA covers (per block, then top level).
_WAN_BLOCK_LINEARS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
                      "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")
_WAN_TOP_LINEARS = ("text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2",
                    "time_projection.1", "head.head")


def fastwan_style_lora(path: Path, transformer: torch.nn.Module, seed: int = 0, rank: int = 8,
                       scale: float = 0.02) -> Path:
    """A tiny accelerator LoRA in the key layout of Kijai's ComfyUI FastWan LoRA
    (``Wan2_2_5B_FastWanFullAttn_lora_rank_128_bf16.safetensors``, Kijai/WanVideo_comfy ``FastWan/``), which is
    what ComfyUI's own LoRA extractor writes (``comfy_extras/nodes_lora_extract.py``, ``LoraSave`` with
    ``bias_diff=True``) from the difference of a distilled and a base checkpoint:

    * ``diffusion_model.<original Wan name>.lora_up.weight`` ``[out, rank]`` and ``.lora_down.weight``
      ``[rank, in]`` for every Linear of the blocks (self/cross attention q k v o, ffn.0, ffn.2) and of the
      text/time embeddings, time projection and head; no ``.alpha`` keys (ComfyUI then scales by 1);
    * ``<name>.diff_b``: the bias difference of each of those Linears (and of ``norm3``);
    * ``<name>.diff``: the difference of every 1-D weight (``norm_q``/``norm_k`` of both attentions, ``norm3``);
    * bf16 tensors, no metadata, no prompt embedding. The conv ``patch_embedding`` and the ``modulation``
      tables are absent (the extractor only handles ``.weight`` tensors of Linear/conv2d shape and biases).

    Shapes follow ``transformer`` (the tiny DiT).
    """
    from safetensors.torch import save_file

    from vbridge_core.lora import wan_to_diffusers_name

    g = torch.Generator().manual_seed(seed)
    modules = dict(transformer.named_modules())
    n_blocks = len(transformer.blocks)
    sd: dict[str, torch.Tensor] = {}

    def rnd(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(torch.bfloat16)

    names = [f"blocks.{i}.{n}" for i in range(n_blocks) for n in _WAN_BLOCK_LINEARS] + list(_WAN_TOP_LINEARS)
    for wan in names:
        lin = modules[wan_to_diffusers_name(wan)]
        sd[f"diffusion_model.{wan}.lora_up.weight"] = rnd(lin.out_features, rank)
        sd[f"diffusion_model.{wan}.lora_down.weight"] = rnd(rank, lin.in_features)
        if lin.bias is not None:
            sd[f"diffusion_model.{wan}.diff_b"] = rnd(lin.out_features)
    for i in range(n_blocks):
        for attn in ("self_attn", "cross_attn"):
            for norm in ("norm_q", "norm_k"):
                sd[f"diffusion_model.blocks.{i}.{attn}.{norm}.diff"] = rnd(transformer.config.num_attention_heads
                                                                           * transformer.config.attention_head_dim)
        dim = transformer.config.num_attention_heads * transformer.config.attention_head_dim
        sd[f"diffusion_model.blocks.{i}.norm3.diff"] = rnd(dim)
        sd[f"diffusion_model.blocks.{i}.norm3.diff_b"] = rnd(dim)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    return path
