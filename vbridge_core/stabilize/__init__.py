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

from .clips import camera_motion_clip, simulate_restorer, synthesize_clips
from .files import FORMAT_VERSION, load_stabilizer, read_stabilizer_metadata, save_stabilizer, stabilizer_output_path
from .frames import as_sequence
from .metrics import sequence_metrics, temporal_stability
from .mixers import (STABILIZER_KINDS, EMAStabilizer, LearnedStabilizer, Stabilizer, StabilizerConfig, StabilizerSpec,
                     as_stabilizer, count_parameters)
from .streaming import StreamingStabilizer, stabilize_sequence
from .training import (ORACLE_BOUND, StabilizerClip, TrainStabilizerConfig, TrainStabilizerResult, collapse_bound,
                       stabilization_loss, train_stabilizer)
from .video import VideoResult, restore_video

__all__ = [
    "STABILIZER_KINDS", "FORMAT_VERSION", "ORACLE_BOUND", "collapse_bound", "EMAStabilizer", "LearnedStabilizer",
    "StreamingStabilizer", "as_stabilizer", "stabilize_sequence", "save_stabilizer", "load_stabilizer",
    "count_parameters", "temporal_stability", "sequence_metrics", "stabilization_loss", "StabilizerClip",
    "TrainStabilizerConfig", "TrainStabilizerResult", "train_stabilizer", "camera_motion_clip",
    "simulate_restorer", "synthesize_clips", "VideoResult", "restore_video",
    "StabilizerConfig", "Stabilizer", "StabilizerSpec", "read_stabilizer_metadata", "as_sequence",
    "stabilizer_output_path",
]
