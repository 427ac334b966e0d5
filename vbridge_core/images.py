"""Image input/output and the size rules the pipeline applies before and after sampling.

Everything here works on plain ``torch`` tensors holding RGB values in ``0..1`` so the rest of the
library never has to care where an image came from (a file, a numpy array, a ComfyUI ``IMAGE``).
The core must not import ComfyUI, so the ComfyUI layout conversions live here too.

Decisions worth knowing (each is also stated where it applies):

* **Alpha is dropped**, not composited. Restoration works on the colour values stored in the file;
  compositing over black or white would change pixels that the model and the metrics compare
  against. This is also what ComfyUI's own ``LoadImage`` and PIL's ``convert("RGB")`` do. A debug
  log line says when a non-opaque alpha channel was discarded.
* **16-bit precision is kept**: 16-bit gray (``I;16``) and 16-bit RGB/RGBA PNGs (which PIL alone
  reduces to 8 bits) are read at full precision and scaled by ``1/65535``.
* **Colour profiles (ICC) are not applied**; CMYK is converted with PIL's plain conversion.
* **Small images are padded, not refused**: reflect padding of a side shorter than the pad uses the
  periodic mirror extension (what ``numpy.pad(mode="reflect")`` produces), and a 1-pixel side, which
  has nothing to reflect, is replicated.
"""
from __future__ import annotations

import logging
import math
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InputError, OutputError
from .fileio import atomic_path

log = logging.getLogger(__name__)

__all__ = [
    "PadInfo",
    "load_image",
    "to_rgb_tensor",
    "save_png",
    "pad_to_multiple",
    "crop_back",
    "fit_release_size",
    "resize_image",
    "comfy_to_bchw",
    "bchw_to_comfy",
    "RELEASE_MAX_H",
    "RELEASE_MAX_W",
]

#: The authors' release pads images up to this height/width and resizes anything larger.
RELEASE_MAX_H = 1440
RELEASE_MAX_W = 2560

# PIL EXIF orientation values -> operations on a [C, H, W] tensor (same results as
# PIL.ImageOps.exif_transpose; checked by the tests).
_ORIENTATION_OPS = {
    2: lambda t: t.flip(-1),
    3: lambda t: t.flip(-1).flip(-2),
    4: lambda t: t.flip(-2),
    5: lambda t: t.transpose(-1, -2),
    6: lambda t: torch.rot90(t, -1, dims=(-2, -1)),
    7: lambda t: t.transpose(-1, -2).flip(-1).flip(-2),
    8: lambda t: torch.rot90(t, 1, dims=(-2, -1)),
}


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

def load_image(path: str | os.PathLike) -> torch.Tensor:
    """Read an image file as a ``[3, H, W]`` float32 RGB tensor in ``0..1``.

    Accepts whatever PIL can read, in any mode: gray (``1``, ``L``, ``I;16``, ``I``, ``F``),
    palette (``P``, with or without transparency), ``RGB``, ``RGBA``/``LA`` (alpha dropped, see the
    module docstring), ``CMYK``, ``YCbCr``. The EXIF orientation tag is applied, so the tensor is
    the image as a viewer shows it. Multi-frame files (GIF, TIFF) give their first frame.

    Value scaling by mode: 8-bit -> ``/255``; 16-bit (``I;16*`` and 16-bit RGB/RGBA PNG) ->
    ``/65535``; ``I`` (32-bit int, how some 16-bit files arrive) -> ``/65535`` clipped to
    ``0..65535``; ``F`` (float) -> taken as ``0..1`` if its maximum is <= 1, else as ``0..255`` if
    <= 255, else as ``0..65535`` (clipped), with a warning in the last two cases.

    Raises :class:`InputError` naming the file when it does not exist, is a folder, or is not an
    image PIL can read.
    """
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.exists():
        raise InputError(f"image file not found: {p}. Check the path (relative paths are taken from {Path.cwd()}).")
    if p.is_dir():
        raise InputError(f"{p} is a folder, not an image file.")
    try:
        with Image.open(p) as img:
            img.load()
            arr = _pil_to_float_array(img, p)
            orientation = _exif_orientation(img)
    except UnidentifiedImageError:
        raise InputError(f"{p} is not an image PIL can read (unknown or unsupported format).") from None
    except Image.DecompressionBombError as e:
        raise InputError(f"{p} is too large to load safely ({e}). Downscale it first.") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(f"{p} is not an image PIL can read: {e}") from None
    t = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).contiguous()
    if orientation in _ORIENTATION_OPS:
        t = _ORIENTATION_OPS[orientation](t).contiguous()
    return t


