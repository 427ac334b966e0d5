"""Causal temporal stabilizers for frame-by-frame video restoration.

A restorer run frame by frame flickers: every frame is restored well, but differently. Following
*Instant Video Models: Universal Adapters for Stabilizing Image-Based Networks* (Dutson, Labiosa,
Li, Gupta, NeurIPS 2025), a light *causal* stabilizer mixes the restorer's current output ``z_t``
with the previous stabilized output ``z~_{t-1}``; it sees only the current and past frames, so it
runs on a stream, and it never changes the restorer's weights.

Stabilizers (``kind``)
----------------------
* ``"ema"`` -- fixed EMA at the output: ``z~_t = b * z_t + (1 - b) * z~_{t-1}``, ``z~_1 = z_1``.
  ``b = 1`` is no stabilization; smaller ``b`` is stronger (and smears motion).
* ``"controlled"`` -- a small conv net (the paper's stabilization controller) predicts a
  per-pixel ``b_t`` in (0, 1) from the current and previous restorer inputs (``x_t``, ``x_{t-1}``,
  the LQ frames, when the stabilizer was built with ``use_inputs``) and outputs (``z_t``,
  ``z~_{t-1}``): ``z~_t = b_t * z_t + (1 - b_t) * z~_{t-1}``.
* ``"spatial"`` -- controlled + spatial fusion: the net also predicts a ``k x k`` kernel per
  pixel (softmax-normalised), and the previous stabilized frame is mixed through it,
  ``z~_t[p] = b_t[p] z_t[p] + (1 - b_t[p]) sum_k w_t[p, k] z~_{t-1}[p + k]``, so content that moved
  by up to ``k // 2`` pixels is matched rather than smeared.

The first frame is passed through (``z~_1 = z_1``). The learned stabilizers have a few tens of
thousands of parameters (:func:`count_parameters`; far below 1 M) and live in their own
safetensors file (:func:`save_stabilizer` / :func:`load_stabilizer`) with metadata (kind, format
version, kernel size, channels, training loss weights and the collapse bound).
They work on any ``[T, C, H, W]`` sequence: restored RGB frames (the default, ``C = 3``) or latents
(build a learned stabilizer with ``channels=48``; the EMA works on any channel count).

Loss and the collapse bound
---------------------------
Training minimises the paper's unified accuracy-stability(-robustness) loss over clips of
``tau`` frames (the restorer's inputs are the *corrupted* frames, so the accuracy term against the
clean targets is the robustness term):

    L = 1/(tau-1) sum_{t=2..tau} d(z~_t, y_t)  +  lambda * 1/(tau-1) sum_{t=2..tau} d(z~_t, z~_{t-1})

with ``d`` the mean absolute difference over pixels (a metric, which the bounds need). The first
output ``z~_1 = z_1`` is fixed. By the triangle inequality:

* **oracle bound** ``lambda < 1/2``: the perfect outputs ``z~_t = y_t`` minimise ``L``, so
  stabilizing never pays by giving up accuracy (each error ``d(z~_t, y_t)`` enters the two
  neighbouring stability terms at most once each);
* **collapse bound** ``lambda > tau - 1``: the constant sequence ``z~_t = z~_1`` minimises ``L``
  (``d(z~_1, y_t) <= sum_{s<=t} d(z~_s, z~_{s-1}) + d(z~_t, y_t)``), so training drives the
  stabilizer to freeze the first frame. :func:`collapse_bound` returns ``tau - 1``.

The stability weight must stay under the collapse bound; :func:`train_stabilizer` refuses a weight
above it unless ``allow_collapse=True`` (the tests use that to show the collapse). Between the two
bounds the minimiser depends on the data; the default ``lambda = 0.4`` sits under the oracle bound,
where the paper reports the well-behaved training (a real stabilizer cannot reach the oracle, so the
stability term still shapes it).

Temporal stability score
------------------------
:func:`temporal_stability` is the mean absolute difference between consecutive outputs
(``1/(T-1) sum_t mean|o_t - o_{t-1}|``, in image units 0..1; lower is more stable; the paper's
stability ``S`` is its negative). ``mask="static"`` restricts it to pixels where a ``reference``
sequence (the clean clip, or the LQ inputs) changes by less than ``threshold`` between the two
frames: there, any change of the output is flicker, not motion. Without a mask, real motion
counts too, so compare against the same score of the reference clip.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import InputError, ModelFileError

logger = logging.getLogger(__name__)

__all__ = [
    "STABILIZER_KINDS", "FORMAT_VERSION", "ORACLE_BOUND", "collapse_bound", "EMAStabilizer", "LearnedStabilizer",
    "StreamingStabilizer", "as_stabilizer", "stabilize_sequence", "save_stabilizer", "load_stabilizer",
    "count_parameters", "temporal_stability", "sequence_metrics", "stabilization_loss", "StabilizerClip",
    "TrainStabilizerConfig", "TrainStabilizerResult", "train_stabilizer", "camera_motion_clip",
    "simulate_restorer", "synthesize_clips", "VideoResult", "restore_video",
]

STABILIZER_KINDS = ("ema", "controlled", "spatial")
FORMAT_VERSION = 1
#: Under this stability weight the perfect outputs minimise the unified loss (paper's oracle bound).
ORACLE_BOUND = 0.5


def collapse_bound(clip_frames: int) -> float:
    """Stability weight above which a constant output minimises the loss on ``clip_frames``-frame clips.

    ``tau - 1``: the number of frames after the (fixed, passed-through) first one.
    """
    if clip_frames < 2:
        raise InputError(f"a training clip needs at least 2 frames, got {clip_frames}")
    return float(clip_frames - 1)


# ----------------------------------------------------------------------------------------- models
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
        return load_stabilizer(spec, device=device)
    raise InputError(f"cannot use {type(spec).__name__} as a stabilizer: give None, an EMA strength in (0, 1], "
                     "a .safetensors stabilizer file or a stabilizer object")


# -------------------------------------------------------------------------------------- streaming
def _as_sequence(frames: Any, what: str = "frames") -> torch.Tensor:
    """A ``[T, C, H, W]`` float tensor from a tensor or a list of ``[C, H, W]`` frames, with clear errors."""
    if isinstance(frames, torch.Tensor):
        if frames.ndim == 3:
            frames = frames.unsqueeze(0)
        if frames.ndim != 4:
            raise InputError(f"{what} must be [T, C, H, W] (or a list of [C, H, W]), got shape {tuple(frames.shape)}")
        seq = frames
    else:
        items = list(frames)
        if not items:
            raise InputError(f"no {what} given")
        for i, f in enumerate(items):
            if not isinstance(f, torch.Tensor) or f.ndim != 3:
                raise InputError(f"{what}[{i}] must be a [C, H, W] tensor, got "
                                 f"{tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__}")
        sizes = sorted({tuple(f.shape) for f in items})
        if len(sizes) > 1:
            raise InputError(f"all {what} of a video must have one size; got {sizes}. Resize or crop them first")
        seq = torch.stack(items)
    if seq.shape[0] == 0:
        raise InputError(f"no {what} given")
    if not seq.is_floating_point():
        raise InputError(f"{what} must be float tensors (0..1 for images), got {seq.dtype}")
    return seq


class StreamingStabilizer:
    """Causal stabilization state, for videos processed in chunks (``push`` frames as they come).

    Keeps the previous stabilized frame and the previous input; every output depends only on the
    frames pushed so far. ``reset()`` starts a new video.
    """

    def __init__(self, stabilizer: StabilizerSpec, device: Optional[torch.device | str] = None) -> None:
        self.stabilizer = as_stabilizer(stabilizer, device=device)
        self.device = torch.device(device) if device is not None else None
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


# ------------------------------------------------------------------------------------------- files
def save_stabilizer(stabilizer: Stabilizer, path: str | os.PathLike,
                    metadata: Optional[dict[str, Any]] = None) -> Path:
    """Write a stabilizer to one safetensors file (atomic) with JSON metadata.

    Metadata keys: ``format`` ("vbridge_stabilizer"), ``version``, ``kind``, ``config`` (channels,
    hidden, kernel size, use_inputs), ``parameters``, the stabilizer's own ``.metadata`` (set by
    :func:`train_stabilizer` and :func:`load_stabilizer`: training loss weights, clip length, collapse
    bound) and whatever ``metadata`` adds.
    """
    from .fileio import save_safetensors_atomic

    meta: dict[str, str] = {"format": "vbridge_stabilizer", "version": str(FORMAT_VERSION), "kind": stabilizer.kind}
    if isinstance(stabilizer, EMAStabilizer):
        tensors = {"ema.b": torch.tensor([stabilizer.b], dtype=torch.float32)}
        meta["config"] = json.dumps({"b": stabilizer.b})
    else:
        tensors = dict(stabilizer.state_dict())
        meta["config"] = json.dumps(asdict(stabilizer.config))
        meta["parameters"] = str(count_parameters(stabilizer))
    own = {k: v for k, v in (getattr(stabilizer, "metadata", None) or {}).items()
           if k not in ("format", "version", "kind", "config", "parameters")}  # e.g. training weights, bound
    for k, v in {**own, **(metadata or {})}.items():
        meta[k] = v if isinstance(v, str) else json.dumps(v)
    return save_safetensors_atomic(tensors, path, metadata=meta)


def read_stabilizer_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a stabilizer file, JSON values decoded."""
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise ModelFileError(f"stabilizer file {p} does not exist")
    try:
        with safe_open(str(p), framework="pt") as f:
            raw = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for broken files
        raise ModelFileError(f"cannot read stabilizer file {p}: {e}") from None
    out: dict[str, Any] = {}
    for k, v in raw.items():
        try:
            out[k] = json.loads(v)
        except (TypeError, ValueError):
            out[k] = v
    return out


