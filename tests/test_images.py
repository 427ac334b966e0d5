"""Image loading (every PIL mode), array conversion, atomic PNG saving, padding and size rules."""
from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from vbridge_core.errors import InputError, OutputError
from vbridge_core.images import (PadInfo, bchw_to_comfy, comfy_to_bchw, crop_back, fit_release_size, load_image,
                                 pad_to_multiple, resize_image, save_png, to_rgb_tensor)

RNG = np.random.RandomState(7)
RGB8 = RNG.randint(0, 256, size=(6, 5, 3)).astype(np.uint8)  # H=6, W=5
GRAY8 = RNG.randint(0, 256, size=(6, 5)).astype(np.uint8)
GRAY16 = RNG.randint(0, 65536, size=(6, 5)).astype(np.uint16)


def _hwc(t: torch.Tensor) -> np.ndarray:
    assert t.dtype == torch.float32 and t.ndim == 3 and t.shape[0] == 3
    assert float(t.min()) >= 0.0 and float(t.max()) <= 1.0
    return t.permute(1, 2, 0).numpy().astype(np.float64)


def _gray3(a: np.ndarray) -> np.ndarray:
    return np.repeat(a[..., None], 3, axis=2)


# ------------------------------------------------------------------------------- loading modes

def test_load_rgb_png(tmp_path):
    Image.fromarray(RGB8, "RGB").save(tmp_path / "a.png")
    t = load_image(tmp_path / "a.png")
    assert t.shape == (3, 6, 5)
    np.testing.assert_allclose(_hwc(t), RGB8 / 255.0, atol=1e-7)


def test_load_gray_modes(tmp_path):
    Image.fromarray(GRAY8, "L").save(tmp_path / "l.png")
    np.testing.assert_allclose(_hwc(load_image(tmp_path / "l.png")), _gray3(GRAY8 / 255.0), atol=1e-7)

    Image.fromarray(GRAY8 > 127).save(tmp_path / "one.png")  # mode "1"
    assert Image.open(tmp_path / "one.png").mode == "1"
    np.testing.assert_allclose(_hwc(load_image(tmp_path / "one.png")), _gray3((GRAY8 > 127).astype(float)))


def test_load_16bit_gray_keeps_precision(tmp_path):
    Image.fromarray(GRAY16).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I;16")
    t = load_image(tmp_path / "g16.png")
    np.testing.assert_allclose(_hwc(t), _gray3(GRAY16 / 65535.0), atol=1e-7)
    # values that differ only in the low byte stay distinct
    assert len(np.unique((_hwc(t)[..., 0] * 65535).round())) == len(np.unique(GRAY16))


def test_load_mode_I_and_F(tmp_path):
    Image.fromarray(GRAY16.astype(np.int32), "I").save(tmp_path / "i.tif")
    assert Image.open(tmp_path / "i.tif").mode == "I"
    np.testing.assert_allclose(_hwc(load_image(tmp_path / "i.tif")), _gray3(GRAY16 / 65535.0), atol=1e-7)

    f01 = (GRAY8 / 255.0).astype(np.float32)
    Image.fromarray(f01, "F").save(tmp_path / "f01.tif")
    assert Image.open(tmp_path / "f01.tif").mode == "F"
    np.testing.assert_allclose(_hwc(load_image(tmp_path / "f01.tif")), _gray3(f01), atol=1e-7)

    Image.fromarray(GRAY8.astype(np.float32), "F").save(tmp_path / "f255.tif")  # 0..255 floats
    np.testing.assert_allclose(_hwc(load_image(tmp_path / "f255.tif")), _gray3(GRAY8 / 255.0), atol=1e-6)