def _exif_orientation(img) -> int:
    try:
        return int(img.getexif().get(0x0112, 1) or 1)
    except Exception:  # broken EXIF must not make an otherwise readable image fail
        return 1


def _pil_to_float_array(img, path: Path) -> np.ndarray:
    """Convert an opened PIL image to an [H, W, 3] float32 array in 0..1 (mode rules in load_image)."""
    mode = img.mode
    if mode in ("RGB", "RGBA") and img.format == "PNG":
        deep = _read_png_16bit_rgb(path)
        if deep is not None:
            return deep
    if mode == "1":
        a = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    elif mode == "L":
        a = np.asarray(img, dtype=np.float32) / 255.0
    elif mode.startswith("I;16"):
        a = np.asarray(img).astype(np.float32) / 65535.0
    elif mode == "I":
        raw = np.asarray(img)
        if raw.size and (raw.min() < 0 or raw.max() > 65535):
            log.warning("%s: 32-bit integer image outside 0..65535; values clipped to 16-bit range", path)
        a = np.clip(raw.astype(np.float64), 0, 65535).astype(np.float32) / 65535.0
    elif mode == "F":
        raw = np.asarray(img, dtype=np.float32)
        a = _scale_float_gray(raw, path)
    elif mode in ("LA", "La", "PA", "RGBA", "RGBa") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        _note_alpha(np.asarray(rgba)[..., 3], path)
        return np.asarray(rgba, dtype=np.float32)[..., :3] / 255.0
    elif mode == "RGB":
        return np.asarray(img, dtype=np.float32) / 255.0
    else:  # P, CMYK, YCbCr, LAB, HSV, ...
        try:
            rgb = img.convert("RGB")
        except (ValueError, OSError) as e:
            raise InputError(f"{path}: PIL cannot convert mode {mode!r} to RGB ({e}). Save it as RGB PNG.") from None
        return np.asarray(rgb, dtype=np.float32) / 255.0
    a = np.clip(a, 0.0, 1.0)
    return np.repeat(a[..., None], 3, axis=2)


def _scale_float_gray(raw: np.ndarray, path: Path) -> np.ndarray:
    finite = raw[np.isfinite(raw)]
    hi = float(finite.max()) if finite.size else 0.0
    if hi <= 1.0:
        return np.nan_to_num(raw, nan=0.0, posinf=1.0, neginf=0.0)
    if hi <= 255.0:
        log.warning("%s: float image with values up to %.3g taken as 0..255", path, hi)
        return np.nan_to_num(raw, nan=0.0, posinf=255.0, neginf=0.0) / 255.0
    log.warning("%s: float image with values up to %.3g taken as 0..65535 (clipped)", path, hi)
    return np.nan_to_num(raw, nan=0.0, posinf=65535.0, neginf=0.0) / 65535.0


def _note_alpha(alpha: np.ndarray, path: Path) -> None:
    if alpha.size and int(alpha.min()) < 255:
        log.debug("%s: alpha channel is not fully opaque; it is dropped (colour values kept as stored)", path)