def load_stabilizer(path: str | os.PathLike, device: Optional[torch.device | str] = None) -> Stabilizer:
    """Load a stabilizer written by :func:`save_stabilizer` (eval mode, on ``device``)."""
    from safetensors.torch import load_file

    meta = read_stabilizer_metadata(path)
    if meta.get("format") != "vbridge_stabilizer":
        raise ModelFileError(f"{path} is not a V-Bridge stabilizer file (no 'format: vbridge_stabilizer' metadata); "
                             "a LoRA or model file cannot be used as a stabilizer")
    if int(meta.get("version", 0)) > FORMAT_VERSION:
        raise ModelFileError(f"{path} has stabilizer format version {meta.get('version')}; this code reads up to "
                             f"{FORMAT_VERSION}: update ComfyUI-VBridge")
    tensors = load_file(str(path))
    kind = meta.get("kind")
    if kind == "ema":
        st: Stabilizer = EMAStabilizer(float(tensors["ema.b"][0]))
    elif kind in ("controlled", "spatial"):
        cfg = StabilizerConfig(**meta["config"])
        st = LearnedStabilizer(cfg)
        try:
            st.load_state_dict(tensors)
        except RuntimeError as e:
            raise ModelFileError(f"{path}: weights do not fit its own config {meta['config']}: {e}") from None
    else:
        raise ModelFileError(f"{path}: unknown stabilizer kind {kind!r}; expected one of {STABILIZER_KINDS}")
    st.metadata = meta  # type: ignore[attr-defined]
    return st.to(device).eval() if device is not None else st.eval()


