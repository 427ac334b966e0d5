"""Training pairs: where they come from, the held-out validation split, and per-stage crops.

A :class:`TrainingPairs` wraps any of: a :class:`~vbridge_core.pairs.PairSet` (folders ``lq/`` +
``hq/``, optionally one level of task subfolders mixed into one multi-task set), a folder path
(scanned with :func:`~vbridge_core.pairs.scan_pairs`), or a list of in-memory ``(lq, hq)``
``[3, H, W]`` tensors. Folder images are loaded on demand (50 pairs of 4K images do not fit in RAM
as float tensors); :meth:`TrainingPairs.check` loads each once up front so an unreadable file or a
pair of two different sizes fails before any model work, with the file named.

Augmentation follows the paper's curriculum (§3.3): in ``resize`` mode each pair is scaled so its
short side equals the stage resolution (the stage-dependent downsampling) before a random square
crop; ``crop`` mode crops at native scale. A horizontal flip is drawn per view. LQ and HQ always
get the same crop and flip.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from ..errors import InputError, VBridgeError
from ..seeds import seeded_generator

logger = logging.getLogger(__name__)


@dataclass
class _Entry:
    name: str
    task: str
    lq: Union[Path, torch.Tensor]
    hq: Union[Path, torch.Tensor]


class TrainingPairs:
    """An indexable set of LQ/HQ pairs with names and tasks; images load on demand."""

    def __init__(self, entries: Sequence[_Entry], root: Optional[Path] = None) -> None:
        self.entries = list(entries)
        self.root = root

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_any(cls, source: Any) -> "TrainingPairs":
        """Build from a PairSet, a folder path, a TrainingPairs, or a list of ``(lq, hq)`` tensors
        (optionally ``(name, lq, hq)``)."""
        from ..pairs import PairSet, scan_pairs

        if isinstance(source, TrainingPairs):
            return source
        if isinstance(source, (str, os.PathLike)):
            source = scan_pairs(source)
        if isinstance(source, PairSet):
            return cls([_Entry(i.name, i.task, i.lq_path, i.hq_path) for i in source.items], root=source.root)
        entries = []
        for i, item in enumerate(source or []):
            if len(item) == 3:
                name, lq, hq = item
            elif len(item) == 2:
                (lq, hq), name = item, f"pair_{i:04d}"
            else:
                raise InputError(f"pair {i}: expected (lq, hq) or (name, lq, hq), got {len(item)} items")
            for what, t in (("LQ", lq), ("HQ", hq)):
                if not isinstance(t, torch.Tensor) or t.ndim != 3 or t.shape[0] != 3:
                    raise InputError(f"pair {name}: {what} must be a [3, H, W] tensor in 0..1, got "
                                     f"{type(t).__name__} {tuple(getattr(t, 'shape', ()))}")
            entries.append(_Entry(str(name), "pairs", lq, hq))
        if not entries:
            raise InputError("no training pairs: give at least one LQ/HQ pair (folders lq/ and hq/ with matching "
                             "file names, or task subfolders each holding lq/ and hq/)")
        return cls(entries)

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self.entries)

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    @property
    def tasks(self) -> list[str]:
        return list(dict.fromkeys(e.task for e in self.entries))

    def subset(self, indices: Sequence[int]) -> "TrainingPairs":
        return TrainingPairs([self.entries[i] for i in indices], root=self.root)

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lq, hq)`` float ``[3, H, W]`` of pair ``index``; raises :class:`InputError` naming the pair."""
        from ..images import load_image

        e = self.entries[index]
        try:
            lq = e.lq if isinstance(e.lq, torch.Tensor) else load_image(e.lq)
            hq = e.hq if isinstance(e.hq, torch.Tensor) else load_image(e.hq)
        except VBridgeError as err:
            raise InputError(f"training pair {e.name}: {err}") from None
        if lq.shape != hq.shape:
            raise InputError(f"training pair {e.name}: LQ is {lq.shape[-1]}x{lq.shape[-2]} but HQ is "
                             f"{hq.shape[-1]}x{hq.shape[-2]} (width x height); both images of a pair must have the "
                             "same size")
        return lq.float().clamp(0, 1), hq.float().clamp(0, 1)

    def check(self) -> tuple[int, int]:
        """Load every pair once; return the smallest ``(height, width)`` seen. Fails on the first bad pair."""
        if not self.entries:
            raise InputError("no training pairs")
        min_h = min_w = math.inf
        for i in range(len(self)):
            lq, _ = self.load(i)
            min_h, min_w = min(min_h, lq.shape[-2]), min(min_w, lq.shape[-1])
        return int(min_h), int(min_w)

    def fingerprint(self) -> str:
        """A hash of the pair contents' identity (paths+mtimes, or tensor bytes) for cache keys."""
        import hashlib

        h = hashlib.sha1()
        for e in self.entries:
            for x in (e.lq, e.hq):
                if isinstance(x, torch.Tensor):
                    h.update(x.detach().cpu().float().contiguous().numpy().tobytes())
                else:
                    st = Path(x).stat()
                    h.update(f"{x}|{st.st_size}|{st.st_mtime_ns}".encode())
        return h.hexdigest()[:16]


