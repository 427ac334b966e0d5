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
                  callback: Optional[Callable[[int, int], Any]] = None,
                  step_callback: Optional[Callable[[int, int, Any], Any]] = None,
                  device: Optional[torch.device | str] = None, trajectory_frames: Optional[int] = None,
                  **restore_kwargs: Any) -> VideoResult:
    """Restore a video frame by frame with ``pipe.restore`` and stream the outputs through a stabilizer.

    ``frames``: ``[T, 3, H, W]`` (or a list) in 0..1, one size. Every frame uses the **same seed**
    (``pipe.restore(..., same_seed=True)``): with fixed initial noise the sampler's randomness is
    identical from frame to frame, so the outputs differ only where the inputs differ -- that alone
    removes much of the flicker that per-frame seeds (``seed + i``) would add. Frames are restored
    in chunks of ``batch_frames``, each chunk **one batched DiT call per step**
    (``batch_size=batch_frames``): same results as one call per frame, more memory, less time. The
    stabilizer state carries across chunks.

    ``stabilizer``: None, an EMA strength, a stabilizer file or object; learned stabilizers run on
    ``device`` (default: the pipeline's device; an object given is moved there) and, when trained
    with inputs, get the LQ frames. ``callback(done_frames, total_frames)`` is called after each
    chunk; ``step_callback(done, total, info)`` after every sampler step, counting frame-steps
    (``total = T * steps``; ``info`` is the sampler's step info). ``trajectory_frames`` is the
    pseudo-video length of each restore (``pipe.restore(frames=...)``; ``frames`` here is the
    video). Other keywords (``steps``, ``should_cancel`` ...) go to ``pipe.restore``.
    """
    seq = _as_sequence(frames)
    if seq.shape[1] != 3:
        raise InputError(f"video frames must be RGB [T, 3, H, W], got {tuple(seq.shape)}")
    if isinstance(batch_frames, bool) or not isinstance(batch_frames, int) or batch_frames < 1:
        raise InputError(f"batch_frames must be a positive integer, got {batch_frames!r}")
    for k in ("seed", "same_seed", "batch_size", "callback"):
        if k in restore_kwargs:
            raise InputError(f"restore_video sets {k} itself: pass seed= / batch_frames= / step_callback= instead")
    if trajectory_frames is not None:
        restore_kwargs["frames"] = int(trajectory_frames)
    dev = device if device is not None else getattr(pipe, "device", None)
    stream = StreamingStabilizer(stabilizer, device=dev)
    use_inputs = bool(getattr(stream.stabilizer, "use_inputs", False))
    n = seq.shape[0]
    steps = int(restore_kwargs.get("steps", 50))
    raw_out, stab_out = [], []
    t0 = time.perf_counter()
    restore_s = 0.0
    calls = 0
    frame_seconds: list[float] = []
    for idx in _chunks(n, batch_frames):
        ta = time.perf_counter()
        chunk_cb = None
        if step_callback is not None:
            def chunk_cb(info: Any, _base: int = idx.start * steps) -> None:
                done = int(info.extra.get("overall_step", info.step)) if hasattr(info, "extra") else int(info.step)
                step_callback(_base + done, n * steps, info)
        res = pipe.restore(seq[idx.start:idx.stop], seed=seed, same_seed=True, batch_size=batch_frames,
                           callback=chunk_cb, **restore_kwargs)
        calls += 1
        restored = torch.stack(list(res.final))
        dt = time.perf_counter() - ta
        restore_s += dt
        frame_seconds += [round(dt / len(idx), 4)] * len(idx)  # a batched call's time, shared by its frames
        raw_out.append(restored)
        stab_out.append(stream.push(restored, seq[idx.start:idx.stop] if use_inputs else None))
        if callback is not None:
            callback(idx.stop, n)
    info = dict(frames=n, seed=seed, batch_frames=batch_frames, restore_calls=calls,
                stabilizer=getattr(stream.stabilizer, "kind", None), restore_seconds=round(restore_s, 3),
                stabilizer_seconds=round(stream.seconds, 4), seconds=round(time.perf_counter() - t0, 3),
                stabilizer_device=str(stream.device) if stream.device is not None else None,
                frame_seconds=frame_seconds)
    if isinstance(stream.stabilizer, EMAStabilizer):
        info["ema_strength"] = stream.stabilizer.b
    return VideoResult(torch.cat(stab_out), torch.cat(raw_out), info)
