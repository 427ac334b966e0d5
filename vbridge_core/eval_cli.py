"""``python -m vbridge_core eval``: PSNR/SSIM of restored images against references, per protocol.

Protocols (see :mod:`.metrics`):

* ``foundir`` (default): FoundIR's tool, pyiqa's default ``psnr`` (RGB) and ``ssim`` (rounded YIQ
  luma); equal to pyiqa within 1e-4 (``tests/test_metrics_pyiqa.py``). Use it for the FoundIR table.
* ``release``: the authors' MATLAB-style ``eval.py``: PSNR/SSIM on BT.601 Y and the RGB variants
  (PSNR averaged over channels, SSIM averaged over channels).
* ``custom``: ``--psnr-channel`` / ``--ssim-channel`` choose the channels.

Files are matched by name (stem); ``--json FILE`` writes ``{"protocol", "mean": {metric: value},
"images": [{"name", metric: value...}], "count"}`` atomically, with infinite PSNRs (identical
images, custom protocol) written as the string ``"inf"``.
"""
from __future__ import annotations

import argparse
import logging
import math
from typing import Any

from .cli_common import collect_inputs
from .errors import InputError

logger = logging.getLogger(__name__)

EVAL_PROTOCOLS = ("foundir", "release", "custom")
PSNR_CHANNELS = ("rgb", "rgb_mean", "y", "y_pyiqa")
SSIM_CHANNELS = ("y", "rgb", "y_pyiqa")


def add_eval_parser(sub: Any, formatter: type) -> argparse.ArgumentParser:
    """Register the ``eval`` subcommand."""
    e = sub.add_parser("eval", help="PSNR/SSIM of restored images against references (matching names)",
                       formatter_class=formatter)
    e.add_argument("restored", help="folder of restored images")
    e.add_argument("reference", help="folder of reference (HQ) images")
    e.add_argument("--protocol", choices=EVAL_PROTOCOLS, default=None,
                   help="foundir: pyiqa's psnr (RGB) and ssim (rounded YIQ luma), as FoundIR scores (default); "
                   "release: the authors' MATLAB-style Y and RGB variants; custom: --psnr-channel/--ssim-channel")
    e.add_argument("--psnr-channel", choices=PSNR_CHANNELS, default=None,
                   help="custom protocol: PSNR on RGB (all channels), rgb_mean (mean of channel PSNRs), BT.601 Y, "
                   "or pyiqa's Y (default rgb)")
    e.add_argument("--ssim-channel", choices=SSIM_CHANNELS, default=None,
                   help="custom protocol: SSIM on BT.601 Y, the RGB mean, or pyiqa's Y (default y)")
    e.add_argument("--json", metavar="FILE", default=None, help="also write the per-image and mean values as JSON")
    return e


def _protocol(a: argparse.Namespace) -> tuple[str, dict[str, tuple]]:
    """The protocol name and its metrics table ``{name: (fn, channel, kwargs)}``."""
    from .metrics import PROTOCOLS

    channels_given = a.psnr_channel is not None or a.ssim_channel is not None
    protocol = a.protocol or ("custom" if channels_given else "foundir")
    if protocol != "custom":
        if channels_given:
            raise InputError(f"--psnr-channel/--ssim-channel apply to --protocol custom only (the {protocol} protocol "
                             "fixes its channels); drop them or add --protocol custom")
        return protocol, {k: (v[0], v[1], v[2] if len(v) > 2 else {}) for k, v in PROTOCOLS[protocol].items()}
    return protocol, {"psnr": ("psnr", a.psnr_channel or "rgb", {}), "ssim": ("ssim", a.ssim_channel or "y", {})}


def _json_value(v: float) -> Any:
    return "inf" if math.isinf(v) else v


def cmd_eval(a: argparse.Namespace) -> int:
    """Score every restored image that has a same-named reference; print a table, optionally write JSON."""
    from .fileio import write_json_atomic
    from .images import load_image
    from .metrics import psnr, ssim, summarize

    protocol, table = _protocol(a)
    restored = {p.stem: p for p in collect_inputs([a.restored])}
    refs = {p.stem: p for p in collect_inputs([a.reference])}
    if a.json:
        from .outputs import check_single_output

        check_single_output(a.json, [*restored.values(), *refs.values()], "--json")
    common = sorted(set(restored) & set(refs))
    missing = sorted(set(restored) ^ set(refs))
    if not common:
        raise InputError(f"no file names in common between {a.restored} and {a.reference}")
    if missing:
        logger.warning("skipped files without a partner: %s", missing[:10])
    fns = {"psnr": psnr, "ssim": ssim}
    names = list(table)
    rows: list[dict[str, Any]] = []
    for s in common:
        x, y = load_image(restored[s]), load_image(refs[s])
        if x.shape != y.shape:
            raise InputError(f"{s}: restored {tuple(x.shape[1:])} and reference {tuple(y.shape[1:])} differ in size; "
                             "score images at the reference size")
        row: dict[str, Any] = {"name": s}
        for m, (fn, ch, kw) in table.items():
            row[m] = float(fns[fn](x, y, channel=ch, **kw))
        rows.append(row)
    mean = {m: summarize([r[m] for r in rows]) for m in names}
    for r in rows:
        print(r["name"] + "\t" + "\t".join(_fmt(m, r[m]) for m in names))
    print("mean\t" + "\t".join(_fmt(m, mean[m]) for m in names) + f"\t({len(rows)} images; {protocol} protocol: "
          + ", ".join(f"{m} on {ch}" for m, (_, ch, _) in table.items()) + ")")
    if a.json:
        write_json_atomic(a.json, {
            "protocol": protocol,
            "definitions": {m: {"metric": fn, "channel": ch, **kw} for m, (fn, ch, kw) in table.items()},
            "mean": {m: _json_value(v) for m, v in mean.items()},
            "images": [{k: (_json_value(v) if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
            "count": len(rows)})
        logger.info("wrote %s", a.json)
    return 0


def _fmt(name: str, value: float) -> str:
    return f"{name.upper()} {value:.3f} dB" if name.startswith("psnr") else f"{name.upper()} {value:.4f}"
