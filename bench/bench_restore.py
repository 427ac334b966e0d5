#!/usr/bin/env python
"""Benchmark: our VBridgePipeline.restore vs diffusers' WanImageToVideoPipeline on the same work.

Both implementations get the same transformer and VAE objects (built once), the same image, the
same prompt embeddings and the same seed. For each one the script prints the median seconds of
``--runs`` timed runs after one warm-up run, the peak memory, the max abs difference of the final
frames, and the ratio ours / reference.

Default: the full Wan2.2-TI2V-5B architecture (4.9998 B DiT parameters) with random weights, bf16,
on CUDA; random prompt embeddings ``[1, 512, 4096]`` (no text encoder is loaded). ``--tiny``: the
tiny random models from ``vbridge_core.tiny`` in fp32 on CPU, a correctness / overhead check.

Memory: on CUDA, ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (resident
weights included). On CPU, the peak resident set size above the RSS just before the run, sampled
every 2 ms from ``/proc/self/statm`` (approximate: the allocator may reuse memory it kept from an
earlier run, so a delta can be smaller than the work's true footprint).

    python bench/bench_restore.py --tiny
    python bench/bench_restore.py --height 1024 --width 1024 --frames 5 --steps 50 --guidance 1 --runs 3 \
        --json bench_5b.json
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

logger = logging.getLogger("bench_restore")

#: Wan2.2-TI2V-5B DiT, as in shared/anchors/gpu_anchor_bench.py (and vbridge_core/configs).
FULL_TRANSFORMER_CONFIG: dict[str, Any] = dict(
    patch_size=(1, 2, 2), num_attention_heads=24, attention_head_dim=128, in_channels=48, out_channels=48,
    text_dim=4096, freq_dim=256, ffn_dim=14336, num_layers=30, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=1024)
#: Wan2.2 VAE, as in gpu_anchor_bench.py (identity latent normalisation).
FULL_VAE_CONFIG: dict[str, Any] = dict(
    base_dim=160, decoder_base_dim=256, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
    temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12, patch_size=2,
    scale_factor_temporal=4, scale_factor_spatial=16, latents_mean=[0.0] * 48, latents_std=[1.0] * 48)
FULL_TEXT_LEN = 512

IMPLS = ("ours", "diffusers")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true",
                   help="tiny random models, fp32, CPU by default (a correctness/overhead check, not a speed claim)")
    p.add_argument("--height", type=int, default=None, help="image height (default 1024; --tiny: 64)")
    p.add_argument("--width", type=int, default=None, help="image width (default 1024; --tiny: 64)")
    p.add_argument("--frames", type=int, default=5, help="pseudo-video frames F (default 5)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default 50; --tiny: 4)")
    p.add_argument("--guidance", type=float, default=1.0, help="guidance scale (default 1.0: one DiT call a step)")
    p.add_argument("--shift", type=float, default=5.0, help="flow shift (default 5.0)")
    p.add_argument("--runs", type=int, default=3, help="timed runs per implementation after one warm-up (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights, image, prompts and noise (default 0)")
    p.add_argument("--device", default=None, help="torch device (default cuda; --tiny: cpu)")
    p.add_argument("--json", dest="json_out", default=None, metavar="OUT", help="also write the results as JSON")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress")
    args = p.parse_args(argv)
    args.height = args.height or (64 if args.tiny else 1024)
    args.width = args.width or (64 if args.tiny else 1024)
    args.steps = args.steps or (4 if args.tiny else 50)
    args.device = args.device or ("cpu" if args.tiny else "cuda")
    if args.runs < 1:
        p.error("--runs must be at least 1")
    if args.height % 16 or args.width % 16:
        p.error("--height and --width must be multiples of 16 (the diffusers reference does not pad)")
    if args.frames < 1 or (args.frames - 1) % 4:
        p.error("--frames must be 4k+1 (1, 5, 9, ...)")
    return args


# ---------------------------------------------------------------------------- measurement helpers
class _RssSampler:
    """Peak RSS of this process above the RSS at start, sampled in a background thread (Linux)."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self.available = os.path.exists("/proc/self/statm")
        self._stop = threading.Event()
        self.base = self.peak = 0

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(self.interval)

    def __enter__(self) -> "_RssSampler":
        if self.available:
            self.base = self.peak = self._rss()
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        else:  # fallback: lifetime max RSS (only grows; a delta shows only new highs)
            self.base = self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.available:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._rss())
        else:
            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    @property
    def delta_bytes(self) -> int:
        return max(0, self.peak - self.base)


