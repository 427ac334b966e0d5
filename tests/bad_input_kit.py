"""Shared tools of the bad-input battery (``tests/test_bad_inputs_*.py``).

- :func:`digest` hashes every file under a folder, so a test can show that nothing outside the
  intended outputs changed (compare before and after);
- :func:`run_cli` calls the real CLI ``main()`` in-process and returns the exit code and stderr;
- :func:`plant_pickle` writes a pickle that, if anything ever unpickled it, would create a marker
  file through ``os.system`` (the attack of issue 9 item 1).
"""
from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path
from typing import Sequence


def digest(root: Path, skip: Sequence[Path] = ()) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``root`` (folders in ``skip`` left out)."""
    root = Path(root)
    skip_r = [Path(s).resolve() for s in skip]
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not any(p.resolve().is_relative_to(s) for s in skip_r):
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def run_cli(argv: Sequence[str], capsys) -> tuple[int, str]:
    """``(exit code, stderr)`` of ``vbridge_core.cli.main(argv)``; asserts it printed no traceback."""
    from vbridge_core.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return rc, err


def assert_one_error(rc: int, err: str, *needles: str) -> None:
    """Exit code 2 and a single ``error:`` line holding every needle."""
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(lines) == 1, (rc, err)
    for n in needles:
        assert n in lines[0], (n, lines[0])


def write_train_files(root: Path, lora: bool = False) -> Path:
    """Two 32 px LQ/HQ pairs under ``root/pairs``, a prompt embedding ``root/emb.safetensors`` and, with
    ``lora``, a restoration LoRA ``root/r.safetensors``: what a cheap ``train`` command line needs."""
    import torch
    from safetensors.torch import save_file

    from vbridge_core.images import save_png
    from vbridge_core.tiny import tiny_prompt_embeds

    for i in range(2):
        save_png(torch.rand(3, 32, 32), root / "pairs" / "hq" / f"p{i}.png")
        save_png(torch.rand(3, 32, 32), root / "pairs" / "lq" / f"p{i}.png")
    save_file({"prompt_embeds": tiny_prompt_embeds()}, str(root / "emb.safetensors"))
    if lora:
        from tiny_files import random_lora

        random_lora(root / "r.safetensors", "restoration", 1)
    return root


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def plant_pickle(path: Path, marker: Path) -> Path:
    """A pickle at ``path`` whose unpickling would run ``touch marker`` (zip layout, as ``torch.save`` writes)."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": "vbridge-train-state-1", "step": 5, "evil": _Payload(marker)}, str(path))
    # make sure the planted file really would fire if it were unpickled the old way
    assert b"system" in path.read_bytes() or b"posix" in path.read_bytes()
    return path


def plant_raw_pickle(path: Path, marker: Path) -> Path:
    """The same payload as a plain pickle stream (any file name)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps({"format": "vbridge-train-state-2", "evil": _Payload(marker)}))
    return path
