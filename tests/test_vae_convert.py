"""The Wan2.2 VAE in the original key layout loads into diffusers and matches the official model.

A tiny official ``wan.modules.vae2_2.WanVAE_`` (random weights) is saved as a safetensors file in the
layout of ``wan2.2_vae.safetensors``, converted with :mod:`vbridge_core.vae_convert` and loaded
strictly into diffusers' ``AutoencoderKLWan``; encode (posterior mean) and decode must equal the
official model's outputs in fp32 on CPU.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from vbridge_core.errors import WrongModelError
from vbridge_core.tiny import TINY_VAE_CONFIG
from vbridge_core.vae_convert import (
    convert_vae22_from_diffusers,
    convert_vae22_to_diffusers,
    is_wan22_vae,
    shipped_vae22_config,
    vae22_config_from_state_dict,
)
from tiny_files import TINY_OFFICIAL_VAE, spread_vae_weights
from wan_official import load_official as _load_official_once


def load_official():
    """``wan_official.load_official`` may be called once per process only (a second call fails in
    ``importlib.util.find_spec`` on the bare ``wan`` package it registered), so reuse its modules."""
    import sys

    if "wan.modules.vae2_2" in sys.modules and "wan.modules.model" in sys.modules:
        return sys.modules["wan.modules.model"], sys.modules["wan.modules.vae2_2"]
    return _load_official_once()

ARCH_KEYS = ("base_dim", "decoder_base_dim", "z_dim", "dim_mult", "num_res_blocks", "attn_scales",
             "temperal_downsample", "dropout", "is_residual", "in_channels", "out_channels", "patch_size",
             "scale_factor_temporal", "scale_factor_spatial")


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Spread the weights so every layer matters (the official init zeroes the attention output)."""
    spread_vae_weights(model, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        # keep the decoded pixels mostly inside [-1, 1] so diffusers' clamp does not hide differences
        head = model.decoder.head[2]
        head.weight.mul_(0.05)
        head.bias.zero_()
    return model.eval()


def _official(seed: int = 0, **overrides):
    _, vae_mod = load_official()
    return _randomize(vae_mod.WanVAE_(**{**TINY_OFFICIAL_VAE, **overrides}), seed)


def _load_diffusers(sd, **cfg_kwargs):
    from diffusers import AutoencoderKLWan

    cfg = vae22_config_from_state_dict(sd, **cfg_kwargs)
    vae = AutoencoderKLWan(**cfg)
    result = vae.load_state_dict(convert_vae22_to_diffusers(sd), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return vae.eval()


@pytest.fixture(scope="module")
def official_file(tmp_path_factory):
    """(official model, path of its weights saved like ComfyUI's wan2.2_vae.safetensors)."""
    model = _official()
    path = tmp_path_factory.mktemp("vae") / "wan2.2_vae.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model, path


def test_detects_wan22_layout(official_file):
    model, path = official_file
    sd = load_file(str(path))
    assert is_wan22_vae(sd)
    assert is_wan22_vae({"first_stage_model." + k: v for k, v in sd.items()})
    assert not is_wan22_vae(convert_vae22_to_diffusers(sd))  # diffusers layout is not the original layout
    # a Wan2.1-style VAE (3 input channels, 16-channel latent) is refused with a clear error
    wan21 = dict(sd)
    wan21["encoder.conv1.weight"] = sd["encoder.conv1.weight"][:, :3]
    assert not is_wan22_vae(wan21)
    with pytest.raises(WrongModelError, match="Wan2.1"):
        convert_vae22_to_diffusers(wan21)
    with pytest.raises(WrongModelError):
        vae22_config_from_state_dict({"blocks.0.weight": torch.zeros(2, 2)})


def test_config_read_from_shapes(official_file):
    _, path = official_file
    sd = load_file(str(path))
    cfg = vae22_config_from_state_dict(sd)
    assert {k: cfg[k] for k in ARCH_KEYS} == {k: TINY_VAE_CONFIG[k] for k in ARCH_KEYS}
    # no checkpoint carries the latent statistics: the shipped real values are the default
    assert cfg["latents_mean"] == shipped_vae22_config()["latents_mean"]
    cfg = vae22_config_from_state_dict(sd, latents_mean=TINY_VAE_CONFIG["latents_mean"],
                                       latents_std=TINY_VAE_CONFIG["latents_std"])
    assert cfg["latents_std"] == TINY_VAE_CONFIG["latents_std"]


def test_shipped_config_is_the_real_vae():
    """configs/wan22_vae.json equals what the real-size official architecture reads as, and its
    latent statistics are the official wrapper's ``Wan2_2_VAE`` mean / std."""
    _, vae_mod = load_official()
    with torch.device("meta"):
        real = vae_mod.WanVAE_(dim=160, dec_dim=256, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                               attn_scales=[], temperal_downsample=[False, True, True])
    sd = real.state_dict()
    cfg = vae22_config_from_state_dict(sd)
    assert cfg == shipped_vae22_config()
    with torch.device("meta"):  # strict load at real size, without allocating the weights
        from diffusers import AutoencoderKLWan
        vae = AutoencoderKLWan(**cfg)
    vae.load_state_dict(convert_vae22_to_diffusers(sd), strict=True, assign=True)

    orig_builder = vae_mod._video_vae
    vae_mod._video_vae = lambda **kw: _official()
    try:
        wrapper = vae_mod.Wan2_2_VAE(vae_pth=None, device="cpu")
    finally:
        vae_mod._video_vae = orig_builder
    mean, inv_std = wrapper.scale
    assert torch.equal(mean, torch.tensor(cfg["latents_mean"]))
    assert torch.allclose(1.0 / inv_std, torch.tensor(cfg["latents_std"]), atol=1e-6)


def test_key_roundtrip_and_prefixes(official_file):
    model, path = official_file
    sd = load_file(str(path))
    conv = convert_vae22_to_diffusers(sd)
    assert len(conv) == len(sd)
    back = convert_vae22_from_diffusers(conv)
    assert back.keys() == sd.keys() and all(back[k] is sd[k] for k in sd)
    for prefix in ("first_stage_model.", "vae."):
        pre = {prefix + k: v for k, v in sd.items()}
        assert convert_vae22_to_diffusers(pre).keys() == conv.keys()
        assert vae22_config_from_state_dict(pre) == vae22_config_from_state_dict(sd)
    # a diffusers-layout dict passes through unchanged (so loaders may call the converter blindly)
    assert convert_vae22_to_diffusers(conv).keys() == conv.keys()


@pytest.mark.parametrize("frames", [1, 5])
def test_encode_decode_match_official(official_file, frames):
    model, path = official_file
    vae = _load_diffusers(load_file(str(path)))
    g = torch.Generator().manual_seed(frames)
    x = torch.rand(1, 3, frames, 64, 64, generator=g) * 2 - 1
    with torch.no_grad():
        ref_mu = model.encode(x, scale=[0.0, 1.0])
        mu = vae.encode(x).latent_dist.mean
        assert mu.shape == ref_mu.shape == (1, 48, (frames - 1) // 4 + 1, 4, 4)
        torch.testing.assert_close(mu, ref_mu, atol=1e-4, rtol=0)

        z = torch.randn(ref_mu.shape, generator=g)
        ref_x = model.decode(z, scale=[0.0, 1.0])
        out = vae.decode(z).sample
        assert out.shape == ref_x.shape == (1, 3, 4 * (z.shape[2] - 1) + 1, 64, 64)
        # diffusers clamps to [-1, 1] (the official Wan2_2_VAE wrapper does the same)
        assert (ref_x.abs() < 1).float().mean() > 0.5, "test weights saturate the decoder"
        torch.testing.assert_close(out, ref_x.clamp(-1, 1), atol=1e-4, rtol=0)


def test_normalised_latents_match_official_wrapper(official_file):
    """Official ``encode(x, [mean, 1/std])`` == (diffusers posterior mean - latents_mean) / latents_std."""
    model, path = official_file
    vae = _load_diffusers(load_file(str(path)))
    cfg = vae.config
    mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1)
    x = torch.rand(1, 3, 5, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        ref = model.encode(x, scale=[mean.flatten(), 1.0 / std.flatten()])
        ours = (vae.encode(x).latent_dist.mean - mean) / std
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
        ref_x = model.decode(ref, scale=[mean.flatten(), 1.0 / std.flatten()]).clamp(-1, 1)
        torch.testing.assert_close(vae.decode(ours * std + mean).sample, ref_x, atol=1e-4, rtol=0)


def test_other_depth_and_width():
    """The mapping is structural: 3 levels, 2 res blocks, temporal down-sampling on the first level."""
    model = _official(seed=5, dim=8, dec_dim=8, dim_mult=[1, 2, 2], num_res_blocks=2,
                      temperal_downsample=[True, False])
    sd = {"vae." + k: v for k, v in model.state_dict().items()}
    vae = _load_diffusers(sd)
    assert vae.config.scale_factor_spatial == 8 and vae.config.scale_factor_temporal == 2
    x = torch.rand(1, 3, 5, 32, 32, generator=torch.Generator().manual_seed(7)) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(vae.encode(x).latent_dist.mean, model.encode(x, scale=[0.0, 1.0]),
                                   atol=1e-4, rtol=0)
        z = torch.randn(1, 48, 2, 4, 4, generator=torch.Generator().manual_seed(8))
        torch.testing.assert_close(vae.decode(z).sample, model.decode(z, scale=[0.0, 1.0]).clamp(-1, 1),
                                   atol=1e-4, rtol=0)