def split_validation(pairs: TrainingPairs, fraction: float, seed: int) -> tuple[TrainingPairs, TrainingPairs]:
    """Hold out ``floor(fraction * n)`` pairs of every task (n = that task's pair count) for validation.

    Stratified so every task is validated; deterministic in ``seed``. With ``fraction > 0`` a task
    of at least 3 pairs always gives at least one (3 shipped sample pairs at 10% would otherwise
    leave no validation at all); a task of 1-2 pairs gives none, and the training set is never emptied.
    """
    g = seeded_generator(seed, 7919)
    val: list[int] = []
    for task in pairs.tasks:
        idx = [i for i, e in enumerate(pairs.entries) if e.task == task]
        k = int(math.floor(fraction * len(idx) + 1e-9))
        if fraction > 0 and k == 0 and len(idx) >= 3:
            k = 1
        k = min(k, len(idx) - 1)
        if k > 0:
            perm = torch.randperm(len(idx), generator=g).tolist()
            val += [idx[j] for j in perm[:k]]
    val_set = set(val)
    train = [i for i in range(len(pairs)) if i not in val_set]
    return pairs.subset(train), pairs.subset(sorted(val))


def scale_for_stage(lq: torch.Tensor, hq: torch.Tensor, resolution: int, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize both images of a pair so a ``resolution`` square crop fits (see the module docstring)."""
    from ..images import resize_image

    h, w = lq.shape[-2:]
    short = min(h, w)
    if mode == "resize" or short < resolution:
        if short < resolution:
            logger.debug("pair of %dx%d is upscaled to fit %d px crops", w, h, resolution)
        s = resolution / short
        size = (max(resolution, round(h * s)), max(resolution, round(w * s)))
        lq, hq = resize_image(lq, size), resize_image(hq, size)
    return lq, hq


def random_view(lq: torch.Tensor, hq: torch.Tensor, resolution: int, mode: str, flip: bool,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One augmented square ``resolution`` crop of a pair (same crop and flip for LQ and HQ)."""
    lq, hq = scale_for_stage(lq, hq, resolution, mode)
    h, w = lq.shape[-2:]
    top = int(torch.randint(h - resolution + 1, (1,), generator=generator))
    left = int(torch.randint(w - resolution + 1, (1,), generator=generator))
    do_flip = bool(torch.rand(1, generator=generator) < 0.5) and flip
    lq = lq[..., top:top + resolution, left:left + resolution]
    hq = hq[..., top:top + resolution, left:left + resolution]
    if do_flip:
        lq, hq = lq.flip(-1), hq.flip(-1)
    return lq.contiguous(), hq.contiguous()


def center_view(lq: torch.Tensor, hq: torch.Tensor, resolution: int, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The deterministic centre ``resolution`` crop used for validation."""
    lq, hq = scale_for_stage(lq, hq, resolution, mode)
    h, w = lq.shape[-2:]
    top, left = (h - resolution) // 2, (w - resolution) // 2
    return (lq[..., top:top + resolution, left:left + resolution].contiguous(),
            hq[..., top:top + resolution, left:left + resolution].contiguous())
