"""Hand-crafted image statistics that separate the degradation families (the perceiver's input).

Why hand-crafted: each family leaves a physical trace that a few cheap statistics measure directly,
so a tiny network on top of them trains in a minute on a CPU and generalises to degradations made
by other code (which a small CNN trained on one implementation does much less well). All
statistics are computed at the crop's native pixel scale and are size-normalised means or
quantiles, so any crop from 24 px up works.

Groups (see :data:`FEATURE_NAMES`): tone (brightness quantiles, contrast, saturation, dark/bright
channel: low light, haze), noise (robust wavelet noise estimates at two scales, their ratio, their
cross-channel correlation and signal dependence), sharpness (gradient energy at three scales and
per direction: blur, motion blur), JPEG (8x8 block-boundary excess at the strongest phase, zeroed
DCT coefficients on that grid, chroma softness), streaks and flakes (white top-hats with line and
square structuring elements: rain is thin in x and long in y, snow is small and round).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_LUMA = (0.299, 0.587, 0.114)
_EPS = 1e-4


def _luma(x: torch.Tensor) -> torch.Tensor:
    w = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def _q(x: torch.Tensor, qs: list[float]) -> torch.Tensor:
    """Per-image quantiles of ``x`` [B, ...] -> [B, len(qs)] (subsampled above 65k values)."""
    flat = x.reshape(x.shape[0], -1)
    if flat.shape[1] > 4096:
        flat = flat[:, :: math.ceil(flat.shape[1] / 4096)]
    srt = flat.sort(1).values
    idx = torch.tensor([round(q * (srt.shape[1] - 1)) for q in qs], device=flat.device)
    return srt[:, idx]


def _mad_sigma(d: torch.Tensor) -> torch.Tensor:
    """Robust std (median absolute value / 0.6745) per image and channel of a residual [B, C, h, w]."""
    b, c = d.shape[:2]
    flat = d.abs().reshape(b, c, -1)
    return flat.median(dim=-1).values / 0.6745


def _haar_hh(x: torch.Tensor) -> torch.Tensor:
    """Finest diagonal Haar detail (unit gain for white noise)."""
    h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
    x = x[..., :h, :w]
    return (x[..., 0::2, 0::2] - x[..., 1::2, 0::2] - x[..., 0::2, 1::2] + x[..., 1::2, 1::2]) / 2.0


def _down2(x: torch.Tensor) -> torch.Tensor:
    h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
    return F.avg_pool2d(x[..., :h, :w], 2)


def _grad_energy(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean |difference| of ``y`` [B, 1, h, w] along x, y and the two diagonals -> four [B] tensors."""
    gx = (y[..., :, 1:] - y[..., :, :-1]).abs().mean((1, 2, 3))
    gy = (y[..., 1:, :] - y[..., :-1, :]).abs().mean((1, 2, 3))
    gd = (y[..., 1:, 1:] - y[..., :-1, :-1]).abs().mean((1, 2, 3)) / math.sqrt(2)
    ga = (y[..., 1:, :-1] - y[..., :-1, 1:]).abs().mean((1, 2, 3)) / math.sqrt(2)
    return gx, gy, gd, ga


def _blockiness(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """JPEG grid evidence along columns and rows: (excess_x, excess_y, phase_x, phase_y).

    The mean absolute step between neighbouring columns is folded by ``column mod 8``; a JPEG
    grid makes one phase stand out. ``excess`` = log(strongest phase / median of the others), so
    it does not depend on where the crop starts.
    """
    out = []
    for dim in (-1, -2):
        d = (y.narrow(dim, 1, y.shape[dim] - 1) - y.narrow(dim, 0, y.shape[dim] - 1)).abs()
        prof = d.mean(dim=(1, 2) if dim == -1 else (1, 3))  # [B, n-1]
        n = prof.shape[1] // 8 * 8
        if n < 8:
            out.append((torch.zeros(y.shape[0]), torch.zeros(y.shape[0], dtype=torch.long)))
            continue
        fold = prof[:, :n].reshape(prof.shape[0], -1, 8).mean(1)  # [B, 8]
        top, idx = fold.max(1)
        rest = fold.sort(1).values[:, :7].median(1).values
        out.append((torch.log((top + _EPS) / (rest + _EPS)), idx))
    return out[0][0], out[1][0], out[0][1], out[1][1]


def _dct_matrix(n: int = 8) -> torch.Tensor:
    k = torch.arange(n, dtype=torch.float32)
    m = torch.cos(math.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * n)) * math.sqrt(2.0 / n)
    m[0] /= math.sqrt(2.0)
    return m