def test_load_palette(tmp_path):
    img = Image.fromarray(RGB8, "RGB").quantize(colors=16)
    img.save(tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").mode == "P"
    expected = np.asarray(img.convert("RGB")) / 255.0
    np.testing.assert_allclose(_hwc(load_image(tmp_path / "p.png")), expected, atol=1e-7)

    img.info["transparency"] = 0
    img.save(tmp_path / "pt.png", transparency=0)
    np.testing.assert_allclose(_hwc(load_image(tmp_path / "pt.png")), expected, atol=1e-7)


def test_load_alpha_is_dropped(tmp_path):
    alpha = np.zeros((6, 5), np.uint8)
    alpha[:3] = 255
    Image.fromarray(np.dstack([RGB8, alpha]), "RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_allclose(_hwc(load_image(tmp_path / "rgba.png")), RGB8 / 255.0, atol=1e-7)

    Image.fromarray(np.dstack([GRAY8, alpha]), "LA").save(tmp_path / "la.png")
    assert Image.open(tmp_path / "la.png").mode == "LA"
    np.testing.assert_allclose(_hwc(load_image(tmp_path / "la.png")), _gray3(GRAY8 / 255.0), atol=1e-7)


def test_load_cmyk(tmp_path):
    cmyk = Image.fromarray(RGB8, "RGB").convert("CMYK")
    cmyk.save(tmp_path / "c.tif")
    assert Image.open(tmp_path / "c.tif").mode == "CMYK"
    expected = np.asarray(cmyk.convert("RGB")) / 255.0
    np.testing.assert_allclose(_hwc(load_image(tmp_path / "c.tif")), expected, atol=1e-7)


def test_load_16bit_rgb_and_rgba_png_keeps_precision(tmp_path):
    x = torch.rand(3, 9, 7, generator=torch.Generator().manual_seed(1))
    save_png(x, tmp_path / "rgb16.png", bits=16)
    t = load_image(tmp_path / "rgb16.png")
    assert (t - x).abs().max() <= 0.5 / 65535 + 1e-7
    exact = np.rint(x.permute(1, 2, 0).numpy().astype(np.float64) * 65535) / 65535
    np.testing.assert_allclose(_hwc(t), exact, atol=1e-7)

    # a 16-bit RGBA PNG written by another tool (here: by hand, filter 0) -> alpha dropped, 16 bits kept
    import struct
    import zlib
    rgba = RNG.randint(0, 65536, size=(4, 3, 4)).astype(">u2")
    raw = b"".join(b"\x00" + rgba[i].tobytes() for i in range(4))

    def chunk(k: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + k + d + struct.pack(">I", zlib.crc32(k + d) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 3, 4, 16, 6, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    (tmp_path / "rgba16.png").write_bytes(png)
    np.testing.assert_allclose(_hwc(load_image(tmp_path / "rgba16.png")), rgba[..., :3] / 65535.0, atol=1e-7)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation(tmp_path, orientation):
    img = Image.fromarray(RGB8, "RGB")
    exif = img.getexif()
    exif[0x0112] = orientation
    img.save(tmp_path / "o.png", exif=exif.tobytes())
    expected = np.asarray(ImageOps.exif_transpose(Image.open(tmp_path / "o.png")).convert("RGB")) / 255.0
    got = _hwc(load_image(tmp_path / "o.png"))
    assert got.shape == expected.shape
    assert got.shape[:2] == ((6, 5) if orientation < 5 else (5, 6))
    np.testing.assert_allclose(got, expected, atol=1e-7)


def test_load_jpeg_and_gif(tmp_path):
    Image.fromarray(RGB8, "RGB").save(tmp_path / "a.jpg", quality=95)
    assert load_image(tmp_path / "a.jpg").shape == (3, 6, 5)
    frames = [Image.fromarray(RGB8, "RGB").quantize(8), Image.fromarray(255 - RGB8, "RGB").quantize(8)]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    np.testing.assert_allclose(_hwc(load_image(tmp_path / "a.gif")),
                               np.asarray(frames[0].convert("RGB")) / 255.0, atol=1e-7)


def test_load_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(InputError, match="not found.*nope.png"):
        load_image(missing)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not an image")
    with pytest.raises(InputError, match=r"bad\.png.*not an image PIL can read"):
        load_image(bad)
    with pytest.raises(InputError, match="folder"):
        load_image(tmp_path)
    truncated = tmp_path / "trunc.png"
    Image.fromarray(RGB8, "RGB").save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:40])
    with pytest.raises(InputError, match="trunc.png"):
        load_image(truncated)


# ------------------------------------------------------------------------------- to_rgb_tensor

def test_to_rgb_tensor_layouts_and_dtypes():
    hwc = RGB8
    ref = torch.from_numpy(RGB8).permute(2, 0, 1).float() / 255
    assert torch.allclose(to_rgb_tensor(hwc), ref)
    assert torch.allclose(to_rgb_tensor(np.ascontiguousarray(hwc.transpose(2, 0, 1))), ref)  # [C,H,W] numpy
    assert torch.allclose(to_rgb_tensor(torch.from_numpy(hwc)), ref)  # uint8 tensor HWC
    assert torch.allclose(to_rgb_tensor(ref), ref)  # float CHW tensor
    assert torch.allclose(to_rgb_tensor(ref.unsqueeze(0)), ref)  # batch of one
    assert torch.allclose(to_rgb_tensor(np.dstack([hwc, np.full((6, 5), 9, np.uint8)])), ref)  # RGBA
    g = to_rgb_tensor(GRAY8)  # [H, W]
    assert g.shape == (3, 6, 5) and torch.equal(g[0], g[2])
    assert to_rgb_tensor(GRAY8[..., None]).shape == (3, 6, 5)  # [H, W, 1]
    assert torch.allclose(to_rgb_tensor(GRAY16)[0], torch.from_numpy(GRAY16 / 65535.0).float())
    assert torch.allclose(to_rgb_tensor(torch.from_numpy(GRAY16.astype(np.int32)).to(torch.uint16))[0],
                          torch.from_numpy(GRAY16 / 65535.0).float())
    assert to_rgb_tensor(np.ones((4, 4), bool)).min() == 1.0


def test_to_rgb_tensor_ambiguous_layout():
    a = np.arange(27, dtype=np.float32).reshape(3, 3, 3) / 27
    # numpy: channels-last; torch: channels-first
    assert torch.equal(to_rgb_tensor(a), torch.from_numpy(a).permute(2, 0, 1))
    assert torch.equal(to_rgb_tensor(torch.from_numpy(a)), torch.from_numpy(a))


def test_to_rgb_tensor_errors():
    with pytest.raises(InputError, match="channel"):
        to_rgb_tensor(np.zeros((5, 6, 7), np.float32))
    with pytest.raises(InputError, match="0..255"):
        to_rgb_tensor(np.full((4, 4, 3), 200.0, np.float32))
    with pytest.raises(InputError, match="NaN"):
        to_rgb_tensor(np.full((4, 4, 3), np.nan, np.float32))
    with pytest.raises(InputError, match="dtype"):
        to_rgb_tensor(np.zeros((4, 4, 3), np.int64))
    with pytest.raises(InputError, match="empty"):
        to_rgb_tensor(np.zeros((0, 4, 3), np.uint8))
    assert float(to_rgb_tensor(np.full((4, 4, 3), 1.2, np.float32)).max()) == 1.0  # small overshoot clamped


# ------------------------------------------------------------------------------- save_png

def test_save_png_roundtrip_8_and_16_bit(tmp_path):
    x = torch.rand(3, 11, 13, generator=torch.Generator().manual_seed(0))
    p8 = save_png(x, tmp_path / "a.png")
    assert Image.open(p8).mode == "RGB"
    assert (load_image(p8) - x).abs().max() <= 0.5 / 255 + 1e-6
    p16 = save_png(x.permute(1, 2, 0), tmp_path / "b.png", bits=16)  # HWC accepted
    assert (load_image(p16) - x).abs().max() <= 0.5 / 65535 + 1e-7
    with pytest.raises(InputError):
        save_png(x, tmp_path / "c.png", bits=12)


def test_save_png_is_atomic(tmp_path, monkeypatch):
    x = torch.rand(3, 8, 8)
    out = tmp_path / "out"
    save_png(x, out / "ok.png")  # creates the folder
    assert sorted(p.name for p in out.iterdir()) == ["ok.png"]  # no temp files left

    real_save = Image.Image.save

    def failing_save(self, fp, *args, **kwargs):
        real_save(self, fp, *args, **kwargs)  # a partial file exists under the temp name...
        raise OSError(28, "No space left on device")  # ...then the disk fills up

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(OutputError, match="fail.png"):
        save_png(x, out / "fail.png")
    assert not (out / "fail.png").exists()
    assert sorted(p.name for p in out.iterdir()) == ["ok.png"]

    # overwriting an existing file that fails keeps the old file intact
    before = (out / "ok.png").read_bytes()
    with pytest.raises(OutputError):
        save_png(torch.zeros(3, 8, 8), out / "ok.png")
    assert (out / "ok.png").read_bytes() == before


@pytest.mark.skipif(sys.platform == "win32" or (hasattr(os, "geteuid") and os.geteuid() == 0),
                    reason="permission bits are not enforced for root / on Windows")
def test_save_png_unwritable_dir(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        with pytest.raises(OutputError, match="not writable"):
            save_png(torch.rand(3, 4, 4), locked / "x.png")
        with pytest.raises(OutputError):
            save_png(torch.rand(3, 4, 4), locked / "sub" / "x.png")
    finally:
        locked.chmod(stat.S_IRWXU)


def test_save_png_unwritable_dir_simulated(tmp_path, monkeypatch):
    """Same check for root users, who ignore permission bits: the directory reports no write access."""
    import vbridge_core.fileio as fileio

    target_dir = tmp_path / "ro"
    target_dir.mkdir()
    monkeypatch.setattr(fileio.os, "access", lambda path, mode: Path(path) != target_dir)
    with pytest.raises(OutputError, match="not writable"):
        save_png(torch.rand(3, 4, 4), target_dir / "x.png")
    assert list(target_dir.iterdir()) == []


def test_save_png_output_is_a_file_not_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError):
        save_png(torch.rand(3, 4, 4), blocker / "x.png")


# ------------------------------------------------------------------------------- padding

@pytest.mark.parametrize("hw", [(37, 50), (5, 7), (64, 64), (1, 1), (1, 40), (33, 2), (31, 32)])
def test_pad_crop_roundtrip(hw):
    h, w = hw
    x = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(h * 100 + w))
    padded, info = pad_to_multiple(x)
    assert padded.shape[-2] % 32 == 0 and padded.shape[-1] % 32 == 0
    assert padded.shape[-2] - h < 32 and padded.shape[-1] - w < 32
    assert info.padded_size == tuple(padded.shape[-2:])
    assert torch.equal(crop_back(padded, info), x)
    # symmetric split, odd pixel at the bottom/right (as the release)
    assert info.top == (padded.shape[-2] - h) // 2 and info.left == (padded.shape[-1] - w) // 2
    assert torch.equal(padded[..., info.top:info.top + h, info.left:info.left + w], x)


def test_no_pad_needed_returns_input():
    x = torch.rand(1, 3, 64, 64)
    padded, info = pad_to_multiple(x)
    assert padded is x and info.is_identity
    assert crop_back(padded, info) is not None and torch.equal(crop_back(padded, info), x)


@pytest.mark.parametrize("hw", [(37, 50), (5, 7), (2, 3), (1, 6)])
def test_reflect_matches_numpy_and_torch(hw):
    h, w = hw
    x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(3))
    padded, info = pad_to_multiple(x, mode="reflect")
    ref = np.pad(x.numpy(), ((0, 0), (0, 0), (info.top, info.bottom), (info.left, info.right)), mode="reflect")
    np.testing.assert_array_equal(padded.numpy(), ref)
    if max(info.top, info.bottom) < h and max(info.left, info.right) < w:
        torch_ref = torch.nn.functional.pad(x, (info.left, info.right, info.top, info.bottom), mode="reflect")
        assert torch.equal(padded, torch_ref)


