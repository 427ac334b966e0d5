"""Resumable training checkpoints, written atomically.

A checkpoint is one ``torch.save`` file holding everything the next step depends on: the LoRA
parameters (fp32), the optimizer and LR-scheduler states, the data/noise generator states, the
global step, the losses so far and the run's config. Resuming from it continues exactly: on the CPU
in fp32 the final LoRA equals that of an uninterrupted run. Each checkpoint also has a loadable
LoRA file beside it (``lora-step000100.safetensors``), so an intermediate result can be tried
without waiting for the end.

Files go to ``<out stem>.checkpoints/`` next to the output LoRA, except when the LoRA is written
inside a ``loras`` model folder (ComfyUI's ``models/loras/...``): every file below it shows up in
ComfyUI's LoRA lists (LoraLoader and ours), so intermediate LoRAs would be offered as finished
ones. Those runs keep their checkpoints in the sibling ``vbridge_checkpoints`` folder instead
(``models/loras/vbridge/x.safetensors`` -> ``models/vbridge_checkpoints/vbridge/x.checkpoints/``),
which ComfyUI does not list. Only the newest ``keep`` checkpoints are kept. A run killed mid-write leaves at most a hidden ``.tmp`` file, never
a truncated checkpoint.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Optional

import torch

from ..errors import InputError
from ..fileio import atomic_path

logger = logging.getLogger(__name__)

STATE_RE = re.compile(r"^state-step(\d+)\.pt$")
FORMAT = "vbridge-train-state-1"


#: Folder that replaces ``loras`` in the checkpoint path of LoRAs written into a ``loras`` model folder.
CHECKPOINTS_FOLDER = "vbridge_checkpoints"


def checkpoint_dir(out_path: str | Path) -> Path:
    """The folder holding the checkpoints of the run that writes ``out_path`` (see the module docstring)."""
    p = Path(out_path)
    folder = p.with_name(p.stem + ".checkpoints")
    parts = list(folder.parts)
    for i in range(len(parts) - 2, -1, -1):  # the nearest enclosing "loras" folder
        if parts[i] == "loras":
            parts[i] = CHECKPOINTS_FOLDER
            return Path(*parts)
    return folder


def state_path(folder: Path, step: int) -> Path:
    return folder / f"state-step{step:06d}.pt"


def lora_path(folder: Path, step: int) -> Path:
    return folder / f"lora-step{step:06d}.safetensors"


def list_checkpoints(folder: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every complete checkpoint in ``folder``, oldest first."""
    d = Path(folder)
    if not d.is_dir():
        return []
    out = []
    for p in d.iterdir():
        m = STATE_RE.match(p.name)
        if m:
            out.append((int(m.group(1)), p))
    return sorted(out)


def find_resume(resume: str | Path, out_path: str | Path) -> Optional[Path]:
    """Resolve ``--resume``: a state file, a checkpoint folder (newest in it), or ``auto``
    (newest in the output's checkpoint folder, ``None`` when there is none)."""
    if str(resume) == "auto":
        found = list_checkpoints(checkpoint_dir(out_path))
        return found[-1][1] if found else None
    p = Path(resume)
    if p.is_dir():
        found = list_checkpoints(p)
        if not found:
            raise InputError(f"no checkpoint (state-stepNNNNNN.pt) in {p}")
        return found[-1][1]
    if not p.is_file():
        raise InputError(f"checkpoint {p} not found; pass a state-stepNNNNNN.pt file, its folder, or 'auto'")
    return p


def save_checkpoint(folder: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write ``state`` for ``step`` atomically and drop all but the newest ``keep`` checkpoints."""
    folder.mkdir(parents=True, exist_ok=True)
    path = state_path(folder, step)
    with atomic_path(path) as tmp:
        torch.save(dict(state, format=FORMAT, step=step), tmp)
    if keep > 0:
        for old_step, old in list_checkpoints(folder)[:-keep]:
            for f in (old, lora_path(folder, old_step)):
                try:
                    f.unlink()
                except OSError:
                    pass
    logger.info("checkpoint %s", path)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (clear error for anything else)."""
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as e:
        raise InputError(f"cannot read checkpoint {path}: {e}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise InputError(f"{path} is not a V-Bridge training checkpoint")
    return state


def config_differences(saved: dict[str, Any], current: dict[str, Any], free: tuple[str, ...]) -> list[str]:
    """Names of config fields that differ between a checkpoint and the resuming run (``free`` ignored)."""
    keys = (set(saved) | set(current)) - set(free)
    return sorted(k for k in keys if saved.get(k) != current.get(k))