# ----------------------------------------------------------------------------------------- metrics
def temporal_stability(frames: Any, mask: Union[None, str, torch.Tensor] = None, reference: Any = None,
                       threshold: float = 2.0 / 255.0) -> float:
    """Mean absolute difference between consecutive frames (0..1 units; lower = more stable).

    ``mask=None``: over all pixels (real motion counts too). ``mask="static"``: only pixels where
    ``reference`` (the clean clip or the inputs, ``[T, C, H, W]``) changes by less than
    ``threshold`` (max over channels) between the two frames; there any output change is flicker.
    A bool tensor ``[T-1, 1 or C, H, W]`` selects pixels directly.
    """
    seq = _as_sequence(frames).to(torch.float64)
    if seq.shape[0] < 2:
        raise InputError(f"temporal stability needs at least 2 frames, got {seq.shape[0]}")
    diff = (seq[1:] - seq[:-1]).abs()
    if mask is None:
        return float(diff.mean())
    if isinstance(mask, str):
        if mask != "static":
            raise InputError(f"mask must be None, 'static' or a tensor, got {mask!r}")
        if reference is None:
            raise InputError("mask='static' needs reference= (the clean clip or the input frames)")
        ref = _as_sequence(reference, "reference").to(torch.float64)
        if ref.shape[0] != seq.shape[0] or ref.shape[-2:] != seq.shape[-2:]:
            raise InputError(f"reference {tuple(ref.shape)} does not match frames {tuple(seq.shape)}")
        m = (ref[1:] - ref[:-1]).abs().amax(dim=1, keepdim=True) < threshold
    else:
        m = mask.to(torch.bool)
    m = m.expand_as(diff)
    n = int(m.sum())
    if n == 0:
        raise InputError("the stability mask selects no pixels (nothing static at this threshold)")
    return float(diff[m].sum() / n)