def test_pad_modes_and_3d_input():
    x = torch.rand(3, 10, 20)
    rep, info = pad_to_multiple(x, mode="replicate")
    assert rep.shape == (3, 32, 32)
    np.testing.assert_array_equal(rep.numpy(), np.pad(x.numpy(), ((0, 0), (info.top, info.bottom),
                                                                  (info.left, info.right)), mode="edge"))
    const, _ = pad_to_multiple(x, mode="constant")
    assert float(const[:, 0, 0].abs().sum()) == 0.0
    assert torch.equal(crop_back(const, info), x)
    with pytest.raises(InputError, match="pad mode"):
        pad_to_multiple(x, mode="wrap")
    padded8, info8 = pad_to_multiple(x, multiple=8)
    assert padded8.shape == (3, 16, 24) and torch.equal(crop_back(padded8, info8), x)


def test_pad_limits():
    with pytest.raises(InputError, match="empty"):
        pad_to_multiple(torch.zeros(1, 3, 0, 5))
    with pytest.raises(InputError, match="over the limit of 100 pixels"):
        pad_to_multiple(torch.zeros(1, 3, 11, 10), max_pixels=100)
    pad_to_multiple(torch.zeros(1, 3, 10, 10), max_pixels=100)  # exactly at the limit is fine
    with pytest.raises(InputError):
        crop_back(torch.zeros(1, 3, 32, 32), PadInfo(0, 0, 0, 0, 16, 16))


