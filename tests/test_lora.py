"""LoRA files and adapters: formats, round trips, exact scaling, switching, mismatch errors.

Every numeric check compares the peft-injected adapter against a copy of the base model whose
Linear weights were merged by hand with ``strength * alpha / rank * up @ down``.
"""
from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from safetensors.torch import save_file

from vbridge_core.errors import LoraMismatchError, ModelFileError, WrongModelError
from vbridge_core.lora import (
    NEGATIVE_PROMPT_EMBEDS_KEY, PROMPT_EMBEDS_KEY, LoraFile, LoraLayer, active_loras, apply_lora,
    diffusers_to_wan_name, loaded_loras, lora_state_from_peft, read_lora, remove_lora, set_active_loras,
    write_lora,
)
from vbridge_core.tiny import build_tiny_transformer, tiny_prompt_embeds

RANK = 4
ALPHA = 8.0
ATOL = 1e-5

META = {
    "vbridge.role": "drift_correction", "vbridge.frames": 5, "vbridge.alpha_schedule": [0.0, 0.25, 0.5, 0.75, 1.0],
    "vbridge.prompt": "a sharp photo", "vbridge.negative_prompt": "blurry", "vbridge.curriculum": [[256, 100], [512, 200]],
    "vbridge.base_model": "Wan2.2-TI2V-5B", "vbridge.steps": 300, "vbridge.format_version": 1,
}


@pytest.fixture(scope="module")
def base():
    return build_tiny_transformer(seed=0)


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(1, 48, 2, 4, 4, generator=g)
    timestep = torch.tensor([[0.0] * 4 + [700.0] * 4])  # per-token: first latent frame clean
    return hidden, timestep, tiny_prompt_embeds()


def run(model, inputs) -> torch.Tensor:
    hidden, timestep, text = inputs
    with torch.no_grad():
        return model(hidden_states=hidden, timestep=timestep, encoder_hidden_states=text, return_dict=False)[0]


def linear_names(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and diffusers_to_wan_name(n)]


def random_layers(model, seed: int, rank: int = RANK, alpha: float = ALPHA, names=None) -> dict[str, LoraLayer]:
    g = torch.Generator().manual_seed(seed)
    mods = dict(model.named_modules())
    out = {}
    for n in names or linear_names(model):
        lin = mods[n]
        down = torch.randn(rank, lin.in_features, generator=g) / lin.in_features ** 0.5
        up = torch.randn(lin.out_features, rank, generator=g) * 0.05
        out[n] = LoraLayer(down, up, alpha)
    return out


def merged(model, *loras: tuple[dict[str, LoraLayer], float]):
    """A copy of ``model`` with the LoRA deltas added to the Linear weights by hand."""
    m = copy.deepcopy(model)
    mods = dict(m.named_modules())
    with torch.no_grad():
        for layers, strength in loras:
            for n, l in layers.items():
                mods[n].weight += strength * (l.alpha / l.down.shape[0]) * (l.up @ l.down)
    return m


@pytest.fixture()
def model(base):
    return copy.deepcopy(base)


# ---- files ------------------------------------------------------------------------------------


def test_round_trip(tmp_path, base):
    layers = random_layers(base, 1)
    pe, ne = tiny_prompt_embeds(5), tiny_prompt_embeds(6).to(torch.bfloat16)
    p = write_lora(tmp_path / "r.safetensors", layers, rank=RANK, alpha=ALPHA, metadata=META,
                   prompt_embeds=pe, negative_prompt_embeds=ne)
    lf = read_lora(p)
    assert isinstance(lf, LoraFile)
    assert lf.rank == RANK and lf.alpha == ALPHA and lf.source_format == "comfyui"
    assert lf.metadata == META
    assert lf.role == "drift_correction"
    assert set(lf.weights) == set(layers)
    for n, l in layers.items():
        assert torch.equal(lf.weights[n].down, l.down) and torch.equal(lf.weights[n].up, l.up)
        assert lf.weights[n].alpha == ALPHA
    assert torch.equal(lf.prompt_embeds, pe)
    assert lf.negative_prompt_embeds.dtype == torch.bfloat16 and torch.equal(lf.negative_prompt_embeds, ne)
    assert not lf.unmapped_keys

    # keys are the ones ComfyUI's LoraLoader maps for Wan; metadata values are JSON strings
    from safetensors import safe_open
    with safe_open(str(p), "pt") as f:
        keys = set(f.keys())
        header = f.metadata()
    assert "diffusion_model.blocks.0.self_attn.q.lora_down.weight" in keys
    assert "diffusion_model.blocks.1.ffn.0.lora_up.weight" in keys
    assert "diffusion_model.head.head.alpha" in keys
    assert "diffusion_model.time_projection.1.lora_down.weight" in keys
    assert {PROMPT_EMBEDS_KEY, NEGATIVE_PROMPT_EMBEDS_KEY} <= keys
    assert json.loads(header["vbridge.frames"]) == 5 and json.loads(header["vbridge.role"]) == "drift_correction"