def _read_png_16bit_rgb(path: Path) -> np.ndarray | None:
    """Full-precision read of a 16-bit RGB/RGBA PNG, or None if the file is not one.

    PIL decodes such files to 8 bits (it keeps the high byte of each sample). PIL's decoder can
    however unpack the same filtered stream with the little-endian raw mode, which yields the low
    byte of each big-endian sample; both passes together give the exact 16-bit values. Interlaced
    or otherwise unusual files fall back to PIL's 8-bit result with a warning.
    """
    from PIL import Image

    try:
        with open(path, "rb") as fh:
            head = fh.read(33)
    except OSError:
        return None
    if len(head) < 33 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    bit_depth, color_type, interlace = head[24], head[25], head[28]
    if bit_depth != 16 or color_type not in (2, 6):
        return None
    try:
        with Image.open(path) as hi_img:
            tile = hi_img.tile
            big = {"RGB;16B": "RGB;16L", "RGBA;16B": "RGBA;16L"}
            if interlace or len(tile) != 1 or tile[0][3] not in big:
                raise ValueError("unsupported PNG layout for the 16-bit reader")
            hi_img.load()
            hi = np.asarray(hi_img).astype(np.uint32)
        with Image.open(path) as lo_img:
            t = lo_img.tile[0]
            lo_img.tile = [t._replace(args=big[t[3]]) if hasattr(t, "_replace") else (t[0], t[1], t[2], big[t[3]])]
            lo_img.load()
            lo = np.asarray(lo_img).astype(np.uint32)
    except Exception as e:  # any internal change in PIL: degrade gracefully, never fail the load
        log.warning("%s: 16-bit PNG read at 8-bit precision (%s)", path, e)
        return None
    full = (hi << 8) | lo
    if full.shape[-1] == 4:
        _note_alpha(full[..., 3], path)
    return full[..., :3].astype(np.float32) / 65535.0


# --------------------------------------------------------------------------------------------
# Arrays and tensors
# --------------------------------------------------------------------------------------------

def to_rgb_tensor(x: "np.ndarray | torch.Tensor") -> torch.Tensor:
    """Turn an image array or tensor into a ``[3, H, W]`` float32 tensor in ``0..1``.

    Accepted shapes: ``[H, W]``, ``[H, W, C]`` or ``[C, H, W]`` with ``C`` in {1, 3, 4}, optionally
    with a leading batch dimension of size 1. Layout detection: a 3-D input is channels-last when
    only its last dimension is in {1, 3, 4}, channels-first when only its first is; when both are
    (e.g. a 3x3x3 array) numpy arrays are taken as ``[H, W, C]`` (PIL/OpenCV convention) and torch
    tensors as ``[C, H, W]`` (torch convention). One channel is repeated to three; a fourth
    (alpha) channel is dropped, as in :func:`load_image`.

    Value scaling: ``uint8`` -> ``/255``, ``uint16`` -> ``/65535``, ``bool`` -> 0/1, floats are
    taken as ``0..1`` and clamped. Floats reaching beyond ``-1..2`` raise :class:`InputError`
    (they are almost always ``0..255`` data), as do other integer types and NaN/inf values.
    Tensors stay on their device.
    """
    is_numpy = isinstance(x, np.ndarray)
    if is_numpy:
        arr = x
        if arr.dtype == np.uint8:
            t = torch.from_numpy(arr.astype(np.float32) / 255.0)
        elif arr.dtype == np.uint16:
            t = torch.from_numpy(arr.astype(np.float32) / 65535.0)
        elif arr.dtype == np.bool_:
            t = torch.from_numpy(arr.astype(np.float32))
        elif np.issubdtype(arr.dtype, np.floating):
            t = torch.from_numpy(arr.astype(np.float32))
        else:
            raise InputError(f"image array has dtype {arr.dtype}; use uint8 (0..255), uint16 (0..65535) or float (0..1).")
    elif isinstance(x, torch.Tensor):
        if x.dtype == torch.uint8:
            t = x.to(torch.float32) / 255.0
        elif x.dtype == torch.uint16:
            t = x.to(torch.float32) / 65535.0
        elif x.dtype == torch.bool:
            t = x.to(torch.float32)
        elif x.is_floating_point():
            t = x.detach().to(torch.float32)
        else:
            raise InputError(f"image tensor has dtype {x.dtype}; use uint8 (0..255), uint16 (0..65535) or float (0..1).")
    else:
        raise InputError(f"expected a numpy array or torch tensor image, got {type(x).__name__}.")

    if t.ndim == 4 and t.shape[0] == 1:
        t = t[0]
    if t.ndim == 2:
        t = t.unsqueeze(0)
    elif t.ndim == 3:
        first, last = t.shape[0] in (1, 3, 4), t.shape[-1] in (1, 3, 4)
        if last and (not first or is_numpy):
            t = t.permute(2, 0, 1)
        elif not first:
            raise InputError(f"cannot tell the channel axis of an image of shape {tuple(x.shape)}: "
                             "expected [H, W], [H, W, C] or [C, H, W] with C in 1, 3 or 4.")
    else:
        raise InputError(f"image has shape {tuple(x.shape)}; expected [H, W], [H, W, C] or [C, H, W] "
                         "(a batch of more than one image needs comfy_to_bchw or a loop).")
    c = t.shape[0]
    if c == 1:
        t = t.expand(3, -1, -1)
    elif c == 4:
        t = t[:3]
    if t.shape[-1] == 0 or t.shape[-2] == 0:
        raise InputError(f"image is empty ({t.shape[-2]}x{t.shape[-1]} pixels).")
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise InputError("image contains NaN or infinite values.")
    lo, hi = float(t.min()), float(t.max())
    if lo < -1.0 or hi > 2.0:
        raise InputError(f"float image values span {lo:.3g}..{hi:.3g}; expected 0..1 "
                         "(divide 0..255 data by 255).")
    return t.clamp(0.0, 1.0).contiguous()


