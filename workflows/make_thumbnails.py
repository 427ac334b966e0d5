"""Draw the thumbnail of every example workflow: ``<name>.json`` -> ``<name>.jpg`` (512x288).

The picture is a diagram of the graph itself (node boxes with their class and title, one curve per
link, coloured by type), drawn with Pillow from the JSON, so it never goes stale: re-run after
editing a workflow. Deterministic for a given Pillow version.

    python workflows/make_thumbnails.py [workflow.json ...]
"""
from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

WIDTH, HEIGHT = 512, 288
SUPER = 2  # drawn at twice the size, then downsampled (anti-aliasing)
MARGIN = 14
CAPTION = 22  # space kept at the bottom for the workflow name
MAX_BYTES = 60_000

BACKGROUND = (32, 32, 36)
NODE_BODY = (53, 53, 58)
NODE_EDGE = (90, 90, 98)
TEXT = (225, 225, 225)
TEXT_DIM = (170, 170, 175)
HEADERS = {  # header colour by node family
    "ours": (44, 86, 140),
    "core": (70, 70, 78),
    "note": (102, 85, 51),
}
LINK_COLOURS = {  # close to ComfyUI's default link colours
    "IMAGE": (100, 181, 246),
    "MASK": (129, 200, 132),
    "STRING": (170, 200, 120),
    "CONDITIONING": (255, 170, 80),
    "VBRIDGE_MODEL": (180, 140, 230),
    "VBRIDGE_PAIRS": (230, 140, 180),
    "VBRIDGE_TRAIN_SETTINGS": (120, 200, 190),
    "CLIP": (255, 213, 0),
    "VIDEO": (240, 120, 90),
    "AUDIO": (120, 160, 230),
    "FLOAT": (170, 170, 255),
}
OUR_PREFIXES = ("LoadVBridge", "RestoreTrajectory", "DriftCorrect", "LoadImagePairs", "ImageQualityMetrics",
                "TrainLoRA", "RestoreVideo", "TrainStabilizer", "PerceiveImage", "AutoRestore", "TrainPerceiver")
