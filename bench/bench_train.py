#!/usr/bin/env python
"""Benchmark: one LoRA training step of our trainer vs a plain diffusers + peft loop on the same work.

Both train a peft LoRA (same rank, alpha, target modules) on the same transformer object with the
TI2V flow-matching objective (frame 0 clean at timestep 0, loss on the noised frames) on one cached
pseudo-video latent of ``--resolution`` x ``--resolution``, F = ``--frames``, batch 1, AdamW.

- ours: ``vbridge_core.training.train_lora`` itself (latent cache, VAE parked on the CPU, bf16
  autocast on CUDA, fp32 LoRA parameters); step times are taken between consecutive progress
  callbacks (each callback follows a synchronising ``loss.item()``), after ``--warmup`` steps.
  Gradient checkpointing per ``--ours-checkpointing`` (auto: on from 768 px up).
- reference: the loop the anchor numbers were measured with (``shared/anchors/README.md``): peft
  ``add_adapter``, fp32 LoRA parameters, ``torch.autocast(bf16)``, gradient checkpointing on
  (``--ref-checkpointing``), ``loss.item()`` every step.

Default: the full Wan2.2-TI2V-5B architecture with random weights in bf16 on CUDA (prompt
embeddings random ``[1, 512, 4096]``). ``--tiny``: the tiny random models in fp32 on the CPU, a
smoke / overhead check only. Memory: ``torch.cuda.max_memory_allocated`` over the timed steps
(resident weights included); on the CPU the peak RSS delta (approximate).

    python bench/bench_train.py --tiny
    python bench/bench_train.py --resolution 512 --frames 5 --rank 32 --steps 30 --json train_512.json
    python bench/bench_train.py --resolution 960 --frames 5 --rank 32 --steps 20 --json train_960.json
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

logger = logging.getLogger("bench_train")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny random models, fp32, CPU")
    p.add_argument("--device", default=None, help="default: cuda (cpu with --tiny)")
    p.add_argument("--resolution", type=int, default=None, help="square side (default 512; 64 with --tiny)")
    p.add_argument("--frames", type=int, default=5)
    p.add_argument("--rank", type=int, default=None, help="LoRA rank (default 32; 8 with --tiny)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per implementation (default 20; 10 tiny)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--ours-checkpointing", choices=["auto", "on", "off"], default="auto")
    p.add_argument("--ref-checkpointing", choices=["on", "off"], default="on")
    p.add_argument("--only", choices=["ours", "diffusers"], default=None, help="run one implementation")
    p.add_argument("--json", default=None, help="write the report here")
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    a.device = a.device or ("cpu" if a.tiny else "cuda")
    a.resolution = a.resolution or (64 if a.tiny else 512)
    a.rank = a.rank or (8 if a.tiny else 32)
    a.steps = a.steps or (10 if a.tiny else 20)
    return a


def _peak_start(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return None
    from bench_restore import _RssSampler

    s = _RssSampler()
    s.__enter__()
    return s


def _peak_end(device, sampler) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    sampler.__exit__(None, None, None)
    return sampler.delta_bytes / 2**30


def run_ours(args, pipe, pos, device) -> dict[str, Any]:
    import torch

    from vbridge_core.training.trainer import TrainConfig, train_lora

    gc = args.ours_checkpointing == "on" or (args.ours_checkpointing == "auto" and args.resolution >= 768)
    g = torch.Generator().manual_seed(0)
    img = torch.rand(3, args.resolution, args.resolution, generator=g)
    pairs = [(img * 0.5, img)]
    stamps: list[float] = []
    state: dict[str, Any] = {}

    def cb(p):
        if p.kind != "step":
            return
        stamps.append(time.perf_counter())
        if p.step == args.warmup:
            state["sampler"] = _peak_start(device)

    cfg = TrainConfig(steps=args.warmup + args.steps, resolution=args.resolution, frames=args.frames, rank=args.rank,
                      alpha=float(args.rank), crops_per_pair=1, flip=False, validation_fraction=0.0,
                      gradient_checkpointing=gc, learning_rate=1e-5)
    with tempfile.TemporaryDirectory() as d:
        train_lora(pipe, pairs, cfg, Path(d) / "bench.safetensors", prompt_embeds=pos, callback=cb, write_plots=False)
    peak = _peak_end(device, state["sampler"])
    times = [b - a for a, b in zip(stamps[args.warmup - 1:], stamps[args.warmup:])]
    return dict(step_ms_median=1000 * statistics.median(times), step_ms_runs=[round(1000 * t, 2) for t in times],
                peak_memory_gb=peak, gradient_checkpointing=gc)


def run_reference(args, transformer, vae_latent, pos, device) -> dict[str, Any]:
    """The plain diffusers + peft loop (as in shared/anchors/gpu_anchor_bench*.py)."""
    import torch
    from peft import LoraConfig

    from vbridge_core.training.config import DEFAULT_TARGET_MODULES

    transformer.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=list(DEFAULT_TARGET_MODULES),
                                       init_lora_weights=True), adapter_name="ref")
    transformer.set_adapter("ref")
    params = [p for n, p in transformer.named_parameters() if "lora_" in n and ".ref." in n]
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    use_gc = args.ref_checkpointing == "on"
    if use_gc:
        transformer.enable_gradient_checkpointing()
    opt = torch.optim.AdamW(params, lr=1e-5)
    dtype = next(transformer.parameters()).dtype
    z = vae_latent.to(device)
    b, c, t, h, w = z.shape
    ctx = pos.to(device, dtype)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    times: list[float] = []
    sampler = None
    transformer.train()
    try:
        for i in range(args.warmup + args.steps):
            if i == args.warmup:
                sampler = _peak_start(device)
            t0 = time.perf_counter()
            noise = torch.randn_like(z)
            sigma = torch.rand(1, device=device)
            mask = torch.ones(1, 1, t, h, w, device=device)
            mask[:, :, 0] = 0
            noisy = (1 - mask) * z + mask * ((1 - sigma) * z + sigma * noise)
            ts = (mask[0, 0][:, ::2, ::2] * sigma * 1000).flatten()[None]
            with autocast:
                pred = transformer(hidden_states=noisy.to(dtype), timestep=ts, encoder_hidden_states=ctx,
                                   return_dict=False)[0]
                loss = torch.nn.functional.mse_loss(pred[:, :, 1:].float(), (noise - z)[:, :, 1:].float())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss.item()
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        peak = _peak_end(device, sampler)
    finally:
        if use_gc:
            transformer.disable_gradient_checkpointing()
        transformer.delete_adapters("ref")
        for p in transformer.parameters():
            p.requires_grad_(False)
        transformer.eval()
    return dict(step_ms_median=1000 * statistics.median(times), step_ms_runs=[round(1000 * t, 2) for t in times],
                peak_memory_gb=peak, gradient_checkpointing=use_gc)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    import torch

    from bench_restore import _quiet_libraries, build_models

    _quiet_libraries()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"error: --device {args.device} asked for CUDA, but torch {torch.__version__} sees no CUDA device. "
              "Use --tiny (CPU) or run on a machine with a GPU.", file=sys.stderr)
        return 2
    dtype = torch.float32 if args.tiny else torch.bfloat16
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    ns = argparse.Namespace(tiny=args.tiny, seed=0)
    transformer, vae, pos, _ = build_models(ns, device, dtype)
    from vbridge_core import trajectory
    from vbridge_core.pipeline import VBridgePipeline
    from vbridge_core.training.latent_cache import encode_video

    pipe = VBridgePipeline(transformer, vae, device=device, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    img = torch.rand(3, args.resolution, args.resolution, generator=g)
    latent = encode_video(pipe, trajectory.blend_pairs((img * 0.5)[None], img[None],
                                                       trajectory.alpha_schedule("linear", args.frames)))
    n_params = sum(p.numel() for p in transformer.parameters())
    results: dict[str, Any] = {}
    order = [args.only] if args.only else ["diffusers", "ours"]
    for name in order:
        t0 = time.perf_counter()
        if name == "ours":
            results[name] = run_ours(args, pipe, pos, device)
        else:
            vae.to("cpu")  # same residency as ours: the VAE is not on the GPU while the DiT trains
            results[name] = run_reference(args, transformer, latent, pos, device)
            vae.to(device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        logger.info("%s: %.1f s", name, time.perf_counter() - t0)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, {os.cpu_count()} cpus")
    report = dict(config=dict(model="tiny" if args.tiny else "wan2.2-ti2v-5b-random", dit_params=n_params,
                              resolution=args.resolution, frames=args.frames, rank=args.rank, steps=args.steps,
                              warmup=args.warmup, dtype=str(dtype).replace("torch.", ""), device=str(device)),
                  environment=dict(device_name=device_name, torch=torch.__version__,
                                   diffusers=__import__("diffusers").__version__, peft=__import__("peft").__version__),
                  results=results)
    if len(results) == 2:
        report["ratio_ours_over_diffusers"] = dict(
            step_ms=results["ours"]["step_ms_median"] / results["diffusers"]["step_ms_median"],
            peak_memory=(results["ours"]["peak_memory_gb"] / results["diffusers"]["peak_memory_gb"]
                         if results["diffusers"]["peak_memory_gb"] > 1e-3 else None))
    unit = "GiB" if device.type == "cuda" else "GiB (RSS delta, approximate)"
    print(f"bench_train: {report['config']['model']} ({n_params / 1e9:.4f} B DiT params), {args.resolution}x"
          f"{args.resolution}, F={args.frames}, rank {args.rank}, batch 1, {report['config']['dtype']} on {device} "
          f"({device_name}); median of {args.steps} steps after {args.warmup} warm-up")
    print(f"| implementation | step ms (median) | peak memory {unit} | grad. checkpointing |")
    print("|---|---|---|---|")
    for name, r in results.items():
        label = "diffusers+peft (ref)" if name == "diffusers" else "ours"
        print(f"| {label} | {r['step_ms_median']:.1f} | {r['peak_memory_gb']:.3f} | {r['gradient_checkpointing']} |")
    if "ratio_ours_over_diffusers" in report:
        r = report["ratio_ours_over_diffusers"]
        pm = f"{r['peak_memory']:.3f}" if r["peak_memory"] is not None else "n/a"
        print(f"| ratio ours/ref | {r['step_ms']:.3f} | {pm} | |")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