def save_png(image: "torch.Tensor | np.ndarray", path: str | os.PathLike, bits: int = 8) -> Path:
    """Write an RGB image (``[3, H, W]`` or ``[H, W, 3]``, values ``0..1``) as a PNG, atomically.

    The file is written under a temporary name in the target folder and renamed onto ``path``
    only when complete, so a crash or an error never leaves a partial PNG under the final name.
    ``bits=8`` (default) rounds to 0..255; ``bits=16`` rounds to 0..65535 and writes a 48-bit RGB
    PNG (PIL cannot write those, so a small writer here does). Layout rules as in
    :func:`to_rgb_tensor`. Raises :class:`OutputError` when the folder or file cannot be written.
    """
    if bits not in (8, 16):
        raise InputError(f"save_png bits must be 8 or 16, got {bits!r}.")
    t = to_rgb_tensor(image)
    hwc = t.permute(1, 2, 0).cpu().numpy().astype(np.float64)
    target = Path(path)
    try:
        with atomic_path(target) as tmp:
            if bits == 8:
                from PIL import Image

                q = np.rint(hwc * 255.0).astype(np.uint8)
                Image.fromarray(q, mode="RGB").save(tmp, format="PNG")
            else:
                q = np.rint(hwc * 65535.0).astype(np.uint16)
                tmp.write_bytes(_encode_png16(q))
    except OutputError:
        raise
    except OSError as e:
        raise OutputError(f"cannot write {target}: {e.strerror or e}. Check free space and permissions.") from None
    return target


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _encode_png16(rgb: np.ndarray) -> bytes:
    """Encode an [H, W, 3] uint16 array as a 16-bit RGB PNG (filter type 0 on every row)."""
    h, w, _ = rgb.shape
    rows = np.ascontiguousarray(rgb, dtype=">u2").view(np.uint8).reshape(h, w * 6)
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rows], axis=1).tobytes()
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(raw, 6))
            + _png_chunk(b"IEND", b""))


# --------------------------------------------------------------------------------------------
# Padding and sizes
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PadInfo:
    """How :func:`pad_to_multiple` padded an image, so :func:`crop_back` can undo it exactly."""

    top: int
    bottom: int
    left: int
    right: int
    height: int  # original height
    width: int  # original width

    @property
    def padded_size(self) -> tuple[int, int]:
        """(height, width) after padding."""
        return self.height + self.top + self.bottom, self.width + self.left + self.right

    @property
    def is_identity(self) -> bool:
        """True when nothing was padded."""
        return self.top == self.bottom == self.left == self.right == 0


