"""Read model checkpoints lazily and tell what they hold.

Users bring the files they already have: ComfyUI's repackaged single files (fp16, bf16 or fp8,
sometimes with a ``model.diffusion_model.`` prefix and ComfyUI's "scaled fp8" scales), the
original Wan release shards, or diffusers folders. This module reads any of them the same way:

* :func:`open_checkpoint` validates each safetensors header first (so a truncated download fails
  with a clear :class:`~vbridge_core.errors.ModelFileError` instead of a low-level error) and then
  reads tensors one at a time (``safe_open``), so a 10 GB model is never held twice in memory;
* key prefixes are stripped, fp8 weights are dequantised (``scale_weight``/``weight_scale``
  multiplied in, ``scale_input`` dropped) and every tensor is cast to the requested dtype;
* :func:`identify` names the model from tensor names and shapes alone (Wan2.2-TI2V-5B DiT in the
  original or diffusers layout, Wan2.1 / 14B / 1.3B DiTs, Wan2.1 vs Wan2.2 VAE, SD/SDXL/Flux,
  LoRAs, ...), so a wrong file gets an error that says what it is and what was expected.

Nothing here imports ComfyUI or touches the network.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from .errors import ModelFileError

logger = logging.getLogger(__name__)

#: Prefixes that wrap a DiT's own key names in ComfyUI / LDM-style files (stripped in this order).
DIT_PREFIXES: tuple[str, ...] = ("model.diffusion_model.", "diffusion_model.", "model.")
#: Prefixes that wrap a VAE's key names in combined checkpoints.
VAE_PREFIXES: tuple[str, ...] = ("first_stage_model.", "vae.")

FP8_DTYPES: frozenset[torch.dtype] = frozenset(
    d for d in (getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None)) if d is not None)

#: safetensors header dtype strings -> (torch dtype, bytes per element).
_ST_DTYPES: dict[str, tuple[torch.dtype | None, int]] = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2), "F8_E4M3": (getattr(torch, "float8_e4m3fn", None), 1),
    "F8_E5M2": (getattr(torch, "float8_e5m2", None), 1), "I64": (torch.int64, 8), "I32": (torch.int32, 4),
    "I16": (torch.int16, 2), "I8": (torch.int8, 1), "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1),
    "U16": (getattr(torch, "uint16", None), 2), "U32": (getattr(torch, "uint32", None), 4),
    "U64": (getattr(torch, "uint64", None), 8),
}

# ComfyUI quantisation side tensors: markers and activation scales are dropped, weight scales are
# multiplied into the weight they belong to.
_MARKER_KEYS = frozenset({"scaled_fp8"})
_DROP_SUFFIXES = (".scale_input", ".input_scale", ".comfy_quant")
_WEIGHT_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")

_MAX_HEADER_BYTES = 100 * 1024 * 1024

REDOWNLOAD_HINT = "Re-download it (the download was probably interrupted)."


def _corrupt(path: Path, detail: str) -> ModelFileError:
    return ModelFileError(
        f"{path}: the file is truncated or is not a safetensors file ({detail}). {REDOWNLOAD_HINT}")


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: file, its name in that file, shape and storage dtype string."""

    file: Path
    raw_key: str
    shape: tuple[int, ...]
    dtype: str


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Parse and validate a safetensors header without reading the tensor data.

    Returns ``(tensors, metadata)`` where ``tensors`` maps names to ``{"dtype", "shape",
    "data_offsets"}``. Raises :class:`ModelFileError` when the file is shorter than its header
    says (an interrupted download) or is not safetensors at all, naming the path.
    """
    p = Path(path)
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _corrupt(p, f"only {size} bytes")
            (n,) = struct.unpack("<Q", head)
            if n == 0 or n > _MAX_HEADER_BYTES or n > size - 8:
                raise _corrupt(p, f"header length {n} does not fit a {size}-byte file")
            raw = f.read(n)
    except OSError as e:
        raise ModelFileError(f"{p}: cannot read the file ({e.strerror or e}).") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _corrupt(p, "the header is not valid JSON") from None
    if not isinstance(header, dict):
        raise _corrupt(p, "the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data_len = size - 8 - n
    end_max = 0
    for name, info in header.items():
        try:
            dt = info["dtype"]
            shape = [int(s) for s in info["shape"]]
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise _corrupt(p, f"bad header entry for {name!r}") from None
        itemsize = _ST_DTYPES.get(dt, (None, None))[1]
        if itemsize is not None and end - begin != math.prod(shape) * itemsize:
            raise _corrupt(p, f"tensor {name!r} has {end - begin} bytes for shape {shape} {dt}")
        end_max = max(end_max, end)
    if end_max > data_len:
        missing = end_max - data_len
        raise _corrupt(p, f"{missing} bytes of tensor data are missing; the file should be "
                          f"{8 + n + end_max} bytes but is {size}")
    return header, {str(k): str(v) for k, v in metadata.items()}


def strip_prefix(key: str, prefixes: Sequence[str]) -> str:
    """Remove the first of ``prefixes`` that ``key`` starts with."""
    for pre in prefixes:
        if key.startswith(pre):
            return key[len(pre):]
    return key


def _is_side_tensor(key: str) -> bool:
    return key in _MARKER_KEYS or key.endswith(_DROP_SUFFIXES) or key.endswith(_WEIGHT_SCALE_SUFFIXES)


def dequantize(weight: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype | None,
               device: torch.device | str | None = None, name: str = "") -> torch.Tensor:
    """Turn a stored tensor into a compute tensor: fp8 -> float, times its scale, cast to ``dtype``.

    fp8 values are exact in fp32, so the product with the scale is formed in fp32 and rounded once
    into ``dtype`` (``None`` keeps the storage dtype, except fp8 which becomes fp32).
    """
    if device is not None:
        weight = weight.to(device)
    if not weight.is_floating_point():
        if scale is not None:
            raise ModelFileError(
                f"tensor {name!r} is stored as {weight.dtype} with a scale: this quantisation format is "
                "not supported. Use the fp16/bf16 (or plain/scaled fp8) file instead.")
        return weight
    if weight.dtype in FP8_DTYPES or scale is not None:
        out = weight.to(torch.float32)
        if scale is not None:
            s = scale.to(device=out.device, dtype=torch.float32)
            if s.numel() != 1:
                try:
                    torch.broadcast_shapes(s.shape, out.shape)
                except RuntimeError:
                    raise ModelFileError(
                        f"tensor {name!r}: its scale of shape {tuple(s.shape)} does not broadcast to the "
                        f"weight {tuple(out.shape)}; this quantisation format is not supported.") from None
            out = out * s
        return out.to(dtype or torch.float32)
    return weight.to(dtype) if dtype is not None else weight


class Checkpoint:
    """A lazily read set of checkpoint files (one file or shards) with normalised tensor names.

    ``keys()`` are the tensor names with prefixes stripped and quantisation side tensors
    (``scaled_fp8``, ``*.scale_weight``, ``*.scale_input``, ...) hidden; :meth:`get` returns one
    tensor dequantised and cast. Safetensors files are memory-mapped through ``safe_open`` and read
    one tensor at a time; ``.pt``/``.pth`` files (the original Wan release ships its VAE that way)
    are loaded with ``torch.load(weights_only=True, mmap=True)``.
    """

    def __init__(self, files: Sequence[str | os.PathLike], prefixes: Sequence[str] = DIT_PREFIXES):
        self.files = [Path(f) for f in files]
        if not self.files:
            raise ModelFileError("no checkpoint files were given.")
        self.prefixes = tuple(prefixes)
        self.metadata: dict[str, str] = {}
        self._entries: dict[str, TensorEntry] = {}
        self._side: dict[str, TensorEntry] = {}
        self._handles: dict[Path, Any] = {}
        self._torch_sds: dict[Path, Mapping[str, torch.Tensor]] = {}
        for f in self.files:
            if not f.is_file():
                raise ModelFileError(f"{f}: file not found.")
            if f.suffix.lower() in (".pt", ".pth", ".ckpt", ".bin"):
                self._add_torch_file(f)
            else:
                self._add_safetensors_file(f)
        self.scaled_fp8 = any(k in _MARKER_KEYS for k in self._side) or any(
            k.endswith(_WEIGHT_SCALE_SUFFIXES) for k in self._side)

    # -- building --------------------------------------------------------------------------------
    def _add(self, f: Path, raw_key: str, shape: Sequence[int], dtype: str) -> None:
        key = strip_prefix(raw_key, self.prefixes)
        entry = TensorEntry(f, raw_key, tuple(int(s) for s in shape), dtype)
        table = self._side if _is_side_tensor(key) else self._entries
        if key in table and table[key].raw_key != raw_key:
            logger.warning("%s: tensors %r and %r have the same name after prefix stripping; using %r",
                           f, table[key].raw_key, raw_key, table[key].raw_key)
            return
        table[key] = entry

    def _add_safetensors_file(self, f: Path) -> None:
        header, meta = read_safetensors_header(f)
        self.metadata.update(meta)
        for raw_key, info in header.items():
            self._add(f, raw_key, info["shape"], info["dtype"])

    def _add_torch_file(self, f: Path) -> None:
        # PyTorch's weights-only unpickler admits tensors and plain containers only, never code; before
        # torch 2.6 it could be bypassed (CVE-2025-32434), so older versions do not open such files at all
        if tuple(int(x) for x in re.findall(r"\d+", torch.__version__)[:2]) < (2, 6):
            raise ModelFileError(f"{f}: PyTorch {torch.__version__} cannot open .pt/.pth files safely (needs 2.6 or "
                                 "newer); upgrade torch or use the .safetensors version of this model file")
        try:
            sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # noqa: BLE001 - torch raises many types for bad files
            raise ModelFileError(f"{f}: cannot read this PyTorch checkpoint ({type(e).__name__}: {e}). "
                                 f"{REDOWNLOAD_HINT}") from None
        for wrapper in ("state_dict", "model", "module"):
            if isinstance(sd, Mapping) and set(sd.keys()) == {wrapper}:
                sd = sd[wrapper]
        if not isinstance(sd, Mapping):
            raise ModelFileError(f"{f}: this file does not hold a state dict of tensors.")
        sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
        self._torch_sds[f] = sd
        for k, v in sd.items():
            self._add(f, k, v.shape, str(v.dtype).replace("torch.", ""))

    # -- reading ---------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        """Normalised tensor names (prefixes stripped, quantisation side tensors hidden)."""
        return list(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Name -> shape for every tensor, from the headers only."""
        return {k: e.shape for k, e in self._entries.items()}

    def storage_dtypes(self) -> dict[str, str]:
        """Name -> storage dtype string as written in the file (e.g. ``F16``, ``F8_E4M3``)."""
        return {k: e.dtype for k, e in self._entries.items()}

    def _raw(self, entry: TensorEntry) -> torch.Tensor:
        if entry.file in self._torch_sds:
            return self._torch_sds[entry.file][entry.raw_key]
        h = self._handles.get(entry.file)
        if h is None:
            from safetensors import safe_open

            try:
                h = safe_open(str(entry.file), framework="pt", device="cpu")
            except Exception as e:  # noqa: BLE001 - SafetensorError and OSError
                raise _corrupt(entry.file, f"{type(e).__name__}: {e}") from None
            self._handles[entry.file] = h
        try:
            return h.get_tensor(entry.raw_key)
        except Exception as e:  # noqa: BLE001
            raise _corrupt(entry.file, f"reading {entry.raw_key!r} failed: {e}") from None

    def scale_for(self, key: str) -> torch.Tensor | None:
        """The ComfyUI weight scale stored for ``key`` (``<module>.scale_weight``), if any."""
        if not key.endswith(".weight"):
            return None
        module = key[: -len(".weight")]
        for suffix in _WEIGHT_SCALE_SUFFIXES:
            e = self._side.get(module + suffix)
            if e is not None:
                return self._raw(e)
        return None

    def get(self, key: str, dtype: torch.dtype | None = None,
            device: torch.device | str | None = None) -> torch.Tensor:
        """Read tensor ``key``, dequantise fp8 (with its scale) and cast to ``dtype`` on ``device``."""
        entry = self._entries.get(key)
        if entry is None:
            raise KeyError(key)
        return dequantize(self._raw(entry), self.scale_for(key), dtype, device, name=key)

    def state_dict(self, dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """All tensors, dequantised and cast (use :meth:`get` per key to bound peak memory)."""
        return {k: self.get(k, dtype, device) for k in self._entries}

    def describe_storage(self) -> str:
        """A short summary such as ``"F16 (825 tensors)"`` or ``"F8_E4M3 scaled fp8 + F32 (...)"``."""
        counts: dict[str, int] = {}
        for e in self._entries.values():
            counts[e.dtype] = counts.get(e.dtype, 0) + 1
        s = ", ".join(f"{d} x{n}" for d, n in sorted(counts.items(), key=lambda kv: -kv[1]))
        return s + (" (ComfyUI scaled fp8)" if self.scaled_fp8 else "")

    def close(self) -> None:
        """Drop open file handles (tensors already returned stay valid)."""
        self._handles.clear()
        self._torch_sds.clear()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_checkpoint(files: str | os.PathLike | Sequence[str | os.PathLike],
                    prefixes: Sequence[str] = DIT_PREFIXES) -> Checkpoint:
    """Open one checkpoint file or a list of shards lazily (headers validated, no tensor read)."""
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    return Checkpoint(list(files), prefixes)


# ---------------------------------------------------------------------------------------------------
# identification

KIND_WAN22_TI2V_DIT = "wan22_ti2v_dit"
KIND_WAN_T2V_DIT = "wan_t2v_dit"
KIND_WAN21_I2V_DIT = "wan21_i2v_dit"
KIND_WAN22_I2V_DIT = "wan22_i2v_dit"
KIND_WAN_OTHER_DIT = "wan_other_dit"
KIND_WAN22_VAE = "wan22_vae"
KIND_WAN21_VAE = "wan21_vae"
KIND_WAN_OTHER_VAE = "wan_other_vae"
KIND_SDXL = "sdxl"
KIND_SD1 = "sd1"
KIND_SD_UNET = "sd_unet"
KIND_FLUX = "flux"
KIND_SD3 = "sd3"
KIND_T5 = "t5_text_encoder"
KIND_CLIP = "clip"
KIND_LORA = "lora"
KIND_UNKNOWN = "unknown"

#: The released Wan2.2-TI2V-5B DiT sizes.
TI2V_5B_ARCH = dict(dim=3072, num_layers=30, ffn_dim=14336, in_channels=48, out_channels=48, text_dim=4096,
                    freq_dim=256, num_heads=24, patch_size=(1, 2, 2))

_SIZE_NAMES = {5120: "14B", 3072: "5B", 1536: "1.3B"}


@dataclass
class CheckpointInfo:
    """What a checkpoint holds, read from tensor names and shapes.

    ``kind`` is one of the ``KIND_*`` strings, ``description`` a phrase for people (e.g.
    ``"Wan2.1 T2V 14B DiT (dim 5120, 40 layers)"``), ``layout`` ``"original"``/``"diffusers"``/
    ``"ldm"``/``""`` and ``arch`` the numbers read (dim, num_layers, num_heads, ffn_dim, ...).
    """

    kind: str
    description: str
    layout: str = ""
    arch: dict[str, Any] = field(default_factory=dict)
    note: str = ""

    @property
    def is_wan_dit(self) -> bool:
        return self.kind.startswith("wan") and self.kind.endswith("_dit")

    @property
    def is_ti2v_5b_size(self) -> bool:
        """True when the DiT has the released 5B sizes (tiny test models are TI2V but not 5B)."""
        return self.kind == KIND_WAN22_TI2V_DIT and all(
            self.arch.get(k) == v for k, v in TI2V_5B_ARCH.items())


ShapesLike = Mapping[str, Any] | Iterable[tuple[str, Any]] | Checkpoint


def _shapes_of(source: ShapesLike) -> dict[str, tuple[int, ...]]:
    if isinstance(source, Checkpoint):
        items: Iterable[tuple[str, Any]] = source.shapes().items()
    else:
        items = source.items() if isinstance(source, Mapping) else source
    out: dict[str, tuple[int, ...]] = {}
    for k, v in items:
        if isinstance(v, torch.Tensor):
            shape = tuple(v.shape)
        elif isinstance(v, (tuple, list, torch.Size)):
            shape = tuple(int(s) for s in v)
        elif v is None:
            shape = ()
        else:
            shape = tuple(getattr(v, "shape", ()))
        key = strip_prefix(strip_prefix(k, DIT_PREFIXES), VAE_PREFIXES)
        if _is_side_tensor(key):
            continue
        out.setdefault(key, shape)
    return out


def _count_blocks(keys: Iterable[str], prefix: str = "blocks.") -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    idx = {int(m.group(1)) for k in keys if (m := pat.match(k))}
    return len(idx)


def read_wan_dit_arch(shapes: Mapping[str, tuple[int, ...]]) -> tuple[str, dict[str, Any]] | None:
    """Read a Wan DiT's architecture numbers from tensor shapes (original or diffusers layout).

    Returns ``(layout, arch)`` or ``None`` when the tensors are not a Wan DiT. Heads are
    ``dim // 128`` (every Wan DiT uses head dim 128; ComfyUI reads them the same way).
    """
    pe = shapes.get("patch_embedding.weight")
    if pe is None or len(pe) != 5:
        return None
    if "blocks.0.self_attn.q.weight" in shapes:
        layout = "original"
        names = dict(ffn="blocks.0.ffn.0.weight", head="head.head.weight", text="text_embedding.0.weight",
                     time="time_embedding.0.weight", norm_q="blocks.0.self_attn.norm_q.weight",
                     cross_norm="blocks.0.norm3.weight", img="img_emb.proj.0.weight",
                     k_img="blocks.0.cross_attn.k_img.weight")
    elif "blocks.0.attn1.to_q.weight" in shapes:
        layout = "diffusers"
        names = dict(ffn="blocks.0.ffn.net.0.proj.weight", head="proj_out.weight",
                     text="condition_embedder.text_embedder.linear_1.weight",
                     time="condition_embedder.time_embedder.linear_1.weight",
                     norm_q="blocks.0.attn1.norm_q.weight", cross_norm="blocks.0.norm2.weight",
                     img="condition_embedder.image_embedder.norm1.weight",
                     k_img="blocks.0.attn2.add_k_proj.weight")
    else:
        return None
    dim, in_ch = int(pe[0]), int(pe[1])
    patch = tuple(int(s) for s in pe[2:])
    get = lambda n, i: int(shapes[names[n]][i]) if names[n] in shapes and len(shapes[names[n]]) > i else None  # noqa: E731
    head_out = get("head", 0)
    out_ch = head_out // math.prod(patch) if head_out else None
    arch: dict[str, Any] = dict(
        dim=dim, num_layers=_count_blocks(shapes), num_heads=dim // 128 if dim % 128 == 0 else None,
        head_dim=128, ffn_dim=get("ffn", 0), in_channels=in_ch, out_channels=out_ch, patch_size=patch,
        text_dim=get("text", 1), freq_dim=get("time", 1), qk_norm=names["norm_q"] in shapes,
        cross_attn_norm=names["cross_norm"] in shapes, image_dim=get("img", 0),
        added_kv_proj_dim=get("k_img", 0), has_img_emb=names["img"] in shapes,
        vace=any(k.startswith("vace_") for k in shapes),
    )
    return layout, arch


def _dit_info(layout: str, a: dict[str, Any]) -> CheckpointInfo:
    dim, layers, inc, outc = a["dim"], a["num_layers"], a["in_channels"], a["out_channels"]
    size = _SIZE_NAMES.get(dim)
    sizes = f"(dim {dim}, {layers} layers)"
    if a["vace"]:
        return CheckpointInfo(KIND_WAN_OTHER_DIT, f"Wan VACE DiT {sizes}", layout, a)
    if inc == 48 and outc == 48 and not a["has_img_emb"]:
        if dim == 3072 and layers == 30:
            desc = f"Wan2.2 TI2V-5B DiT {sizes}"
        else:
            desc = f"Wan2.2 TI2V-type DiT {sizes}; not the released 5B sizes (dim 3072, 30 layers)"
        return CheckpointInfo(KIND_WAN22_TI2V_DIT, desc, layout, a)
    size_txt = f" {size}" if size else ""
    if inc == 16 and outc == 16 and not a["has_img_emb"]:
        note = "Wan2.2 T2V-A14B experts have the same shapes" if dim == 5120 else ""
        return CheckpointInfo(KIND_WAN_T2V_DIT, f"Wan2.1 T2V{size_txt} DiT {sizes}", layout, a, note)
    if a["has_img_emb"]:
        return CheckpointInfo(KIND_WAN21_I2V_DIT, f"Wan2.1 I2V{size_txt} DiT {sizes}, with CLIP image embedding",
                              layout, a)
    if inc == 36 and outc == 16:
        return CheckpointInfo(KIND_WAN22_I2V_DIT, f"Wan2.2 I2V-A14B expert DiT {sizes}", layout, a)
    return CheckpointInfo(KIND_WAN_OTHER_DIT,
                          f"Wan-family DiT{size_txt} {sizes}, in/out channels {inc}/{outc} "
                          "(e.g. a Fun/Control variant)", layout, a)


def _vae_info(shapes: Mapping[str, tuple[int, ...]]) -> CheckpointInfo | None:
    enc = shapes.get("encoder.conv1.weight")
    if enc is not None and len(enc) == 5 and "decoder.conv1.weight" in shapes and "conv2.weight" in shapes:
        layout, in_ch, z = "original", int(enc[1]), int(shapes["conv2.weight"][0])
    else:
        enc = shapes.get("encoder.conv_in.weight")
        pq = shapes.get("post_quant_conv.weight")
        if enc is None or len(enc) != 5 or pq is None:
            return None
        layout, in_ch, z = "diffusers", int(enc[1]), int(pq[0])
    arch = dict(in_channels=in_ch, z_dim=z, base_dim=int(enc[0]))
    if z == 48 and in_ch == 12:
        return CheckpointInfo(KIND_WAN22_VAE, "Wan2.2 VAE (48 latent channels)", layout, arch)
    if z == 16 and in_ch == 3:
        return CheckpointInfo(KIND_WAN21_VAE, "Wan2.1 VAE (16 latent channels)", layout, arch)
    return CheckpointInfo(KIND_WAN_OTHER_VAE, f"Wan-style video VAE ({z} latent channels, {in_ch} input channels)",
                          layout, arch)


def identify(source: ShapesLike) -> CheckpointInfo:
    """Name the model in a checkpoint from its tensor names and shapes.

    ``source`` is a state dict, a mapping or list of ``(name, shape)`` pairs (meta tensors are
    fine), or an open :class:`Checkpoint`. No tensor data is read. Prefixes such as
    ``model.diffusion_model.`` are ignored.
    """
    shapes = _shapes_of(source)
    keys = list(shapes)
    if not keys:
        return CheckpointInfo(KIND_UNKNOWN, "an empty checkpoint (no tensors)")
    if any(("lora_A" in k or "lora_B" in k or "lora_down" in k or "lora_up" in k) for k in keys):
        return CheckpointInfo(KIND_LORA, f"a LoRA ({len(keys)} tensors), not a full model")
    dit = read_wan_dit_arch(shapes)
    if dit is not None:
        return _dit_info(*dit)
    vae = _vae_info(shapes)
    if vae is not None:
        return vae

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if has("conditioner.embedders."):
        return CheckpointInfo(KIND_SDXL, "an SDXL checkpoint (UNet + CLIP text encoders)", "ldm")
    if has("cond_stage_model.") and has("input_blocks."):
        return CheckpointInfo(KIND_SD1, "a Stable Diffusion 1.x/2.x checkpoint", "ldm")
    if has("input_blocks.") and has("output_blocks."):
        desc = "an SDXL UNet" if "label_emb.0.0.weight" in shapes else "a Stable Diffusion UNet"
        return CheckpointInfo(KIND_SD_UNET, desc, "ldm")
    if has("double_blocks.") and has("single_blocks."):
        return CheckpointInfo(KIND_FLUX, "a Flux-style DiT (double_blocks / single_blocks)", "original")
    if has("joint_blocks."):
        return CheckpointInfo(KIND_SD3, "a Stable Diffusion 3 MMDiT", "original")
    if has("encoder.block.0.layer.0.SelfAttention.") or "shared.weight" in shapes:
        return CheckpointInfo(KIND_T5, "a T5/umT5 text encoder")
    if has("text_model.") or has("vision_model.") or has("visual."):
        return CheckpointInfo(KIND_CLIP, "a CLIP text or vision encoder")
    sample = ", ".join(keys[:3])
    return CheckpointInfo(KIND_UNKNOWN, f"an unrecognised checkpoint ({len(keys)} tensors, e.g. {sample})")

