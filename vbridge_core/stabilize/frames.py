"""Frame-sequence checks shared by the stabilizer modules."""
from __future__ import annotations

from typing import Any

import torch

from ..errors import InputError


def as_sequence(frames: Any, what: str = "frames") -> torch.Tensor:
    """A ``[T, C, H, W]`` float tensor from a tensor or a list of ``[C, H, W]`` frames, with clear errors."""
    if isinstance(frames, torch.Tensor):
        if frames.ndim == 3:
            frames = frames.unsqueeze(0)
        if frames.ndim != 4:
            raise InputError(f"{what} must be [T, C, H, W] (or a list of [C, H, W]), got shape {tuple(frames.shape)}")
        seq = frames
    else:
        items = list(frames)
        if not items:
            raise InputError(f"no {what} given")
        for i, f in enumerate(items):
            if not isinstance(f, torch.Tensor) or f.ndim != 3:
                raise InputError(f"{what}[{i}] must be a [C, H, W] tensor, got "
                                 f"{tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__}")
        sizes = sorted({tuple(f.shape) for f in items})
        if len(sizes) > 1:
            raise InputError(f"all {what} of a video must have one size; got {sizes}. Resize or crop them first")
        seq = torch.stack(items)
    if seq.shape[0] == 0:
        raise InputError(f"no {what} given")
    if not seq.is_floating_point():
        raise InputError(f"{what} must be float tensors (0..1 for images), got {seq.dtype}")
    return seq


_as_sequence = as_sequence  # the name used before the package split
