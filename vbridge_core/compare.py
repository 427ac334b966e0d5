"""Comparing restored images with references: a metrics table and a side-by-side strip.

Used by the ``ImageQualityMetrics`` node and usable from Python. Inputs are ``[B, 3, H, W]`` float
tensors in 0..1; a reference (or degraded) batch of 1 is compared with every restored image.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .errors import InputError
from .metrics import format_metrics_table, psnr, ssim

CHANNELS = ("rgb", "y")


def _size(x: torch.Tensor) -> str:
    return f"{x.shape[-1]}x{x.shape[-2]}"


def match_batches(restored: torch.Tensor, other: torch.Tensor, what: str) -> torch.Tensor:
    """``other`` with the batch size of ``restored`` (a batch of 1 is repeated); sizes must match.

    Raises :class:`InputError` naming both batch sizes or both image sizes (width x height).
    """
    if restored.ndim != 4 or other.ndim != 4:
        raise InputError(f"expected image batches [B, 3, H, W], got {tuple(restored.shape)} and {tuple(other.shape)}")
    if restored.shape[-2:] != other.shape[-2:]:
        raise InputError(f"restored images are {_size(restored)} but the {what} images are {_size(other)} "
                         "(width x height): compare images of the same size (resize or crop one of them first)")
    b, bo = restored.shape[0], other.shape[0]
    if bo == b:
        return other
    if bo == 1:
        return other.expand(b, -1, -1, -1)
    raise InputError(f"{b} restored images but {bo} {what} images: give one {what} image per restored image, "
                     "or a single one for all")


def side_by_side(columns: Sequence[torch.Tensor], gap: int = 4) -> torch.Tensor:
    """Concatenate same-size ``[B, 3, H, W]`` batches left to right with white ``gap``-pixel columns."""
    if not columns:
        raise InputError("nothing to put side by side")
    b, c, h, _ = columns[0].shape
    parts: list[torch.Tensor] = []
    for i, col in enumerate(columns):
        if i:
            parts.append(torch.ones(b, c, h, gap, dtype=col.dtype, device=col.device))
        parts.append(col)
    return torch.cat(parts, dim=-1)


def quality_report(restored: torch.Tensor, reference: torch.Tensor, degraded: Optional[torch.Tensor] = None,
                   psnr_channel: str = "rgb", ssim_channel: str = "y",
                   names: Optional[Sequence[str]] = None) -> tuple[str, torch.Tensor]:
    """PSNR/SSIM of each restored image against its reference, as a text table, plus a comparison.

    Returns ``(table, comparison)``: the table has one row per image and a mean row (and the
    degraded input's scores when ``degraded`` is given, for reference); ``comparison`` is
    ``[B, 3, H, W']`` with ``degraded | restored | reference`` (or ``restored | reference``).
    """
    for ch, what in ((psnr_channel, "psnr_channel"), (ssim_channel, "ssim_channel")):
        if ch not in CHANNELS:
            raise InputError(f"unknown {what} {ch!r}; use one of {CHANNELS}")
    ref = match_batches(restored, reference, "reference")
    deg = match_batches(restored, degraded, "degraded") if degraded is not None else None
    n = restored.shape[0]
    names = list(names) if names is not None else [f"image {i + 1}" for i in range(n)]
    title = f"PSNR ({psnr_channel.upper() if psnr_channel == 'y' else 'RGB'}), " \
            f"SSIM ({ssim_channel.upper() if ssim_channel == 'y' else 'RGB'}), data range 1"
    table = format_metrics_table(names, psnr(restored, ref, channel=psnr_channel),
                                 ssim(restored, ref, channel=ssim_channel), title="restored vs reference: " + title)
    if deg is not None:
        table += "\n\n" + format_metrics_table(names, psnr(deg, ref, channel=psnr_channel),
                                               ssim(deg, ref, channel=ssim_channel), title="degraded vs reference")
    cols = ([deg] if deg is not None else []) + [restored, ref]
    return table, side_by_side([c.to(torch.float32) for c in cols])
