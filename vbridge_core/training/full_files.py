"""Files of full fine-tuning: the trained DiT (original layout, optionally sharded; diffusers folder on
request) and the resumable training state, all safetensors + JSON (nothing is pickled).

The DiT file uses the original Wan key names (``blocks.0.self_attn.q.weight`` ...), the layout of
``wan2.2_ti2v_5B_fp16.safetensors``, so ComfyUI's UNETLoader and our loader read it like the base
model. Names are mapped back from diffusers' by the inverse of diffusers' own converter
(:func:`vbridge_core.models._original_to_diffusers_names`), and every name is checked to convert
back to itself. Above ``max_shard_size`` the file is split with huggingface_hub's sharding into
``NAME-00001-of-0000N.safetensors`` plus ``NAME.safetensors.index.json`` (our loader follows the
index; ComfyUI's UNETLoader reads single files, so keep the default of one file for ComfyUI).

A training state is a folder ``state-stepNNNNNN/`` beside the output (in ``<out stem>.checkpoints/``):
``model.safetensors`` (the trained weights, fp32, diffusers names), ``optimizer.safetensors``
(``<param>::<slot>`` tensors) and ``state.safetensors`` (step, losses, config, optimizer
hyper-parameters and the generator state, in the LoRA trainer's pickle-free format,
:mod:`.state_file`). The big tensors get files of their own because ``state_file`` copies every
tensor it stores, which for a 5B model's weights and AdamW moments would double rank 0's memory.
The folder is written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from ..errors import InputError
from ..fileio import atomic_path, write_json_atomic
from . import state_file

logger = logging.getLogger(__name__)

STATE_DIR_RE = re.compile(r"^state-step(\d+)$")
STATE_FORMAT = "vbridge-full-train-state-1"
STATE_FILE = "state.safetensors"

_BLOCK_D2O = (("attn1.to_q", "self_attn.q"), ("attn1.to_k", "self_attn.k"), ("attn1.to_v", "self_attn.v"),
              ("attn1.to_out.0", "self_attn.o"), ("attn1.norm_q", "self_attn.norm_q"),
              ("attn1.norm_k", "self_attn.norm_k"), ("attn2.to_q", "cross_attn.q"), ("attn2.to_k", "cross_attn.k"),
              ("attn2.to_v", "cross_attn.v"), ("attn2.to_out.0", "cross_attn.o"),
              ("attn2.norm_q", "cross_attn.norm_q"), ("attn2.norm_k", "cross_attn.norm_k"),
              ("attn2.add_k_proj", "cross_attn.k_img"), ("attn2.add_v_proj", "cross_attn.v_img"),
              ("attn2.norm_added_k", "cross_attn.norm_k_img"), ("norm2", "norm3"),
              ("ffn.net.0.proj", "ffn.0"), ("ffn.net.2", "ffn.2"), ("scale_shift_table", "modulation"))
_TOP_D2O = (("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
            ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
            ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
            ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
            ("condition_embedder.time_proj", "time_projection.1"), ("proj_out", "head.head"),
            ("scale_shift_table", "head.modulation"))


def _to_original(name: str) -> str:
    m = re.match(r"^blocks\.(\d+)\.(.+)$", name)
    if m:
        for d, o in _BLOCK_D2O:
            if m.group(2) == d or m.group(2).startswith(d + "."):
                return f"blocks.{m.group(1)}.{o}{m.group(2)[len(d):]}"
        return name
    for d, o in _TOP_D2O:
        if name == d or name.startswith(d + "."):
            return o + name[len(d):]
    return name


def diffusers_to_original_names(names: list[str]) -> dict[str, str]:
    """diffusers parameter name -> original Wan name, checked against diffusers' converter."""
    from ..models import _original_to_diffusers_names

    mapping = {n: _to_original(n) for n in names}
    back = _original_to_diffusers_names(list(mapping.values()))  # diffusers name -> original name
    bad = [n for n, o in mapping.items() if back.get(n) != o]
    if bad:
        raise InputError(f"cannot map {len(bad)} DiT weight name(s) to the original layout, e.g. {bad[:3]}")
    return mapping


def parse_size(text: str | int | None) -> int:
    """Bytes of ``"10GB"``, ``"500MB"``, ``"0"`` (0: never shard)."""
    if text is None:
        return 0
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)I?B?\s*", str(text).upper())
    if not m:
        raise InputError(f"size {text!r}: give a number of bytes or e.g. 5GB, 500MB (0: one file)")
    return int(float(m.group(1)) * 1000 ** " KMGT".index(m.group(2) or " "))


