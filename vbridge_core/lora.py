"""LoRA files for the Wan2.2-TI2V-5B DiT: read, write, and apply several adapters on one base.

Why this module exists
----------------------
V-Bridge restores an image with one LoRA (``restoration``) and then optionally corrects drift with
a second one (``drift_correction``) on the *same* base transformer. Loading the 5B base twice would
double memory, so both LoRAs live on one diffusers ``WanTransformer3DModel`` as named peft adapters
and :func:`set_active_loras` switches between them.

Files (see DESIGN.md section 3)
-------------------------------
Our files use the keys ComfyUI's own LoraLoader accepts, in the *original* Wan module names::

    diffusion_model.blocks.0.self_attn.q.lora_down.weight   [rank, in]
    diffusion_model.blocks.0.self_attn.q.lora_up.weight     [out, rank]
    diffusion_model.blocks.0.self_attn.q.alpha               scalar

ComfyUI scales a LoRA by ``alpha / rank`` (rank = rows of ``lora_down``), exactly like peft, so the
delta added to a Linear weight is ``strength * alpha / rank * up @ down`` in both worlds.

Besides the weights, a file carries:

* metadata in the safetensors header, under ``vbridge.*`` names, each value JSON-encoded
  (``vbridge.role``, ``vbridge.frames``, ``vbridge.alpha_schedule``, ``vbridge.prompt``,
  ``vbridge.negative_prompt``, ``vbridge.curriculum``, ``vbridge.base_model``, ``vbridge.steps``,
  ``vbridge.format_version``);
* the prompt embedding the LoRA was trained with, as tensors :data:`PROMPT_EMBEDS_KEY`
  (``vbridge.prompt_embeds``) and :data:`NEGATIVE_PROMPT_EMBEDS_KEY`
  (``vbridge.negative_prompt_embeds``), so restoring needs no text encoder.

These tensor names were chosen so ComfyUI ignores them: ComfyUI's ``comfy.lora.load_lora`` only
looks up keys derived from the model's own weight names (``diffusion_model.*``, ``lora_unet_*``,
``text_encoders.*``, ...) and merely logs ``lora key not loaded: vbridge.prompt_embeds`` for any
other key; nothing is patched and loading goes on. No ComfyUI key map can produce a name starting
with ``vbridge.``, and no converter in ``comfy/lora_convert.py`` triggers on them.

Formats read (auto-detected per key, reported in :attr:`LoraFile.source_format`)
---------------------------------------------------------------------------------
* ``comfyui``: ``diffusion_model.<wan name>.lora_down/lora_up.weight`` + ``.alpha`` (ours);
* ``comfyui_ab``: ``diffusion_model.<wan name>.lora_A/lora_B.weight``;
* ``diffusers``: ``[transformer.]<diffusers name>.lora_A/lora_B.weight``, alpha from ``.alpha``
  keys, from diffusers' ``lora_adapter_metadata`` header, or ``alpha = rank`` (peft default);
* ``kohya``: musubi-tuner / kohya ``lora_unet_blocks_0_self_attn_q.lora_down.weight`` + ``.alpha``
  (Wan names; diffusers names written the same way are accepted too).

* ``peft``: a ``save_pretrained`` folder (``adapter_model.safetensors`` + ``adapter_config.json``; the
  folder or the file inside it): alpha from the config (``lora_alpha``, ``alpha_pattern``,
  ``use_rslora``), never assumed equal to the rank when the config says otherwise;
* the other spellings ComfyUI's ``weight_adapter/lora.py`` reads (``.lora.up.weight``,
  ``_lora.up.weight``, ``.lora_linear_layer.up.weight``, ``.lora_B`` without ``.weight``).

Linear LoRA pairs are normalised to :class:`LoraLayer` keyed by the diffusers module name
(``blocks.0.attn1.to_q``), which is what peft injects into. The other tensors ComfyUI applies from
LoRA files (``diff``, ``diff_b``, ``w_norm``/``b_norm``, ``set_weight``, conv LoRA pairs on the patch
embedding) become :class:`~.lora_patches.ParamPatch` entries in :attr:`LoraFile.patches`, keyed by the
diffusers tensor name, and are applied with ComfyUI's arithmetic (see :mod:`.lora_patches`).

Mismatch policy
---------------
:func:`apply_lora` raises :class:`LoraMismatchError` when *any* key cannot be mapped to a Linear of
the loaded model or any shape differs, listing the first names, the differing shapes and the base
model the file seems to be for. A half-applied LoRA gives plausible-looking but wrong restorations,
which is worse than an error. ``allow_partial=True`` applies the matching part and logs a warning
with the rest (it still raises when nothing matches). LoHa/LoKr/DoRA/OFT keys are not supported and
are reported as such.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import torch

from .errors import InputError, LoraMismatchError, ModelFileError, WrongModelError
from .fileio import save_safetensors_atomic
from .lora_patches import ParamPatch, add_patches, drop_patches, patch_adapters, sync_patches
from .lora_patches import find_param as _find_param

logger = logging.getLogger(__name__)

#: Tensor key of the (positive) prompt embedding stored beside the LoRA weights.
PROMPT_EMBEDS_KEY = "vbridge.prompt_embeds"
#: Tensor key of the negative prompt embedding stored beside the LoRA weights.
NEGATIVE_PROMPT_EMBEDS_KEY = "vbridge.negative_prompt_embeds"
#: Prefix of every V-Bridge header metadata entry.
METADATA_PREFIX = "vbridge."
#: Version of the file layout written by :func:`write_lora`.
FORMAT_VERSION = 1
#: Roles a V-Bridge LoRA can have.
ROLES = ("restoration", "drift_correction")

_STRENGTHS_ATTR = "_vbridge_lora_strengths"
_MAX_LISTED = 10


class LoraLayer(NamedTuple):
    """One LoRA pair in the internal form: ``delta W = alpha / rank * up @ down``.

    ``down`` is ``[rank, in_features]``, ``up`` is ``[out_features, rank]``.
    """

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self, strength: float = 1.0) -> torch.Tensor:
        """The weight delta this layer adds at ``strength`` (fp32), for checks and merging."""
        return (strength * self.alpha / self.rank) * (self.up.float() @ self.down.float())


# --------------------------------------------------------------------------------------------
# Module-name mapping: original Wan names <-> diffusers names
# --------------------------------------------------------------------------------------------

# (original Wan suffix inside a block, diffusers suffix inside a block)
_BLOCK_MAP: tuple[tuple[str, str], ...] = (
    ("self_attn.q", "attn1.to_q"), ("self_attn.k", "attn1.to_k"),
    ("self_attn.v", "attn1.to_v"), ("self_attn.o", "attn1.to_out.0"),
    ("cross_attn.q", "attn2.to_q"), ("cross_attn.k", "attn2.to_k"),
    ("cross_attn.v", "attn2.to_v"), ("cross_attn.o", "attn2.to_out.0"),
    ("cross_attn.k_img", "attn2.add_k_proj"), ("cross_attn.v_img", "attn2.add_v_proj"),
    ("ffn.0", "ffn.net.0.proj"), ("ffn.2", "ffn.net.2"),
)
# top-level modules
_TOP_MAP: tuple[tuple[str, str], ...] = (
    ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    ("time_projection.1", "condition_embedder.time_proj"),
    ("head.head", "proj_out"),
    ("img_emb.proj.1", "condition_embedder.image_embedder.ff.net.0.proj"),
    ("img_emb.proj.3", "condition_embedder.image_embedder.ff.net.2"),
)
_O2D_BLOCK = dict(_BLOCK_MAP)
_D2O_BLOCK = {d: o for o, d in _BLOCK_MAP}
_O2D_TOP = dict(_TOP_MAP)
_D2O_TOP = {d: o for o, d in _TOP_MAP}
# Tensors that are not Linear weights but that ComfyUI patches from LoRA files (``diff``, ``diff_b``,
# norm and conv LoRA keys, see lora_patches.py): (original owner, diffusers owner). An owner ending in
# ``scale_shift_table`` is a bare parameter; the others are modules with ``weight`` (and ``bias``).
_BLOCK_PARAM_MAP: tuple[tuple[str, str], ...] = (
    ("self_attn.norm_q", "attn1.norm_q"), ("self_attn.norm_k", "attn1.norm_k"),
    ("cross_attn.norm_q", "attn2.norm_q"), ("cross_attn.norm_k", "attn2.norm_k"),
    ("norm3", "norm2"), ("modulation", "scale_shift_table"),
)
_TOP_PARAM_MAP: tuple[tuple[str, str], ...] = (
    ("patch_embedding", "patch_embedding"), ("head.modulation", "scale_shift_table"),
)
_O2D_BLOCK_PARAM = dict(_BLOCK_PARAM_MAP)
_D2O_BLOCK_PARAM = {d: o for o, d in _BLOCK_PARAM_MAP}
_O2D_TOP_PARAM = dict(_TOP_PARAM_MAP)
_D2O_TOP_PARAM = {d: o for o, d in _TOP_PARAM_MAP}
_BARE_PARAM = "scale_shift_table"
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


def wan_to_diffusers_name(name: str) -> str | None:
    """Diffusers module name for an original Wan module name (``blocks.0.self_attn.q``), or None."""
    m = _BLOCK_RE.match(name)
    if m:
        d = _O2D_BLOCK.get(m.group(2))
        return f"blocks.{m.group(1)}.{d}" if d else None
    return _O2D_TOP.get(name)


def diffusers_to_wan_name(name: str) -> str | None:
    """Original Wan module name for a diffusers module name (``blocks.0.attn1.to_q``), or None."""
    m = _BLOCK_RE.match(name)
    if m:
        o = _D2O_BLOCK.get(m.group(2))
        return f"blocks.{m.group(1)}.{o}" if o else None
    return _D2O_TOP.get(name)


def _is_diffusers_name(name: str) -> bool:
    return diffusers_to_wan_name(name) is not None


def _wan_param_owner(name: str) -> str | None:
    """Diffusers owner of a non-Linear original Wan tensor owner (``blocks.0.norm3`` -> ``blocks.0.norm2``)."""
    m = _BLOCK_RE.match(name)
    if m:
        d = _O2D_BLOCK_PARAM.get(m.group(2))
        return f"blocks.{m.group(1)}.{d}" if d else None
    return _O2D_TOP_PARAM.get(name)


def _is_diffusers_param_owner(name: str) -> bool:
    m = _BLOCK_RE.match(name)
    return (m.group(2) in _D2O_BLOCK_PARAM) if m else name in _D2O_TOP_PARAM


def owner_params(owner: str) -> tuple[str, str | None]:
    """(weight tensor name, bias tensor name or None) of a diffusers owner (module or bare parameter)."""
    if owner == _BARE_PARAM or owner.endswith("." + _BARE_PARAM):
        return owner, None
    return owner + ".weight", owner + ".bias"


def _underscore_table() -> list[tuple[re.Pattern[str], str]]:
    """Regexes turning kohya-style underscore names back into dotted diffusers names."""
    table: list[tuple[re.Pattern[str], str]] = []
    for o, d in _BLOCK_MAP:
        table.append((re.compile(rf"^blocks_(\d+)_{re.escape(o.replace('.', '_'))}$"), "blocks.{}." + d))
        table.append((re.compile(rf"^blocks_(\d+)_{re.escape(d.replace('.', '_'))}$"), "blocks.{}." + d))
    for o, d in _BLOCK_PARAM_MAP:
        table.append((re.compile(rf"^blocks_(\d+)_{re.escape(o.replace('.', '_'))}$"), "blocks.{}." + d))
    for o, d in _TOP_MAP + _TOP_PARAM_MAP:
        table.append((re.compile(rf"^{re.escape(o.replace('.', '_'))}$"), d))
        table.append((re.compile(rf"^{re.escape(d.replace('.', '_'))}$"), d))
    return table


_UNDERSCORE_TABLE = _underscore_table()
_KOHYA_PREFIXES = ("lora_unet__", "lora_unet_", "lora_transformer_", "lycoris_")
_DOTTED_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "base_model.model.", "transformer.", "unet.")

# LoRA pair keys, every naming ComfyUI's weight_adapter/lora.py reads: ``.lora_up/.lora_down.weight``,
# ``.lora_B/.lora_A[.<adapter>].weight``, ``.lora_B/.lora_A`` (Mochi), ``_lora.up/.down.weight``,
# ``.lora.up/.down.weight`` and ``.lora_linear_layer.up/.down.weight``.
_PART_RE = re.compile(r"^(?P<mod>.+?)(?:\.(?P<part>lora_down|lora_up|lora_A|lora_B)(?:\.(?P<adapter>[A-Za-z0-9_\-]+))?\.weight"
                      r"|\.(?P<part2>lora_A|lora_B)|(?:_lora|\.lora|\.lora_linear_layer)\.(?P<part3>up|down)\.weight)$")
_ALPHA_RE = re.compile(r"^(?P<mod>.+)\.alpha$")
# whole-tensor patch keys ComfyUI applies (comfy/lora.py load_lora)
_PATCH_RE = re.compile(r"^(?P<mod>.+)\.(?P<kind>diff|diff_b|w_norm|b_norm|set_weight)$")
# adapter kinds ComfyUI also reads but we do not apply: listed as unsupported, never half-applied silently
_UNSUPPORTED_RE = re.compile(r"\.(dora_scale|hada_w[12]_[ab]|hada_t[12]|lokr_w[12](_[ab])?|lokr_t2|lora_mid\.weight|"
                             r"reshape_weight|oft_blocks|oft_diag|rescale|a1\.weight|a2\.weight|b1\.weight|b2\.weight)$")


def _natural_key(name: str) -> tuple:
    """Sort key putting blocks.2 before blocks.10 (so listings read in model order)."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


