"""Wan2.2 VAE: original (official / ComfyUI) key layout <-> diffusers ``AutoencoderKLWan``.

Why this exists: ComfyUI users have ``models/vae/wan2.2_vae.safetensors`` in the original Wan2.2
layout (``encoder.downsamples.0.downsamples.0.residual.0.gamma``, ...). diffusers' single-file
loader only knows the Wan2.1 layout and leaves the residual down/up blocks of the 2.2 VAE unmapped,
so we map the keys ourselves. The mapping is structural (regular expressions on block / layer
indices), so it works for any depth (``num_res_blocks``) and width (``dim_mult``), the real 5B VAE
and the tiny test VAEs alike. The architecture is read from tensor shapes; only the latent
normalisation statistics (``latents_mean`` / ``latents_std``, which no checkpoint carries) come from
the shipped config ``configs/wan22_vae.json`` (the 48 values of the official ``wan/modules/vae2_2.py``,
identical to diffusers' ``vae22_diffusers_config``).

Layout facts (official ``wan.modules.vae2_2.WanVAE_`` vs diffusers ``AutoencoderKLWan(is_residual=True)``):

=====================================================  ==================================================
original                                               diffusers
=====================================================  ==================================================
``encoder.conv1.*`` / ``decoder.conv1.*``              ``encoder.conv_in.*`` / ``decoder.conv_in.*``
``conv1.*`` / ``conv2.*``                              ``quant_conv.*`` / ``post_quant_conv.*``
``{enc,dec}.middle.0|2.*``                             ``{enc,dec}.mid_block.resnets.0|1.*``
``{enc,dec}.middle.1.*``                               ``{enc,dec}.mid_block.attentions.0.*``
``{enc,dec}.head.0.gamma`` / ``head.2.*``              ``{enc,dec}.norm_out.gamma`` / ``conv_out.*``
``encoder.downsamples.I.downsamples.J.<resnet>``       ``encoder.down_blocks.I.resnets.J.<resnet>``
``encoder.downsamples.I.downsamples.J.<resample>``     ``encoder.down_blocks.I.downsampler.<resample>``
``decoder.upsamples.I.upsamples.J.<resnet>``           ``decoder.up_blocks.I.resnets.J.<resnet>``
``decoder.upsamples.I.upsamples.J.<resample>``         ``decoder.up_blocks.I.upsampler.<resample>``
resnet ``residual.0.gamma`` / ``residual.2.*``         ``norm1.gamma`` / ``conv1.*``
resnet ``residual.3.gamma`` / ``residual.6.*``         ``norm2.gamma`` / ``conv2.*``
resnet ``shortcut.*``                                  ``conv_shortcut.*``
=====================================================  ==================================================

``<resample>`` is ``resample.1.*`` (the 2-D conv) and ``time_conv.*`` (temporal conv); both names are
the same on both sides. The parameter-free ``avg_shortcut`` of the residual blocks has no keys.
"""
from __future__ import annotations

import json
import logging
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import torch

from .errors import WrongModelError

logger = logging.getLogger(__name__)

CONFIG_PATH = Path(__file__).resolve().parent / "configs" / "wan22_vae.json"

#: Prefixes seen in front of VAE keys when the VAE is stored inside a bigger checkpoint or wrapper
#: (ComfyUI's own ``models/vae/wan2.2_vae.safetensors`` has none; full checkpoints use
#: ``first_stage_model.``; some trainers save ``vae.`` or ``module.``).
KNOWN_PREFIXES = ("first_stage_model.", "vae.", "model.", "module.")

_ORIG_MARKERS = ("encoder.conv1.weight", "decoder.middle.0.residual.0.gamma")
_DIFF_MARKERS = ("encoder.conv_in.weight", "decoder.mid_block.resnets.0.norm1.gamma")

# resnet sub-layer names: original -> diffusers
_RESNET_TO_DIFF = (
    ("residual.0.gamma", "norm1.gamma"),
    ("residual.2.", "conv1."),
    ("residual.3.gamma", "norm2.gamma"),
    ("residual.6.", "conv2."),
    ("shortcut.", "conv_shortcut."),
)
_HEAD_TO_DIFF = (("head.0.gamma", "norm_out.gamma"), ("head.2.", "conv_out."), ("conv1.", "conv_in."))


