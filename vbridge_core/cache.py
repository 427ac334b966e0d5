"""Step caching of the DiT for the 50-step modes, through diffusers' own hooks.

Two techniques, both skipping whole DiT passes (all blocks but the first) when the model's
residual barely changes from the previous step:

* ``fbc`` / ``fbc:THRESHOLD``: diffusers' First Block Cache (``FirstBlockCacheConfig``,
  ``apply_first_block_cache``): a step reuses the cached residual of the remaining blocks when the
  first block's residual changed by less than ``THRESHOLD`` (relative mean absolute difference;
  diffusers default 0.05). Needs no calibration.
* ``mag:FILE.json`` / ``mag:FILE.json:THRESHOLD``: diffusers' MagCache (``MagCacheConfig``,
  ``apply_mag_cache``) with the per-step magnitude ratios measured for this model, LoRA and step
  count by ``python -m vbridge_core cache-calibrate`` (see :mod:`vbridge_core.cache_cli`).

Caching changes the output slightly; ``cache-calibrate`` reports that deviation (PSNR and max
difference against the uncached restore) together with how many DiT passes were skipped. Every
sampling call runs with fresh cache state (the hooks are attached for the call and removed after),
so one image's cache never leaks into the next.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from .errors import InputError

logger = logging.getLogger(__name__)

CACHE_KINDS = ("none", "fbc", "mag")
DEFAULT_FBC_THRESHOLD = 0.05
DEFAULT_MAG_THRESHOLD = 0.06
#: Format tag of the MagCache calibration files ``cache-calibrate`` writes.
MAG_FILE_FORMAT = "vbridge-magcache-1"


@dataclass
class CacheSpec:
    """A parsed ``--cache`` value: ``kind`` ``fbc`` or ``mag``, its ``threshold``, and for MagCache the
    calibrated per-step ``mag_ratios`` (``calibrate=True`` measures them instead of skipping)."""

    kind: str
    threshold: float
    mag_ratios: Optional[list[float]] = None
    calibrate: bool = False
    source: Optional[str] = None

    def describe(self) -> str:
        if self.kind == "mag":
            return "mag (calibrating)" if self.calibrate else f"mag:{self.source}:{self.threshold:g}"
        return f"{self.kind}:{self.threshold:g}"


@dataclass
class CacheState:
    """Counts of one cached sampling call: DiT passes the cache let through vs. skipped."""

    spec: CacheSpec
    computed: int = 0
    skipped: int = 0
    calibration: list[float] = field(default_factory=list)

    def report(self) -> dict[str, Any]:
        total = self.computed + self.skipped
        return dict(method=self.spec.describe(), dit_passes=total, skipped=self.skipped,
                    skipped_fraction=round(self.skipped / total, 4) if total else 0.0)


def _parse_threshold(text: str, what: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise InputError(f"cache threshold {text!r} for {what} is not a number") from None
    if not (v > 0 and math.isfinite(v)):
        raise InputError(f"cache threshold for {what} must be a positive number, got {text!r}")
    return v


def read_mag_ratios(path: str | Path) -> list[float]:
    """The ``mag_ratios`` list of a calibration file written by ``cache-calibrate``."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"MagCache calibration file {p} not found: make one with "
                         "`python -m vbridge_core cache-calibrate IN --lora FILE --out DIR`")
    try:
        data = json.loads(p.read_text())
        ratios = [float(x) for x in data["mag_ratios"]]
    except (ValueError, KeyError, TypeError):
        raise InputError(f"{p} is not a MagCache calibration file (expected JSON with a 'mag_ratios' list, "
                         "as written by `python -m vbridge_core cache-calibrate`)") from None
    if not ratios or not all(math.isfinite(r) and r > 0 for r in ratios):
        raise InputError(f"{p}: mag_ratios must be a non-empty list of positive numbers")
    return ratios


def parse_cache(cache: Any) -> Optional[CacheSpec]:
    """``None``/``"none"`` -> no caching; ``"fbc[:T]"``; ``"mag:FILE[:T]"``; a :class:`CacheSpec` as is."""
    if cache is None or isinstance(cache, CacheSpec):
        return cache
    if not isinstance(cache, str):
        raise InputError(f"cache must be 'none', 'fbc[:threshold]' or 'mag:FILE.json[:threshold]', got {cache!r}")
    text = cache.strip()
    if text in ("", "none", "off"):
        return None
    kind, _, rest = text.partition(":")
    if kind == "fbc":
        return CacheSpec("fbc", _parse_threshold(rest, "fbc") if rest else DEFAULT_FBC_THRESHOLD)
    if kind == "mag":
        if not rest:
            raise InputError("mag caching needs its calibration file: --cache mag:FILE.json (write it with "
                             "`python -m vbridge_core cache-calibrate`)")
        path, thr = rest, DEFAULT_MAG_THRESHOLD
        head, sep, tail = rest.rpartition(":")
        if sep and head and not Path(rest).exists():
            try:
                thr = _parse_threshold(tail, "mag")
                path = head
            except InputError:
                pass
        return CacheSpec("mag", thr, mag_ratios=read_mag_ratios(path), source=path)
    raise InputError(f"unknown cache {cache!r}: use none, fbc, fbc:0.05 or mag:FILE.json")