def _resolve_module(raw: str) -> tuple[str | None, str]:
    """Map a raw module key (without the lora suffix) to (diffusers name or None, format tag)."""
    for p in _KOHYA_PREFIXES:
        if raw.startswith(p):
            rest = raw[len(p):]
            for rx, tmpl in _UNDERSCORE_TABLE:
                m = rx.match(rest)
                if m:
                    return (tmpl.format(m.group(1)) if m.groups() else tmpl), "kohya"
            return None, "kohya"
    prefix = ""
    name = raw
    for p in _DOTTED_PREFIXES:
        if raw.startswith(p):
            prefix, name = p, raw[len(p):]
            break
    d = wan_to_diffusers_name(name) or _wan_param_owner(name)
    if d is not None:
        return d, "comfyui"
    if _is_diffusers_name(name) or _is_diffusers_param_owner(name):
        return name, "diffusers"
    return None, ("comfyui" if prefix.endswith("diffusion_model.") else "diffusers" if prefix else "unknown")


# --------------------------------------------------------------------------------------------
# LoraFile and reading
# --------------------------------------------------------------------------------------------


@dataclass
class LoraFile:
    """A LoRA read from disk, normalised to diffusers module names.

    ``weights`` maps a diffusers module name (``blocks.0.attn1.to_q``) to a :class:`LoraLayer`.
    ``rank``/``alpha`` are the most common values over the layers (per-layer values are kept in
    the layers). ``metadata`` holds the ``vbridge.*`` header entries JSON-decoded (full names,
    e.g. ``metadata["vbridge.frames"] == 5``); ``extra_metadata`` the other header entries as raw
    strings (kohya ``ss_*``, diffusers ``lora_adapter_metadata``...). ``unmapped_keys`` are the
    tensor keys that could not be mapped to a Wan Linear (reported by :func:`apply_lora`).
    """

    weights: dict[str, LoraLayer]
    rank: int
    alpha: float
    metadata: dict[str, Any] = field(default_factory=dict)
    prompt_embeds: torch.Tensor | None = None
    negative_prompt_embeds: torch.Tensor | None = None
    extra_metadata: dict[str, str] = field(default_factory=dict)
    unmapped_keys: list[str] = field(default_factory=list)
    source_format: str = "comfyui"
    path: Path | None = None
    #: whole-tensor patches (``diff``, ``diff_b``, norm and conv LoRA keys) by diffusers tensor name,
    #: applied the way ComfyUI applies them (see :mod:`.lora_patches`)
    patches: dict[str, ParamPatch] = field(default_factory=dict)

    @property
    def role(self) -> str:
        """``restoration`` (default when the file does not say) or ``drift_correction``."""
        return str(self.metadata.get(METADATA_PREFIX + "role", "restoration"))

    @property
    def base_model(self) -> str | None:
        """The base model named in the metadata, if any."""
        v = self.metadata.get(METADATA_PREFIX + "base_model")
        return None if v is None else str(v)

    def describe(self) -> str:
        """One line for logs and node outputs."""
        name = self.path.name if self.path else "<memory>"
        patched = f" + {len(self.patches)} tensor patches (diff/bias/norm/conv)" if self.patches else ""
        return (f"{name}: {self.role} LoRA, {len(self.weights)} layers{patched}, rank {self.rank}, alpha {self.alpha:g}, "
                f"format {self.source_format}")


