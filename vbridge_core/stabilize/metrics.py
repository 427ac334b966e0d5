"""The temporal stability score and the accuracy + stability metrics of a sequence."""
from __future__ import annotations

from typing import Any, Union

import torch

from ..errors import InputError
from .frames import as_sequence as _as_sequence


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
    from ..metrics import psnr, ssim

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
