"""Restore a video frame by frame with the V-Bridge pipeline and stream it through a stabilizer."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch

from ..errors import InputError
from .frames import as_sequence as _as_sequence
from .mixers import EMAStabilizer, StabilizerSpec
from .streaming import StreamingStabilizer


@dataclass
class VideoResult:
    """``frames``: stabilized outputs ``[T, 3, H, W]``; ``raw``: the restorer's per-frame outputs; ``info``."""

    frames: torch.Tensor
    raw: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)


def _chunks(n: int, size: int) -> Iterator[range]:
    for a in range(0, n, size):
        yield range(a, min(n, a + size))


def restore_video(pipe: Any, frames: Any, stabilizer: StabilizerSpec = None, batch_frames: int = 8, seed: int = 0,
                  callback: Optional[Callable[[int, int], Any]] = None, **restore_kwargs: Any) -> VideoResult:
    """Restore a video frame by frame with ``pipe.restore`` and stream the outputs through a stabilizer.

    ``frames``: ``[T, 3, H, W]`` (or a list) in 0..1, one size. Frames are restored in chunks of
    ``batch_frames`` (bounded memory; the stabilizer state carries across chunks). Every frame uses
    the **same seed**: with fixed initial noise the sampler's randomness is identical from frame to
    frame, so the outputs differ only where the inputs differ -- that alone removes much of the
    flicker that per-frame seeds (``seed + i``) would add. ``stabilizer``: None, an EMA strength,
    a stabilizer file or object; learned stabilizers trained with inputs get the LQ frames.
    ``callback(done, total)`` is called after each chunk. Other keywords go to ``pipe.restore``.
    """
    seq = _as_sequence(frames)
    if seq.shape[1] != 3:
        raise InputError(f"video frames must be RGB [T, 3, H, W], got {tuple(seq.shape)}")
    if isinstance(batch_frames, bool) or not isinstance(batch_frames, int) or batch_frames < 1:
        raise InputError(f"batch_frames must be a positive integer, got {batch_frames!r}")
    if "seed" in restore_kwargs:
        raise InputError("pass seed= to restore_video itself")
    stream = StreamingStabilizer(stabilizer)
    use_inputs = bool(getattr(stream.stabilizer, "use_inputs", False))
    raw_out, stab_out = [], []
    t0 = time.perf_counter()
    restore_s = 0.0
    for idx in _chunks(seq.shape[0], batch_frames):
        ta = time.perf_counter()
        # one call per frame: pipe.restore gives image i of a call seed + i, and we want one seed for all
        restored = torch.stack([pipe.restore([seq[i]], seed=seed, **restore_kwargs).final[0] for i in idx])
        restore_s += time.perf_counter() - ta
        raw_out.append(restored)
        stab_out.append(stream.push(restored, seq[idx.start:idx.stop] if use_inputs else None))
        if callback is not None:
            callback(idx.stop, seq.shape[0])
    info = dict(frames=seq.shape[0], seed=seed, batch_frames=batch_frames,
                stabilizer=getattr(stream.stabilizer, "kind", None), restore_seconds=round(restore_s, 3),
                stabilizer_seconds=round(stream.seconds, 4), seconds=round(time.perf_counter() - t0, 3))
    if isinstance(stream.stabilizer, EMAStabilizer):
        info["ema_strength"] = stream.stabilizer.b
    return VideoResult(torch.cat(stab_out), torch.cat(raw_out), info)
