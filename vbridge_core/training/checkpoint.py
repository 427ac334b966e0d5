"""Resumable training checkpoints, written atomically, never pickled.

A checkpoint is one safetensors file (``state-step000100.safetensors``) holding everything the next
step depends on: the LoRA parameters (fp32), the optimizer state and the data/noise generator state
as tensors, and the global step, the losses so far and the run's config as JSON in its header
(:mod:`.state_file`). Reading it cannot run code. State files of earlier versions
(``state-step000100.pt``, pickles read with ``torch.load``) are refused without being opened, with a
message saying how to go on. Resuming from it continues exactly: on the CPU
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

from ..errors import InputError
from .state_file import load_state, save_state

logger = logging.getLogger(__name__)

STATE_RE = re.compile(r"^state-step(\d+)\.safetensors$")
#: State files of versions that pickled the training state; never opened, only named and removed.
LEGACY_STATE_RE = re.compile(r"^state-step(\d+)\.pt$")
FORMAT = "vbridge-train-state-2"
_PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle")


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
    return folder / f"state-step{step:06d}.safetensors"


def lora_path(folder: Path, step: int) -> Path:
    return folder / f"lora-step{step:06d}.safetensors"


def list_checkpoints(folder: str | Path, pattern: re.Pattern = STATE_RE) -> list[tuple[int, Path]]:
    """``(step, path)`` of every complete checkpoint in ``folder``, oldest first
    (``pattern=LEGACY_STATE_RE``: the pickled state files of earlier versions)."""
    d = Path(folder)
    if not d.is_dir():
        return []
    out = []
    for p in d.iterdir():
        m = pattern.match(p.name)
        if m:
            out.append((int(m.group(1)), p))
    return sorted(out)


def legacy_state_error(path: Path) -> InputError:
    """The refusal for a pickled state file of an earlier version (it is never opened)."""
    return InputError(
        f"cannot resume from {path}: it is a training state in the old pickle format (.pt), which is not opened "
        f"because loading a pickle can run any code it holds. Start the run afresh (drop --resume, or delete "
        f"{path.parent / 'state-step*.pt'}); the lora-step*.safetensors files beside it are complete LoRAs")


def _newest(folder: Path) -> Optional[Path]:
    found = list_checkpoints(folder)
    if found:
        return found[-1][1]
    legacy = list_checkpoints(folder, LEGACY_STATE_RE)
    if legacy:
        raise legacy_state_error(legacy[-1][1])
    return None


def find_resume(resume: str | Path, out_path: str | Path) -> Optional[Path]:
    """Resolve ``--resume``: a state file, a checkpoint folder (newest in it), or ``auto``
    (newest in the output's checkpoint folder, ``None`` when there is none). Old pickled states are refused."""
    if str(resume) == "auto":
        return _newest(checkpoint_dir(out_path))
    p = Path(resume)
    if p.is_dir():
        found = _newest(p)
        if found is None:
            raise InputError(f"no checkpoint (state-stepNNNNNN.safetensors) in {p}")
        return found
    if not p.is_file():
        raise InputError(f"checkpoint {p} not found; pass a state-stepNNNNNN.safetensors file, its folder, or 'auto'")
    if p.suffix.lower() in _PICKLE_SUFFIXES:
        raise legacy_state_error(p)
    return p


def save_checkpoint(folder: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write ``state`` for ``step`` atomically and drop all but the newest ``keep`` checkpoints."""
    folder.mkdir(parents=True, exist_ok=True)
    path = state_path(folder, step)
    save_state(dict(state, format=FORMAT, step=step), path)
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
    """Read a checkpoint written by :func:`save_checkpoint` (clear error for anything else; never unpickles)."""
    p = Path(path)
    if p.suffix.lower() in _PICKLE_SUFFIXES:
        raise legacy_state_error(p)
    state = load_state(p)  # safetensors + JSON: any other file fails to parse, nothing in it is executed
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise InputError(f"{path} is not a V-Bridge training checkpoint")
    return state


def config_differences(saved: dict[str, Any], current: dict[str, Any], free: tuple[str, ...]) -> list[str]:
    """Names of config fields that differ between a checkpoint and the resuming run (``free`` ignored)."""
    keys = (set(saved) | set(current)) - set(free)
    return sorted(k for k in keys if saved.get(k) != current.get(k))
