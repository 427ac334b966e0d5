"""Pictures of a training run, drawn with PIL only (no matplotlib dependency).

:func:`loss_curve_image` draws the per-step loss (light) with its moving average (dark), the
skipped steps as red ticks and the curriculum stage boundaries as dashed lines; it returns a
``[3, H, W]`` tensor in 0..1 (what the TrainLoRA node shows as an IMAGE) and can be written as a
PNG. :func:`validation_grid` lays validation pairs out as rows of LQ | before | after | HQ.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], []
    for v in values:
        if math.isfinite(v):
            acc.append(v)
        acc = acc[-window:]
        out.append(sum(acc) / len(acc) if acc else float("nan"))
    return out


def loss_curve_image(losses: Sequence[float], stage_starts: Sequence[int] = (), width: int = 640,
                     height: int = 320, title: str = "training loss") -> torch.Tensor:
    """Draw the loss curve; see the module docstring. Works for 0 or 1 losses (an empty plot)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), (255, 255, 255))
    d = ImageDraw.Draw(img)
    left, right, top, bottom = 56, width - 12, 24, height - 28
    d.rectangle([left, top, right, bottom], outline=(0, 0, 0))
    vals = [float(v) for v in losses]
    finite = [v for v in vals if math.isfinite(v)]
    n = len(vals)
    d.text((left, 6), f"{title} ({n} steps)", fill=(0, 0, 0))
    if finite:
        lo, hi = min(finite), max(finite)
        if hi - lo < 1e-12:
            lo, hi = lo - 0.5 * abs(lo or 1), hi + 0.5 * abs(hi or 1)

        def xy(i: int, v: float) -> tuple[float, float]:
            x = left + (right - left) * (i / max(1, n - 1))
            y = bottom - (bottom - top) * ((v - lo) / (hi - lo))
            return x, y

        for s in stage_starts:
            if 0 < s < n:
                x = xy(s, lo)[0]
                for y0 in range(top, bottom, 8):
                    d.line([(x, y0), (x, min(bottom, y0 + 4))], fill=(120, 120, 200))
        raw = [xy(i, v) for i, v in enumerate(vals) if math.isfinite(v)]
        if len(raw) > 1:
            d.line(raw, fill=(170, 190, 230), width=1)
        sm = [xy(i, v) for i, v in enumerate(_smooth(vals, max(1, n // 25))) if math.isfinite(v)]
        if len(sm) > 1:
            d.line(sm, fill=(20, 60, 160), width=2)
        elif sm:
            d.ellipse([sm[0][0] - 2, sm[0][1] - 2, sm[0][0] + 2, sm[0][1] + 2], fill=(20, 60, 160))
        for i, v in enumerate(vals):
            if not math.isfinite(v):
                x = xy(i, lo)[0]
                d.line([(x, bottom - 6), (x, bottom)], fill=(220, 30, 30), width=2)
        d.text((4, top - 4), f"{hi:.4g}", fill=(0, 0, 0))
        d.text((4, bottom - 10), f"{lo:.4g}", fill=(0, 0, 0))
    d.text((left, bottom + 6), "1", fill=(0, 0, 0))
    d.text((right - 40, bottom + 6), f"{max(n, 1)}", fill=(0, 0, 0))
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def validation_grid(rows: Sequence[Sequence[torch.Tensor]], gap: int = 4,
                    max_side: Optional[int] = 256) -> torch.Tensor:
    """Stack rows of equally-sized ``[3, h, w]`` images (e.g. LQ, before, after, HQ) into one image."""
    from ..images import resize_image

    if not rows:
        raise ValueError("no rows to draw")
    h, w = rows[0][0].shape[-2:]
    if max_side and max(h, w) > max_side:
        s = max_side / max(h, w)
        h, w = max(2, round(h * s)), max(2, round(w * s))
    out_rows = []
    for row in rows:
        cells = []
        for j, img in enumerate(row):
            if j:
                cells.append(torch.ones(3, h, gap))
            cells.append(resize_image(img.float().clamp(0, 1), (h, w)))
        out_rows.append(torch.cat(cells, dim=-1))
        out_rows.append(torch.ones(3, gap, out_rows[-1].shape[-1]))
    return torch.cat(out_rows[:-1], dim=-2)


def run_pictures(losses: Sequence[float], stage_starts: Sequence[int], title: str, val: object,
                 before: Optional[Sequence[torch.Tensor]], after: Optional[Sequence[torch.Tensor]],
                 out_path: Path, write: bool) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[Path]]:
    """The end-of-run pictures of any trainer: ``(loss curve, validation grid or None, curve PNG or None)``.

    ``val`` holds the validation LQs/HQs (``.lqs``, ``.hqs``; None when there was no validation);
    ``before``/``after`` are its outputs before and after training. With ``write`` the curve is saved
    as ``<out stem>.loss.png`` and the grid as ``<out stem>.validation.png`` beside ``out_path``.
    """
    curve = loss_curve_image(losses, stage_starts, title=title)
    grid = None
    if val is not None and before is not None and after is not None:
        grid = validation_grid([[val.lqs[i], before[i], after[i], val.hqs[i]]  # type: ignore[attr-defined]
                                for i in range(len(val))])  # type: ignore[arg-type]
    curve_path = None
    if write:
        from ..images import save_png

        curve_path = save_png(curve, out_path.with_name(out_path.stem + ".loss.png"))
        if grid is not None:
            save_png(grid, out_path.with_name(out_path.stem + ".validation.png"))
    return curve, grid, curve_path