def timed_run(fn: Callable[[], Any], device) -> tuple[Any, float, float]:
    """Run ``fn`` once; return (output, seconds, peak memory in GiB)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        with _RssSampler() as rss:
            t0 = time.perf_counter()
            out = fn()
            seconds = time.perf_counter() - t0
        peak = rss.delta_bytes / 2**30
    return out, seconds, peak


# ---------------------------------------------------------------------------- models and work
def build_models(args: argparse.Namespace, device, dtype):
    """Transformer, VAE, prompt embeddings and negative prompt embeddings, built once for both."""
    import torch

    if args.tiny:
        from vbridge_core.tiny import build_tiny_transformer, build_tiny_vae, tiny_prompt_embeds

        transformer = build_tiny_transformer(seed=args.seed).to(device, dtype)
        vae = build_tiny_vae(seed=args.seed + 1).to(device, dtype)
        pos = tiny_prompt_embeds(seed=args.seed + 2).to(device, dtype)
        neg = tiny_prompt_embeds(seed=args.seed + 3).to(device, dtype)
        return transformer, vae, pos, neg

    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    torch.manual_seed(args.seed)
    with torch.device(device):
        transformer = WanTransformer3DModel(**FULL_TRANSFORMER_CONFIG)
    transformer = transformer.to(dtype).eval()
    with torch.device(device):
        vae = AutoencoderKLWan(**FULL_VAE_CONFIG)
    vae = vae.to(dtype).eval()
    g = torch.Generator("cpu").manual_seed(args.seed + 2)
    pos = torch.randn(1, FULL_TEXT_LEN, 4096, generator=g).to(device, dtype)
    neg = torch.randn(1, FULL_TEXT_LEN, 4096, generator=g).to(device, dtype)
    return transformer, vae, pos, neg


def make_image(args: argparse.Namespace):
    """A seeded random uint8 RGB image: (PIL image for diffusers, [3, H, W] 0..1 tensor for ours)."""
    import numpy as np
    import torch
    from PIL import Image

    arr = np.random.default_rng(args.seed).integers(0, 256, (args.height, args.width, 3), dtype=np.uint8)
    return Image.fromarray(arr), torch.from_numpy(arr).permute(2, 0, 1).float() / 255


def make_runners(args, device, dtype, transformer, vae, pos, neg):
    import torch
    from diffusers import UniPCMultistepScheduler, WanImageToVideoPipeline

    from vbridge_core.pipeline import VBridgePipeline

    pil_image, image = make_image(args)
    ours = VBridgePipeline(transformer, vae, device=device, dtype=dtype, prompt_embeds=pos,
                           negative_prompt_embeds=neg)
    sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                    num_train_timesteps=1000, flow_shift=args.shift)
    ref = WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=sched, image_processor=None,
                                  image_encoder=None, transformer=transformer, transformer_2=None,
                                  boundary_ratio=None, expand_timesteps=True)
    ref.set_progress_bar_config(disable=True)

    def run_ours():
        res = ours.restore(image, frames=args.frames, steps=args.steps, seed=args.seed, shift=args.shift,
                           solver="unipc", guidance=args.guidance)
        return res.final[0].float().cpu()

    def run_ref():
        # A CPU generator, as ours draws its noise on the CPU: the same seed gives the same noise.
        frames = ref(image=pil_image, prompt_embeds=pos, negative_prompt_embeds=neg, height=args.height,
                     width=args.width, num_frames=args.frames, num_inference_steps=args.steps,
                     guidance_scale=args.guidance, output_type="pt",
                     generator=torch.Generator("cpu").manual_seed(args.seed)).frames
        return frames[0, -1].float().cpu()  # last frame, [3, H, W] in 0..1

    return {"ours": run_ours, "diffusers": run_ref}


# ---------------------------------------------------------------------------- main
def _quiet_libraries() -> None:
    """Silence diffusers / transformers warnings (their loggers reset their level on first import)."""
    for mod in ("transformers", "diffusers"):
        try:
            __import__(f"{mod}.utils.logging", fromlist=["set_verbosity_error"]).set_verbosity_error()
        except Exception:  # noqa: BLE001 - cosmetic only
            logging.getLogger(mod).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    import torch

    _quiet_libraries()
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        print(f"error: bad --device {args.device!r}: {e}", file=sys.stderr)
        return 2
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"error: --device {args.device} asked for CUDA, but torch {torch.__version__} sees no CUDA device "
              "(no GPU, or a CPU-only torch build). Use --tiny (CPU) or run on a machine with a GPU.",
              file=sys.stderr)
        return 2
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = torch.float32 if args.tiny else torch.bfloat16
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True

    t0 = time.perf_counter()
    transformer, vae, pos, neg = build_models(args, device, dtype)
    # both sides get the embeddings as the official model sees them (zero-padded to 512 tokens), as our
    # pipeline pads every embedding it is given; diffusers' pipeline uses prompt_embeds as passed
    from vbridge_core.runtime import pad_prompt_embeds

    pos, neg = pad_prompt_embeds(pos).to(pos.dtype), pad_prompt_embeds(neg).to(neg.dtype)
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in transformer.parameters())
    logger.info("built models in %.1f s (DiT %.4f B params)", build_s, n_params / 1e9)
    runners = make_runners(args, device, dtype, transformer, vae, pos, neg)

    # One warm-up run each, then the timed runs interleaved (ours, diffusers, ours, ...) so slow drift
    # of the machine (clocks, caches) affects both alike.
    finals: dict[str, Any] = {}
    times: dict[str, list[float]] = {k: [] for k in IMPLS}
    peaks: dict[str, list[float]] = {k: [] for k in IMPLS}
    for name in IMPLS:
        t = time.perf_counter()
        finals[name] = runners[name]()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        logger.info("warm-up %s: %.2f s", name, time.perf_counter() - t)
    for r in range(args.runs):
        for name in IMPLS:
            out, s, peak = timed_run(runners[name], device)
            times[name].append(s)
            peaks[name].append(peak)
            logger.info("run %d %s: %.3f s, %.3f GiB", r + 1, name, s, peak)
            if r == 0:
                finals[name] = out

    diff = (finals["ours"] - finals["diffusers"]).abs().max().item()
    mem_kind = ("torch.cuda.max_memory_allocated after reset_peak_memory_stats, resident weights included"
                if device.type == "cuda" else
                "peak RSS over the run minus RSS before it (/proc/self/statm sampled every 2 ms; approximate)")
    results: dict[str, Any] = {}
    for name in IMPLS:
        results[name] = dict(seconds_median=statistics.median(times[name]), seconds_runs=times[name],
                             peak_memory_gb=max(peaks[name]), peak_memory_runs_gb=peaks[name])
    ratio = dict(
        seconds=results["ours"]["seconds_median"] / results["diffusers"]["seconds_median"],
        # An RSS delta under 1 MiB is sampling noise: no ratio then.
        peak_memory=(results["ours"]["peak_memory_gb"] / results["diffusers"]["peak_memory_gb"]
                     if results["diffusers"]["peak_memory_gb"] * 1024 >= 1 else None))
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"{os.cpu_count()} cpus")
    report = dict(
        config=dict(model="tiny" if args.tiny else "wan2.2-ti2v-5b-random", dit_params=n_params,
                    height=args.height, width=args.width, frames=args.frames, steps=args.steps,
                    guidance=args.guidance, shift=args.shift, solver="unipc", runs=args.runs, seed=args.seed,
                    dtype=str(dtype).replace("torch.", ""), device=str(device)),
        environment=dict(device_name=device_name, torch=torch.__version__,
                         diffusers=__import__("diffusers").__version__, python=platform.python_version()),
        build_seconds=build_s, memory_metric=mem_kind, results=results,
        max_abs_diff_final=diff, ratio_ours_over_diffusers=ratio)

    print(f"bench_restore: {report['config']['model']} ({n_params / 1e9:.4f} B DiT params), "
          f"{args.height}x{args.width}, F={args.frames}, {args.steps} steps, guidance {args.guidance:g}, "
          f"{report['config']['dtype']} on {device} ({device_name}); median of {args.runs} run(s) after a warm-up")
    print(f"memory: {mem_kind}")
    unit, scale = ("GiB", 1) if device.type == "cuda" else ("MiB", 1024)
    header = f"| {'implementation':<16} | {'seconds (median)':>16} | {'peak memory ' + unit:>15} | {'max abs diff':>12} |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for name in IMPLS:
        label = "ours" if name == "ours" else "diffusers (ref)"
        print(f"| {label:<16} | {results[name]['seconds_median']:>16.3f} | "
              f"{results[name]['peak_memory_gb'] * scale:>15.3f} | {f'{diff:.3g}' if name == 'ours' else 'reference':>12} |")
    mem_ratio = f"{ratio['peak_memory']:.3f}" if ratio["peak_memory"] is not None else "n/a"
    print(f"| {'ratio ours/ref':<16} | {ratio['seconds']:>16.3f} | {mem_ratio:>15} | {'':>12} |")

    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