def test_default_role_and_unprefixed_metadata(tmp_path, base):
    layers = random_layers(base, 1, names=["blocks.0.attn1.to_q"])
    p = write_lora(tmp_path / "a.safetensors", layers, rank=RANK, alpha=ALPHA, metadata={"frames": 9})
    lf = read_lora(p)
    assert lf.role == "restoration"
    assert lf.metadata == {"vbridge.frames": 9, "vbridge.format_version": 1}
    assert lf.prompt_embeds is None and lf.negative_prompt_embeds is None


def _orig(n: str) -> str:
    return diffusers_to_wan_name(n)


def write_format(path, layers: dict[str, LoraLayer], fmt: str):
    t: dict[str, torch.Tensor] = {}
    header = None
    for n, l in layers.items():
        a = torch.tensor(l.alpha)
        if fmt == "diffusers_meta":  # transformer. prefix, alpha in diffusers' adapter metadata
            t[f"transformer.{n}.lora_A.weight"] = l.down
            t[f"transformer.{n}.lora_B.weight"] = l.up
            header = {"lora_adapter_metadata": json.dumps({"transformer.r": RANK, "transformer.lora_alpha": l.alpha}),
                      "format": "pt"}
        elif fmt == "diffusers_alpha":  # no prefix, .alpha keys
            t[f"{n}.lora_A.weight"] = l.down
            t[f"{n}.lora_B.weight"] = l.up
            t[f"{n}.alpha"] = a
        elif fmt == "kohya":
            k = "lora_unet_" + _orig(n).replace(".", "_")
            t[f"{k}.lora_down.weight"] = l.down
            t[f"{k}.lora_up.weight"] = l.up
            t[f"{k}.alpha"] = a
        elif fmt == "comfy_ab":
            t[f"diffusion_model.{_orig(n)}.lora_A.weight"] = l.down
            t[f"diffusion_model.{_orig(n)}.lora_B.weight"] = l.up
            t[f"diffusion_model.{_orig(n)}.alpha"] = a
    save_file(t, str(path), metadata=header)
    return path


def test_all_formats_give_identical_outputs(tmp_path, base, inputs):
    layers = random_layers(base, 2)
    ref_model = copy.deepcopy(base)
    apply_lora(ref_model, write_lora(tmp_path / "ours.safetensors", layers, rank=RANK, alpha=ALPHA, metadata={}),
               "x")
    ref = run(ref_model, inputs)
    assert torch.allclose(ref, run(merged(base, (layers, 1.0)), inputs), atol=ATOL, rtol=ATOL)
    expect_fmt = {"diffusers_meta": "diffusers", "diffusers_alpha": "diffusers", "kohya": "kohya", "comfy_ab": "comfyui_ab"}
    for fmt, tag in expect_fmt.items():
        lf = read_lora(write_format(tmp_path / f"{fmt}.safetensors", layers, fmt))
        assert lf.source_format == tag and lf.alpha == ALPHA and lf.rank == RANK and not lf.unmapped_keys
        m = copy.deepcopy(base)
        apply_lora(m, lf, "x")
        assert torch.equal(run(m, inputs), ref), fmt


def test_peft_state_dict_write_and_extract(tmp_path, base, inputs, model):
    from peft import get_peft_model_state_dict

    layers = random_layers(base, 3)
    apply_lora(model, LoraFile(weights=layers, rank=RANK, alpha=ALPHA), "r")
    extracted = lora_state_from_peft(model, "r")
    assert set(extracted) == set(layers)
    for n, l in layers.items():
        assert torch.equal(extracted[n].down, l.down) and torch.equal(extracted[n].up, l.up) and extracted[n].alpha == ALPHA
    sd = get_peft_model_state_dict(model, adapter_name="r")
    p = write_lora(tmp_path / "peft.safetensors", sd, rank=RANK, alpha=ALPHA, metadata={"role": "restoration"})
    lf = read_lora(p)
    for n, l in layers.items():
        assert torch.equal(lf.weights[n].down, l.down) and lf.weights[n].alpha == ALPHA


def test_mixed_ranks_and_alphas_exact(base, inputs, model):
    names = linear_names(base)
    layers = random_layers(base, 4, names=names[:6])
    layers.update(random_layers(base, 5, rank=2, alpha=1.0, names=names[6:9]))
    layers.update(random_layers(base, 6, rank=4, alpha=3.0, names=names[9:]))
    apply_lora(model, LoraFile(weights=layers, rank=RANK, alpha=ALPHA), "mixed")
    assert torch.allclose(run(model, inputs), run(merged(base, (layers, 1.0)), inputs), atol=ATOL, rtol=ATOL)


