"""The stabilizers: fixed output EMA and the learned controlled / spatial nets (see the package docs)."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import InputError

STABILIZER_KINDS = ("ema", "controlled", "spatial")


class EMAStabilizer(nn.Module):
    """Fixed output EMA ``z~_t = b z_t + (1 - b) z~_{t-1}``; ``b`` in (0, 1], 1 = off. No parameters."""

    kind = "ema"
    use_inputs = False

    def __init__(self, strength: float) -> None:
        super().__init__()
        b = float(strength)
        if not (0.0 < b <= 1.0) or math.isnan(b):
            raise InputError(f"EMA strength b must be in (0, 1] (1 = no stabilization, smaller = stronger), got {b}")
        self.b = b
        self.channels: Optional[int] = None

    def step(self, z: torch.Tensor, prev: torch.Tensor, x: Optional[torch.Tensor] = None,
             x_prev: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One causal step on ``[N, C, H, W]``: mix the current output with the previous stabilized one."""
        return self.b * z + (1.0 - self.b) * prev

    def extra_repr(self) -> str:
        return f"b={self.b}"


@dataclass
class StabilizerConfig:
    """Architecture of a learned stabilizer (stored in its file's metadata)."""

    kind: str = "controlled"
    channels: int = 3
    hidden: int = 24
    kernel_size: int = 5
    use_inputs: bool = True
    beta_init: float = 0.5

    def validate(self) -> "StabilizerConfig":
        if self.kind not in ("controlled", "spatial"):
            raise InputError(f"learned stabilizer kind must be 'controlled' or 'spatial', got {self.kind!r}")
        if self.channels < 1 or self.hidden < 1:
            raise InputError(f"channels and hidden must be positive, got {self.channels}, {self.hidden}")
        if self.kind == "spatial" and (self.kernel_size < 1 or self.kernel_size % 2 == 0):
            raise InputError(f"spatial fusion kernel size must be odd and >= 1, got {self.kernel_size}")
        if not 0.0 < self.beta_init < 1.0:
            raise InputError(f"beta_init must be in (0, 1), got {self.beta_init}")
        return self


class LearnedStabilizer(nn.Module):
    """Controlled (per-pixel ``b_t``) or spatial (``b_t`` + per-pixel ``k x k`` fusion kernel) stabilizer.

    Features: ``z_t``, ``z~_{t-1}``, ``z_t - z~_{t-1}`` and, with ``use_inputs``, ``x_t``, ``x_{t-1}``,
    ``x_t - x_{t-1}``; three 3x3 convs (dilations 1, 2, 1: a 11x11 receptive field) and a 1x1 head.
    """

    def __init__(self, config: StabilizerConfig) -> None:
        super().__init__()
        self.config = config.validate()
        c, h = config.channels, config.hidden
        n_in = 3 * c * (2 if config.use_inputs else 1)
        self.k = config.kernel_size if config.kind == "spatial" else 1
        n_out = 1 + (self.k * self.k if config.kind == "spatial" else 0)
        self.body = nn.Sequential(
            nn.Conv2d(n_in, h, 3, padding=1), nn.SiLU(),
            nn.Conv2d(h, h, 3, padding=2, dilation=2), nn.SiLU(),
            nn.Conv2d(h, h, 3, padding=1), nn.SiLU(),
        )
        self.head = nn.Conv2d(h, n_out, 1)
        with torch.no_grad():
            self.head.weight.mul_(0.1)
            self.head.bias.zero_()
            self.head.bias[0] = math.log(config.beta_init / (1.0 - config.beta_init))
            if self.k > 1:  # start close to "previous pixel at the same place"
                self.head.bias[1 + (self.k * self.k) // 2] = 6.0

    kind = property(lambda self: self.config.kind)
    use_inputs = property(lambda self: self.config.use_inputs)
    channels = property(lambda self: self.config.channels)

    def predict(self, z: torch.Tensor, prev: torch.Tensor, x: Optional[torch.Tensor] = None,
                x_prev: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Per-pixel ``b_t`` ``[N, 1, H, W]`` and, for ``spatial``, kernel weights ``[N, k*k, H, W]``."""
        feats = [z, prev, z - prev]
        if self.config.use_inputs:
            if x is None or x_prev is None:
                raise InputError("this stabilizer was trained with the restorer's inputs (use_inputs): pass the "
                                 "LQ frames as inputs=... (restore_video does this itself)")
            feats += [x, x_prev, x - x_prev]
        out = self.head(self.body(torch.cat(feats, dim=1)))
        # clamped logit: b in [4.5e-5, 1 - 4.5e-5]; keeps saturated gradients out of the (slow) denormal range
        beta = torch.sigmoid(out[:, :1].clamp(-10.0, 10.0))
        weights = torch.softmax(out[:, 1:], dim=1) if self.k > 1 else None
        return beta, weights

    def fuse(self, prev: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Mix ``prev`` through a per-pixel ``k x k`` kernel (replicate-padded borders)."""
        n, c, h, w = prev.shape
        r = self.k // 2
        patches = F.unfold(F.pad(prev, (r, r, r, r), mode="replicate"), self.k)  # [N, C*k*k, H*W]
        patches = patches.view(n, c, self.k * self.k, h, w)
        return (patches * weights.unsqueeze(1)).sum(dim=2)

    def step(self, z: torch.Tensor, prev: torch.Tensor, x: Optional[torch.Tensor] = None,
             x_prev: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One causal step on ``[N, C, H, W]``; returns the stabilized current frame."""
        if z.shape[1] != self.config.channels:
            raise InputError(f"this stabilizer was built for {self.config.channels}-channel frames, got {z.shape[1]}")
        beta, weights = self.predict(z, prev, x, x_prev)
        if weights is not None:
            prev = self.fuse(prev, weights)
        return beta * z + (1.0 - beta) * prev


Stabilizer = Union[EMAStabilizer, LearnedStabilizer]
StabilizerSpec = Union[None, float, int, str, os.PathLike, Stabilizer]


def count_parameters(stabilizer: nn.Module) -> int:
    """Number of trainable parameters (0 for the EMA)."""
    return sum(p.numel() for p in stabilizer.parameters())


def as_stabilizer(spec: StabilizerSpec, device: Optional[torch.device | str] = None) -> Optional[Stabilizer]:
    """``None`` -> no stabilizer; a number -> EMA of that strength; a path -> :func:`load_stabilizer`."""
    if spec is None:
        return None
    if isinstance(spec, (EMAStabilizer, LearnedStabilizer)):
        return spec
    if isinstance(spec, bool):
        raise InputError("stabilizer must be None, an EMA strength in (0, 1], a stabilizer file or object")
    if isinstance(spec, (int, float)):
        return EMAStabilizer(float(spec))
    if isinstance(spec, (str, os.PathLike)):
        from .files import load_stabilizer

        return load_stabilizer(spec, device=device)
    raise InputError(f"cannot use {type(spec).__name__} as a stabilizer: give None, an EMA strength in (0, 1], "
                     "a .safetensors stabilizer file or a stabilizer object")