def _decode_metadata(header: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    ours: dict[str, Any] = {}
    extra: dict[str, str] = {}
    for k, v in header.items():
        if k.startswith(METADATA_PREFIX):
            try:
                ours[k] = json.loads(v)
            except (TypeError, ValueError):
                ours[k] = v  # a plain string written by another tool
        else:
            extra[k] = v
    return ours, extra


def _diffusers_adapter_config(extra: Mapping[str, str]) -> dict[str, Any]:
    """The peft config diffusers stores in ``lora_adapter_metadata`` (prefix stripped), or {}."""
    raw = extra.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        cfg = json.loads(raw)
    except ValueError:
        return {}
    if not isinstance(cfg, dict):
        return {}
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        out[k.split(".", 1)[1] if k.startswith(("transformer.", "unet.")) else k] = v
    return out


def _pattern_value(patterns: Mapping[str, Any], name: str) -> Any | None:
    """peft's pattern rule: a key matches a module name as a (dot-aligned) regex suffix."""
    for key, val in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return val
    return None


def _guess_base(keys: list[str], layers: Mapping[str, LoraLayer], meta: Mapping[str, Any]) -> str:
    """A human guess of which base model a LoRA was trained for, from names and shapes."""
    hints = []
    if meta.get(METADATA_PREFIX + "base_model"):
        hints.append(f"its metadata says {meta[METADATA_PREFIX + 'base_model']}")
    joined = " ".join(keys[:2000])
    if any(s in joined for s in ("down_blocks", "up_blocks", "input_blocks", "output_blocks", "mid_block", "lora_te")):
        return "a Stable Diffusion / SDXL UNet (not Wan)" + (f"; {hints[0]}" if hints else "")
    if "double_blocks" in joined or "single_blocks" in joined or "single_transformer_blocks" in joined:
        return "Flux / HunyuanVideo-style double/single-stream DiT (not Wan)" + (f"; {hints[0]}" if hints else "")
    if "transformer_blocks" in joined:
        return "another diffusers DiT with transformer_blocks (not Wan)" + (f"; {hints[0]}" if hints else "")
    dims = Counter()
    blocks = set()
    for name, layer in layers.items():
        if ".attn1.to_q" in name:
            dims[int(layer.down.shape[1])] += 1
        m = _BLOCK_RE.match(name)
        if m:
            blocks.add(int(m.group(1)))
    if dims:
        dim = dims.most_common(1)[0][0]
        nb = max(blocks) + 1 if blocks else 0
        i2v = any("add_k_proj" in n for n in layers)
        known = {3072: "Wan2.2-TI2V-5B (dim 3072, 30 blocks)", 5120: "a Wan 14B model (Wan2.1/2.2 T2V/I2V, dim 5120, 40 blocks)",
                 1536: "Wan2.1-T2V-1.3B (dim 1536, 30 blocks)"}
        what = known.get(dim, f"a Wan-layout model with dim {dim}")
        extra = " with image cross-attention (I2V)" if i2v else ""
        hints.insert(0, f"{what}{extra}; the file has blocks 0..{nb - 1}")
    if not hints:
        return "an unknown base"
    return "; ".join(hints)


def _load_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    if not path.exists():
        raise ModelFileError(f"LoRA file not found: {path}. Put it in models/loras/vbridge/ or pass the full path.")
    if path.is_dir():
        raise ModelFileError(f"LoRA path {path} is a folder; pass the .safetensors file inside it.")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ModelFileError(f"{path} is not a readable safetensors file ({e}). LoRAs must be .safetensors; "
                             "re-download or re-save it.") from None
    return tensors, header


def _adapter_alpha(cfg: Mapping[str, Any], name: str, rank: int) -> float | None:
    """The alpha a peft/diffusers adapter config gives layer ``name`` (rsLoRA folded in), or None."""
    if not cfg:
        return None
    alpha = _pattern_value(cfg.get("alpha_pattern") or {}, name)
    if alpha is None:
        alpha = cfg.get("lora_alpha")
    if alpha is None:
        return None
    alpha = float(alpha)
    if cfg.get("use_rslora"):
        alpha = alpha * rank ** 0.5  # rsLoRA scales by alpha / sqrt(r); ours is alpha / r
    return alpha


def parse_lora_state_dict(tensors: Mapping[str, torch.Tensor], header: Mapping[str, str] | None = None,
                          *, source: str = "<state dict>", adapter_config: Mapping[str, Any] | None = None) -> LoraFile:
    """Normalise a LoRA state dict in any supported key format (see module docstring).

    ``adapter_config`` is a peft ``adapter_config.json`` (``r``, ``lora_alpha``, ``alpha_pattern``,
    ``use_rslora``...) for a peft ``save_pretrained`` folder; it gives the alpha of layers without
    an ``.alpha`` key. Raises :class:`WrongModelError` when no key looks like a LoRA, and
    :class:`LoraMismatchError` when LoRA keys exist but none names a Wan tensor (e.g. an SDXL LoRA).
    """
    header = dict(header or {})
    meta, extra = _decode_metadata(header)
    adapter_cfg = dict(adapter_config) if adapter_config else _diffusers_adapter_config(extra)
    if adapter_cfg.get("use_dora"):
        raise LoraMismatchError(f"{source} is a DoRA adapter (use_dora); DoRA is not supported. Merge it into the "
                                "base with peft's merge_and_unload, or train a plain LoRA.")
    prompt = tensors.get(PROMPT_EMBEDS_KEY)
    negative = tensors.get(NEGATIVE_PROMPT_EMBEDS_KEY)

    downs: dict[str, torch.Tensor] = {}
    ups: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    raw_keys: dict[str, list[str]] = {}
    # owner -> {kind: tensor} for diff / diff_b / w_norm / b_norm / set_weight keys; "bias:" owners patch a bias
    whole: dict[str, dict[str, torch.Tensor]] = {}
    formats: Counter[str] = Counter()
    unmapped: list[str] = []
    lora_like = 0
    for key, t in tensors.items():
        if key.startswith(METADATA_PREFIX):
            continue
        m = _PART_RE.match(key)
        a = None if m else _ALPHA_RE.match(key)
        pm = None if (m or a) else _PATCH_RE.match(key)
        if not m and not a and not pm:
            if _UNSUPPORTED_RE.search(key):
                lora_like += 1
            unmapped.append(key)
            continue
        lora_like += 1
        raw = (m or a or pm).group("mod")
        on_bias = False
        if pm and raw.endswith(".bias"):  # ComfyUI's generic key for a bias tensor itself
            raw, on_bias = raw[: -len(".bias")], True
        name, fmt = _resolve_module(raw)
        if name is None:
            unmapped.append(key)
            continue
        raw_keys.setdefault(name, []).append(key)
        if m:
            part = m.group("part") or m.group("part2") or ("lora_up" if m.group("part3") == "up" else "lora_down")
            if fmt == "comfyui" and part in ("lora_A", "lora_B"):
                fmt = "comfyui_ab"
            formats[fmt] += 1
            target = downs if part in ("lora_down", "lora_A") else ups
            if name in target:
                raise WrongModelError(f"{source}: two tensors for the same LoRA layer {name} "
                                      f"({raw_keys[name]}); the file mixes key formats.")
            target[name] = t
        elif a:
            alphas[name] = float(t.float().reshape(-1)[0].item())
        else:
            kind = pm.group("kind")
            if on_bias:
                kind = {"diff": "diff_b", "set_weight": "set_bias"}.get(kind, kind)
            formats[fmt] += 1
            whole.setdefault(name, {})[kind] = t

    if lora_like == 0:
        shown = ", ".join(list(tensors)[:5]) or "(no tensors)"
        raise WrongModelError(f"{source} holds no LoRA weights (no lora_down/lora_up or lora_A/lora_B keys; "
                              f"first keys: {shown}). Is it a full model checkpoint rather than a LoRA?")

    def alpha_for(name: str, rank: int) -> float | None:
        if name in alphas:
            return alphas[name]
        alpha = _adapter_alpha(adapter_cfg, name, rank)
        if alpha is None and "ss_network_alpha" in extra:
            try:
                alpha = float(extra["ss_network_alpha"])
            except ValueError:
                alpha = None
        return alpha

    layers: dict[str, LoraLayer] = {}
    patches: dict[str, ParamPatch] = {}
    for name in sorted(set(downs) | set(ups) | set(whole), key=_natural_key):
        weight_name, bias_name = owner_params(name)
        kinds = whole.get(name, {})
        is_linear = _is_diffusers_name(name)
        # ComfyUI keeps one patch per tensor: the last of lora, w_norm, diff, set_weight (diff_b over b_norm)
        weight_patch: ParamPatch | None = None
        pair = (downs.get(name), ups.get(name))
        if pair[0] is not None or pair[1] is not None:
            d, u = pair
            if d is None or u is None or d.ndim < 2 or d.ndim != u.ndim or d.shape[0] != u.shape[1]:
                unmapped.extend(k for k in raw_keys.get(name, [name]) if _PART_RE.match(k) or _ALPHA_RE.match(k))
                logger.debug("LoRA layer %s has a missing half or inconsistent shapes", name)
            elif is_linear and d.ndim == 2:
                rank = int(d.shape[0])
                alpha = alpha_for(name, rank)
                layers[name] = LoraLayer(d, u, float(rank if alpha is None else alpha))
            else:  # a conv (patch_embedding) or another non-Linear tensor: a ComfyUI-style weight patch
                weight_patch = ParamPatch("lora", u, d, alpha_for(name, int(d.shape[0])))
        for kind, pk in (("w_norm", "diff"), ("diff", "diff"), ("set_weight", "set")):
            if kind in kinds:
                weight_patch = ParamPatch(pk, kinds[kind])
        if weight_patch is not None:
            if name in layers and weight_patch.kind != "lora":
                logger.info("%s: %s carries a LoRA pair and a %s; ComfyUI applies only the latter, so do we",
                            source, name, weight_patch.kind)
                del layers[name]
            patches[weight_name] = weight_patch
        bias_patch = None
        for kind, pk in (("b_norm", "diff"), ("diff_b", "diff"), ("set_bias", "set")):
            if kind in kinds:
                bias_patch = ParamPatch(pk, kinds[kind])
        if bias_patch is not None:
            if bias_name is None:
                unmapped.extend(k for k in raw_keys.get(name, []) if k.endswith((".diff_b", ".b_norm")))
            else:
                patches[bias_name] = bias_patch
    for name in alphas:
        if name not in downs and name not in ups:
            unmapped.extend(raw_keys.get(name, [name]))

    if not layers and not patches:
        raise LoraMismatchError(
            f"{source} is a LoRA, but none of its {lora_like} LoRA keys names a Wan2.2 transformer layer "
            f"(first: {', '.join(unmapped[:_MAX_LISTED])}). It seems to be for {_guess_base(list(tensors), {}, meta)}. "
            "Use a LoRA trained for Wan2.2-TI2V-5B.")

    ranks = Counter(l.rank for l in layers.values())
    alpha_c = Counter(l.alpha for l in layers.values())
    if not ranks:  # a file of patches only
        ranks = Counter(int(p.down.shape[0]) for p in patches.values() if p.down is not None) or Counter({0: 1})
        alpha_c = Counter(float(p.alpha) for p in patches.values() if p.alpha is not None) or Counter({0.0: 1})
    return LoraFile(weights=layers, rank=ranks.most_common(1)[0][0], alpha=alpha_c.most_common(1)[0][0],
                    metadata=meta, prompt_embeds=prompt, negative_prompt_embeds=negative, extra_metadata=extra,
                    unmapped_keys=unmapped, source_format=formats.most_common(1)[0][0] if formats else "unknown",
                    patches=patches)


#: file names of a LoRA inside a folder: peft ``save_pretrained``, diffusers ``save_lora_weights``
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"
DIFFUSERS_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"


def _peft_files(path: Path) -> tuple[Path, dict[str, Any] | None]:
    """(weights file, peft adapter config or None) for a LoRA path: a file, or a peft / diffusers folder."""
    if path.is_dir():
        for fname in (PEFT_WEIGHTS_NAME, DIFFUSERS_WEIGHTS_NAME):
            if (path / fname).is_file():
                return _peft_files(path / fname)
        if (path / "adapter_model.bin").is_file():
            raise ModelFileError(f"{path} holds adapter_model.bin (a pickle); save the adapter with "
                                 "safe_serialization=True (the default) to get adapter_model.safetensors.")
        raise ModelFileError(f"LoRA folder {path} has no {PEFT_WEIGHTS_NAME} (peft save_pretrained) or "
                             f"{DIFFUSERS_WEIGHTS_NAME}; pass the .safetensors file itself.")
    cfg_path = path.parent / PEFT_CONFIG_NAME
    if path.name == PEFT_WEIGHTS_NAME and cfg_path.is_file():
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ModelFileError(f"{cfg_path} is not readable JSON ({e}); it gives the adapter's alpha.") from None
        if not isinstance(cfg, dict):
            raise ModelFileError(f"{cfg_path} is not a peft adapter config (a JSON object expected).")
        return path, cfg
    return path, None


def read_lora_role(path: str | os.PathLike) -> str | None:
    """The ``vbridge.role`` of a LoRA file from its safetensors header alone (no tensor is read), or None.

    Cheap enough to sort long LoRA lists: the file's first 8 bytes give the header length, the header
    is JSON. Unreadable files and files of other tools give None.
    """
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n < 100_000_000:
                return None
            header = json.loads(f.read(n))
        role = json.loads((header.get("__metadata__") or {}).get(METADATA_PREFIX + "role", "null"))
    except (OSError, ValueError, AttributeError):
        return None
    return role if role in ROLES else None


def read_lora(path: str | os.PathLike) -> LoraFile:
    """Read a LoRA safetensors file in any supported key format (see the module docstring).

    Raises :class:`ModelFileError` for a missing or unreadable file, :class:`WrongModelError` for a
    safetensors file without LoRA keys, :class:`LoraMismatchError` for a LoRA of another architecture.
    """
    p, adapter_config = _peft_files(Path(path))
    tensors, header = _load_safetensors(p)
    from .validate import check_finite_tensors

    fix = "re-download it, or retrain it (a training run with a non-finite setting or a diverged loss writes such files)"
    check_finite_tensors(tensors, p, "LoRA", fix)
    lora = parse_lora_state_dict(tensors, header, source=str(p), adapter_config=adapter_config)
    lora.path = p
    bad_alpha = [n for n, layer in lora.weights.items() if not math.isfinite(float(layer.alpha))]
    if bad_alpha or not math.isfinite(float(lora.alpha)):
        raise ModelFileError(f"LoRA file {p} holds NaN/inf values (alpha of {', '.join(bad_alpha[:3]) or 'the file'}): "
                             f"it is broken and would turn every output into NaN; {fix}")
    if lora.unmapped_keys:
        logger.debug("%s: %d keys not mapped to Wan layers: %s", p, len(lora.unmapped_keys), lora.unmapped_keys[:_MAX_LISTED])
    return lora


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def lora_state_from_peft(transformer: torch.nn.Module, adapter_name: str = "default") -> dict[str, LoraLayer]:
    """Extract one peft adapter of ``transformer`` in the internal form (with its exact per-layer alpha).

    Uses ``peft.get_peft_model_state_dict`` for the tensors and reads ``r``/``lora_alpha`` from the
    injected layers themselves, so rank/alpha patterns are honoured.
    """
    from peft import get_peft_model_state_dict
    from peft.tuners.lora import LoraLayer as PeftLoraLayer

    sd = get_peft_model_state_dict(transformer, adapter_name=adapter_name)
    if not sd:
        raise InputError(f"the model has no LoRA adapter named {adapter_name!r}.")
    out: dict[str, LoraLayer] = {}
    modules = dict(transformer.named_modules())
    for key, t in sd.items():
        if not key.endswith(".lora_A.weight"):
            continue
        name = key[: -len(".lora_A.weight")]
        up = sd.get(f"{name}.lora_B.weight")
        if up is None:
            continue
        mod = modules.get(name)
        if isinstance(mod, PeftLoraLayer) and adapter_name in mod.lora_alpha:
            alpha = float(mod.lora_alpha[adapter_name])
        else:
            alpha = float(t.shape[0])
        out[name] = LoraLayer(t.detach().clone(), up.detach().clone(), alpha)
    return out


def _normalise_weights(weights: Mapping[str, Any], alpha: float) -> dict[str, LoraLayer]:
    """Accept the internal form or a peft state dict (``<name>.lora_A.weight``) and return the internal form."""
    if all(isinstance(v, LoraLayer) for v in weights.values()):
        out = {}
        for name, layer in weights.items():
            name = name.removeprefix("transformer.")
            out[name] = layer
        return out
    if not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise InputError("weights must map module names to LoraLayer, or be a peft state dict of tensors.")
    parsed = parse_lora_state_dict(dict(weights), source="weights")
    if parsed.unmapped_keys:
        raise InputError(f"weights hold keys that are not Wan LoRA layers: {parsed.unmapped_keys[:_MAX_LISTED]}")
    alpha_keys = any(k.endswith(".alpha") for k in weights)
    return {n: (l if alpha_keys else LoraLayer(l.down, l.up, float(alpha))) for n, l in parsed.weights.items()}


def _encode_metadata(metadata: Mapping[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in metadata.items():
        key = k if k.startswith(METADATA_PREFIX) else METADATA_PREFIX + k
        try:
            out[key] = json.dumps(v, sort_keys=True)
        except TypeError as e:
            raise InputError(f"metadata {key} cannot be stored as JSON: {e}") from None
    role_key = METADATA_PREFIX + "role"
    if role_key in out and json.loads(out[role_key]) not in ROLES:
        raise InputError(f"metadata role must be one of {ROLES}, got {json.loads(out[role_key])!r}.")
    out.setdefault(METADATA_PREFIX + "format_version", json.dumps(FORMAT_VERSION))
    return out


def write_lora(path: str | os.PathLike, weights: Mapping[str, Any], *, rank: int, alpha: float,
               metadata: Mapping[str, Any], prompt_embeds: torch.Tensor | None = None,
               negative_prompt_embeds: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write a V-Bridge LoRA file atomically, in ComfyUI-loadable keys (see module docstring).

    ``weights`` is the internal form (``{diffusers name: LoraLayer}``, each layer keeps its own
    alpha) or a peft state dict as returned by ``peft.get_peft_model_state_dict`` (every layer then
    gets ``alpha``). ``rank`` must equal the rank of every layer (checked). ``metadata`` keys may
    be given with or without the ``vbridge.`` prefix; values must be JSON-serialisable.
    ``vbridge.format_version`` is added when absent. ``dtype`` optionally casts the LoRA weights
    (alphas are always fp32, prompt embeddings keep their dtype).
    """
    layers = _normalise_weights(weights, alpha)
    if not layers:
        raise InputError("no LoRA layers to write.")
    bad_rank = [n for n, l in layers.items() if l.rank != rank or l.up.shape[1] != rank]
    if bad_rank:
        raise InputError(f"rank {rank} does not match layers {bad_rank[:_MAX_LISTED]} "
                         f"(their rank: {layers[bad_rank[0]].rank}).")
    odd_alpha = [n for n, l in layers.items() if l.alpha != float(alpha)]
    if odd_alpha:
        logger.warning("write_lora: %d layers keep their own alpha instead of %g (e.g. %s)", len(odd_alpha), alpha, odd_alpha[0])
    tensors: dict[str, torch.Tensor] = {}
    for name in sorted(layers):
        layer = layers[name]
        orig = diffusers_to_wan_name(name)
        if orig is None:
            raise InputError(f"layer {name} has no ComfyUI/Wan name; only attention, FFN, embedding and head Linears can be saved.")
        d, u = layer.down.detach(), layer.up.detach()
        if dtype is not None:
            d, u = d.to(dtype), u.to(dtype)
        tensors[f"diffusion_model.{orig}.lora_down.weight"] = d
        tensors[f"diffusion_model.{orig}.lora_up.weight"] = u
        tensors[f"diffusion_model.{orig}.alpha"] = torch.tensor(float(layer.alpha), dtype=torch.float32)
    if prompt_embeds is not None:
        tensors[PROMPT_EMBEDS_KEY] = prompt_embeds.detach()
    if negative_prompt_embeds is not None:
        tensors[NEGATIVE_PROMPT_EMBEDS_KEY] = negative_prompt_embeds.detach()
    header = _encode_metadata(metadata)
    out = save_safetensors_atomic(tensors, path, metadata=header)
    logger.info("wrote LoRA %s (%d layers, rank %d)", out, len(layers), rank)
    return out


# --------------------------------------------------------------------------------------------
# Applying to a diffusers WanTransformer3DModel
# --------------------------------------------------------------------------------------------


def _linear_shape(module: torch.nn.Module) -> tuple[int, int] | None:
    """(out_features, in_features) of a Linear, also when peft already wrapped it."""
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    if isinstance(base, torch.nn.Linear):
        return int(base.out_features), int(base.in_features)
    return None


def check_lora_fits(transformer: torch.nn.Module, lora: LoraFile) -> tuple[list[str], list[str]]:
    """(keys/layers that map to no Linear or tensor of the model, shape differences as text)."""
    modules = dict(transformer.named_modules())
    missing = list(lora.unmapped_keys)
    shapes: list[str] = []
    for name, patch in lora.patches.items():
        p = _find_param(transformer, name)
        if p is None:
            missing.append(name)
        elif not patch.fits(p.shape):
            shapes.append(f"{name}: {patch.shape_text()} vs model {tuple(p.shape)}")
    for name, layer in lora.weights.items():
        mod = modules.get(name)
        shape = _linear_shape(mod) if mod is not None else None
        if shape is None:
            orig = diffusers_to_wan_name(name)
            missing.append(name + (f" ({orig})" if orig else ""))
            continue
        out_f, in_f = shape
        if int(layer.down.shape[1]) != in_f or int(layer.up.shape[0]) != out_f:
            shapes.append(f"{name}: LoRA {int(layer.up.shape[0])}x{int(layer.down.shape[1])} vs model {out_f}x{in_f}")
    return missing, shapes


def _mismatch_message(lora: LoraFile, missing: list[str], shapes: list[str], total: int) -> str:
    src = str(lora.path) if lora.path else "the LoRA"
    problems = []
    if missing:
        problems.append(f"{len(missing)} of {total} layers/keys match no layer of the model (first: "
                        f"{', '.join(missing[:_MAX_LISTED])})")
    if shapes:
        problems.append(f"{len(shapes)} layers have other shapes (first: {'; '.join(shapes[:_MAX_LISTED])})")
    parts = [f"{src} does not fit this model: {'; '.join(problems)}."]
    unsupported = [m for m in missing if _UNSUPPORTED_RE.search(m)]
    if unsupported:
        parts.append(f"{len(unsupported)} keys are LoHa/LoKr/DoRA/OFT/LoCon-mid adapter parts, which are not "
                     "supported (only LoRA pairs and diff/diff_b/norm/set_weight tensors are).")
    if len(unsupported) < len(missing) or shapes:
        parts.append(f"The file seems to be for {_guess_base(list(lora.weights) + lora.unmapped_keys, lora.weights, lora.metadata)}.")
    parts.append("Use a LoRA trained for Wan2.2-TI2V-5B, or apply only the matching part: --allow-partial (CLI), "
                 "allow_partial_lora (V-Bridge Load Model) or allow_partial=True (Python); the rest is listed.")
    return " ".join(parts)


def _strengths(transformer: torch.nn.Module) -> dict[str, float]:
    s = transformer.__dict__.get(_STRENGTHS_ATTR)
    if s is None:
        s = {}
        transformer.__dict__[_STRENGTHS_ATTR] = s
    return s


def _peft_adapters(transformer: torch.nn.Module) -> list[str]:
    return list(getattr(transformer, "peft_config", {}) or {})


def loaded_loras(transformer: torch.nn.Module) -> list[str]:
    """Names of the adapters loaded on ``transformer`` (active or not): peft adapters and patch-only ones."""
    names = _peft_adapters(transformer)
    return names + [n for n in patch_adapters(transformer) if n not in names]


def active_loras(transformer: torch.nn.Module) -> dict[str, float]:
    """The active adapters and their strengths, as last set by this module."""
    return dict(_strengths(transformer))


def _sync_active(transformer: torch.nn.Module) -> None:
    """Push the recorded strengths to peft: listed adapters active at their strength, others off."""
    active = _strengths(transformer)
    sync_patches(transformer, active)
    peft_names = _peft_adapters(transformer)
    if not peft_names:
        return
    names = [n for n in active if n in peft_names]
    if not names:
        transformer.disable_lora()
        return
    transformer.enable_lora()
    transformer.set_adapters(names, [float(active[n]) for n in names])


def _check_strength(strength: Any, name: str) -> float:
    """A LoRA strength as a float; NaN/inf (which would turn every output into NaN) and non-numbers are refused."""
    import math

    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(float(strength)):
        raise InputError(f"LoRA strength for {name!r} must be a finite number (1.0 = as trained), got {strength!r}")
    return float(strength)


def apply_lora(transformer: torch.nn.Module, lora: LoraFile | str | os.PathLike, adapter_name: str,
               strength: float = 1.0, *, allow_partial: bool = False) -> LoraFile:
    """Inject ``lora`` as the named peft adapter ``adapter_name`` and activate it at ``strength``.

    The base weights are untouched: the adapter adds ``strength * alpha / rank * up @ down(x)`` to
    each targeted Linear. Adapters already active stay active (with their strengths); use
    :func:`set_active_loras` to choose. Loading under a name already in use replaces that adapter.
    Raises :class:`LoraMismatchError` when the LoRA does not fit (see module docstring).
    Returns the :class:`LoraFile` (read from disk when a path was given).
    """
    if not adapter_name or not isinstance(adapter_name, str):
        raise InputError("adapter_name must be a non-empty string.")
    strength = _check_strength(strength, adapter_name)
    if not isinstance(lora, LoraFile):
        lora = read_lora(lora)
    missing, shapes = check_lora_fits(transformer, lora)
    total = len(lora.weights) + len(lora.patches) + len(lora.unmapped_keys)
    layers = dict(lora.weights)
    patches = dict(lora.patches)
    if missing or shapes:
        msg = _mismatch_message(lora, missing, shapes, total)
        bad = {s.split(":", 1)[0] for s in shapes} | {m.split(" ", 1)[0] for m in missing}
        layers = {n: l for n, l in layers.items() if n not in bad}
        patches = {n: p for n, p in patches.items() if n not in bad}
        if not allow_partial or not (layers or patches):
            raise LoraMismatchError(msg)
        logger.warning("applying the matching part only (%d of %d layers/tensors). %s", len(layers) + len(patches),
                       len(lora.weights) + len(lora.patches), msg)

    if adapter_name in loaded_loras(transformer):
        logger.info("replacing LoRA adapter %r", adapter_name)
        remove_lora(transformer, adapter_name)
    if not layers:  # tensor patches only (e.g. an extracted bias/norm LoRA): no peft adapter
        add_patches(transformer, adapter_name, patches)
        _strengths(transformer)[adapter_name] = float(strength)
        _sync_active(transformer)
        logger.info("LoRA %s applied as %r at strength %g", lora.describe(), adapter_name, strength)
        return lora

    ranks = Counter(l.rank for l in layers.values())
    alphas = Counter(l.alpha for l in layers.values())
    r0 = ranks.most_common(1)[0][0]
    a0 = alphas.most_common(1)[0][0]
    rank_pattern = {"^" + re.escape(n): l.rank for n, l in layers.items() if l.rank != r0}
    alpha_pattern = {"^" + re.escape(n): l.alpha for n, l in layers.items() if l.alpha != a0}
    config = dict(r=r0, lora_alpha=a0, lora_dropout=0.0, bias="none", use_rslora=False, use_dora=False,
                  target_modules="^(?:" + "|".join(re.escape(n) for n in sorted(layers)) + ")$",
                  rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    modules = dict(transformer.named_modules())
    state = {}
    for n, l in layers.items():
        # each layer in its own base weight's dtype/device (diffusers keeps some modules fp32 in bf16 models)
        mod = modules[n]
        w = (mod.get_base_layer() if hasattr(mod, "get_base_layer") else mod).weight
        dt = w.dtype if w.dtype.is_floating_point and w.dtype.itemsize >= 2 else torch.bfloat16  # fp8 storage
        state[f"{n}.lora_A.weight"] = l.down.to(device=w.device, dtype=dt)
        state[f"{n}.lora_B.weight"] = l.up.to(device=w.device, dtype=dt)
    was_active = _strengths(transformer)
    with warnings.catch_warnings():
        # peft warns that a second adapter joins an existing peft_config: that is the point here.
        warnings.filterwarnings("ignore", message=".*Already found a `peft_config`.*")
        transformer.load_lora_adapter(state, adapter_name=adapter_name, prefix=None, metadata=config)
    add_patches(transformer, adapter_name, patches)
    was_active[adapter_name] = float(strength)
    _sync_active(transformer)
    logger.info("LoRA %s applied as %r at strength %g", lora.describe(), adapter_name, strength)
    return lora


def set_active_loras(transformer: torch.nn.Module, strengths: Mapping[str, float]) -> None:
    """Activate exactly the adapters in ``strengths`` at those strengths; all others are off.

    ``{}`` disables every adapter (the base model alone). Switching costs no reload.
    """
    loaded = loaded_loras(transformer)
    unknown = [n for n in strengths if n not in loaded]
    if unknown:
        raise InputError(f"no LoRA adapter named {unknown} is loaded (loaded: {loaded or 'none'}).")
    checked = {n: _check_strength(v, n) for n, v in strengths.items()}
    s = _strengths(transformer)
    s.clear()
    s.update(checked)
    _sync_active(transformer)


def remove_lora(transformer: torch.nn.Module, name: str) -> None:
    """Delete the adapter ``name`` from ``transformer``; the other adapters keep their state."""
    if name not in loaded_loras(transformer):
        raise InputError(f"no LoRA adapter named {name!r} is loaded (loaded: {loaded_loras(transformer) or 'none'}).")
    if name in _peft_adapters(transformer):
        with warnings.catch_warnings():
            # peft announces which adapter it activates instead; _sync_active sets the real state next.
            warnings.filterwarnings("ignore", message=".*which is now deleted.*")
            transformer.delete_adapters(name)
    drop_patches(transformer, name)
    _strengths(transformer).pop(name, None)
    _sync_active(transformer)