def sequence_metrics(frames: Any, references: Any, mask: Union[None, str, torch.Tensor] = None,
                     threshold: float = 2.0 / 255.0) -> dict[str, Any]:
    """Both sides of the trade-off: PSNR/SSIM per frame vs ``references`` and the stability score.

    Returns ``psnr`` / ``ssim`` (means), ``psnr_per_frame`` / ``ssim_per_frame`` (lists),
    ``stability`` (:func:`temporal_stability` of the frames, with ``mask``; ``reference`` for the
    static mask is ``references``) and ``reference_stability`` (the same score of the references:
    the part that is real motion).
    """
    from .metrics import psnr, ssim

    seq = _as_sequence(frames)
    ref = _as_sequence(references, "references")
    if seq.shape != ref.shape:
        raise InputError(f"frames {tuple(seq.shape)} and references {tuple(ref.shape)} differ in shape")
    p = psnr(seq.clamp(0, 1), ref).tolist()
    s = ssim(seq.clamp(0, 1), ref).tolist() if min(seq.shape[-2:]) >= 11 else [float("nan")] * seq.shape[0]
    out: dict[str, Any] = dict(psnr=sum(p) / len(p), ssim=sum(s) / len(s), psnr_per_frame=p, ssim_per_frame=s)
    if seq.shape[0] >= 2:
        out["stability"] = temporal_stability(seq, mask=mask, reference=ref, threshold=threshold)
        out["reference_stability"] = temporal_stability(ref, mask=mask, reference=ref, threshold=threshold)
    return out


# ---------------------------------------------------------------------------------------- training
def _l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).abs().mean()


