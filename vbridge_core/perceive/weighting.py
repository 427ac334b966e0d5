"""Quality-aware training (Perceive-IR's difficulty-adaptive loss, adapted to V-Bridge's few-shot LoRAs).

Perceive-IR weights its restoration loss by how hard a sample is, as judged by its quality
perceiver, so badly degraded inputs are not drowned out by easy ones. Here each training pair's LQ
image is perceived once before training; its difficulty is ``d = 1 - quality_score`` (0 for a
clean-looking LQ, towards 1 for a severe or mixed degradation), and its flow-matching loss is
multiplied by ``w = 1 + strength * d``, normalised so the weights average 1 over the training pairs
(the learning rate keeps its meaning). ``strength`` 0 turns it off; 1 lets the hardest pair count
up to about twice the easiest.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import torch

from ..errors import InputError

logger = logging.getLogger(__name__)


def pair_difficulties(pairs: Any, perceive_fn: Optional[Any] = None) -> torch.Tensor:
    """``1 - quality_score`` of every pair's LQ image, in pair order ``[N]``."""
    from .model import Perceiver

    fn = perceive_fn or Perceiver.builtin().perceive
    d = []
    for i in range(len(pairs)):
        lq, _ = pairs.load(i)
        d.append(1.0 - fn([lq], [pairs.entries[i].name])[0].quality_score)
    return torch.tensor(d, dtype=torch.float32)


def difficulty_weights(difficulties: torch.Tensor, strength: float) -> torch.Tensor:
    """``1 + strength * d`` normalised to mean 1."""
    if not (0.0 <= float(strength) <= 10.0):
        raise InputError(f"quality weighting strength must be in 0..10, got {strength}")
    w = 1.0 + float(strength) * difficulties.clamp(0.0, 1.0)
    return w / w.mean()


def pair_weights(pairs: Any, strength: float) -> torch.Tensor:
    """Per-pair loss weights for a training set (see the module docstring); logs the spread."""
    d = pair_difficulties(pairs)
    w = difficulty_weights(d, strength)
    logger.info("quality-aware loss (strength %g): %d pairs, difficulty %.2f..%.2f, weights %.2f..%.2f", strength,
                len(w), float(d.min()), float(d.max()), float(w.min()), float(w.max()))
    return w
