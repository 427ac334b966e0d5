"""Causal streaming state (:class:`StreamingStabilizer`) and whole-sequence stabilization."""
from __future__ import annotations

import time
from typing import Any, Optional

import torch

from ..errors import InputError
from .frames import as_sequence as _as_sequence
from .mixers import StabilizerSpec, as_stabilizer, count_parameters


class StreamingStabilizer:
    """Causal stabilization state, for videos processed in chunks (``push`` frames as they come).

    Keeps the previous stabilized frame and the previous input; every output depends only on the
    frames pushed so far. ``reset()`` starts a new video.
    """

    def __init__(self, stabilizer: StabilizerSpec, device: Optional[torch.device | str] = None) -> None:
        """``device``: where a learned stabilizer runs (it is moved there; frames come back on their own device)."""
        self.stabilizer = as_stabilizer(stabilizer, device=device)
        self.device = torch.device(device) if device is not None else None
        if self.device is not None and self.stabilizer is not None and count_parameters(self.stabilizer):
            self.stabilizer.to(self.device)
        self.reset()

    def reset(self) -> None:
        """Forget the history: the next pushed frame is passed through."""
        self.prev: Optional[torch.Tensor] = None
        self.prev_input: Optional[torch.Tensor] = None
        self.frames_seen = 0
        self.seconds = 0.0

    @torch.no_grad()
    def push(self, frames: Any, inputs: Any = None) -> torch.Tensor:
        """Stabilize the next frames ``[N, C, H, W]`` (or one ``[C, H, W]``); returns them stabilized, same shape."""
        single = isinstance(frames, torch.Tensor) and frames.ndim == 3
        z = _as_sequence(frames)
        x = _as_sequence(inputs, "inputs") if inputs is not None else None
        if x is not None and (x.shape[0] != z.shape[0] or x.shape[-2:] != z.shape[-2:]):
            raise InputError(f"inputs {tuple(x.shape)} do not match frames {tuple(z.shape)}: give one input per "
                             "frame, of the same size")
        ref = self.prev if self.prev is not None else None
        if ref is not None and ref.shape != z.shape[1:]:
            raise InputError(f"frame size changed within a video: {tuple(ref.shape)} then {tuple(z.shape[1:])}; "
                             "all frames of a video must have one size (call reset() for a new video)")
        st = self.stabilizer
        if st is None:
            self.frames_seen += z.shape[0]
            self.prev = z[-1].clone()
            return z[0] if single else z
        t0 = time.perf_counter()
        dev = self.device or (next(st.parameters()).device if count_parameters(st) else z.device)
        dtype = next(st.parameters()).dtype if count_parameters(st) else z.dtype
        outs = []
        for i in range(z.shape[0]):
            zi = z[i:i + 1].to(dev, dtype)
            xi = x[i:i + 1].to(dev, dtype) if x is not None else None
            if self.prev is None:
                out = zi
            else:
                out = st.step(zi, self.prev.unsqueeze(0).to(dev, dtype), xi,
                              self.prev_input.unsqueeze(0).to(dev, dtype) if self.prev_input is not None else None)
            self.prev = out[0]
            self.prev_input = xi[0] if xi is not None else None
            outs.append(out[0].to(z.device, z.dtype))
            self.frames_seen += 1
        self.seconds += time.perf_counter() - t0
        res = torch.stack(outs)
        return res[0] if single else res


def stabilize_sequence(frames: Any, stabilizer: StabilizerSpec, inputs: Any = None) -> torch.Tensor:
    """Causally stabilize a whole sequence ``[T, C, H, W]`` (or list of ``[C, H, W]``); returns ``[T, C, H, W]``.

    ``stabilizer``: None (returns the frames), an EMA strength ``b`` in (0, 1], a stabilizer file or
    object. ``inputs``: the restorer's input frames (LQ), needed by stabilizers trained with them.
    Output ``t`` depends only on frames (and inputs) ``0..t``.
    """
    seq = _as_sequence(frames)
    if seq.shape[0] < 2:
        raise InputError(f"stabilizing needs a video of at least 2 frames, got {seq.shape[0]}")
    return StreamingStabilizer(stabilizer).push(seq, inputs)