def stabilization_loss(outputs: torch.Tensor, targets: torch.Tensor, stability_weight: float
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unified accuracy-stability loss on ``[B, T, C, H, W]`` (frame 0 is the fixed passed-through one).

    Returns ``(loss, accuracy_term, stability_term)``; see the module docstring for the bounds.
    """
    acc = _l1(outputs[:, 1:], targets[:, 1:])
    stab = _l1(outputs[:, 1:], outputs[:, :-1])
    return acc + stability_weight * stab, acc, stab


@dataclass
class StabilizerClip:
    """One training clip: restorer outputs, clean targets and (optionally) the restorer's inputs, ``[T, C, H, W]``."""

    restored: torch.Tensor
    target: torch.Tensor
    inputs: Optional[torch.Tensor] = None
    name: str = ""

    def check(self) -> "StabilizerClip":
        r = _as_sequence(self.restored, "restored frames")
        y = _as_sequence(self.target, "target frames")
        if r.shape != y.shape:
            raise InputError(f"clip {self.name or ''}: restored {tuple(r.shape)} and target {tuple(y.shape)} differ")
        if r.shape[0] < 2:
            raise InputError(f"clip {self.name or ''}: a training clip needs at least 2 frames, got {r.shape[0]}")
        x = None
        if self.inputs is not None:
            x = _as_sequence(self.inputs, "input frames")
            if x.shape[0] != r.shape[0] or x.shape[-2:] != r.shape[-2:]:
                raise InputError(f"clip {self.name}: inputs {tuple(x.shape)} do not match restored {tuple(r.shape)}")
        return StabilizerClip(r.float(), y.float(), None if x is None else x.float(), self.name)


@dataclass
class TrainStabilizerConfig:
    """Training settings. ``clip_frames`` = tau (window length); the collapse bound is ``tau - 1``."""

    kind: str = "controlled"
    steps: int = 300
    learning_rate: float = 3e-3
    stability_weight: float = 0.4
    clip_frames: int = 5
    crop: int = 64
    batch_size: int = 4
    hidden: int = 24
    kernel_size: int = 5
    use_inputs: Optional[bool] = None  # None: use them when every clip has inputs
    seed: int = 0
    allow_collapse: bool = False
    device: Optional[str] = None


@dataclass
class TrainStabilizerResult:
    """The trained stabilizer, its loss curve and where it was written (if anywhere)."""

    stabilizer: LearnedStabilizer
    losses: list[float]
    path: Optional[Path] = None
    info: dict[str, Any] = field(default_factory=dict)


def _windows(clips: Sequence[StabilizerClip], cfg: TrainStabilizerConfig, g: torch.Generator
             ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """A batch of random (clip, time window, crop) samples: ``[B, tau, C, h, w]`` each."""
    zs, ys, xs = [], [], []
    for _ in range(cfg.batch_size):
        c = clips[int(torch.randint(len(clips), (1,), generator=g))]
        t_len, _, h, w = c.restored.shape
        tau = min(cfg.clip_frames, t_len)
        t0 = int(torch.randint(t_len - tau + 1, (1,), generator=g))
        ch, cw = min(cfg.crop, h), min(cfg.crop, w)
        i = int(torch.randint(h - ch + 1, (1,), generator=g))
        j = int(torch.randint(w - cw + 1, (1,), generator=g))
        sl = (slice(t0, t0 + tau), slice(None), slice(i, i + ch), slice(j, j + cw))
        zs.append(c.restored[sl])
        ys.append(c.target[sl])
        if c.inputs is not None:
            xs.append(c.inputs[sl])
    return torch.stack(zs), torch.stack(ys), (torch.stack(xs) if len(xs) == len(zs) else None)


def _unroll(st: LearnedStabilizer, z: torch.Tensor, x: Optional[torch.Tensor]) -> torch.Tensor:
    """Run the stabilizer causally over ``[B, T, C, H, W]`` (differentiable)."""
    outs = [z[:, 0]]
    for t in range(1, z.shape[1]):
        outs.append(st.step(z[:, t], outs[-1], x[:, t] if x is not None else None,
                            x[:, t - 1] if x is not None else None))
    return torch.stack(outs, dim=1)


def train_stabilizer(clips: Sequence[StabilizerClip | tuple], kind: str = "controlled",
                     config: Optional[TrainStabilizerConfig] = None, out: Optional[str | os.PathLike] = None,
                     callback: Optional[Callable[[int, float], Any]] = None,
                     metadata: Optional[dict[str, Any]] = None, **overrides: Any) -> TrainStabilizerResult:
    """Train a controlled or spatial stabilizer on clips of (restored, target[, inputs]) frames.

    Only the stabilizer's parameters are optimised (the restorer's outputs are data). ``config``
    fields may be overridden by keyword (``steps=...``). Refuses a stability weight above the
    collapse bound ``clip_frames - 1`` unless ``allow_collapse=True``. Writes ``out`` if given.
    """
    cfg = config or TrainStabilizerConfig()
    cfg = TrainStabilizerConfig(**{**asdict(cfg), "kind": kind, **overrides})
    if cfg.kind not in ("controlled", "spatial"):
        raise InputError(f"only 'controlled' and 'spatial' stabilizers are trained (the EMA has no parameters); "
                         f"got {cfg.kind!r}")
    checked = [(c if isinstance(c, StabilizerClip) else StabilizerClip(*c)).check() for c in clips]
    if not checked:
        raise InputError("no training clips given")
    tau = min(cfg.clip_frames, min(c.restored.shape[0] for c in checked))
    bound = collapse_bound(tau)
    if cfg.stability_weight < 0:
        raise InputError(f"stability weight must be >= 0, got {cfg.stability_weight}")
    if cfg.stability_weight >= bound and not cfg.allow_collapse:
        raise InputError(f"stability weight {cfg.stability_weight} is at or above the collapse bound {bound:g} "
                         f"(clip_frames - 1 for {tau}-frame windows): training would freeze the first frame. Use a "
                         f"weight under {ORACLE_BOUND} (the oracle bound) or at least under {bound:g}")
    if cfg.stability_weight > ORACLE_BOUND:
        logger.warning("stability weight %.3g is above the oracle bound %.1f: accuracy may be traded for stability",
                       cfg.stability_weight, ORACLE_BOUND)
    chans = {c.restored.shape[1] for c in checked}
    if len(chans) != 1:
        raise InputError(f"training clips have different channel counts {sorted(chans)}")
    has_inputs = all(c.inputs is not None for c in checked)
    use_inputs = has_inputs if cfg.use_inputs is None else bool(cfg.use_inputs)
    if use_inputs and not has_inputs:
        raise InputError("use_inputs=True needs the restorer's input frames in every clip")
    if not use_inputs:
        checked = [StabilizerClip(c.restored, c.target, None, c.name) for c in checked]
    dev = torch.device(cfg.device) if cfg.device else torch.device("cpu")
    torch.manual_seed(cfg.seed)
    st = LearnedStabilizer(StabilizerConfig(kind=cfg.kind, channels=chans.pop(), hidden=cfg.hidden,
                                            kernel_size=cfg.kernel_size, use_inputs=use_inputs)).to(dev)
    opt = torch.optim.Adam(st.parameters(), lr=cfg.learning_rate)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, cfg.steps), eta_min=cfg.learning_rate * 0.05)
    g = torch.Generator().manual_seed(cfg.seed)
    losses: list[float] = []
    t0 = time.perf_counter()
    st.train()
    for step in range(1, cfg.steps + 1):
        z, y, x = _windows(checked, cfg, g)
        z, y = z.to(dev), y.to(dev)
        x = x.to(dev) if x is not None else None
        outs = _unroll(st, z, x)
        loss, acc, stab = stabilization_loss(outs, y, cfg.stability_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if callback is not None:
            callback(step, losses[-1])
    st.eval()
    info = dict(kind=cfg.kind, steps=cfg.steps, seconds=round(time.perf_counter() - t0, 3),
                parameters=count_parameters(st), final_loss=losses[-1] if losses else None)
    meta = {"training": {**asdict(cfg), "use_inputs": use_inputs, "clip_frames": tau, "clips": len(checked), "loss": "L1 accuracy + "
                         "stability_weight * L1(z~_t, z~_{t-1}), frames 2..tau"},
            "stability_weight": cfg.stability_weight, "collapse_bound": bound, "oracle_bound": ORACLE_BOUND,
            **(metadata or {})}
    st.metadata = {k: v for k, v in meta.items()}  # type: ignore[attr-defined]
    path = save_stabilizer(st, out, metadata=meta) if out is not None else None
    logger.info("trained %s stabilizer (%d parameters, %d steps, %.1f s), final loss %.4f", cfg.kind, info["parameters"],
                cfg.steps, info["seconds"], info["final_loss"] or float("nan"))
    return TrainStabilizerResult(st, losses, path, info)


# --------------------------------------------------------------------------------- synthetic clips
def camera_motion_clip(photo: torch.Tensor, n_frames: int, seed: int = 0, size: int | tuple[int, int] = 64,
                       max_shift: float = 0.06, max_zoom: float = 0.08) -> torch.Tensor:
    """A clip of ``n_frames`` views of ``photo`` ``[3, H, W]`` under a smooth random camera motion.

    Subpixel translation (up to ``max_shift`` of the view per clip) and zoom (up to ``max_zoom``),
    interpolated smoothly (cosine ease between random start and end poses plus a small sinusoidal
    wobble) and applied with an affine ``grid_sample`` (bilinear). The view stays inside the photo.
    Returns ``[T, 3, h, w]``.
    """
    if photo.ndim != 3:
        raise InputError(f"photo must be [3, H, W], got {tuple(photo.shape)}")
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    g = torch.Generator().manual_seed(seed)
    # pre-filter to about the output resolution (grid_sample does not antialias)
    base_zoom = 1.0 + max_zoom + 2 * max_shift
    ph, pw = photo.shape[-2:]
    scale = min(ph / (h * base_zoom), pw / (w * base_zoom))
    if scale > 1.0:
        photo = F.interpolate(photo.unsqueeze(0).float(), size=(max(h, round(ph / scale)), max(w, round(pw / scale))),
                              mode="bilinear", antialias=True, align_corners=False)[0]
    rnd = lambda n: torch.rand(n, generator=g) * 2 - 1  # noqa: E731
    start, end = rnd(3), rnd(3)  # (tx, ty, zoom) in -1..1
    phase, freq = torch.rand(2, generator=g) * 2 * math.pi, 0.5 + torch.rand(1, generator=g)
    ph, pw = photo.shape[-2:]
    ratio = (w / h) / (pw / ph)  # view width / height fractions that keep the photo's aspect
    fx, fy = (ratio, 1.0) if ratio < 1.0 else (1.0, 1.0 / ratio)
    thetas = []
    for t in range(n_frames):
        u = t / max(1, n_frames - 1)
        e = 0.5 - 0.5 * math.cos(math.pi * u)
        p = start + (end - start) * e
        wob = 0.15 * torch.sin(2 * math.pi * freq * u + phase)
        s = 1.0 / (1.0 + max_zoom * (0.5 + 0.5 * float(p[2])) + max_shift)  # view size (fraction of the photo)
        sx, sy = s * fx, s * fy
        tx = float(p[0] + wob[0]) / 1.15 * (1.0 - sx)
        ty = float(p[1] + wob[1]) / 1.15 * (1.0 - sy)
        thetas.append(torch.tensor([[sx, 0.0, tx], [0.0, sy, ty]]))
    theta = torch.stack(thetas)
    grid = F.affine_grid(theta, (n_frames, 3, h, w), align_corners=False)
    src = photo.unsqueeze(0).float().expand(n_frames, -1, -1, -1)
    return F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=False).clamp(0, 1)