def _mirror_index(n: int, before: int, after: int, mode: str, device) -> torch.Tensor:
    """Source indices for padding a length-``n`` axis by ``before``/``after`` samples."""
    idx = torch.arange(-before, n + after, device=device)
    if mode == "replicate" or n == 1:
        return idx.clamp(0, n - 1)
    period = 2 * (n - 1)  # "reflect": mirror about the first and last samples, not repeating them
    idx = torch.remainder(idx, period)
    return torch.where(idx > n - 1, period - idx, idx)


def pad_to_multiple(x: torch.Tensor, multiple: int = 32, mode: str = "reflect",
                    max_pixels: int | None = None) -> tuple[torch.Tensor, PadInfo]:
    """Pad the last two dims of ``x`` (``[B, C, H, W]`` or ``[C, H, W]``) up to multiples of ``multiple``.

    Padding is split symmetrically, the odd pixel going to the bottom/right (``top = pad // 2``),
    as in the authors' release, so :func:`crop_back` is a centre crop. Modes: ``"reflect"``
    (default; mirror without repeating the edge, like ``numpy.pad`` / ``F.pad``), ``"replicate"``,
    ``"constant"`` (zeros).

    Small images: ``F.pad(mode="reflect")`` needs the pad to be shorter than the side. Here
    reflection continues periodically instead (the same values ``numpy.pad(mode="reflect")``
    gives), so a 5x7 image pads to 32x32 without error; a side of 1 pixel is replicated. Images
    smaller than ``multiple`` are accepted.

    Raises :class:`InputError` for an empty image (a side of 0 pixels) and, when ``max_pixels``
    is given, for an image with more than ``max_pixels`` pixels (H*W, before padding).
    """
    if x.ndim not in (3, 4):
        raise InputError(f"pad_to_multiple expects [B, C, H, W] or [C, H, W], got shape {tuple(x.shape)}.")
    if multiple < 1:
        raise InputError(f"pad multiple must be >= 1, got {multiple}.")
    h, w = int(x.shape[-2]), int(x.shape[-1])
    if h == 0 or w == 0:
        raise InputError(f"image is empty ({h}x{w} pixels); every side must be at least 1 pixel.")
    if max_pixels is not None and h * w > max_pixels:
        raise InputError(f"image is {h}x{w} = {h * w} pixels, over the limit of {max_pixels} pixels "
                         "(height x width). Resize it or raise the limit.")
    ph, pw = (-h) % multiple, (-w) % multiple
    info = PadInfo(top=ph // 2, bottom=ph - ph // 2, left=pw // 2, right=pw - pw // 2, height=h, width=w)
    if info.is_identity:
        return x, info
    if mode == "constant":
        return F.pad(x, (info.left, info.right, info.top, info.bottom), mode="constant", value=0.0), info
    if mode not in ("reflect", "replicate"):
        raise InputError(f"unknown pad mode {mode!r}; use 'reflect', 'replicate' or 'constant'.")
    rows = _mirror_index(h, info.top, info.bottom, mode, x.device)
    cols = _mirror_index(w, info.left, info.right, mode, x.device)
    return x.index_select(-2, rows).index_select(-1, cols), info


def crop_back(x: torch.Tensor, info: PadInfo) -> torch.Tensor:
    """Undo :func:`pad_to_multiple`: crop the last two dims of ``x`` back to the original size.

    ``x`` must have the padded size (e.g. the model output for the padded input); anything else
    raises :class:`InputError` rather than silently cropping the wrong region.
    """
    if tuple(x.shape[-2:]) != info.padded_size:
        raise InputError(f"crop_back got a {x.shape[-2]}x{x.shape[-1]} image but the padding was for "
                         f"{info.padded_size[0]}x{info.padded_size[1]}.")
    return x[..., info.top:info.top + info.height, info.left:info.left + info.width]


def fit_release_size(h: int, w: int, max_h: int = RELEASE_MAX_H, max_w: int = RELEASE_MAX_W) -> tuple[int, int]:
    """The authors' size rule: the size an image is resized to before padding, as (height, width).

    If ``h <= max_h`` and ``w <= max_w`` the size is returned unchanged (the image is then only
    padded). Otherwise the image is scaled, keeping its aspect ratio, to an area of
    ``min(max_h * max_w, h * w)`` and both sides are floored to multiples of 32 (at least 32), so
    the result's area never exceeds ``max_h * max_w``. As in the release this is an *area* rule:
    a very wide but small-area image (e.g. 500x3000) keeps its area, so one side can stay above
    ``max_w``. (The release additionally stretches images with a side exactly equal to the limit
    instead of padding them; that quirk is not reproduced.)
    """
    if h <= 0 or w <= 0:
        raise InputError(f"image is empty ({h}x{w} pixels).")
    if h <= max_h and w <= max_w:
        return h, w
    area = min(max_h * max_w, h * w)
    aspect = w / h
    new_h = math.sqrt(area / aspect)
    new_w = new_h * aspect
    return max(32, int(new_h // 32) * 32), max(32, int(new_w // 32) * 32)


def resize_image(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resize ``x`` (``[B, C, H, W]`` or ``[C, H, W]``, 0..1) to ``size = (height, width)``.

    Antialiased bicubic (``F.interpolate(..., antialias=True)``), close to PIL's bicubic resize
    that the release uses; the result is clamped to ``0..1`` because bicubic overshoots at edges.
    Computed in float32 and returned in the input's dtype; same size returns the input.
    """
    th, tw = int(size[0]), int(size[1])
    if th <= 0 or tw <= 0:
        raise InputError(f"resize target must be positive, got {th}x{tw}.")
    if x.ndim not in (3, 4):
        raise InputError(f"resize_image expects [B, C, H, W] or [C, H, W], got shape {tuple(x.shape)}.")
    if tuple(x.shape[-2:]) == (th, tw):
        return x
    batched = x if x.ndim == 4 else x.unsqueeze(0)
    y = F.interpolate(batched.to(torch.float32), size=(th, tw), mode="bicubic", align_corners=False, antialias=True)
    y = y.clamp(0.0, 1.0).to(x.dtype)
    return y if x.ndim == 4 else y[0]


# --------------------------------------------------------------------------------------------
# ComfyUI layout
# --------------------------------------------------------------------------------------------

def _to_three_channels(t: torch.Tensor, dim: int) -> torch.Tensor:
    c = t.shape[dim]
    if c == 3:
        return t
    if c == 1:
        return torch.cat([t, t, t], dim=dim)
    if c == 4:
        return t.narrow(dim, 0, 3)
    raise InputError(f"image has {c} channels; expected 1 (gray), 3 (RGB) or 4 (RGBA).")


def comfy_to_bchw(images: torch.Tensor) -> torch.Tensor:
    """ComfyUI ``IMAGE`` (``[B, H, W, C]`` float 0..1) -> ``[B, 3, H, W]`` float32.

    ``C`` may be 1 (repeated to RGB), 3, or 4 (alpha dropped). A single ``[H, W, C]`` image gets a
    batch dimension of 1.
    """
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4:
        raise InputError(f"expected a ComfyUI IMAGE [B, H, W, C], got shape {tuple(images.shape)}.")
    t = _to_three_channels(images, -1)
    return t.permute(0, 3, 1, 2).to(torch.float32).contiguous()


def bchw_to_comfy(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` (or ``[C, H, W]``) 0..1 -> ComfyUI ``IMAGE`` ``[B, H, W, 3]`` float32, clamped.

    ``C`` may be 1 (repeated), 3, or 4 (alpha dropped): ComfyUI IMAGE consumers expect RGB.
    """
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4:
        raise InputError(f"expected [B, C, H, W], got shape {tuple(x.shape)}.")
    t = _to_three_channels(x, 1)
    return t.permute(0, 2, 3, 1).to(torch.float32).clamp(0.0, 1.0).contiguous()
