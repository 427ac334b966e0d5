"""DiT loading: original-layout files (plain, prefixed, fp16, fp8/scaled fp8) and diffusers folders
load through ``load_transformer`` and reproduce the official Wan2.2 ``WanModel``; wrong or broken
files give errors that say what they are and where to get the right one."""
from __future__ import annotations

import inspect
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from vbridge_core import models
from vbridge_core.checkpoints import (KIND_FLUX, KIND_LORA, KIND_SD1, KIND_SDXL, KIND_WAN21_I2V_DIT,
                                      KIND_WAN21_VAE, KIND_WAN22_I2V_DIT, KIND_WAN22_TI2V_DIT, KIND_WAN22_VAE,
                                      KIND_WAN_T2V_DIT, identify, open_checkpoint, read_safetensors_header)
from vbridge_core.errors import ModelFileError, WrongModelError
from vbridge_core.models import load_transformer, load_vae, resolve_model_files

from tiny_files import TINY_OFFICIAL_VAE, spread_vae_weights
from wan_official import load_official

TEXT_LEN = 8
FP8 = torch.float8_e4m3fn


# ---------------------------------------------------------------------------------------------------
# fixtures: an official tiny WanModel with random weights, and inputs the TI2V way


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Random values everywhere (the official init zeroes the head and biases)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modulation" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


def _official_tiny(seed: int = 0, in_dim: int = 48, out_dim: int = 48):
    wan_model, _ = load_official()
    m = wan_model.WanModel(model_type="ti2v", patch_size=(1, 2, 2), text_len=TEXT_LEN, in_dim=in_dim, dim=256,
                           ffn_dim=512, freq_dim=256, text_dim=4096, out_dim=out_dim, num_heads=2, num_layers=2,
                           qk_norm=True, cross_attn_norm=True, eps=1e-6)
    _randomize(m, seed)
    return m.eval()