def _gauss_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    if sigma <= 0:
        return x
    r = max(1, int(math.ceil(2.5 * sigma)))
    k = torch.exp(-(torch.arange(-r, r + 1, dtype=x.dtype) ** 2) / (2 * sigma ** 2))
    k = (k / k.sum()).to(x.device)
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def simulate_restorer(clean: torch.Tensor, seed: int = 0, amplitude: float = 0.05, blur: float = 1.0,
                      tone: float = 0.01) -> torch.Tensor:
    """A flickering stand-in for a frame-by-frame restorer: ``clean`` + an error re-drawn every frame.

    The error is Gaussian noise blurred by ``blur`` (spatially correlated like hallucinated detail),
    rescaled to std ``amplitude``, plus a per-frame colour offset of std ``tone``. ``[T, 3, H, W]``.
    """
    g = torch.Generator().manual_seed(seed)
    n = torch.randn(clean.shape, generator=g, dtype=torch.float32)
    n = _gauss_blur(n, blur)
    n = n / n.std().clamp_min(1e-8) * amplitude
    off = torch.randn(clean.shape[0], clean.shape[1], 1, 1, generator=g) * tone
    return (clean.float() + n + off).clamp(0, 1)


def _degrade(frames: torch.Tensor, degradation: Any, seed: int, params: dict[str, Any]) -> torch.Tensor:
    if degradation is None or degradation == "none":
        g = torch.Generator().manual_seed(seed)
        return (frames + 0.05 * torch.randn(frames.shape, generator=g)).clamp(0, 1)
    if callable(degradation):
        return degradation(frames, seed)
    from .degrade import degrade_sequence  # written alongside; re-draws the degradation per frame

    return degrade_sequence(frames, degradation, seed=seed, redraw_per_frame=True, **params)