# ---- strength and switching --------------------------------------------------------------------


def test_strength_scaling(base, inputs, model):
    layers = random_layers(base, 7)
    lf = LoraFile(weights=layers, rank=RANK, alpha=ALPHA)
    out_base = run(base, inputs)
    apply_lora(model, lf, "r", strength=0.0)
    assert torch.allclose(run(model, inputs), out_base, atol=1e-6, rtol=0)
    set_active_loras(model, {"r": 0.5})
    half = run(model, inputs)
    assert torch.allclose(half, run(merged(base, (layers, 0.5)), inputs), atol=ATOL, rtol=ATOL)
    assert not torch.allclose(half, out_base, atol=1e-3)
    # linear check on one layer: the injected layer's delta is exactly 0.5 * alpha / rank * up @ down
    name = "blocks.0.attn1.to_q"
    mod = dict(model.named_modules())[name]
    x = torch.randn(3, mod.in_features)
    with torch.no_grad():
        delta = mod(x) - mod.get_base_layer()(x)
    assert torch.allclose(delta, x @ layers[name].delta(0.5).T, atol=1e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "1.0", None])
def test_non_finite_or_non_numeric_strength_is_refused(base, model, bad):
    """A NaN strength used to run and turn every output into NaN ("image contains NaN" far from the cause)."""
    from vbridge_core.errors import InputError

    lf = LoraFile(weights=random_layers(base, 7), rank=RANK, alpha=ALPHA)
    with pytest.raises(InputError, match="strength"):
        apply_lora(model, lf, "r", strength=bad)
    assert loaded_loras(model) == []
    apply_lora(model, lf, "r", strength=1.0)
    with pytest.raises(InputError, match="strength"):
        set_active_loras(model, {"r": bad})
    assert active_loras(model) == {"r": 1.0}


def test_switching_does_not_leak(base, inputs, model, tmp_path):
    a, b = random_layers(base, 8), random_layers(base, 9, rank=2, alpha=2.0)
    apply_lora(model, LoraFile(weights=a, rank=RANK, alpha=ALPHA), "restoration")
    apply_lora(model, write_lora(tmp_path / "b.safetensors", b, rank=2, alpha=2.0,
                                 metadata={"role": "drift_correction"}), "drift", strength=0.7)
    assert sorted(loaded_loras(model)) == ["drift", "restoration"]
    assert active_loras(model) == {"restoration": 1.0, "drift": 0.7}
    out_a, out_b = run(merged(base, (a, 1.0)), inputs), run(merged(base, (b, 1.0)), inputs)
    assert torch.allclose(run(model, inputs), run(merged(base, (a, 1.0), (b, 0.7)), inputs), atol=ATOL, rtol=ATOL)
    set_active_loras(model, {"restoration": 1.0})
    assert torch.allclose(run(model, inputs), out_a, atol=ATOL, rtol=ATOL)
    set_active_loras(model, {"drift": 1.0})
    assert torch.allclose(run(model, inputs), out_b, atol=ATOL, rtol=ATOL)
    set_active_loras(model, {})
    assert torch.allclose(run(model, inputs), run(base, inputs), atol=1e-6, rtol=0)
    set_active_loras(model, {"restoration": 1.0})
    assert torch.allclose(run(model, inputs), out_a, atol=ATOL, rtol=ATOL)
    with pytest.raises(Exception, match="no LoRA adapter named"):
        set_active_loras(model, {"nope": 1.0})
    remove_lora(model, "restoration")
    assert loaded_loras(model) == ["drift"] and active_loras(model) == {}
    assert torch.allclose(run(model, inputs), run(base, inputs), atol=1e-6, rtol=0)
    set_active_loras(model, {"drift": 1.0})
    assert torch.allclose(run(model, inputs), out_b, atol=ATOL, rtol=ATOL)
    # reloading under a used name replaces the adapter; removing everything gives the base back
    apply_lora(model, LoraFile(weights=a, rank=RANK, alpha=ALPHA), "drift")
    assert torch.allclose(run(model, inputs), out_a, atol=ATOL, rtol=ATOL)
    remove_lora(model, "drift")
    assert loaded_loras(model) == []
    assert torch.allclose(run(model, inputs), run(base, inputs), atol=1e-6, rtol=0)
    apply_lora(model, LoraFile(weights=b, rank=2, alpha=2.0), "again")
    assert torch.allclose(run(model, inputs), out_b, atol=ATOL, rtol=ATOL)


# ---- errors ------------------------------------------------------------------------------------


