"""A small annotated preview of perceived images (thumbnail + a banner with label, severity, tier)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .model import PerceptionReport

_TIER_COLOURS = {"high": (60, 170, 80), "medium": (220, 160, 40), "low": (200, 60, 50)}


def annotate(images: Sequence[torch.Tensor], reports: Sequence[PerceptionReport], width: int = 256) -> torch.Tensor:
    """``[B, 3, H, W]`` previews (all ``width`` px wide; height from the first image's aspect) with banners."""
    from PIL import Image, ImageDraw

    if not images:
        return torch.zeros(1, 3, 64, width)
    h0, w0 = images[0].shape[-2:]
    height = max(48, round(width * h0 / w0))
    out = []
    for img, r in zip(images, reports):
        x = img if img.shape[0] == 3 else img[:3] if img.shape[0] == 4 else img[:1].expand(3, -1, -1)
        x = torch.nan_to_num(x.float(), nan=0.0).clamp(0, 1)
        t = F.interpolate(x[None], size=(height, width), mode="area" if x.shape[-1] >= width else "bilinear")[0]
        canvas = Image.fromarray((t.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
        draw = ImageDraw.Draw(canvas)
        also = [f for f in r.present() if f != r.degradation]
        line1 = f"{r.degradation} {r.scores[r.degradation]:.2f}" + (f" +{','.join(also)}" if also else "")
        line2 = f"quality {r.quality} {r.quality_score:.2f}"
        draw.rectangle([0, height - 26, width, height], fill=(0, 0, 0))
        draw.rectangle([0, height - 26, 5, height], fill=_TIER_COLOURS.get(r.quality, (128, 128, 128)))
        draw.text((9, height - 25), line1, fill=(255, 255, 255))
        draw.text((9, height - 13), line2, fill=(255, 255, 255))
        out.append(torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0).permute(2, 0, 1))
    return torch.stack(out)