NOTE_TYPES = ("Note", "MarkdownNote")


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def _family(node_type: str) -> str:
    if node_type in NOTE_TYPES:
        return "note"
    return "ours" if node_type.startswith(OUR_PREFIXES) else "core"


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: float) -> str:
    """Shorten ``text`` with an ellipsis until it fits ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…" if text else ""


def _bezier(p0, p1, steps: int = 24):
    """Points of the S-curve ComfyUI draws between an output (p0) and an input (p1)."""
    dx = max(abs(p1[0] - p0[0]) * 0.5, 20 * SUPER)
    c0, c1 = (p0[0] + dx, p0[1]), (p1[0] - dx, p1[1])
    pts = []
    for i in range(steps + 1):
        t = i / steps
        a, b, c, d = (1 - t) ** 3, 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t ** 2, t ** 3
        pts.append((a * p0[0] + b * c0[0] + c * c1[0] + d * p1[0], a * p0[1] + b * c0[1] + c * c1[1] + d * p1[1]))
    return pts


def render(workflow: dict, name: str) -> Image.Image:
    W, H = WIDTH * SUPER, HEIGHT * SUPER
    img = Image.new("RGB", (W, H), BACKGROUND)
    draw = ImageDraw.Draw(img)
    nodes = workflow["nodes"]
    x0 = min(n["pos"][0] for n in nodes)
    y0 = min(n["pos"][1] for n in nodes)
    x1 = max(n["pos"][0] + n["size"][0] for n in nodes)
    y1 = max(n["pos"][1] + n["size"][1] for n in nodes)
    avail_w, avail_h = W - 2 * MARGIN * SUPER, H - (2 * MARGIN + CAPTION) * SUPER
    scale = min(avail_w / (x1 - x0), avail_h / (y1 - y0))
    off_x = MARGIN * SUPER + (avail_w - (x1 - x0) * scale) / 2
    off_y = MARGIN * SUPER + (avail_h - (y1 - y0) * scale) / 2

    def box(n):
        left = off_x + (n["pos"][0] - x0) * scale
        top = off_y + (n["pos"][1] - y0) * scale
        return left, top, left + n["size"][0] * scale, top + n["size"][1] * scale

    header_h = 15 * SUPER
    slot_gap = 9 * SUPER
    by_id = {n["id"]: n for n in nodes}

    def slot_y(n, index):
        return box(n)[1] + header_h + slot_gap * (index + 0.8)

    # links under the nodes
    for link in workflow["links"]:
        _, src, src_slot, dst, dst_slot, typ = link[:6]
        s, d = by_id[src], by_id[dst]
        p0 = (box(s)[2], slot_y(s, src_slot))
        p1 = (box(d)[0], slot_y(d, dst_slot))
        draw.line(_bezier(p0, p1), fill=LINK_COLOURS.get(typ, (200, 200, 200)), width=2 * SUPER, joint="curve")

    title_font, body_font = _font(8 * SUPER), _font(7 * SUPER)
    for n in sorted(nodes, key=lambda n: n.get("order", 0)):
        left, top, right, bottom = box(n)
        family = _family(n["type"])
        body = NODE_BODY if family != "note" else (70, 62, 44)
        draw.rounded_rectangle((left, top, right, bottom), radius=4 * SUPER, fill=body, outline=NODE_EDGE, width=SUPER)
        draw.rounded_rectangle((left, top, right, top + header_h), radius=4 * SUPER, fill=HEADERS[family])
        inner = right - left - 8 * SUPER
        header = n.get("title") or n["type"] if family == "note" else n["type"]
        draw.text((left + 4 * SUPER, top + 3 * SUPER), _fit(draw, header, title_font, inner), font=title_font, fill=TEXT)
        lines: list[str] = []
        if family != "note" and n.get("title") and n["title"] != n["type"]:
            lines += textwrap.wrap(n["title"], width=max(8, int(inner / (4.0 * SUPER))))
        if family == "note":
            text = str((n.get("widgets_values") or [""])[0]).replace("#", "").replace("*", "").replace("`", "")
            lines += textwrap.wrap(" ".join(text.split()), width=max(8, int(inner / (3.7 * SUPER))))
        y = top + header_h + 3 * SUPER
        for line in lines:
            if y + 8 * SUPER > bottom:
                break
            draw.text((left + 4 * SUPER, y), _fit(draw, line, body_font, inner), font=body_font, fill=TEXT_DIM)
            y += 9 * SUPER
        for i, _ in enumerate(n.get("inputs") or []):
            cy = slot_y(n, i)
            draw.ellipse((left - 2.5 * SUPER, cy - 2.5 * SUPER, left + 2.5 * SUPER, cy + 2.5 * SUPER), fill=TEXT_DIM)
        for i, _ in enumerate(n.get("outputs") or []):
            cy = slot_y(n, i)
            draw.ellipse((right - 2.5 * SUPER, cy - 2.5 * SUPER, right + 2.5 * SUPER, cy + 2.5 * SUPER), fill=TEXT_DIM)

    caption_font = _font(11 * SUPER)
    draw.text((MARGIN * SUPER, H - (CAPTION - 3) * SUPER), f"ComfyUI-VBridge · {name}", font=caption_font, fill=TEXT)
    return img.resize((WIDTH, HEIGHT), Image.Resampling.LANCZOS)


def make_thumbnail(path: Path) -> Path:
    workflow = json.loads(path.read_text(encoding="utf-8"))
    out = path.with_suffix(".jpg")
    img = render(workflow, path.stem)
    for quality in (88, 80, 70, 60):
        img.save(out, "JPEG", quality=quality, optimize=True)
        if out.stat().st_size < MAX_BYTES:
            break
    return out


def main(argv: list[str]) -> int:
    paths = [Path(a) for a in argv] or sorted(Path(__file__).resolve().parent.glob("*.json"))
    for p in paths:
        out = make_thumbnail(p)
        print(f"{out} ({out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
