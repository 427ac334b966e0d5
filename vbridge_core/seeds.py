"""Seeds are taken modulo 2^64, everywhere (CLI, Python API, nodes).

ComfyUI's seed widgets go up to 2^64 - 1 and image ``i`` of a run uses ``seed + i``, so a seed near
the top would overflow :meth:`torch.Generator.manual_seed` (which takes 0 .. 2^64 - 1). Wrapping
around instead keeps every seed valid and every result reproducible: ``seed`` and ``seed + 2^64``
(and ``-1`` and ``2^64 - 1``) give the same output.
"""
from __future__ import annotations

import torch

from .errors import InputError

#: Seeds live in 0 .. SEED_MODULUS - 1.
SEED_MODULUS = 2 ** 64


def wrap_seed(seed: int, offset: int = 0) -> int:
    """``(seed + offset) mod 2^64``; refuses values that are not whole numbers."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        try:
            if isinstance(seed, bool) or float(seed) != int(seed):
                raise ValueError
            seed = int(seed)
        except (TypeError, ValueError, OverflowError):
            raise InputError(f"seed must be a whole number, got {seed!r}") from None
    return (seed + int(offset)) % SEED_MODULUS


def seeded_generator(seed: int, offset: int = 0, device: str | torch.device = "cpu") -> torch.Generator:
    """A :class:`torch.Generator` seeded with :func:`wrap_seed` ``(seed, offset)``."""
    return torch.Generator(device).manual_seed(wrap_seed(seed, offset))