@lru_cache(maxsize=1)
def shipped_vae22_config() -> dict[str, Any]:
    """The real Wan2.2 VAE config (``configs/wan22_vae.json``) as ``AutoencoderKLWan`` keyword arguments."""
    raw = json.loads(CONFIG_PATH.read_text(encoding="utf-8"))
    return {k: v for k, v in raw.items() if not k.startswith("_")}


def _strip_prefix(sd: Mapping[str, Any]) -> dict[str, Any]:
    """Return ``sd`` without a common wrapper prefix (``first_stage_model.``, ``vae.``, ...), if any."""
    keys = list(sd.keys())
    for marker in _ORIG_MARKERS + _DIFF_MARKERS:
        if marker in sd:
            return dict(sd)
    for prefix in KNOWN_PREFIXES:
        if any(prefix + m in sd for m in _ORIG_MARKERS + _DIFF_MARKERS):
            out = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            dropped = len(keys) - len(out)
            if dropped:
                logger.info("VAE: kept %d keys under prefix %r, ignored %d others", len(out), prefix, dropped)
            return out
    return dict(sd)


def _is_original_layout(sd: Mapping[str, Any]) -> bool:
    return "encoder.conv1.weight" in sd and "decoder.middle.0.residual.0.gamma" in sd


def _is_diffusers_layout(sd: Mapping[str, Any]) -> bool:
    return "encoder.conv_in.weight" in sd and "decoder.mid_block.resnets.0.norm1.gamma" in sd


def is_wan22_vae(sd: Mapping[str, Any]) -> bool:
    """True if ``sd`` is a Wan2.2 VAE in the original (official / ComfyUI) key layout.

    Wan2.2 differs from Wan2.1 by its patchified input (``encoder.conv1`` takes 12 = 3 x 2 x 2
    channels), its 48-channel latent and its residual down/up blocks (``encoder.downsamples.I.
    downsamples.J``); a wrapper prefix such as ``first_stage_model.`` is tolerated.
    """
    sd = _strip_prefix(sd)
    if not _is_original_layout(sd):
        return False
    w = sd["encoder.conv1.weight"]
    if getattr(w, "ndim", 0) != 5 or w.shape[1] != 12:
        return False
    if "conv2.weight" not in sd or sd["conv2.weight"].shape[0] != 48:
        return False
    return any(k.startswith("encoder.downsamples.0.downsamples.") for k in sd)


def _orig_key_to_diffusers(key: str) -> str:
    """Map one original-layout key to its diffusers name (raises KeyError if it has none)."""
    if key.startswith("conv1."):
        return "quant_conv." + key[len("conv1."):]
    if key.startswith("conv2."):
        return "post_quant_conv." + key[len("conv2."):]
    m = re.fullmatch(r"(encoder|decoder)\.(.+)", key)
    if not m:
        raise KeyError(key)
    part, rest = m.groups()
    m = re.fullmatch(r"middle\.([012])\.(.+)", rest)
    if m:
        idx, sub = m.groups()
        if idx == "1":
            return f"{part}.mid_block.attentions.0.{sub}"
        return f"{part}.mid_block.resnets.{int(idx) // 2}.{_map_resnet(sub, key)}"
    kind = "downsamples" if part == "encoder" else "upsamples"
    m = re.fullmatch(rf"{kind}\.(\d+)\.{kind}\.(\d+)\.(.+)", rest)
    if m:
        i, j, sub = m.groups()
        block = "down_blocks" if part == "encoder" else "up_blocks"
        if sub.startswith(("resample.", "time_conv.")):
            sampler = "downsampler" if part == "encoder" else "upsampler"
            return f"{part}.{block}.{i}.{sampler}.{sub}"
        return f"{part}.{block}.{i}.resnets.{j}.{_map_resnet(sub, key)}"
    for old, new in _HEAD_TO_DIFF:
        if rest.startswith(old):
            return f"{part}.{new}{rest[len(old):]}"
    raise KeyError(key)


def _map_resnet(sub: str, key: str) -> str:
    for old, new in _RESNET_TO_DIFF:
        if sub.startswith(old):
            return new + sub[len(old):]
    raise KeyError(key)


