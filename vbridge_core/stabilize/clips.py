"""Synthetic training clips: smooth camera motion over still photos, per-frame degradation, simulated restorer."""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn.functional as F

from ..errors import InputError
from ..seeds import wrap_seed
from .training import StabilizerClip


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
    from ..degrade import degrade_sequence  # written alongside; re-draws the degradation per frame

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
    from ..validate import finite_float

    restorer_amplitude = finite_float("restorer error", restorer_amplitude, min=0, max=1,
                                      hint="the simulated restorer's per-frame error std in 0..1 image units (default 0.05)")
    photos = list(photos)
    if not photos:
        raise InputError("synthesize_clips needs at least one photo")
    if n_frames < 2:
        raise InputError(f"a clip needs at least 2 frames, got {n_frames}")
    clips = []
    k = 0
    for i, photo in enumerate(photos):
        for j in range(clips_per_photo):
            s = wrap_seed(int(seed) * 1000003, k)
            k += 1
            clean = camera_motion_clip(photo, n_frames, seed=s, size=size, max_shift=max_shift, max_zoom=max_zoom)
            lq = _degrade(clean, degradation, wrap_seed(s, 1), degradation_params or {}).float().clamp(0, 1)
            if restorer is None:
                restored = simulate_restorer(clean, seed=wrap_seed(s, 2), amplitude=restorer_amplitude)
            else:
                restored = restorer(lq, clean, wrap_seed(s, 2))
            clips.append(StabilizerClip(restored, clean, lq, name=f"photo{i}_clip{j}").check())
    return clips