def _blocks(transformer: torch.nn.Module) -> torch.nn.ModuleList:
    blocks = getattr(transformer, "blocks", None)
    if not isinstance(blocks, torch.nn.ModuleList) or len(blocks) < 2:
        raise InputError("step caching needs a DiT with at least 2 transformer blocks (diffusers WanTransformer3DModel)")
    return blocks


@contextlib.contextmanager
def dit_cache(transformer: torch.nn.Module, cache: Any, num_steps: Optional[int] = None,
              ) -> Iterator[Optional[CacheState]]:
    """Attach the cache ``cache`` (see :func:`parse_cache`) to ``transformer`` for one sampling call.

    Yields a :class:`CacheState` that counts computed and skipped DiT passes (``None`` without a
    cache). The hooks are removed afterwards, so the next call starts clean. ``num_steps`` is the
    number of sampling steps (MagCache interpolates its ratios to it).
    """
    spec = parse_cache(cache)
    if spec is None:
        yield None
        return
    from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig

    if not hasattr(transformer, "enable_cache"):
        raise InputError(f"step caching needs a diffusers model with enable_cache(); got {type(transformer).__name__}")
    if getattr(transformer, "is_cache_enabled", False):
        transformer.disable_cache()
    blocks = _blocks(transformer)
    state = CacheState(spec)
    if spec.kind == "fbc":
        config = FirstBlockCacheConfig(threshold=spec.threshold)
    else:
        steps = int(num_steps or len(spec.mag_ratios or []) or 1)
        # calibrating: one step more than run, so diffusers' end-of-run reset never clears the ratios before
        # they are read below (it resets when its step counter reaches num_inference_steps)
        config = MagCacheConfig(threshold=spec.threshold, num_inference_steps=steps + 1 if spec.calibrate else steps,
                                mag_ratios=None if spec.calibrate else list(spec.mag_ratios or []),
                                calibrate=spec.calibrate, retention_ratio=0.2)
    # a DiT pass that is not skipped runs the last block's feed-forward: count those
    counter = blocks[-1].ffn.register_forward_hook(lambda *_: setattr(state, "computed", state.computed + 1))
    first = blocks[0].register_forward_hook(lambda *_: setattr(state, "skipped", state.skipped + 1))
    transformer.enable_cache(config)
    try:
        yield state
        if spec.calibrate:
            state.calibration = _read_calibration(blocks[-1])
    finally:
        transformer.disable_cache()
        counter.remove()
        first.remove()
        # ``skipped`` counted every pass (the first block always runs); make it the skipped ones
        state.skipped = max(0, state.skipped - state.computed)
    logger.info("DiT cache %s: %d of %d passes skipped", spec.describe(), state.skipped, state.skipped + state.computed)


def _read_calibration(tail_block: torch.nn.Module) -> list[float]:
    """The magnitude ratios diffusers' MagCache measured in calibration mode (its tail-block hook state;
    the longest series when several cache contexts ran, e.g. batched guided steps)."""
    from diffusers.hooks import HookRegistry
    from diffusers.hooks.mag_cache import _MAG_CACHE_BLOCK_HOOK

    hook = HookRegistry.check_if_exists_or_initialize(tail_block).get_hook(_MAG_CACHE_BLOCK_HOOK)
    states = getattr(getattr(hook, "state_manager", None), "_state_cache", None)
    if not states:
        raise RuntimeError("diffusers' MagCache hook kept no calibration state (diffusers internals changed?)")
    series = max((list(st.calibration_ratios) for st in states.values()), key=len)
    return [float(r) for r in series]


def cache_context(transformer: torch.nn.Module, name: str, step: int):
    """diffusers' ``cache_context`` for one DiT call when a cache is attached (a no-op otherwise): the
    conditional, unconditional and batched passes keep separate cache states."""
    if getattr(transformer, "is_cache_enabled", False):
        return transformer.cache_context(name)
    return contextlib.nullcontext()