def _diffusers_key_to_orig(key: str, num_res_blocks: int) -> str:
    """Inverse of :func:`_orig_key_to_diffusers`; the resample index needs ``num_res_blocks``."""
    if key.startswith("quant_conv."):
        return "conv1." + key[len("quant_conv."):]
    if key.startswith("post_quant_conv."):
        return "conv2." + key[len("post_quant_conv."):]
    m = re.fullmatch(r"(encoder|decoder)\.(.+)", key)
    if not m:
        raise KeyError(key)
    part, rest = m.groups()
    m = re.fullmatch(r"mid_block\.attentions\.0\.(.+)", rest)
    if m:
        return f"{part}.middle.1.{m.group(1)}"
    m = re.fullmatch(r"mid_block\.resnets\.([01])\.(.+)", rest)
    if m:
        return f"{part}.middle.{int(m.group(1)) * 2}.{_unmap_resnet(m.group(2), key)}"
    kind = "downsamples" if part == "encoder" else "upsamples"
    block = "down_blocks" if part == "encoder" else "up_blocks"
    sampler = "downsampler" if part == "encoder" else "upsampler"
    m = re.fullmatch(rf"{block}\.(\d+)\.resnets\.(\d+)\.(.+)", rest)
    if m:
        i, j, sub = m.groups()
        return f"{part}.{kind}.{i}.{kind}.{j}.{_unmap_resnet(sub, key)}"
    m = re.fullmatch(rf"{block}\.(\d+)\.{sampler}\.(.+)", rest)
    if m:
        i, sub = m.groups()
        # the resample layer follows the block's residual layers: num_res_blocks of them in the
        # encoder, num_res_blocks + 1 in the decoder
        j = num_res_blocks if part == "encoder" else num_res_blocks + 1
        return f"{part}.{kind}.{i}.{kind}.{j}.{sub}"
    for old, new in _HEAD_TO_DIFF:
        if rest.startswith(new):
            return f"{part}.{old}{rest[len(new):]}"
    raise KeyError(key)


def _unmap_resnet(sub: str, key: str) -> str:
    for old, new in _RESNET_TO_DIFF:
        if sub.startswith(new):
            return old + sub[len(new):]
    raise KeyError(key)


def _require_wan22(sd: Mapping[str, Any]) -> None:
    if is_wan22_vae(sd):
        return
    if _is_original_layout(sd):
        w = sd["encoder.conv1.weight"]
        raise WrongModelError(
            f"this VAE is a Wan-family VAE but not the Wan2.2 one (its encoder takes {w.shape[1]} input "
            "channels, Wan2.2's takes 12; it is probably the Wan2.1 VAE). Wan2.2-TI2V-5B needs "
            "models/vae/wan2.2_vae.safetensors.")
    raise WrongModelError(
        "this file is not a Wan2.2 VAE in the original layout (no 'encoder.conv1.weight' / "
        "'decoder.middle.0.residual.0.gamma'). Use models/vae/wan2.2_vae.safetensors or the vae/ folder "
        "of Wan-AI/Wan2.2-TI2V-5B-Diffusers.")


