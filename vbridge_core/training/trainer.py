"""Public entry points of V-Bridge LoRA training (kept stable for callers: demo, CLI, nodes).

The work is split by concern: :mod:`.config` (what a run is), :mod:`.dataset` (pairs, validation
split, crops), :mod:`.curriculum` (resolution stages), :mod:`.latent_cache` (VAE latents per
stage), :mod:`.flow_matching` (the objective), :mod:`.loop` (the training loop), :mod:`.checkpoint`
(resume), :mod:`.validation` and :mod:`.plots` (reports), :mod:`.drift` (drift-correction data).
"""
from __future__ import annotations

from .config import DEFAULT_TARGET_MODULES, TrainConfig, TrainProgress, TrainResult
from .curriculum import Stage, parse_stages
from .loop import TRAIN_ADAPTER, TrainingCancelled, train_lora

__all__ = ["DEFAULT_TARGET_MODULES", "TRAIN_ADAPTER", "Stage", "TrainConfig", "TrainProgress", "TrainResult",
           "TrainingCancelled", "parse_stages", "train_lora", "train_drift_lora"]


def train_drift_lora(*args, **kwargs):
    """See :func:`.drift.train_drift_lora` (imported lazily)."""
    from .drift import train_drift_lora as _impl

    return _impl(*args, **kwargs)
