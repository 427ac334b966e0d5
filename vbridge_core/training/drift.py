"""Drift-correction training (paper §3.4): a second LoRA that learns the short trajectory from the
restoration model's own output to HQ.

:func:`restored_pairs` runs the trained restoration LoRA over the training LQs and caches its
outputs (16-bit PNGs under ``cache_dir``, keyed by the LoRA file, the sampler settings and the
pair files, so a rerun or a resumed run does not restore again). :func:`train_drift_lora` then
trains on ``(restored, HQ)`` pairs with a short pseudo-video (default F = 5) and writes a file
whose metadata says ``role: drift_correction``, which ``VBridgePipeline.drift_correct`` uses.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..errors import InputError
from .config import TrainConfig, TrainProgress, TrainResult
from .dataset import TrainingPairs, _Entry

logger = logging.getLogger(__name__)

DEFAULT_RESTORE_SETTINGS: dict[str, Any] = dict(frames=5, steps=30, seed=0)


def _key(pairs: TrainingPairs, lora_path: Path, settings: dict[str, Any]) -> str:
    st = lora_path.stat()
    spec = dict(pairs=pairs.fingerprint(), lora=f"{lora_path.resolve()}|{st.st_size}|{st.st_mtime_ns}",
                settings=settings)
    return hashlib.sha1(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def restored_pairs(pipe, pairs: Any, restoration_lora: str | Path, cache_dir: str | Path,
                   restore_settings: Optional[dict[str, Any]] = None,
                   callback: Optional[Callable[[TrainProgress], None]] = None,
                   should_cancel: Optional[Callable[[], bool]] = None, is_main: bool = True,
                   barrier: Optional[Callable[[], None]] = None) -> TrainingPairs:
    """``(restoration output, HQ)`` pairs for every training pair, restored once and cached.

    With several processes only the main one restores (``is_main``); the others wait at ``barrier``
    and read the cache.
    """
    from ..images import save_png

    data = TrainingPairs.from_any(pairs)
    data.check()
    lora = Path(restoration_lora)
    if not lora.is_file():
        raise InputError(f"restoration LoRA {lora} not found: train one first (python -m vbridge_core train ...)")
    settings = dict(DEFAULT_RESTORE_SETTINGS, **(restore_settings or {}))
    folder = Path(cache_dir) / f"drift_inputs_{_key(data, lora, settings)}"
    outs = [folder / f"{i:04d}.png" for i in range(len(data))]
    if is_main and not all(p.is_file() for p in outs):
        pipe.load_lora(lora, role="restoration")
        todo = [i for i in range(len(data)) if not outs[i].is_file()]
        logger.info("restoring %d training LQs with %s for drift-correction data (%s)%s", len(todo), lora, settings,
                    f"; {len(data) - len(todo)} restored earlier" if len(todo) < len(data) else "")
        every = max(1, len(todo) // 10)  # about ten progress lines, like the sampling and training passes
        t0 = time.perf_counter()
        for k, i in enumerate(todo, 1):
            lq, _ = data.load(i)
            res = pipe.restore(lq, should_cancel=should_cancel, **settings)
            save_png(res.final[0], outs[i], bits=16)
            if k % every == 0 or k == len(todo):
                logger.info("drift data: restored %d/%d training LQs (%.1f s)", k, len(todo), time.perf_counter() - t0)
            if callback is not None:
                callback(TrainProgress("restoring", i + 1, len(data)))
    if barrier is not None:
        barrier()
    entries = []
    for i, e in enumerate(data.entries):
        if not outs[i].is_file():
            raise InputError(f"drift-correction input {outs[i]} is missing (was the restoring process stopped?)")
        entries.append(_Entry(e.name, e.task, outs[i], e.hq))
    return TrainingPairs(entries, root=data.root)


def train_drift_lora(pipe, pairs: Any, restoration_lora: str | Path, config: TrainConfig, out_path: str | Path, *,
                     prompt_embeds: Optional[torch.Tensor] = None, negative_prompt_embeds: Optional[torch.Tensor] = None,
                     restore_settings: Optional[dict[str, Any]] = None, cache_dir: Optional[str | Path] = None,
                     metadata: Optional[dict[str, Any]] = None, **train_kwargs: Any) -> TrainResult:
    """Train the drift-correction LoRA from the restoration LoRA's outputs; see the module docstring.

    The prompt embeddings default to the ones embedded in the restoration LoRA. ``config.role`` is
    set to ``drift_correction``; other ``train_kwargs`` go to :func:`.loop.train_lora`.
    """
    from ..lora import read_lora
    from .checkpoint import checkpoint_dir
    from .loop import make_accelerator, train_lora

    config.role = "drift_correction"
    config.validate()
    lf = read_lora(restoration_lora)
    if lf.role != "restoration":
        logger.warning("%s has role %r; using it as the restoration model anyway", restoration_lora, lf.role)
    pos = prompt_embeds if prompt_embeds is not None else lf.prompt_embeds
    neg = negative_prompt_embeds if negative_prompt_embeds is not None else lf.negative_prompt_embeds
    if pos is None:
        raise InputError(f"{restoration_lora} carries no prompt embedding: pass prompt_embeds (or --prompt with a "
                         "text encoder)")
    acc = train_kwargs.pop("accelerator", None) or make_accelerator(pipe.device)
    cache = Path(cache_dir) if cache_dir else checkpoint_dir(out_path) / "cache"
    drift_pairs = restored_pairs(pipe, pairs, restoration_lora, cache, restore_settings,
                                 callback=train_kwargs.get("callback") if acc.is_main_process else None,
                                 should_cancel=train_kwargs.get("should_cancel"), is_main=acc.is_main_process,
                                 barrier=acc.wait_for_everyone)
    meta = dict(restoration_lora=Path(restoration_lora).name,
                drift_restore_settings=dict(DEFAULT_RESTORE_SETTINGS, **(restore_settings or {})))
    for k in ("prompt", "negative_prompt"):
        if f"vbridge.{k}" in lf.metadata or k in lf.metadata:
            meta[k] = lf.metadata.get(f"vbridge.{k}", lf.metadata.get(k))
    meta.update(metadata or {})
    return train_lora(pipe, drift_pairs, config, out_path, prompt_embeds=pos, negative_prompt_embeds=neg,
                      metadata=meta, accelerator=acc, **train_kwargs)