@pytest.fixture(scope="module")
def official():
    return _official_tiny()


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 48, 3, 4, 6, generator=g)           # 3 latent frames, 2x3 patches each
    ctx = 0.1 * torch.randn(1, TEXT_LEN, 4096, generator=g)
    tokens_per_frame = (4 // 2) * (6 // 2)
    seq_len = 3 * tokens_per_frame
    t = torch.full((1, seq_len), 700.0)
    t[:, :tokens_per_frame] = 0.0                           # TI2V: the clean first frame gets timestep 0
    return x, ctx, t


def _run_official(model, inputs) -> torch.Tensor:
    x, ctx, t = inputs
    with torch.no_grad():
        out = model([x[0]], t=t, context=[ctx[0]], seq_len=t.shape[1])
    return torch.stack(out)


def _run_diffusers(model, inputs, dtype=torch.float32) -> torch.Tensor:
    x, ctx, t = inputs
    with torch.no_grad():
        out = model(hidden_states=x.to(dtype), timestep=t, encoder_hidden_states=ctx.to(dtype), return_dict=False)[0]
    return out.float()


def _quantize_fp8_scaled(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """ComfyUI "scaled fp8": 2-D weights stored fp8 with a per-layer scale. Returns (file dict, dequantised)."""
    out: dict[str, torch.Tensor] = {"scaled_fp8": torch.zeros(0, dtype=FP8)}
    deq: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if v.ndim == 2 and k.endswith(".weight"):
            scale = (v.abs().max() / 448.0).float()
            w8 = (v / scale).to(FP8)
            module = k[: -len(".weight")]
            out[k] = w8
            out[module + ".scale_weight"] = scale.reshape(())
            out[module + ".scale_input"] = torch.ones(())
            deq[k] = w8.float() * scale
        else:
            out[k] = v.half()
            deq[k] = v.half().float()
    return out, deq


def _storage(sd: dict[str, torch.Tensor], kind: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(tensors to write, the exact fp32 weights they stand for)."""
    if kind in ("plain", "prefixed"):
        return dict(sd), dict(sd)
    if kind == "fp16":
        h = {k: v.half() for k, v in sd.items()}
        return h, {k: v.float() for k, v in h.items()}
    if kind == "bf16":
        h = {k: v.bfloat16() for k, v in sd.items()}
        return h, {k: v.float() for k, v in h.items()}
    if kind == "fp8_e5m2":
        w = {k: (v.to(torch.float8_e5m2) if v.ndim == 2 else v) for k, v in sd.items()}
        return w, {k: v.float() for k, v in w.items()}
    if kind == "fp8_scaled":
        return _quantize_fp8_scaled(sd)
    raise ValueError(kind)


def _save(tensors: dict[str, torch.Tensor], path: Path, prefix: str = "") -> Path:
    save_file({prefix + k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


# ---------------------------------------------------------------------------------------------------
# equivalence with the official implementation


@pytest.mark.parametrize("storage,prefix", [
    ("plain", ""), ("prefixed", "model.diffusion_model."), ("fp16", ""), ("bf16", "diffusion_model."),
    ("fp8_scaled", "model.diffusion_model."), ("fp8_e5m2", ""),
])
def test_original_layout_matches_official(official, inputs, tmp_path, storage, prefix):
    sd = {k: v.detach().clone() for k, v in official.state_dict().items()}
    tensors, exact = _storage(sd, storage)
    path = _save(tensors, tmp_path / f"wan_{storage}.safetensors", prefix)

    reference = _official_tiny()
    reference.load_state_dict(exact)                       # official model with the same stored weights
    ref = _run_official(reference, inputs)

    model = load_transformer(path, dtype=torch.float32)
    out = _run_diffusers(model, inputs)
    assert out.shape == ref.shape == inputs[0].shape
    assert ref.abs().max() > 0.1                           # the comparison is not between zeros
    assert (out - ref).abs().max().item() <= 1e-4


def test_original_layout_differs_from_quantised_only_by_storage(official, inputs, tmp_path):
    """fp8 storage changes outputs by a bounded amount vs the fp32 weights (sanity of the scales)."""
    sd = {k: v.detach().clone() for k, v in official.state_dict().items()}
    tensors, _ = _storage(sd, "fp8_scaled")
    model = load_transformer(_save(tensors, tmp_path / "fp8.safetensors"), dtype=torch.float32)
    ref = _run_official(official, inputs)
    err = (_run_diffusers(model, inputs) - ref).abs().max().item()
    assert err <= 0.15 * ref.abs().max().item()


def test_bf16_compute_keeps_fp32_modules(official, inputs, tmp_path):
    sd = {k: v.detach().clone() for k, v in official.state_dict().items()}
    path = _save({k: v.half() for k, v in sd.items()}, tmp_path / "wan_fp16.safetensors")
    model = load_transformer(path, dtype=torch.bfloat16)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert dtypes["blocks.0.attn1.to_q.weight"] == torch.bfloat16
    assert dtypes["proj_out.weight"] == torch.bfloat16
    for name in ("scale_shift_table", "blocks.0.scale_shift_table", "blocks.0.norm2.weight",
                 "condition_embedder.time_embedder.linear_1.weight"):
        assert dtypes[name] == torch.float32, name
    reference = _official_tiny()
    reference.load_state_dict({k: v.half().float() for k, v in sd.items()})
    ref = _run_official(reference, inputs)
    out = _run_diffusers(model, inputs, dtype=torch.bfloat16)
    assert (out - ref).abs().max().item() <= 0.05 * ref.abs().max().item()


# ---------------------------------------------------------------------------------------------------
# diffusers folders


def test_diffusers_folder_root_and_component(tiny_model_dir, inputs):
    from vbridge_core.tiny import build_tiny_transformer

    ref = _run_diffusers(build_tiny_transformer(0), inputs)
    for path in (tiny_model_dir, tiny_model_dir / "transformer", tiny_model_dir / "transformer" / "config.json"):
        if path.name == "config.json":
            continue
        out = _run_diffusers(load_transformer(path, dtype=torch.float32), inputs)
        assert (out - ref).abs().max().item() <= 1e-5


def test_diffusers_dtypes_match_from_pretrained(tiny_model_dir):
    from diffusers import WanTransformer3DModel

    ours = load_transformer(tiny_model_dir, dtype=torch.bfloat16)
    theirs = WanTransformer3DModel.from_pretrained(tiny_model_dir / "transformer", torch_dtype=torch.bfloat16)
    a, b = dict(ours.named_parameters()), dict(theirs.named_parameters())
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


def test_sharded_folder_and_diffusers_single_file(tmp_path, inputs):
    from vbridge_core.tiny import build_tiny_transformer

    tiny = build_tiny_transformer(3)
    ref = _run_diffusers(tiny, inputs)
    tiny.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="2MB")
    assert list((tmp_path / "sharded").glob("*.index.json"))
    out = _run_diffusers(load_transformer(tmp_path / "sharded", dtype=torch.float32), inputs)
    assert (out - ref).abs().max().item() <= 1e-5
    # a diffusers-layout single file with a prefix and no config.json
    single = _save(tiny.state_dict(), tmp_path / "diffusers_layout.safetensors", "model.diffusion_model.")
    out = _run_diffusers(load_transformer(single, dtype=torch.float32), inputs)
    assert (out - ref).abs().max().item() <= 1e-5


def test_original_sharded_release_folder(official, inputs, tmp_path):
    sd = {k: v.detach().clone() for k, v in official.state_dict().items()}
    keys = sorted(sd)
    half = len(keys) // 2
    folder = tmp_path / "Wan2.2-TI2V-5B"
    folder.mkdir()
    names = ["diffusion_pytorch_model-00001-of-00002.safetensors", "diffusion_pytorch_model-00002-of-00002.safetensors"]
    _save({k: sd[k] for k in keys[:half]}, folder / names[0])
    _save({k: sd[k] for k in keys[half:]}, folder / names[1])
    weight_map = {k: names[0] if i < half else names[1] for i, k in enumerate(keys)}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({"_class_name": "WanModel", "dim": 256}))
    out = _run_diffusers(load_transformer(folder, dtype=torch.float32), inputs)
    assert (out - _run_official(official, inputs)).abs().max().item() <= 1e-4
    (folder / names[1]).unlink()
    with pytest.raises(ModelFileError, match="missing"):
        load_transformer(folder)


def test_shipped_config_is_the_5b():
    cfg = models.load_transformer_config()
    assert cfg["num_layers"] == 30 and cfg["num_attention_heads"] == 24 and cfg["attention_head_dim"] == 128
    assert cfg["ffn_dim"] == 14336 and cfg["in_channels"] == cfg["out_channels"] == 48
    assert cfg["patch_size"] == [1, 2, 2] and cfg["text_dim"] == 4096 and cfg["freq_dim"] == 256
    assert cfg["qk_norm"] == "rms_norm_across_heads" and cfg["cross_attn_norm"] is True
    assert cfg["image_dim"] is None and cfg["rope_max_seq_len"] == 1024 and cfg["eps"] == 1e-6


# ---------------------------------------------------------------------------------------------------
# identification and wrong models


def _wan_original_shapes(dim: int, layers: int, ffn: int, in_ch: int, out_ch: int, img: bool = False,
                         text_dim: int = 4096) -> dict[str, tuple[int, ...]]:
    s: dict[str, tuple[int, ...]] = {
        "patch_embedding.weight": (dim, in_ch, 1, 2, 2), "patch_embedding.bias": (dim,),
        "text_embedding.0.weight": (dim, text_dim), "text_embedding.2.weight": (dim, dim),
        "time_embedding.0.weight": (dim, 256), "time_embedding.2.weight": (dim, dim),
        "time_projection.1.weight": (6 * dim, dim), "head.head.weight": (out_ch * 4, dim), "head.modulation": (1, 2, dim),
    }
    for i in range(layers):
        for a in ("self_attn", "cross_attn"):
            for n in ("q", "k", "v", "o"):
                s[f"blocks.{i}.{a}.{n}.weight"] = (dim, dim)
            s[f"blocks.{i}.{a}.norm_q.weight"] = (dim,)
        s[f"blocks.{i}.norm3.weight"] = (dim,)
        s[f"blocks.{i}.ffn.0.weight"] = (ffn, dim)
        s[f"blocks.{i}.ffn.2.weight"] = (dim, ffn)
        s[f"blocks.{i}.modulation"] = (1, 6, dim)
        if img:
            s[f"blocks.{i}.cross_attn.k_img.weight"] = (dim, dim)
    if img:
        s["img_emb.proj.0.weight"] = (1280,)
        s["img_emb.proj.1.weight"] = (1280, 1280)
    return s


def test_identify_wan_dits():
    five_b = identify(_wan_original_shapes(3072, 30, 14336, 48, 48))
    assert five_b.kind == KIND_WAN22_TI2V_DIT and five_b.is_ti2v_5b_size and five_b.layout == "original"
    assert five_b.description == "Wan2.2 TI2V-5B DiT (dim 3072, 30 layers)"
    assert five_b.arch["num_heads"] == 24 and five_b.arch["ffn_dim"] == 14336 and five_b.arch["freq_dim"] == 256

    meta = {k: torch.empty(v, device="meta") for k, v in _wan_original_shapes(5120, 40, 13824, 16, 16).items()}
    t2v14 = identify(meta)
    assert t2v14.kind == KIND_WAN_T2V_DIT
    assert t2v14.description == "Wan2.1 T2V 14B DiT (dim 5120, 40 layers)"
    assert "A14B" in t2v14.note
    small = identify({"model.diffusion_model." + k: v for k, v in _wan_original_shapes(1536, 30, 8960, 16, 16).items()})
    assert small.kind == KIND_WAN_T2V_DIT and "1.3B" in small.description and small.arch["num_heads"] == 12
    i2v = identify(_wan_original_shapes(5120, 40, 13824, 36, 16, img=True))
    assert i2v.kind == KIND_WAN21_I2V_DIT and "Wan2.1 I2V 14B" in i2v.description and i2v.arch["image_dim"] == 1280
    a14b = identify(_wan_original_shapes(5120, 40, 13824, 36, 16))
    assert a14b.kind == KIND_WAN22_I2V_DIT


def test_identify_diffusers_layout_and_others():
    from vbridge_core.tiny import build_tiny_transformer

    info = identify(build_tiny_transformer(0).state_dict())
    assert info.kind == KIND_WAN22_TI2V_DIT and info.layout == "diffusers" and info.arch["num_layers"] == 2
    assert not info.is_ti2v_5b_size

    sdxl = {"conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
            "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
            "model.diffusion_model.output_blocks.0.0.in_layers.0.weight": (2560,)}
    assert identify(sdxl).kind == KIND_SDXL
    sd1 = {"cond_stage_model.transformer.text_model.final_layer_norm.weight": (768,),
           "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)}
    assert identify(sd1).kind == KIND_SD1
    flux = {"double_blocks.0.img_attn.qkv.weight": (9216, 3072), "single_blocks.0.linear1.weight": (21504, 3072)}
    assert identify(flux).kind == KIND_FLUX
    lora = {"diffusion_model.blocks.0.self_attn.q.lora_A.weight": (16, 3072)}
    assert identify(lora).kind == KIND_LORA
    assert identify({"foo.bar": (3,)}).kind == "unknown"


def test_identify_vaes():
    wan22 = {"encoder.conv1.weight": (160, 12, 3, 3, 3), "decoder.conv1.weight": (1024, 48, 3, 3, 3),
             "conv1.weight": (96, 96, 1, 1, 1), "conv2.weight": (48, 48, 1, 1, 1)}
    wan21 = {"encoder.conv1.weight": (96, 3, 3, 3, 3), "decoder.conv1.weight": (384, 16, 3, 3, 3),
             "conv1.weight": (32, 32, 1, 1, 1), "conv2.weight": (16, 16, 1, 1, 1)}
    assert identify(wan22).kind == KIND_WAN22_VAE
    assert identify(wan21).kind == KIND_WAN21_VAE
    from vbridge_core.tiny import build_tiny_vae

    d = identify(build_tiny_vae().state_dict())
    assert d.kind == KIND_WAN22_VAE and d.layout == "diffusers"


def _small_tensors(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    return {k: torch.zeros(v, dtype=torch.float16) for k, v in shapes.items()}


def test_wrong_models_raise_helpful_errors(tmp_path):
    # A Wan2.1 T2V DiT (16 channels), small widths.
    wan21 = _save(_official_tiny(1, in_dim=16, out_dim=16).state_dict(), tmp_path / "wan2.1_t2v.safetensors")
    with pytest.raises(WrongModelError) as e:
        load_transformer(wan21)
    msg = str(e.value)
    assert "Wan2.1 T2V" in msg and "Wan2.2-TI2V-5B" in msg and models.HF_REPACKAGED_REPO in msg
    assert str(wan21) in msg

    # A 14B-shaped file: the shapes identify() reads are real, the rest are stand-ins.
    shapes = {"patch_embedding.weight": (5120, 16, 1, 2, 2), "head.head.weight": (64, 1)}
    shapes.update({f"model.diffusion_model.blocks.{i}.self_attn.q.weight": (1, 1) for i in range(40)})
    f14 = _save(_small_tensors(shapes), tmp_path / "wan2.1_t2v_14B_fp16.safetensors")
    with pytest.raises(WrongModelError, match=r"Wan2\.1 T2V 14B DiT \(dim 5120, 40 layers\)"):
        load_transformer(f14)

    sdxl = _save(_small_tensors({"conditioner.embedders.0.model.ln_final.weight": (8,),
                                 "model.diffusion_model.input_blocks.0.0.weight": (4, 4, 3, 3)}),
                 tmp_path / "sd_xl_base_1.0.safetensors")
    with pytest.raises(WrongModelError, match="SDXL") as e:
        load_transformer(sdxl)
    assert models.DIT_FILE_NAME in str(e.value)

    vae = _save(_small_tensors({"encoder.conv1.weight": (16, 12, 3, 3, 3), "decoder.conv1.weight": (16, 48, 3, 3, 3),
                                "conv1.weight": (96, 96, 1, 1, 1), "conv2.weight": (48, 48, 1, 1, 1)}),
                tmp_path / "wan2.2_vae.safetensors")
    with pytest.raises(WrongModelError, match="Wan2.2 VAE.*pass it as the VAE"):
        load_transformer(vae)
    with pytest.raises(WrongModelError, match="Wan2.1 T2V.*pass it as the DiT"):
        load_vae(wan21)
    with pytest.raises(WrongModelError, match="Wan2.1 T2V 14B.*pass it as the DiT"):
        load_vae(f14)                                                   # prefixed DiT given as the VAE
    wan21_vae = _save(_small_tensors({"encoder.conv1.weight": (8, 3, 3, 3, 3), "decoder.conv1.weight": (8, 16, 3, 3, 3),
                                      "conv1.weight": (32, 32, 1, 1, 1), "conv2.weight": (16, 16, 1, 1, 1)}),
                      tmp_path / "wan_2.1_vae.safetensors")
    with pytest.raises(WrongModelError, match="Wan2.1 VAE") as e:
        load_vae(wan21_vae)
    assert models.VAE_FILE_NAME in str(e.value)


# ---------------------------------------------------------------------------------------------------
# broken and missing files


def test_truncated_and_garbage_files(official, tmp_path):
    good = _save(official.state_dict(), tmp_path / "good.safetensors")
    data = good.read_bytes()
    for name, blob in (("cut.safetensors", data[: len(data) // 2]), ("cut_header.safetensors", data[:50]),
                       ("tiny.safetensors", data[:4]), ("notes.safetensors", b"this is not a model\n" * 10)):
        bad = tmp_path / name
        bad.write_bytes(blob)
        with pytest.raises(ModelFileError) as e:
            load_transformer(bad)
        msg = str(e.value)
        assert str(bad) in msg and "truncated or is not a safetensors file" in msg and "Re-download" in msg
        with pytest.raises(ModelFileError):
            read_safetensors_header(bad)


def test_missing_paths_name_the_expected_files(tmp_path):
    with pytest.raises(ModelFileError) as e:
        load_transformer(tmp_path / "models" / "diffusion_models" / models.DIT_FILE_NAME)
    msg = str(e.value)
    assert models.DIT_FILE_NAME in msg and models.HF_REPACKAGED_REPO in msg and models.HF_DIT_FILE in msg
    assert models.HF_DIFFUSERS_REPO in msg and "models/diffusion_models" in msg
    with pytest.raises(ModelFileError) as e:
        load_vae(tmp_path / "nope.safetensors")
    assert models.VAE_FILE_NAME in str(e.value) and models.HF_VAE_FILE in str(e.value)
    with pytest.raises(ModelFileError, match=models.DIT_FILE_NAME):
        resolve_model_files(model_dir=tmp_path)
    with pytest.raises(ModelFileError, match="not found"):
        resolve_model_files(dit=tmp_path / "x.safetensors")


def test_resolve_model_files_layouts(tmp_path, tiny_model_dir):
    assert resolve_model_files(model_dir=tiny_model_dir) == (tiny_model_dir / "transformer", tiny_model_dir / "vae")
    comfy = tmp_path / "ComfyUI" / "models"
    (comfy / "diffusion_models").mkdir(parents=True)
    (comfy / "vae").mkdir()
    dit = comfy / "diffusion_models" / models.DIT_FILE_NAME
    vae = comfy / "vae" / models.VAE_FILE_NAME
    dit.write_bytes(b"x")
    vae.write_bytes(b"x")
    assert resolve_model_files(model_dir=comfy) == (dit, vae)
    assert resolve_model_files(model_dir=comfy.parent) == (dit, vae)
    assert resolve_model_files(dit=dit) == (dit, vae)                   # VAE found beside the DiT's folder
    with pytest.raises(ModelFileError, match=models.VAE_FILE_NAME):
        resolve_model_files(model_dir=comfy, vae=tmp_path / "missing_vae.safetensors")
    dl = tmp_path / "downloaded"
    for rel in (models.HF_DIT_FILE, models.HF_VAE_FILE):
        (dl / rel).parent.mkdir(parents=True, exist_ok=True)
        (dl / rel).write_bytes(b"x")
    assert resolve_model_files(model_dir=dl) == (dl / models.HF_DIT_FILE, dl / models.HF_VAE_FILE)


def test_download_model_files_uses_the_named_repo(monkeypatch, tmp_path):
    import huggingface_hub

    calls = []

    def fake_download(repo_id, filename, local_dir=None, **kw):
        calls.append((repo_id, filename))
        return str(Path(local_dir) / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    dit, vae = models.download_model_files(tmp_path)
    assert calls == [("Comfy-Org/Wan_2.2_ComfyUI_Repackaged", "split_files/diffusion_models/wan2.2_ti2v_5B_fp16.safetensors"),
                     ("Comfy-Org/Wan_2.2_ComfyUI_Repackaged", "split_files/vae/wan2.2_vae.safetensors")]
    assert dit == tmp_path / models.HF_DIT_FILE and vae == tmp_path / models.HF_VAE_FILE
    assert models.HF_DIFFUSERS_REPO == "Wan-AI/Wan2.2-TI2V-5B-Diffusers"
    assert "dest_dir" in inspect.signature(models.download_model_files).parameters


# ---------------------------------------------------------------------------------------------------
# fp8 reader details and the VAE


def test_checkpoint_hides_quantisation_side_tensors(official, tmp_path):
    sd = {k: v.detach().clone() for k, v in official.state_dict().items()}
    tensors, exact = _quantize_fp8_scaled(sd)
    path = _save(tensors, tmp_path / "scaled.safetensors", "model.diffusion_model.")
    with open_checkpoint(path) as ck:
        assert ck.scaled_fp8 and set(ck.keys()) == set(sd)
        assert ck.storage_dtypes()["blocks.0.self_attn.q.weight"] == "F8_E4M3"
        w = ck.get("blocks.0.self_attn.q.weight", dtype=torch.float32)
        assert torch.equal(w, exact["blocks.0.self_attn.q.weight"])
        assert ck.get("blocks.0.self_attn.q.weight", dtype=torch.bfloat16).dtype == torch.bfloat16
        assert math.isclose(w.abs().max().item(), sd["blocks.0.self_attn.q.weight"].abs().max().item(), rel_tol=0.07)


def test_load_vae_diffusers_folder(tiny_model_dir):
    from vbridge_core.tiny import build_tiny_vae

    ref = build_tiny_vae(1).state_dict()
    for path in (tiny_model_dir, tiny_model_dir / "vae"):
        vae = load_vae(path)
        got = vae.state_dict()
        assert got.keys() == ref.keys()
        assert all(torch.equal(got[k], ref[k]) for k in ref)
        assert vae.config.z_dim == 48
    assert load_vae(tiny_model_dir, dtype=torch.bfloat16).encoder.conv_in.weight.dtype == torch.bfloat16


def test_load_vae_single_file_matches_official(tmp_path):
    """Original-layout Wan2.2 VAE files (plain, prefixed, the release's .pth) load via vae_convert."""
    pytest.importorskip("vbridge_core.vae_convert")
    _, vae_mod = load_official()
    g = torch.Generator().manual_seed(11)
    official_vae = spread_vae_weights(vae_mod.WanVAE_(**TINY_OFFICIAL_VAE), g).eval()
    sd = official_vae.state_dict()
    x = torch.rand(1, 3, 1, 32, 32, generator=g) * 2 - 1
    with torch.no_grad():
        ref = official_vae.encode(x, scale=[0.0, 1.0])
    plain = _save(sd, tmp_path / models.VAE_FILE_NAME)
    prefixed = _save(sd, tmp_path / "prefixed_vae.safetensors", "first_stage_model.")
    pth = tmp_path / "Wan2.2_VAE.pth"
    torch.save(sd, pth)
    for path in (plain, prefixed, pth):
        vae = load_vae(path)
        assert vae.config.z_dim == 48 and vae.config.base_dim == 16
        with torch.no_grad():
            mu = vae.encode(x).latent_dist.mean
        assert (mu - ref).abs().max().item() <= 1e-4, path


def test_real_5b_shapes_map_completely_onto_the_shipped_config():
    """The official 5B (built without memory) converts to exactly the diffusers model our config makes."""
    from accelerate import init_empty_weights
    from diffusers import WanTransformer3DModel

    wan_model, _ = load_official()
    with init_empty_weights():
        official_5b = wan_model.WanModel(model_type="ti2v", in_dim=48, dim=3072, ffn_dim=14336, freq_dim=256,
                                         text_dim=4096, out_dim=48, num_heads=24, num_layers=30)
        shapes = {k: tuple(v.shape) for k, v in official_5b.state_dict().items()}
        info = identify(shapes)
        assert info.is_ti2v_5b_size and info.description == "Wan2.2 TI2V-5B DiT (dim 3072, 30 layers)"
        cfg = models.load_transformer_config(info.arch)
        assert cfg == models.load_transformer_config()     # the tensors agree with the shipped config
        ours = WanTransformer3DModel.from_config(cfg)
    mapping = models._original_to_diffusers_names(list(shapes))
    target = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert set(mapping) == set(target)
    assert all(shapes[mapping[k]] == target[k] for k in target)


def test_one_shard_of_a_sharded_folder_loads_the_whole_model(tmp_path):
    """A full fine-tune saved in shards shows up in ComfyUI's list as several files; picking any one
    of them loads the whole set."""
    from vbridge_core.models import load_transformer
    from vbridge_core.tiny import build_tiny_transformer

    model = build_tiny_transformer(7)
    model.save_pretrained(tmp_path / "vbridge_full", max_shard_size="2MB", safe_serialization=True)
    shards = sorted((tmp_path / "vbridge_full").glob("diffusion_pytorch_model-*.safetensors"))
    assert len(shards) > 1
    loaded = load_transformer(shards[1], dtype=torch.float32)
    ref = dict(model.state_dict())
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, ref[k]), k