def test_wan14b_lora_mismatch(tmp_path, model):
    g = torch.Generator().manual_seed(0)
    t = {}
    for i in range(40):
        for o in ("self_attn.q", "cross_attn.k", "ffn.0"):
            out_f = 13824 if o == "ffn.0" else 5120
            t[f"diffusion_model.blocks.{i}.{o}.lora_down.weight"] = torch.randn(2, 5120, generator=g)
            t[f"diffusion_model.blocks.{i}.{o}.lora_up.weight"] = torch.zeros(out_f, 2)
            t[f"diffusion_model.blocks.{i}.{o}.alpha"] = torch.tensor(2.0)
    p = tmp_path / "wan14b.safetensors"
    save_file(t, str(p))
    with pytest.raises(LoraMismatchError) as e:
        apply_lora(model, p, "x")
    msg = str(e.value)
    assert "114 of 120" in msg and "blocks.2.attn1.to_q" in msg  # 38 blocks too many x 3 layers
    assert "6 layers have other shapes" in msg and "5120" in msg and "14B" in msg
    assert loaded_loras(model) == []


def test_extra_blocks_mismatch_and_partial(tmp_path, base, inputs, model, caplog):
    layers = random_layers(base, 10)
    extra = random_layers(base, 11, names=["blocks.1.attn1.to_q"])
    layers["blocks.5.attn1.to_q"] = extra["blocks.1.attn1.to_q"]
    p = write_lora(tmp_path / "more.safetensors", layers, rank=RANK, alpha=ALPHA, metadata={})
    with pytest.raises(LoraMismatchError, match=r"1 of \d+ layers/keys match no layer.*blocks\.5\.attn1\.to_q"):
        apply_lora(model, p, "x")
    with caplog.at_level(logging.WARNING, logger="vbridge_core.lora"):
        apply_lora(model, p, "x", allow_partial=True)
    assert "blocks.5.attn1.to_q" in caplog.text
    del layers["blocks.5.attn1.to_q"]
    assert torch.allclose(run(model, inputs), run(merged(base, (layers, 1.0)), inputs), atol=ATOL, rtol=ATOL)


def test_sdxl_lora_rejected(tmp_path):
    t = {}
    for k in ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
              "lora_unet_mid_block_attentions_0_proj_in", "lora_te1_text_model_encoder_layers_0_mlp_fc1"):
        t[f"{k}.lora_down.weight"] = torch.zeros(4, 320)
        t[f"{k}.lora_up.weight"] = torch.zeros(320, 4)
        t[f"{k}.alpha"] = torch.tensor(4.0)
    p = tmp_path / "sdxl.safetensors"
    save_file(t, str(p))
    with pytest.raises(LoraMismatchError, match="SDXL"):
        read_lora(p)


def test_junk_and_bad_files(tmp_path):
    with pytest.raises(ModelFileError, match="nothere.safetensors"):
        read_lora(tmp_path / "nothere.safetensors")
    junk = tmp_path / "junk.safetensors"
    save_file({"foo.bar": torch.zeros(3), "model.weight": torch.zeros(2, 2)}, str(junk))
    with pytest.raises(WrongModelError, match="no LoRA weights"):
        read_lora(junk)
    text = tmp_path / "text.safetensors"
    text.write_text("this is not a safetensors file at all")
    with pytest.raises(ModelFileError, match="not a readable safetensors"):
        read_lora(text)


def test_write_rejects_bad_input(tmp_path, base):
    from vbridge_core.errors import InputError

    layers = random_layers(base, 12, names=["blocks.0.attn1.to_q"])
    with pytest.raises(InputError, match="rank"):
        write_lora(tmp_path / "x.safetensors", layers, rank=8, alpha=ALPHA, metadata={})
    with pytest.raises(InputError, match="role"):
        write_lora(tmp_path / "x.safetensors", layers, rank=RANK, alpha=ALPHA, metadata={"role": "other"})
    assert not (tmp_path / "x.safetensors").exists()


def test_names_cover_official_wan_linears(base):
    """Every Linear of the official Wan2.2 model (whose names ComfyUI uses) maps to the diffusers
    Linear of the same shape, and back: our file keys name real Wan modules."""
    import sys

    from vbridge_core.lora import wan_to_diffusers_name

    if "wan.modules.model" in sys.modules:  # wan_official.load_official may run once per process only
        wan_model = sys.modules["wan.modules.model"]
    else:
        from wan_official import load_official
        wan_model = load_official()[0]
    official = wan_model.WanModel(model_type="ti2v", in_dim=48, dim=256, ffn_dim=512, freq_dim=256, text_dim=4096,
                                  out_dim=48, num_heads=2, num_layers=2)
    ours = {n: m for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
    names = [n for n, m in official.named_modules() if isinstance(m, torch.nn.Linear)]
    assert names
    for n in names:
        d = wan_to_diffusers_name(n)
        assert d in ours, n
        assert ours[d].weight.shape == dict(official.named_modules())[n].weight.shape, n
        assert diffusers_to_wan_name(d) == n
    assert set(linear_names(base)) == set(ours)  # every diffusers Linear has a Wan/ComfyUI name