# ------------------------------------------------------------------------------- sizes and resize

def test_fit_release_size():
    assert fit_release_size(1080, 1920) == (1080, 1920)
    assert fit_release_size(1440, 2560) == (1440, 2560)
    assert fit_release_size(37, 50) == (37, 50)
    h, w = fit_release_size(2160, 3840)
    assert (h, w) == (1440, 2560)
    for hw in [(2160, 3840), (3000, 4000), (4000, 3000), (1500, 1000), (1000, 3000), (6000, 6000)]:
        h, w = fit_release_size(*hw)
        assert h % 32 == 0 and w % 32 == 0
        assert h * w <= 2560 * 1440
        aspect_in, aspect_out = hw[1] / hw[0], w / h
        assert abs(aspect_out - aspect_in) / aspect_in < 0.05
    # area rule: a wide image with small area keeps its area (one side may stay above 2560)
    assert fit_release_size(500, 3000) == (480, 2976)
    with pytest.raises(InputError):
        fit_release_size(0, 10)


def test_resize_image():
    x = torch.rand(2, 3, 64, 48)
    y = resize_image(x, (32, 24))
    assert y.shape == (2, 3, 32, 24) and float(y.min()) >= 0 and float(y.max()) <= 1
    assert resize_image(x, (64, 48)) is x
    c = torch.full((3, 40, 40), 0.3)
    assert torch.allclose(resize_image(c, (17, 23)), torch.full((3, 17, 23), 0.3), atol=1e-6)
    assert resize_image(x.half(), (16, 12)).dtype == torch.float16
    with pytest.raises(InputError):
        resize_image(x, (0, 5))


