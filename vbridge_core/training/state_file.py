"""Training state on disk without pickle: tensors in a safetensors file, everything else as JSON in its header.

A training checkpoint is a nested structure (the optimizer's ``state_dict`` with integer keys and
tuples, generator states, loss lists, the run's config). :func:`encode` splits it into a flat
``{name: tensor}`` table and a JSON document that refers to the tensors by name; :func:`decode` puts
it back together with the same Python types (int dict keys, tuples, non-finite floats), so a resumed
run continues bit for bit. Reading such a file parses a JSON header and raw tensor bytes: nothing in
it can run code, unlike ``torch.load`` of a pickle.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError

#: Header key holding the JSON document.
STATE_KEY = "vbridge.train_state"
_TAG = "__vb__"


def encode(obj: Any) -> tuple[dict[str, torch.Tensor], str]:
    """``(tensors, json_text)`` for a nested structure of dicts, lists, tuples, tensors and JSON scalars."""
    tensors: dict[str, torch.Tensor] = {}

    def enc(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            name = f"t{len(tensors)}"
            tensors[name] = x.detach().to("cpu").contiguous().clone()
            return {_TAG: "tensor", "name": name}
        if isinstance(x, bool) or x is None or isinstance(x, (int, str)):
            return x
        if isinstance(x, float):
            return x if math.isfinite(x) else {_TAG: "float", "value": repr(x)}
        if isinstance(x, tuple):
            return {_TAG: "tuple", "items": [enc(v) for v in x]}
        if isinstance(x, list):
            return [enc(v) for v in x]
        if isinstance(x, dict):
            if all(isinstance(k, str) for k in x) and _TAG not in x:
                return {k: enc(v) for k, v in x.items()}
            return {_TAG: "dict", "items": [[enc(k), enc(v)] for k, v in x.items()]}
        if isinstance(x, Path):
            return str(x)
        raise TypeError(f"cannot store a {type(x).__name__} in a training state")

    doc = enc(obj)
    return tensors, json.dumps(doc, allow_nan=False, separators=(",", ":"))


def decode(tensors: dict[str, torch.Tensor], text: str) -> Any:
    """The inverse of :func:`encode`."""

    def dec(x: Any) -> Any:
        if isinstance(x, list):
            return [dec(v) for v in x]
        if not isinstance(x, dict):
            return x
        tag = x.get(_TAG)
        if tag is None:
            return {k: dec(v) for k, v in x.items()}
        if tag == "tensor":
            return tensors[x["name"]]
        if tag == "float":
            return float(x["value"])
        if tag == "tuple":
            return tuple(dec(v) for v in x["items"])
        if tag == "dict":
            return {_key(dec(k)): dec(v) for k, v in x["items"]}
        raise ValueError(f"unknown entry {tag!r}")

    return dec(json.loads(text))


def _key(k: Any) -> Any:
    return tuple(k) if isinstance(k, list) else k


def save_state(obj: Any, path: str | os.PathLike) -> Path:
    """Write ``obj`` (see :func:`encode`) to a safetensors file, atomically."""
    from ..fileio import save_safetensors_atomic

    tensors, text = encode(obj)
    return save_safetensors_atomic(tensors, path, metadata={STATE_KEY: text})


def load_state(path: str | os.PathLike) -> Any:
    """Read a file written by :func:`save_state`; :class:`InputError` for anything else. Never unpickles."""
    from safetensors import safe_open

    p = Path(path)
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for foreign or broken files
        raise InputError(f"{p} is not a V-Bridge training state file (cannot read it as safetensors: {e})") from None
    if STATE_KEY not in meta:
        raise InputError(f"{p} is a safetensors file but not a V-Bridge training state (no {STATE_KEY!r} entry)")
    try:
        return decode(tensors, meta[STATE_KEY])
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"{p}: its training state is damaged ({type(e).__name__}: {e})") from None
