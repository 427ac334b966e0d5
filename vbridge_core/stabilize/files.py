"""Stabilizer files: one safetensors file with JSON metadata (kind, config, training weights, bounds)."""
from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import torch

from ..errors import ModelFileError
from ..fileio import safe_output_path
from .mixers import STABILIZER_KINDS, EMAStabilizer, LearnedStabilizer, Stabilizer, StabilizerConfig, count_parameters

FORMAT_VERSION = 1
STABILIZER_SUFFIX = ".safetensors"


def stabilizer_output_path(folder: str | os.PathLike, name: Any) -> Path:
    """``folder/<sanitised name>.safetensors`` for a user-typed stabilizer name, checked to lie in ``folder``.

    Blanks and a trailing ``.safetensors`` are dropped; folders (``a/b``, ``../x``), names starting
    with a dot and empty names are refused; other unusual characters become ``_``
    (:func:`vbridge_core.fileio.safe_output_name`).
    """
    return safe_output_path(folder, name, what="stabilizer", example="my_stabilizer",
                            folder_hint="models/vbridge_stabilizers/", suffix=STABILIZER_SUFFIX)


def save_stabilizer(stabilizer: Stabilizer, path: str | os.PathLike,
                    metadata: Optional[dict[str, Any]] = None) -> Path:
    """Write a stabilizer to one safetensors file (atomic) with JSON metadata.

    Metadata keys: ``format`` ("vbridge_stabilizer"), ``version``, ``kind``, ``config`` (channels,
    hidden, kernel size, use_inputs), ``parameters``, the stabilizer's own ``.metadata`` (set by
    :func:`train_stabilizer` and :func:`load_stabilizer`: training loss weights, clip length, collapse
    bound) and whatever ``metadata`` adds.
    """
    from ..fileio import save_safetensors_atomic

    meta: dict[str, str] = {"format": "vbridge_stabilizer", "version": str(FORMAT_VERSION), "kind": stabilizer.kind}
    if isinstance(stabilizer, EMAStabilizer):
        tensors = {"ema.b": torch.tensor([stabilizer.b], dtype=torch.float32)}
        meta["config"] = json.dumps({"b": stabilizer.b})
    else:
        tensors = dict(stabilizer.state_dict())
        meta["config"] = json.dumps(asdict(stabilizer.config))
        meta["parameters"] = str(count_parameters(stabilizer))
    own = {k: v for k, v in (getattr(stabilizer, "metadata", None) or {}).items()
           if k not in ("format", "version", "kind", "config", "parameters")}  # e.g. training weights, bound
    for k, v in {**own, **(metadata or {})}.items():
        meta[k] = v if isinstance(v, str) else json.dumps(v)
    return save_safetensors_atomic(tensors, path, metadata=meta)


def read_stabilizer_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a stabilizer file, JSON values decoded."""
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise ModelFileError(f"stabilizer file {p} does not exist")
    try:
        with safe_open(str(p), framework="pt") as f:
            raw = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for broken files
        raise ModelFileError(f"cannot read stabilizer file {p}: {e}") from None
    out: dict[str, Any] = {}
    for k, v in raw.items():
        try:
            out[k] = json.loads(v)
        except (TypeError, ValueError):
            out[k] = v
    return out


def load_stabilizer(path: str | os.PathLike, device: Optional[torch.device | str] = None) -> Stabilizer:
    """Load a stabilizer written by :func:`save_stabilizer` (eval mode, on ``device``)."""
    from safetensors.torch import load_file

    meta = read_stabilizer_metadata(path)
    if meta.get("format") != "vbridge_stabilizer":
        raise ModelFileError(f"{path} is not a V-Bridge stabilizer file (no 'format: vbridge_stabilizer' metadata); "
                             "a LoRA or model file cannot be used as a stabilizer")
    if int(meta.get("version", 0)) > FORMAT_VERSION:
        raise ModelFileError(f"{path} has stabilizer format version {meta.get('version')}; this code reads up to "
                             f"{FORMAT_VERSION}: update ComfyUI-VBridge")
    tensors = load_file(str(path))
    from ..validate import check_finite_tensors

    check_finite_tensors(tensors, path, "stabilizer", "retrain it (train-stabilizer / Train Stabilizer) and check "
                         "that its stability weight and learning rate were finite numbers")
    kind = meta.get("kind")
    if kind == "ema":
        st: Stabilizer = EMAStabilizer(float(tensors["ema.b"][0]))
    elif kind in ("controlled", "spatial"):
        cfg = StabilizerConfig(**meta["config"])
        st = LearnedStabilizer(cfg)
        try:
            st.load_state_dict(tensors)
        except RuntimeError as e:
            raise ModelFileError(f"{path}: weights do not fit its own config {meta['config']}: {e}") from None
    else:
        raise ModelFileError(f"{path}: unknown stabilizer kind {kind!r}; expected one of {STABILIZER_KINDS}")
    st.metadata = meta  # type: ignore[attr-defined]
    return st.to(device).eval() if device is not None else st.eval()
