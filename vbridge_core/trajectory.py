"""Pseudo-temporal trajectories: the frame-count rule, alpha schedules and LQ -> HQ blends.

V-Bridge treats restoration as a short video whose frame 0 is the degraded image (LQ) and whose
last frame is the clean one (HQ); frame t is ``(1 - a_t) * LQ + a_t * HQ`` with ``a_0 = 0`` and
``a_{F-1} = 1``. The Wan2.2 VAE compresses time by 4 with a causal first frame, so a pseudo-video
has ``F = 4k + 1`` pixel frames (``F >= 5``) and ``(F - 1) / 4 + 1`` latent frames.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .errors import InputError

#: Temporal compression of the Wan2.2 VAE.
TEMPORAL_STRIDE = 4
#: Alpha schedules understood by :func:`alpha_schedule` (besides an explicit list of numbers).
SCHEDULES = ("linear", "cosine")


def check_frames(frames: int) -> int:
    """Return ``frames`` if it follows the rule ``F = 4k + 1, F >= 5``, else raise :class:`InputError`."""
    if isinstance(frames, bool) or not isinstance(frames, int):
        raise InputError(f"frames must be an integer of the form 4k+1 (5, 9, 13, ...), got {frames!r}")
    if frames < 5 or (frames - 1) % TEMPORAL_STRIDE:
        lower = max(5, (frames - 1) // TEMPORAL_STRIDE * TEMPORAL_STRIDE + 1)
        hint = f"; the nearest valid values are {lower} and {lower + 4}" if frames >= 5 else "; use 5"
        raise InputError(f"frames must be 4k+1 and at least 5 (5, 9, 13, ...), got {frames}{hint}")
    from .limits import check_frame_limit

    return check_frame_limit(frames)


def latent_frames(frames: int) -> int:
    """Number of latent frames the VAE produces for ``frames`` pixel frames."""
    return (check_frames(frames) - 1) // TEMPORAL_STRIDE + 1


def alpha_schedule(schedule: str | Sequence[float], frames: int) -> list[float]:
    """Blend weights ``a_0 .. a_{F-1}`` from 0 (LQ) to 1 (HQ).

    ``schedule`` is ``"linear"`` (the paper: ``a_t = t / (F - 1)``), ``"cosine"`` (slow start and
    end: ``(1 - cos(pi t / (F - 1))) / 2``) or an explicit list of ``F`` non-decreasing numbers that
    starts at 0 and ends at 1.
    """
    check_frames(frames)
    n = frames - 1
    if isinstance(schedule, str):
        if schedule == "linear":
            return [t / n for t in range(frames)]
        if schedule == "cosine":
            return [(1.0 - math.cos(math.pi * t / n)) / 2.0 for t in range(frames)]
        raise InputError(f"unknown alpha schedule {schedule!r}; use one of {SCHEDULES} or a list of {frames} numbers")
    from .validate import finite_float

    alphas = [finite_float("alpha schedule value", a, min=0, max=1, hint="list one blend weight per frame, from 0 "
                           "(LQ) to 1 (HQ), e.g. 0,0.25,0.5,0.75,1") for a in schedule]
    if len(alphas) != frames:
        raise InputError(f"an explicit alpha schedule needs one value per frame: {frames} values, got {len(alphas)}")
    if abs(alphas[0]) > 1e-6 or abs(alphas[-1] - 1.0) > 1e-6:
        raise InputError(f"an alpha schedule must start at 0 (LQ) and end at 1 (HQ), got {alphas[0]} .. {alphas[-1]}")
    if any(b < a for a, b in zip(alphas, alphas[1:])):
        raise InputError(f"an alpha schedule must be non-decreasing, got {alphas}")
    return alphas


def parse_schedule(text: str) -> str | list[float]:
    """Parse a CLI/widget value: a schedule name or comma-separated numbers."""
    text = text.strip()
    if "," in text:
        try:
            return [float(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise InputError(f"cannot read alpha schedule {text!r}: expected numbers separated by commas") from None
    return text


def blend_pairs(lq: torch.Tensor, hq: torch.Tensor, alphas: Sequence[float]) -> torch.Tensor:
    """Build pseudo-videos from a batch of pairs.

    ``lq`` and ``hq`` are ``[B, C, H, W]`` of the same shape (any value range); returns
    ``[B, C, F, H, W]`` with frame t = ``(1 - a_t) * lq + a_t * hq``.
    """
    if lq.shape != hq.shape:
        raise InputError(f"LQ and HQ must have the same shape, got {tuple(lq.shape)} and {tuple(hq.shape)}")
    if lq.ndim != 4:
        raise InputError(f"expected image batches [B, C, H, W], got shape {tuple(lq.shape)}")
    a = torch.as_tensor(list(alphas), dtype=lq.dtype, device=lq.device).view(1, 1, -1, 1, 1)
    return (1 - a) * lq.unsqueeze(2) + a * hq.unsqueeze(2)
