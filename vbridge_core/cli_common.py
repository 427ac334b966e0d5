"""Helpers shared by the CLI subcommands: input collection and dtype names."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

from .errors import InputError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def collect_inputs(inputs: Sequence[str]) -> list[Path]:
    """Expand files and folders (non-recursive) into a sorted list of image paths."""
    paths: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_EXTS)
            if not found:
                raise InputError(f"folder {p} holds no images ({', '.join(IMAGE_EXTS)})")
            paths.extend(found)
        elif p.is_file():
            paths.append(p)
        else:
            raise InputError(f"input {p} does not exist: give image files or folders of images")
    stems = [p.stem for p in paths]
    dup = sorted({s for s in stems if stems.count(s) > 1})
    if dup:
        raise InputError(f"several inputs share the name(s) {dup}: outputs would overwrite each other; rename them")
    return paths


def parse_dtype(name: Optional[str]):
    import torch

    if name is None:
        return None
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    return table[name]




class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` only where the help text does not already say it and X is meaningful."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        # identity, not ==: a default of 0 (seeds, warmup steps) is meaningful and equals False
        if "default" in text or action.default is None or action.default is False \
                or action.default == argparse.SUPPRESS or action.required:
            return text
        return text + " (default: %(default)s)"