def vae22_config_from_state_dict(sd: Mapping[str, torch.Tensor], latents_mean: list[float] | None = None,
                                 latents_std: list[float] | None = None) -> dict[str, Any]:
    """``AutoencoderKLWan`` keyword arguments that fit the Wan2.2 VAE weights in ``sd``.

    Widths, depths and temporal down-sampling flags are read from tensor shapes and key names, so a
    real file and a tiny test file both work. ``latents_mean`` / ``latents_std`` are not stored in
    checkpoints: they default to the real 48 values of the shipped config (pass others for a model
    trained with other statistics). Accepts the original layout (with or without a wrapper prefix)
    and the diffusers layout.
    """
    sd = _strip_prefix(sd)
    if _is_diffusers_layout(sd) and not _is_original_layout(sd):
        sd = convert_vae22_from_diffusers(sd)
    _require_wan22(sd)

    base_dim = int(sd["encoder.conv1.weight"].shape[0])
    in_channels = int(sd["encoder.conv1.weight"].shape[1])
    z_dim = int(sd["conv2.weight"].shape[0])
    out_channels = int(sd["decoder.head.2.weight"].shape[0])

    n_levels = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"encoder\.downsamples\.(\d+)\.", k)))
    num_res_blocks = len({int(m.group(1)) for k in sd
                          if (m := re.match(r"encoder\.downsamples\.0\.downsamples\.(\d+)\.residual\.", k))})
    dim_mult = []
    for i in range(n_levels):
        width = int(sd[f"encoder.downsamples.{i}.downsamples.0.residual.6.weight"].shape[0])
        if width % base_dim:
            raise WrongModelError(f"unexpected Wan2.2 VAE widths: encoder level {i} has {width} channels, "
                                  f"not a multiple of the base width {base_dim}")
        dim_mult.append(width // base_dim)
    temperal_downsample = [f"encoder.downsamples.{i}.downsamples.{num_res_blocks}.time_conv.weight" in sd
                           for i in range(n_levels - 1)]
    dec_head_in = int(sd["decoder.head.2.weight"].shape[1])
    decoder_base_dim = dec_head_in // dim_mult[0]

    # consistency checks on the decoder (its layout mirrors the encoder's)
    dec_levels = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"decoder\.upsamples\.(\d+)\.", k)))
    temperal_upsample = [f"decoder.upsamples.{i}.upsamples.{num_res_blocks + 1}.time_conv.weight" in sd
                         for i in range(n_levels - 1)]
    if dec_levels != n_levels or temperal_upsample != temperal_downsample[::-1] or \
            int(sd["decoder.conv1.weight"].shape[0]) != decoder_base_dim * dim_mult[-1]:
        raise WrongModelError("this Wan2.2 VAE's decoder does not mirror its encoder; the file is damaged "
                              "or holds another architecture.")

    shipped = shipped_vae22_config()
    mean = list(latents_mean) if latents_mean is not None else list(shipped["latents_mean"])
    std = list(latents_std) if latents_std is not None else list(shipped["latents_std"])
    if len(mean) != z_dim or len(std) != z_dim:
        raise WrongModelError(f"latent statistics have {len(mean)}/{len(std)} values, the VAE has {z_dim} channels")
    patch = int(round((in_channels // 3) ** 0.5))
    return dict(
        base_dim=base_dim, decoder_base_dim=decoder_base_dim, z_dim=z_dim, dim_mult=dim_mult,
        num_res_blocks=num_res_blocks, attn_scales=[], temperal_downsample=temperal_downsample, dropout=0.0,
        latents_mean=mean, latents_std=std, is_residual=True, in_channels=in_channels, out_channels=out_channels,
        patch_size=patch, scale_factor_temporal=2 ** sum(temperal_downsample),
        scale_factor_spatial=patch * 2 ** (n_levels - 1),
    )


def convert_vae22_to_diffusers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename every key of an original-layout Wan2.2 VAE to diffusers' ``AutoencoderKLWan`` names.

    Tensors are not copied. A wrapper prefix (``first_stage_model.``, ``vae.``, ...) is removed; a
    state dict already in the diffusers layout is returned as is. Raises :class:`WrongModelError`
    for a Wan2.1 VAE, another model, or keys this mapping does not know (so a strict load never
    silently drops weights).
    """
    sd = _strip_prefix(sd)
    if _is_diffusers_layout(sd) and not _is_original_layout(sd):
        return dict(sd)
    _require_wan22(sd)
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in sd.items():
        try:
            out[_orig_key_to_diffusers(key)] = value
        except KeyError:
            unknown.append(key)
    if unknown:
        raise WrongModelError(f"the Wan2.2 VAE file has {len(unknown)} keys this loader does not know, "
                              f"e.g. {unknown[:3]}; it is not a plain Wan2.2 VAE.")
    return out


def convert_vae22_from_diffusers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`convert_vae22_to_diffusers`: diffusers names back to the original layout.

    Used by tests and tools to write files in the layout ComfyUI and the official code read.
    """
    sd = _strip_prefix(sd)
    if not _is_diffusers_layout(sd):
        raise WrongModelError("not a diffusers AutoencoderKLWan state dict (no 'encoder.conv_in.weight').")
    num_res_blocks = len({int(m.group(1)) for k in sd
                          if (m := re.match(r"encoder\.down_blocks\.0\.resnets\.(\d+)\.", k))})
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        try:
            out[_diffusers_key_to_orig(key, num_res_blocks)] = value
        except KeyError:
            raise WrongModelError(f"unexpected key {key!r} in a diffusers Wan VAE state dict") from None
    return out