def synthesize_clips(photos: Iterable[torch.Tensor], n_frames: int = 8, seed: int = 0, degradation: Any = None,
                     restorer: Optional[Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]] = None,
                     size: int | tuple[int, int] = 64, clips_per_photo: int = 1, degradation_params: Optional[dict] = None,
                     max_shift: float = 0.06, max_zoom: float = 0.08, restorer_amplitude: float = 0.05
                     ) -> list[StabilizerClip]:
    """Training clips from still photos: smooth random camera motion, degradation re-drawn per frame.

    For each photo (and each of ``clips_per_photo``): the clean clip (:func:`camera_motion_clip`),
    its degraded version (``degradation``: a name from :mod:`vbridge_core.degrade`, a callable
    ``(frames, seed) -> frames``, or None for Gaussian noise of std 0.05), and the restorer outputs:
    ``restorer(lq, clean, seed)`` (e.g. a wrapper around :func:`restore_video`), or by default
    :func:`simulate_restorer` (clean + a per-frame redrawn error), which needs no model.
    """
    photos = list(photos)
    if not photos:
        raise InputError("synthesize_clips needs at least one photo")
    if n_frames < 2:
        raise InputError(f"a clip needs at least 2 frames, got {n_frames}")
    clips = []
    k = 0
    for i, photo in enumerate(photos):
        for j in range(clips_per_photo):
            s = seed * 1000003 + k
            k += 1
            clean = camera_motion_clip(photo, n_frames, seed=s, size=size, max_shift=max_shift, max_zoom=max_zoom)
            lq = _degrade(clean, degradation, s + 1, degradation_params or {}).float().clamp(0, 1)
            if restorer is None:
                restored = simulate_restorer(clean, seed=s + 2, amplitude=restorer_amplitude)
            else:
                restored = restorer(lq, clean, s + 2)
            clips.append(StabilizerClip(restored, clean, lq, name=f"photo{i}_clip{j}").check())
    return clips


# ---------------------------------------------------------------------------------- video restore
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