# ------------------------------------------------------------------------------- ComfyUI layout

@pytest.mark.parametrize("c", [1, 3, 4])
def test_comfy_conversions(c):
    imgs = torch.rand(2, 5, 7, c)
    bchw = comfy_to_bchw(imgs)
    assert bchw.shape == (2, 3, 5, 7) and bchw.dtype == torch.float32
    assert torch.equal(bchw[:, 0], imgs[..., 0])
    back = bchw_to_comfy(bchw)
    assert back.shape == (2, 5, 7, 3)
    if c == 3:
        assert torch.equal(back, imgs)
    assert bchw_to_comfy(torch.rand(2, c, 5, 7)).shape == (2, 5, 7, 3)
    assert comfy_to_bchw(imgs[0]).shape == (1, 3, 5, 7)
    with pytest.raises(InputError):
        comfy_to_bchw(torch.rand(1, 5, 7, 2))


def test_sample_generator_reproduces_shipped_pixels(tmp_path):
    import importlib.util

    root = Path(__file__).resolve().parents[1] / "vbridge_core" / "assets"
    spec = importlib.util.spec_from_file_location("make_samples", root / "make_samples.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    written = mod.generate(tmp_path)
    assert len(written) == 12
    for p in written:
        shipped = root / "samples" / p.relative_to(tmp_path)
        assert np.array_equal(np.asarray(Image.open(p)), np.asarray(Image.open(shipped))), shipped


def test_shipped_samples_are_pairs():
    root = Path(__file__).resolve().parents[1] / "vbridge_core" / "assets" / "samples"
    tasks = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert tasks == ["deblur", "denoise"]
    total = 0
    for task in tasks:
        lqs = sorted(p.name for p in (root / task / "lq").glob("*.png"))
        hqs = sorted(p.name for p in (root / task / "hq").glob("*.png"))
        assert lqs == hqs and len(lqs) == 3
        for name in lqs:
            lq, hq = load_image(root / task / "lq" / name), load_image(root / task / "hq" / name)
            assert lq.shape == hq.shape == (3, 64, 64)
            assert 0 < float((lq - hq).abs().mean()) < 0.2
            total += (root / task / "lq" / name).stat().st_size + (root / task / "hq" / name).stat().st_size
    assert total < 200_000


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permission bits")
def test_atomic_outputs_get_the_usual_file_mode(tmp_path):
    """Outputs go through mkstemp (0600); they must end up as a plain open() would leave them (0666 & ~umask),
    else ComfyUI's server or other users cannot read the written images, LoRAs and settings."""
    from vbridge_core.fileio import save_safetensors_atomic, write_json_atomic

    old = os.umask(0o022)
    try:
        paths = [save_png(torch.rand(3, 4, 4), tmp_path / "a.png"), write_json_atomic(tmp_path / "s.json", {"a": 1}),
                 save_safetensors_atomic({"x": torch.zeros(2)}, tmp_path / "w.safetensors")]
        os.umask(0o027)
        paths.append(save_png(torch.rand(3, 4, 4), tmp_path / "b.png"))
    finally:
        os.umask(old)
    modes = [stat.S_IMODE(os.stat(p).st_mode) for p in paths]
    assert modes == [0o644, 0o644, 0o644, 0o640]