_DCT8 = _dct_matrix()


def _dct_zero_fraction(y: torch.Tensor, phase_x: torch.Tensor, phase_y: torch.Tensor) -> torch.Tensor:
    """Share of near-zero AC coefficients (|c| < 0.5/255 x 8) of 8x8 DCT blocks on the detected grid [B]."""
    res = []
    for i in range(y.shape[0]):
        ox, oy = (int(phase_x[i]) + 1) % 8, (int(phase_y[i]) + 1) % 8
        t = y[i, 0, oy:, ox:]
        h, w = t.shape[0] // 8 * 8, t.shape[1] // 8 * 8
        if h < 8 or w < 8:
            res.append(torch.tensor(0.0))
            continue
        blocks = t[:h, :w].reshape(h // 8, 8, w // 8, 8).permute(0, 2, 1, 3).reshape(-1, 8, 8) * 255.0
        c = _DCT8 @ blocks @ _DCT8.T
        ac = c.reshape(-1, 64)[:, 1:]
        res.append((ac.abs() < 0.5).float().mean())
    return torch.stack(res)


def _max_filter(y: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """Running maximum over ``k`` (odd) pixels along ``dim`` (-1 or -2), replicated borders."""
    if k <= 1:
        return y
    r = k // 2
    pad = (r, r, 0, 0) if dim == -1 else (0, 0, r, r)
    p = F.pad(y, pad, mode="replicate")
    # running max by doubling: after the loop m[i] = max(p[i : i + span])
    m, span = p, 1
    while span * 2 <= k:
        m = torch.maximum(m.narrow(dim, 0, m.shape[dim] - span), m.narrow(dim, span, m.shape[dim] - span))
        span *= 2
    if span < k:  # cover the remaining k - span pixels with a second, overlapping window
        m = torch.maximum(m.narrow(dim, 0, m.shape[dim] - (k - span)), m.narrow(dim, k - span, m.shape[dim] - (k - span)))
    return m.narrow(dim, 0, y.shape[dim])


def _dilate(y: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    return _max_filter(_max_filter(y, kw, -1), kh, -2)


def _open(y: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    """Grey-level opening (erosion then dilation) with a kh x kw rectangle."""
    return _dilate(-_dilate(-y, kh, kw), kh, kw)


def _corr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = a.flatten(1) - a.flatten(1).mean(1, keepdim=True)
    b = b.flatten(1) - b.flatten(1).mean(1, keepdim=True)
    return (a * b).mean(1) / (a.pow(2).mean(1).sqrt() * b.pow(2).mean(1).sqrt() + 1e-8)


def _shifts(y: torch.Tensor, m: int):
    """``z(dy, dx)`` with ``z[p] = y[p + (dy, dx)]`` (replicated borders, ``|dy|, |dx| <= m``)."""
    h, w = y.shape[-2:]
    p = F.pad(y, (m, m, m, m), mode="replicate")
    return lambda dy, dx: p[..., m + dy:m + dy + h, m + dx:m + dx + w]


def _ring_max(y: torch.Tensor, r: int) -> torch.Tensor:
    """Maximum of ``y`` at 8 points on a circle of radius ``r`` around each pixel."""
    s = _shifts(y, r)
    d = max(1, round(r / math.sqrt(2)))
    pts = [(r, 0), (-r, 0), (0, r), (0, -r), (d, d), (d, -d), (-d, d), (-d, -d)]
    out = s(*pts[0])
    for q in pts[1:]:
        out = torch.maximum(out, s(*q))
    return out


def _flake_maps(y: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Isolated bright spots: ``iso = y - max(ring of radius r)`` (>= 0) and the mask of its local maxima.

    A flake smaller than the ring stands above every ring point; an edge, a large bright region or
    a thin line (rain, wires) has bright ring points too, so it scores ~0."""
    iso = (y - _ring_max(y, r)).clamp(min=0)
    peak = (iso > 0) & (iso >= _dilate(iso, 3, 3))
    return iso, peak


#: Rain-like ridges: tilts from vertical (degrees) searched, and the off-axis tilts they are compared with.
_RIDGE_TILTS = (-30.0, -15.0, 0.0, 15.0, 30.0)
_RIDGE_OFF = (60.0, 90.0, -60.0)


def _ridge(y: torch.Tensor, tilt_deg: float, s) -> torch.Tensor:
    """Thin bright line evidence at one tilt: brighter than both sides (2 px across) at the pixel and
    4 px up and down the line (min of the three), so short blobs and edges score ~0."""
    a = math.radians(tilt_deg)
    ty, tx = math.cos(a), math.sin(a)  # along the line
    ny, nx = -tx, ty  # across

    def across(oy: int, ox: int) -> torch.Tensor:
        c = s(oy, ox)
        return c - torch.maximum(s(oy + round(2 * ny), ox + round(2 * nx)), s(oy - round(2 * ny), ox - round(2 * nx)))

    up = (round(4 * ty), round(4 * tx))
    return torch.minimum(torch.minimum(across(0, 0), across(*up)), across(-up[0], -up[1])).clamp(min=0)


FEATURE_NAMES: tuple[str, ...] = (
    # tone
    "y_q01", "y_q05", "y_q25", "y_q50", "y_q75", "y_q95", "y_q99", "y_mean", "y_std", "log_y_std",
    "dark_frac", "bright_frac", "sat_mean", "sat_q90", "dark_ch_mean", "dark_ch_q10", "dark_ch_q90",
    "bright_ch_mean", "contrast_rel", "log_mean",
    # noise
    "log_sig_y", "log_sig_r", "log_sig_g", "log_sig_b", "log_sig_y2", "noise_ratio", "hh_corr_rg",
    "hh_corr_rb", "log_sig_rel", "noise_dark_bright", "log_sig_lap",
    # sharpness
    "log_g1", "log_g2", "log_g4", "g1_g2", "g2_g4", "g1_rel", "g_dir_min", "g_dir_max", "g_dir_spread",
    "g_dir_spread2", "edge_q99_rel", "lap_rel",
    # jpeg
    "block_x", "block_y", "block_sum", "block_min", "dct_zero", "chroma_soft", "chroma_soft2",
    # streaks / flakes
    "th_h_mean", "th_v_mean", "th_sq_mean", "th_h_q99", "th_v_q99", "th_sq_q99", "th_h_v_ratio",
    "th_sq_frac", "th_h_frac", "th_v_frac", "th_diag_ratio", "th_sat", "white_blob_frac", "white_blob_share",
    "white_line_frac",
    # isolated bright spots (flakes) and thin bright lines (rain), v2
    "flk3_d05", "flk3_d15", "flk3_q", "flk6_d05", "flk6_d15", "flk6_d30", "flk6_q", "flk6_cells", "flk6_bg",
    "flk6_sat", "flk6_big", "ridge_mean", "ridge_f04", "ridge_f10", "ridge_q", "ridge_off_ratio", "ridge_cells",
    # edge width (blur), v2
    "ew_x", "ew_y", "ew_min", "ew_max", "ew2_min", "ew2_max",
    # crop side (densities and quantiles of a 64 px crop are noisier than of a 128 px one), v2
    "log_side",
)
#: Version of the feature set (stored in the weights file; a file from another version is refused).
FEATURE_VERSION = 2


def crop_features(x: torch.Tensor) -> torch.Tensor:
    """Statistics of a batch of same-size RGB crops ``[B, 3, h, w]`` (0..1) -> ``[B, len(FEATURE_NAMES)]``."""
    x = x.to(torch.float32).clamp(0.0, 1.0)
    b = x.shape[0]
    y = _luma(x)
    f: list[torch.Tensor] = []

    # tone
    yq = _q(y, [0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99])
    ymean, ystd = y.mean((1, 2, 3)), y.std((1, 2, 3))
    mx, mn = x.amax(1, keepdim=True), x.amin(1, keepdim=True)
    sat = (mx - mn) / (mx + 0.05)
    dark = -_dilate(-mn, 7, 7)
    bright = _dilate(mx, 7, 7)
    dq = _q(dark, [0.1, 0.9])
    f += [yq, ymean[:, None], ystd[:, None], torch.log(ystd + 1e-3)[:, None],
          (y < 0.06).float().mean((1, 2, 3))[:, None], (y > 0.94).float().mean((1, 2, 3))[:, None],
          sat.mean((1, 2, 3))[:, None], _q(sat, [0.9]), dark.mean((1, 2, 3))[:, None], dq,
          bright.mean((1, 2, 3))[:, None], ((yq[:, 5] - yq[:, 1]) / (yq[:, 5] + 0.05))[:, None],
          torch.log(ymean + 0.01)[:, None]]

    # noise
    hh = _haar_hh(x)
    hy = _haar_hh(y)
    sig_c = _mad_sigma(hh)  # [B, 3]
    sig_y = _mad_sigma(hy)[:, 0]
    sig_y2 = _mad_sigma(_haar_hh(_down2(y)))[:, 0] * 2.0  # white noise halves per 2x average; x2 to compare
    lap = y[..., 1:-1, 1:-1] * 4 - y[..., :-2, 1:-1] - y[..., 2:, 1:-1] - y[..., 1:-1, :-2] - y[..., 1:-1, 2:]
    sig_lap = _mad_sigma(lap / math.sqrt(20.0))[:, 0]
    ysm = _down2(y)
    hh_abs = hy.abs()
    dark_m = (ysm < ysm.flatten(1).median(1).values.view(b, 1, 1, 1)).float()
    nd = (hh_abs * dark_m).sum((1, 2, 3)) / dark_m.sum((1, 2, 3)).clamp(min=1)
    nb = (hh_abs * (1 - dark_m)).sum((1, 2, 3)) / (1 - dark_m).sum((1, 2, 3)).clamp(min=1)
    f += [torch.log(sig_y + _EPS)[:, None], torch.log(sig_c + _EPS), torch.log(sig_y2 + _EPS)[:, None],
          torch.log((sig_y + _EPS) / (sig_y2 + _EPS))[:, None], _corr(hh[:, 0], hh[:, 1])[:, None],
          _corr(hh[:, 0], hh[:, 2])[:, None], torch.log((sig_y + _EPS) / (ymean + 0.02))[:, None],
          torch.log((nd + _EPS) / (nb + _EPS))[:, None], torch.log(sig_lap + _EPS)[:, None]]

    # sharpness
    y2 = _down2(y)
    y4 = _down2(y2)
    g1 = torch.stack(_grad_energy(y), 1)  # [B, 4]
    g2 = torch.stack(_grad_energy(y2), 1)
    g4 = torch.stack(_grad_energy(y4), 1) if min(y4.shape[-2:]) >= 2 else g2
    m1, m2, m4 = g1.mean(1), g2.mean(1), g4.mean(1)
    dir_ratio = torch.log((g1 + _EPS) / (g2 + _EPS))  # per direction
    dir_ratio2 = torch.log((g2 + _EPS) / (g4 + _EPS))
    gx = (y[..., :, 1:] - y[..., :, :-1]).abs()
    f += [torch.log(m1 + _EPS)[:, None], torch.log(m2 + _EPS)[:, None], torch.log(m4 + _EPS)[:, None],
          torch.log((m1 + _EPS) / (m2 + _EPS))[:, None], torch.log((m2 + _EPS) / (m4 + _EPS))[:, None],
          torch.log((m1 + _EPS) / (ystd + 1e-3))[:, None], dir_ratio.min(1).values[:, None],
          dir_ratio.max(1).values[:, None], (dir_ratio.max(1).values - dir_ratio.min(1).values)[:, None],
          (dir_ratio2.max(1).values - dir_ratio2.min(1).values)[:, None],
          torch.log((_q(gx, [0.99])[:, 0] + _EPS) / (ystd + 1e-3))[:, None],
          torch.log((lap.abs().mean((1, 2, 3)) + _EPS) / (ystd + 1e-3))[:, None]]

    # jpeg
    bx, by, px, py = _blockiness(y)
    cb = x[:, 2:3] - y
    cr = x[:, 0:1] - y
    chroma = torch.cat([cb, cr], 1)
    cg1 = torch.stack(_grad_energy(chroma.mean(1, keepdim=True)), 1).mean(1)
    cg2 = torch.stack(_grad_energy(_down2(chroma.mean(1, keepdim=True))), 1).mean(1)
    f += [bx[:, None], by[:, None], (bx + by)[:, None], torch.minimum(bx, by)[:, None],
          _dct_zero_fraction(y, px, py)[:, None], torch.log((cg1 + _EPS) / (m1 + _EPS))[:, None],
          torch.log((cg1 + _EPS) / (cg2 + _EPS))[:, None]]

    # streaks and flakes (white top-hats)
    th_h = (y - _open(y, 1, 9)).clamp(min=0)  # removes structures thinner than 9 px in x (vertical streaks)
    th_v = (y - _open(y, 9, 1)).clamp(min=0)  # removes structures thinner than 9 px in y
    th_sq = (y - _open(y, 7, 7)).clamp(min=0)  # removes small blobs (flakes) and all thin lines
    th_d = (y - _open(y, 5, 5)).clamp(min=0)
    qs = lambda t: _q(t, [0.99])[:, 0]  # noqa: E731
    mh, mv, ms = th_h.mean((1, 2, 3)), th_v.mean((1, 2, 3)), th_sq.mean((1, 2, 3))
    satm = (sat * (th_sq > 0.1).float()).sum((1, 2, 3)) / (th_sq > 0.1).float().sum((1, 2, 3)).clamp(min=1)
    f += [torch.log(mh + _EPS)[:, None], torch.log(mv + _EPS)[:, None], torch.log(ms + _EPS)[:, None],
          qs(th_h)[:, None], qs(th_v)[:, None], qs(th_sq)[:, None], torch.log((mh + _EPS) / (mv + _EPS))[:, None],
          (th_sq > 0.12).float().mean((1, 2, 3))[:, None], (th_h > 0.08).float().mean((1, 2, 3))[:, None],
          (th_v > 0.08).float().mean((1, 2, 3))[:, None],
          torch.log((th_d.mean((1, 2, 3)) + _EPS) / (ms + _EPS))[:, None], satm[:, None]]
    # snow is white and grey-free: small bright blobs that are near-white and unsaturated (gravel's
    # bright stones are grey); rain streaks are bright thin lines
    whiteish = ((y > 0.72) & (sat < 0.25)).float()
    blob = (th_sq > 0.1).float()
    wb = (blob * whiteish).mean((1, 2, 3))
    f += [torch.log(wb + 1e-4)[:, None], (wb / blob.mean((1, 2, 3)).clamp(min=1e-4))[:, None],
          torch.log(((th_h > 0.08).float() * whiteish).mean((1, 2, 3)) + 1e-4)[:, None]]
    # isolated bright spots (snow flakes): local maxima standing above a ring of radius 3 or 6 px
    def _dens(m: torch.Tensor) -> torch.Tensor:
        return torch.log(m.float().mean((1, 2, 3)) + 1e-4)[:, None]

    def _cells(m: torch.Tensor) -> torch.Tensor:  # share of 4 x 4 cells holding at least one
        hh, ww = m.shape[-2] // 4 * 4, m.shape[-1] // 4 * 4
        if hh < 4 or ww < 4:
            return m.float().amax((1, 2, 3))[:, None]
        c = F.adaptive_max_pool2d(m[..., :hh, :ww].float(), 4)
        return c.mean((1, 2, 3))[:, None]

    iso3, pk3 = _flake_maps(y, 3)
    iso6, pk6 = _flake_maps(y, 6)
    p6 = pk6 & (iso6 > 0.05)
    ring6 = y - iso6
    f += [_dens(pk3 & (iso3 > 0.05)), _dens(pk3 & (iso3 > 0.15)), _q(iso3, [0.999]),
          _dens(p6), _dens(pk6 & (iso6 > 0.15)), _dens(pk6 & (iso6 > 0.3)), _q(iso6, [0.999]),
          _cells(pk6 & (iso6 > 0.1)),
          ((ring6 * p6).sum((1, 2, 3)) / p6.sum((1, 2, 3)).clamp(min=1))[:, None],
          ((sat * p6).sum((1, 2, 3)) / p6.sum((1, 2, 3)).clamp(min=1))[:, None],
          # spots that stand out at 6 px but not at 3 px are bigger than flakes (stones, speculars)
          torch.log((pk6 & (iso6 > 0.1) & (iso3 < 0.03)).float().mean((1, 2, 3)) + 1e-4)[:, None]]
    # thin bright lines near vertical (rain) vs off-vertical ones (wires, edges of thin structures)
    s8 = _shifts(y, 8)
    ridge = torch.stack([_ridge(y, t, s8) for t in _RIDGE_TILTS]).amax(0)
    off = torch.stack([_ridge(y, t, s8) for t in _RIDGE_OFF]).amax(0)
    f += [torch.log(ridge.mean((1, 2, 3)) + 1e-4)[:, None], (ridge > 0.04).float().mean((1, 2, 3))[:, None],
          (ridge > 0.1).float().mean((1, 2, 3))[:, None], _q(ridge, [0.995]),
          torch.log((ridge.mean((1, 2, 3)) + 1e-4) / (off.mean((1, 2, 3)) + 1e-4))[:, None], _cells(ridge > 0.06)]
    # edge width: at the strongest edges a sharp step is as high over 1 px as over 4 px; blur spreads it
    ew = []
    for dim in (-1, -2):
        n = y.shape[dim]
        d1 = (y.narrow(dim, 1, n - 1) - y.narrow(dim, 0, n - 1)).abs()
        d4 = (y.narrow(dim, 4, n - 4) - y.narrow(dim, 0, n - 4)).abs()
        d2 = (y.narrow(dim, 2, n - 2) - y.narrow(dim, 0, n - 2)).abs()
        q1, q4, q2 = _q(d1, [0.995])[:, 0], _q(d4, [0.995])[:, 0], _q(d2, [0.995])[:, 0]
        ew.append((torch.log((q1 + 0.01) / (q4 + 0.01)), torch.log((q1 + 0.01) / (q2 + 0.01))))
    ex, ey = ew[0][0], ew[1][0]
    f += [ex[:, None], ey[:, None], torch.minimum(ex, ey)[:, None], torch.maximum(ex, ey)[:, None],
          torch.minimum(ew[0][1], ew[1][1])[:, None], torch.maximum(ew[0][1], ew[1][1])[:, None]]
    f += [torch.full((b, 1), math.log(min(x.shape[-2:])), dtype=x.dtype)]
    out = torch.cat(f, 1)
    assert out.shape[1] == len(FEATURE_NAMES), (out.shape, len(FEATURE_NAMES))
    return torch.nan_to_num(out, nan=0.0, posinf=10.0, neginf=-10.0)