def write_dit(state: Mapping[str, torch.Tensor], out_path: str | Path, *, dtype: torch.dtype,
              config: Mapping[str, Any], metadata: Mapping[str, str], max_shard_size: int = 0,
              diffusers_folder: Optional[str | Path] = None) -> list[Path]:
    """Write a full DiT ``state`` (diffusers names) in the original layout; see the module docstring."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    out = Path(out_path)
    if out.suffix != ".safetensors":
        raise InputError(f"--out {out}: a full fine-tune is written as a .safetensors file")
    names = diffusers_to_original_names(list(state))
    tensors = {names[k]: v.detach().to("cpu", dtype).contiguous() for k, v in state.items()}
    meta = {str(k): str(v) for k, v in metadata.items()}
    written: list[Path] = []
    split = split_torch_state_dict_into_shards(tensors, filename_pattern=out.stem + "{suffix}.safetensors",
                                               max_shard_size=max_shard_size) if max_shard_size else None
    if split is None or not split.is_sharded:
        with atomic_path(out) as tmp:
            save_file(tensors, str(tmp), metadata=dict(meta, format="pt"))
        written.append(out)
    else:
        for fname, keys in split.filename_to_tensors.items():
            with atomic_path(out.with_name(fname)) as tmp:
                save_file({k: tensors[k] for k in keys}, str(tmp), metadata=dict(meta, format="pt"))
            written.append(out.with_name(fname))
        index = out.with_name(out.name + ".index.json")  # NAME.safetensors.index.json, last: marks completeness
        write_json_atomic(index, {"metadata": dict(meta, total_size=sum(t.numel() * t.element_size()
                                                                          for t in tensors.values())),
                                  "weight_map": split.tensor_to_filename})
        written.append(index)
    if diffusers_folder is not None:
        written += write_diffusers_folder(state, diffusers_folder, dtype=dtype, config=config, metadata=meta,
                                          max_shard_size=max_shard_size)
    return written


def write_diffusers_folder(state: Mapping[str, torch.Tensor], folder: str | Path, *, dtype: torch.dtype,
                           config: Mapping[str, Any], metadata: Mapping[str, str], max_shard_size: int = 0) -> list[Path]:
    """A diffusers ``transformer/`` folder (config.json + safetensors, sharded with an index above the size)."""
    import diffusers
    from huggingface_hub import save_torch_state_dict

    d = Path(folder)
    d.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in state.items()}
    cfg = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    cfg.update(_class_name="WanTransformer3DModel", _diffusers_version=diffusers.__version__)
    save_torch_state_dict(tensors, d, filename_pattern="diffusion_pytorch_model{suffix}.safetensors",
                          max_shard_size=max_shard_size or 10**15, metadata=dict(metadata, format="pt"))
    write_json_atomic(d / "config.json", cfg)
    return sorted(d.iterdir())


# ---------------------------------------------------------------------------------------------- state
def state_dir(folder: Path, step: int) -> Path:
    return folder / f"state-step{step:06d}"


def list_states(folder: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every complete training state in ``folder``, oldest first."""
    d = Path(folder)
    if not d.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in d.iterdir()
                  if (m := STATE_DIR_RE.match(p.name)) and (p / STATE_FILE).is_file())


def find_state(resume: str | Path, checkpoints: Path) -> Optional[Path]:
    """``--resume``: a state folder, a checkpoint folder (newest in it), or ``auto`` (None when none yet)."""
    if str(resume) == "auto":
        found = list_states(checkpoints)
        return found[-1][1] if found else None
    p = Path(resume)
    if (p / STATE_FILE).is_file():
        return p
    found = list_states(p)
    if not found:
        raise InputError(f"no full fine-tuning state (state-stepNNNNNN/ with {STATE_FILE}) in {p}")
    return found[-1][1]


def _flatten_optimizer(osd: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    tensors: dict[str, torch.Tensor] = {}
    for pname, slots in osd["state"].items():
        for slot, v in slots.items():
            t = v if isinstance(v, torch.Tensor) else torch.tensor(v)
            tensors[f"{pname}::{slot}"] = t.detach().cpu().contiguous()
    return tensors, [dict(g) for g in osd["param_groups"]]


def save_state(folder: Path, step: int, *, model: Mapping[str, torch.Tensor], optimizer: Mapping[str, Any],
               generator: torch.Tensor, info: Mapping[str, Any], keep: int) -> Path:
    """Write a training state folder atomically and keep the newest ``keep`` (0: all)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    final = state_dir(folder, step)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=folder))
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.items()}, str(tmp / "model.safetensors"))
        otensors, groups = _flatten_optimizer(optimizer)
        save_file(otensors, str(tmp / "optimizer.safetensors"))
        state_file.save_state(dict(info, format=STATE_FORMAT, step=step, param_groups=groups,
                                   generator=generator.cpu()), tmp / STATE_FILE)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep > 0:
        for _, old in list_states(folder)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    logger.info("training state %s", final)
    return final


def load_state(path: Path) -> dict[str, Any]:
    """Read a state folder: ``model``, ``optimizer`` (torch's FQN-keyed form), ``generator`` and the JSON fields."""
    from safetensors.torch import load_file

    info = state_file.load_state(path / STATE_FILE)
    if not isinstance(info, dict) or info.get("format") != STATE_FORMAT:
        raise InputError(f"{path} is not a V-Bridge full fine-tuning state")
    try:
        model = load_file(str(path / "model.safetensors"))
        flat = load_file(str(path / "optimizer.safetensors"))
    except Exception as e:
        raise InputError(f"cannot read training state {path}: {e}") from None
    generator = info.pop("generator")
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in flat.items():
        pname, slot = key.split("::", 1)
        state.setdefault(pname, {})[slot] = t
    groups = info.pop("param_groups")
    return dict(info, model=model, optimizer={"state": state, "param_groups": groups}, generator=generator)
