"""``python -m vbridge_core cache-calibrate``: calibrate MagCache and measure what step caching costs.

It restores the given images once without caching, with diffusers' MagCache in calibration mode
(nothing is skipped; the per-step residual magnitude ratios are recorded), writes those ratios to
``<out>/magcache.json`` (use it as ``--cache mag:<out>/magcache.json``), then restores the same
images with each cache to evaluate (default: ``fbc`` and the fresh MagCache file) and reports, per
cache, the fraction of DiT passes skipped and the deviation from the uncached output (PSNR in dB
and max absolute difference of the restored images), also written to ``<out>/cache_report.json``.

Ratios depend on the model, the LoRA, the step count and the solver: calibrate with the settings
you restore with (the same ``--lora``, ``--preset``/``--steps``, ``--guidance``).
"""
from __future__ import annotations

import argparse
import logging
import math
import time
from typing import Any, Callable

from .cli_common import HelpFormatter, collect_inputs, parse_dtype
from .errors import InputError
from .validate import float_arg

logger = logging.getLogger("vbridge_core")


def add_cache_parser(sub, add_model_args: Callable[..., None], add_sampler_args: Callable[..., None]) -> None:
    """Register ``cache-calibrate`` on the CLI's subparsers."""
    c = sub.add_parser("cache-calibrate", formatter_class=HelpFormatter,
                       help="calibrate MagCache for a LoRA and report the deviation of step caching")
    c.add_argument("inputs", nargs="+", metavar="IN", help="degraded images (or folders) to calibrate on")
    c.add_argument("--out", required=True, metavar="DIR", help="folder for magcache.json and cache_report.json")
    c.add_argument("--lora", metavar="FILE", help="V-Bridge restoration LoRA (.safetensors)")
    c.add_argument("--lora-strength", type=float_arg("--lora-strength"), default=1.0, help="restoration LoRA strength")
    c.add_argument("--evaluate", nargs="*", default=None, metavar="SPEC",
                   help="caches to evaluate after calibrating (default: fbc and the new MagCache file)")
    c.add_argument("--mag-threshold", type=float_arg("--mag-threshold", min=0, min_inclusive=False), default=None, help="MagCache threshold to evaluate (default 0.06)")
    add_model_args(c)
    add_sampler_args(c)


def cmd_cache_calibrate(a: argparse.Namespace) -> int:
    from .cache import DEFAULT_MAG_THRESHOLD, MAG_FILE_FORMAT, CacheSpec
    from .cli import _sampler_kwargs
    from .fileio import write_json_atomic
    from .outputs import check_output_dir
    from .images import load_image
    from .metrics import psnr
    from .pipeline import VBridgePipeline

    out = check_output_dir(a.out)  # created by the first file written
    paths = collect_inputs(a.inputs)
    images = [load_image(p) for p in paths]
    pipe = VBridgePipeline.from_files(a.model, dit=a.dit, vae=a.vae, lora=a.lora, lora_strength=a.lora_strength,
                                      device=a.device, dtype=parse_dtype(a.dtype), text_encoder=a.text_encoder,
                                      tokenizer=a.tokenizer, vae_tiling=a.vae_tiling, offload=a.offload,
                                      accelerator_lora=a.accelerator_lora, accelerator_strength=a.accelerator_strength)
    pipe.maybe_compile(a.compile)
    kw = _sampler_kwargs(a, lora=pipe.adapter_file("restoration"))
    kw.pop("cache", None)
    if kw.get("guidance_skip_tail") and kw.get("guidance", 1.0) > 1.0:
        raise InputError("MagCache counts steps per model call type, so calibrate without a guidance skip tail "
                         "(--guidance-skip-tail 0); First Block Cache (--cache fbc) works with any guidance")

    t0 = time.perf_counter()
    ratios: list[float] = []
    reference = []
    for img in images:  # one image per run: the hook state holds one series
        spec = CacheSpec("mag", DEFAULT_MAG_THRESHOLD, calibrate=True)
        res = pipe.restore([img], cache=spec, **kw)
        reference.append(res.final[0])
        cal = res.info.get("cache_calibration") or []
        ratios = cal if not ratios else [(x + y) / 2 for x, y in zip(ratios, cal)] if len(cal) == len(ratios) else cal
    if not ratios:
        raise InputError("MagCache calibration recorded no steps; check the sampler settings")
    steps = res.info["steps"]
    mag_file = out / "magcache.json"
    write_json_atomic(mag_file, {"format": MAG_FILE_FORMAT, "mag_ratios": [round(r, 6) for r in ratios],
                                 "steps": steps, "solver": kw.get("solver"), "guidance": kw.get("guidance"),
                                 "lora": a.lora, "inputs": [str(p) for p in paths],
                                 "uncached_seconds": round(time.perf_counter() - t0, 3)})
    logger.info("wrote MagCache ratios for %d steps to %s", steps, mag_file)

    thr = a.mag_threshold if a.mag_threshold is not None else DEFAULT_MAG_THRESHOLD
    specs = a.evaluate if a.evaluate is not None else ["fbc", f"mag:{mag_file}:{thr:g}"]
    rows: list[dict[str, Any]] = []
    for spec in specs:
        t1 = time.perf_counter()
        res = pipe.restore(images, cache=spec, **kw)
        seconds = time.perf_counter() - t1
        dev = [(float(psnr(x, r)), float((x - r).abs().max())) for x, r in zip(res.final, reference)]
        report = res.info.get("cache") or {}
        worst = min(d[0] for d in dev)
        rows.append(dict(cache=spec, skipped_fraction=report.get("skipped_fraction", 0.0),
                         psnr_to_uncached_db=round(worst, 3) if math.isfinite(worst) else None,  # None: identical
                         max_abs_diff=round(max(d[1] for d in dev), 6), seconds=round(seconds, 3)))
    write_json_atomic(out / "cache_report.json", {"steps": steps, "sampler": {k: v for k, v in kw.items()},
                                                  "rows": rows})
    print(f"{'cache':<40} {'skipped':>8} {'PSNR vs uncached':>17} {'max diff':>9} {'seconds':>8}")
    for r in rows:
        db = "identical" if r["psnr_to_uncached_db"] is None else f"{r['psnr_to_uncached_db']:.2f} dB"
        print(f"{r['cache']:<40} {r['skipped_fraction']:>8.1%} {db:>17} "
              f"{r['max_abs_diff']:>9.4f} {r['seconds']:>8.2f}")
    return 0
