#!/usr/bin/env python
"""The GPU suite: one command that measures every speed and memory lever of the pack on the real
Wan2.2-TI2V-5B architecture (random weights, no downloads) and prints one table.

    python bench/gpu_suite.py --json gpu_suite.json      # one H100 / H200, ~4-6 minutes
    python bench/gpu_suite.py --plan                     # list the cases (no GPU needed)
    python bench/gpu_suite.py --tiny                     # every case's code on the tiny model, CPU

The DiT is diffusers' ``WanTransformer3DModel`` with the config we ship
(``vbridge_core/configs/wan22_ti2v_5b_transformer.json``), built with random weights on the GPU and
cast to bf16 the way our loader leaves a real checkpoint (diffusers' fp32 modules kept in fp32); the
VAE is ``AutoencoderKLWan`` with ``configs/wan22_vae.json``; the prompt embeddings are random
``[1, 512, 4096]``. Random weights cost the same time as trained ones, so seconds and memory are
real; image quality is not measured here (``bench_turbo.py`` does that on trained tiny models).

Cases, at 1024x1024, F=5 unless said (``--plan`` lists them with their targets):

* the diffusers reference: ``WanImageToVideoPipeline(expand_timesteps=True)``, 50 UniPC steps,
  guidance 1 (the restoration setting; 3.75 s on the anchors' H100) and guidance 5 (6.89 s);
* ours: ``fast`` (50 calls), ``paper`` (guidance 6, last 15 % unguided: 93 calls), ``turbo`` (<= 4
  calls), ``fast`` with the step cache, each eager, then with regional ``torch.compile``;
* memory levers: fp8 weight storage (``runtime.enable_fp8_storage``), model offload, and the three
  together with VAE tiling (the small-card setting), with their peaks; 3840x2176 with VAE tiling;
* training: one LoRA step (our trainer) at 512 and 960 px; one full fine-tuning step (all 5 B
  parameters, AdamW, gradient checkpointing) at 512 and 960 px, fp32 masters and pure bf16, with
  the per-GPU prediction of ``bench/memory_plan.py`` beside the measured peak (CUDA only; the
  ``--tiny`` run checks the code on the CPU).

Per case: seconds (median of ``--runs`` timed runs after a warm-up; CUDA-synchronised wall clock
of the whole call: encode, all DiT calls, decode, copy to the CPU), DiT noise predictions per image
(counted by a hook on the DiT, the conditional and unconditional halves of a batched call counted
separately), peak memory (``torch.cuda.max_memory_allocated``, resident weights included; on the
CPU the RSS rise over the run, approximate), and the max abs difference of the restored image
(0..1) to the eager bf16 run of the same recipe (for ``fast``: to the diffusers reference with the
same noise). Every case runs guarded: a failure is logged with its traceback and its row says
``failed`` (``OOM`` for out-of-memory), and the suite goes on. A feature the installed pack lacks
(e.g. the ``turbo`` preset or the step cache) gives ``not available``. ``--budget-s`` (default 420)
skips the remaining cases once that much time has passed, so the whole run stays within 8 minutes.

Targets (H100, ``issues`` #8): turbo end to end <= 0.6 s, fast 50 steps <= 2.0 s, paper <= 3.4 s;
the diffusers default measured 3.75 s.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import inspect
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "bench"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

logger = logging.getLogger("gpu_suite")


class NotAvailable(Exception):
    """The installed pack lacks a feature this case measures."""


class Skipped(Exception):
    """The case does not apply here (e.g. CUDA-only work on a CPU run)."""


@dataclass
class Case:
    """One row of the suite."""

    name: str
    what: str
    run: Callable[["Suite", "Case"], dict[str, Any]]
    target_s: Optional[float] = None      # issue 8's target on an H100
    anchor_s: Optional[float] = None      # the diffusers number measured on the anchors' H100
    diff_to: Optional[str] = None         # the case whose image this one is compared with
    cuda_only: bool = False


@dataclass
class Row:
    case: str
    what: str
    status: str = "ok"
    seconds: Optional[float] = None
    seconds_runs: list[float] = field(default_factory=list)
    dit_calls_per_image: Optional[float] = None
    peak_gb: Optional[float] = None
    max_diff: Optional[float] = None
    diff_to: Optional[str] = None
    target_s: Optional[float] = None
    anchor_s: Optional[float] = None
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------
# sizes

@dataclass
class Sizes:
    height: int
    width: int
    frames: int
    steps: int                 # the 50-step recipes (fewer in --tiny)
    big: tuple[int, int]       # the tiled high-resolution case (H, W)
    train: tuple[int, int]     # LoRA / full fine-tuning sides
    train_steps: int
    train_warmup: int


FULL_SIZES = Sizes(height=1024, width=1024, frames=5, steps=50, big=(2176, 3840), train=(512, 960),
                   train_steps=4, train_warmup=2)
TINY_SIZES = Sizes(height=64, width=64, frames=5, steps=2, big=(96, 160), train=(64, 96),
                   train_steps=1, train_warmup=1)


# ---------------------------------------------------------------------------------------------------
# the shared state: models, pipeline, images, results

class Suite:
    """Models built once, the pipeline over them, and the final images of finished cases."""

    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        self.args = args
        self.tiny = args.tiny
        self.device = torch.device(args.device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.dtype = torch.float32 if self.tiny else torch.bfloat16
        self.sizes = TINY_SIZES if self.tiny else FULL_SIZES
        self.finals: dict[str, Any] = {}
        self.transformer = self.vae = self.pos = self.neg = None
        self._pipe = None
        self.compiled = False

    # -- models --------------------------------------------------------------------------------------
    def build(self) -> None:
        """Random-weight DiT and VAE on the device, as our loader leaves a checkpoint."""
        import torch

        self.transformer = build_transformer(self.tiny, self.device, self.dtype, seed=self.args.seed)
        self.vae = build_vae(self.tiny, self.device, self.dtype, seed=self.args.seed + 1)
        g = torch.Generator("cpu").manual_seed(self.args.seed + 2)
        text_len = 512  # as the official model sees umt5 embeddings (zero-padded to 512), and as our pipeline pads
        self.pos = (0.1 * torch.randn(1, text_len, 4096, generator=g)).to(self.device, self.dtype)
        self.neg = (0.1 * torch.randn(1, text_len, 4096, generator=g)).to(self.device, self.dtype)

    def release(self) -> None:
        """Drop the inference models (the full fine-tuning cases build their own)."""
        self.transformer = self.vae = self._pipe = None
        free_memory(self.device)

    def pipeline(self, transformer=None, **kwargs):
        """A VBridgePipeline over the shared models (or ``transformer``), random prompt embeddings."""
        from vbridge_core.pipeline import VBridgePipeline

        if self.transformer is None:
            raise RuntimeError("the inference models were released")
        if transformer is None and not kwargs and self._pipe is not None:
            return self._pipe
        pipe = VBridgePipeline(transformer or self.transformer, self.vae, device=self.device, dtype=self.dtype,
                               prompt_embeds=self.pos, negative_prompt_embeds=self.neg, **kwargs)
        if transformer is None and not kwargs:
            self._pipe = pipe
        return pipe

    def image(self, height: int | None = None, width: int | None = None):
        """A seeded random uint8 RGB image: (PIL for diffusers, [3, H, W] 0..1 tensor for ours)."""
        import numpy as np
        import torch
        from PIL import Image

        h, w = height or self.sizes.height, width or self.sizes.width
        arr = np.random.default_rng(self.args.seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
        return Image.fromarray(arr), torch.from_numpy(arr).permute(2, 0, 1).float() / 255

    # -- measurement ---------------------------------------------------------------------------------
    def measure(self, fn: Callable[[], Any], warmup: int | None = None, runs: int | None = None) -> dict[str, Any]:
        """``warmup`` untimed calls, then ``runs`` timed ones: median seconds, max peak, first output,
        DiT calls per image (of the first timed run)."""
        from bench_restore import timed_run

        warmup = self.args.warmup if warmup is None else warmup
        runs = self.args.runs if runs is None else runs
        warm_s = []
        for _ in range(warmup):
            t0 = time.perf_counter()
            fn()
            sync(self.device)
            warm_s.append(time.perf_counter() - t0)
        times, peaks, out, calls = [], [], None, None
        for r in range(runs):
            with DitCallCounter(self.transformer) as counter:
                res, s, peak = timed_run(fn, self.device)
            times.append(s)
            peaks.append(peak)
            if r == 0:
                out, calls = res, counter.predictions
        return dict(seconds=statistics.median(times), seconds_runs=[round(t, 4) for t in times], peak_gb=max(peaks),
                    output=out, dit_predictions=calls, warmup_s=[round(t, 3) for t in warm_s])


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class DitCallCounter:
    """Counts noise predictions: the batch rows of every forward of ``transformer`` (and of the
    other DiT objects registered with :meth:`watch`)."""

    def __init__(self, transformer) -> None:
        self.predictions = 0
        self._handles = []
        self._targets = [transformer] if transformer is not None else []

    def watch(self, module) -> None:
        self._targets.append(module)

    def _hook(self, module, args, kwargs):
        x = kwargs.get("hidden_states", args[0] if args else None)
        self.predictions += int(x.shape[0]) if x is not None else 1

    def __enter__(self) -> "DitCallCounter":
        self._handles = [m.register_forward_pre_hook(self._hook, with_kwargs=True) for m in self._targets]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()


def build_transformer(tiny: bool, device, dtype, seed: int = 0):
    """The 5B DiT (shipped config) with random weights on ``device``; diffusers' fp32 modules stay fp32."""
    import torch

    from vbridge_core.models import _keep_fp32, load_transformer_config
    from vbridge_core.tiny import build_tiny_transformer

    if tiny:
        return build_tiny_transformer(seed=seed).to(device=device, dtype=dtype)
    from diffusers import WanTransformer3DModel

    cfg = load_transformer_config()
    params = inspect.signature(WanTransformer3DModel.__init__).parameters
    torch.manual_seed(seed)
    with torch.device(device):
        model = WanTransformer3DModel(**{k: v for k, v in cfg.items() if k in params})
    keep = getattr(model, "_keep_in_fp32_modules", None)
    for name, p in model.named_parameters():
        if not _keep_fp32(name, keep):
            p.data = p.data.to(dtype)
    return model.eval().requires_grad_(False)


def build_vae(tiny: bool, device, dtype, seed: int = 1):
    """The Wan2.2 VAE (shipped config, real latent statistics) with random weights on ``device``."""
    import torch

    from vbridge_core.tiny import build_tiny_vae

    if tiny:
        return build_tiny_vae(seed=seed).to(device=device, dtype=dtype)
    from diffusers import AutoencoderKLWan

    from vbridge_core.models import VAE_CONFIG_FILE

    cfg = {k: v for k, v in json.loads(VAE_CONFIG_FILE.read_text()).items() if not k.startswith("_")}
    params = inspect.signature(AutoencoderKLWan.__init__).parameters
    torch.manual_seed(seed)
    with torch.device(device):
        vae = AutoencoderKLWan(**{k: v for k, v in cfg.items() if k in params})
    for p in vae.parameters():  # not ModelMixin.to(): it warns about an (empty) fp32 module list
        p.data = p.data.to(dtype)
    return vae.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------------
# recipes: what the pack offers, detected at run time

def recipe(suite: Suite, name: str) -> dict[str, Any]:
    """Keyword arguments of ``VBridgePipeline.run`` for a named recipe (``--tiny``: fewer steps)."""
    from vbridge_core import presets

    if name not in presets.PRESETS:
        raise NotAvailable(f"presets.PRESETS has no {name!r} preset")
    kw = presets.preset(name)
    kw["frames"] = suite.sizes.frames
    if suite.tiny and kw.get("steps", 0) > suite.sizes.steps and name != "turbo":
        kw["steps"] = suite.sizes.steps
    accepted = inspect.signature(suite.pipeline().run).parameters
    unknown = [k for k in kw if k not in accepted]
    if unknown:
        raise NotAvailable(f"preset {name!r} uses {unknown}, which VBridgePipeline.run does not accept")
    return kw


def fastest_recipe(suite: Suite) -> tuple[dict[str, Any], str]:
    """``(sampler kwargs, note)`` of the fastest recipe available: turbo, else fast with 4 steps."""
    try:
        return recipe(suite, "turbo"), "turbo"
    except NotAvailable:
        kw = recipe(suite, "fast")
        kw["steps"] = 4
        return kw, "fast with 4 steps (no turbo preset)"


def cache_kwargs(suite: Suite) -> dict[str, Any]:
    """The step-cache option of ``VBridgePipeline.run`` (diffusers first-block cache), if the pack has it."""
    accepted = inspect.signature(suite.pipeline().run).parameters
    if "cache" not in accepted:
        raise NotAvailable("VBridgePipeline.run has no cache= option")
    return {"cache": suite.args.cache}


def run_ours(suite: Suite, kw: dict[str, Any], pipe=None, image=None) -> tuple[Any, dict[str, Any]]:
    """One restore; returns (final image [3, H, W] on the CPU, info)."""
    pipe = pipe or suite.pipeline()
    _, img = image if image is not None else suite.image()
    res = pipe.run(img, role="restoration", seed=suite.args.seed, **kw)
    return res.final[0].float().cpu(), res.info


def restore_case(recipe_name: str, *, cached: bool = False, compiled: bool = False) -> Callable[[Suite, Case], dict]:
    """A case that times one of our recipes (optionally with the step cache / compiled blocks)."""
    def run(suite: Suite, case: Case) -> dict[str, Any]:
        kw = recipe(suite, recipe_name)
        if cached:
            kw.update(cache_kwargs(suite))
        if compiled:
            ensure_compiled(suite)
        elif suite.compiled:
            raise RuntimeError("the DiT is compiled; eager cases must run before the compiled ones")
        info_box: dict[str, Any] = {}

        def call():
            final, info = run_ours(suite, kw)
            info_box.update(info)
            return final

        m = suite.measure(call)
        out = dict(m)
        out["info_calls"] = info_box.get("dit_calls_per_image")
        out["notes"] = f"steps {kw.get('steps')}, guidance {kw.get('guidance', 1.0):g}"
        if compiled and m["warmup_s"]:
            out["notes"] += f", first call {m['warmup_s'][0]:.1f} s (compiles)"
        if isinstance(info_box.get("cache"), dict):
            out["extra"] = {"cache": info_box["cache"]}
            out["notes"] += ", cache " + ", ".join(f"{k}={v}" for k, v in info_box["cache"].items()
                                                   if isinstance(v, (int, float, str)))[:120]
        if info_box.get("compiled") and not compiled:
            out["notes"] += f", pipeline reports compiled={info_box['compiled']}"
        return out
    return run


def ensure_compiled(suite: Suite) -> None:
    """Regional compile of the shared DiT (once). ``--tiny`` uses the ``eager`` backend: the dynamo
    capture (fullgraph) is checked without minutes of C++ compilation on two CPU cores."""
    if suite.compiled:
        return
    pipe = suite.pipeline()
    backend = suite.args.compile_backend or ("eager" if suite.device.type == "cpu" else None)
    pipe.compile(backend=backend)
    suite.compiled = True


def uncompile(suite: Suite) -> None:
    """Undo ``compile_repeated_blocks`` (``nn.Module.compile`` wraps each block's call) so the later
    cases run eager again."""
    import torch

    if not suite.compiled or suite.transformer is None:
        return
    for m in suite.transformer.modules():
        if getattr(m, "_compiled_call_impl", None) is not None:
            m._compiled_call_impl = None
    torch._dynamo.reset()
    if suite._pipe is not None:
        suite._pipe.compiled = None
    suite.compiled = False


# ---------------------------------------------------------------------------------------------------
# the cases

def diffusers_case(guidance: float) -> Callable[[Suite, Case], dict]:
    """diffusers' WanImageToVideoPipeline (expand_timesteps: the TI2V-5B mode), as in the anchors."""
    def run(suite: Suite, case: Case) -> dict[str, Any]:
        import torch
        from diffusers import UniPCMultistepScheduler, WanImageToVideoPipeline

        if suite.compiled:
            raise RuntimeError("the DiT is compiled; the diffusers reference must run eager")
        sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        num_train_timesteps=1000, flow_shift=5.0)
        ref = WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=suite.vae, scheduler=sched,
                                      image_processor=None, image_encoder=None, transformer=suite.transformer,
                                      transformer_2=None, boundary_ratio=None, expand_timesteps=True)
        ref.set_progress_bar_config(disable=True)
        pil, _ = suite.image()
        s = suite.sizes

        def call():
            # a CPU generator, as ours draws its noise on the CPU: the same seed gives the same noise
            frames = ref(image=pil, prompt_embeds=suite.pos, negative_prompt_embeds=suite.neg, height=s.height,
                         width=s.width, num_frames=s.frames, num_inference_steps=s.steps, guidance_scale=guidance,
                         output_type="pt", generator=torch.Generator("cpu").manual_seed(suite.args.seed)).frames
            return frames[0, -1].float().cpu()

        out = suite.measure(call)
        out["notes"] = f"steps {s.steps}, guidance {guidance:g}"
        return out
    return run


def fp8_case(suite: Suite, case: Case) -> dict[str, Any]:
    """fast with the DiT's weights stored in fp8 (diffusers layerwise casting), on a copy of the DiT."""
    from vbridge_core.runtime import enable_fp8_storage

    kw = recipe(suite, "fast")
    dit = copy.deepcopy(suite.transformer)
    try:
        enable_fp8_storage(dit, suite.dtype)
        pipe = suite.pipeline(transformer=dit)
        free_memory(suite.device)
        with swap_counter_target(suite, dit):
            out = suite.measure(lambda: run_ours(suite, kw, pipe=pipe)[0])
        out["notes"] = "weights fp8_e4m3fn, compute " + str(suite.dtype).replace("torch.", "")
        return out
    finally:
        del dit
        free_memory(suite.device)


@contextlib.contextmanager
def swap_counter_target(suite: Suite, transformer):
    """Point the DiT-call counter (which hooks ``suite.transformer``) at another DiT for a block."""
    saved = suite.transformer
    suite.transformer = transformer
    try:
        yield
    finally:
        suite.transformer = saved


def offload_case(suite: Suite, case: Case) -> dict[str, Any]:
    """Model offload: both models live on the CPU, each moves to the GPU only while it works."""
    kw, note = fastest_recipe(suite)
    suite.transformer.to("cpu")
    suite.vae.to("cpu")
    free_memory(suite.device)
    try:
        pipe = suite.pipeline(offload=True)
        out = suite.measure(lambda: run_ours(suite, kw, pipe=pipe)[0], runs=1)
        out["notes"] = note + ", models on the CPU between uses"
        return out
    finally:
        suite.transformer.to(suite.device)
        suite.vae.to(suite.device)


def low_vram_case(suite: Suite, case: Case) -> dict[str, Any]:
    """The small-card setting: fp8 weight storage + model offload + VAE tiling, on a copy of the DiT."""
    from vbridge_core.runtime import enable_fp8_storage

    kw, note = fastest_recipe(suite)
    suite.transformer.to("cpu")
    suite.vae.to("cpu")
    free_memory(suite.device)
    dit = copy.deepcopy(suite.transformer)
    try:
        enable_fp8_storage(dit, suite.dtype)
        suite.vae.enable_tiling()
        pipe = suite.pipeline(transformer=dit, offload=True)
        with swap_counter_target(suite, dit):
            out = suite.measure(lambda: run_ours(suite, kw, pipe=pipe)[0], runs=1)
        out["notes"] = note + ", fp8 DiT weights, models on the CPU between uses, VAE tiling"
        return out
    finally:
        suite.vae.disable_tiling()
        del dit
        suite.transformer.to(suite.device)
        suite.vae.to(suite.device)


def big_tiled_case(suite: Suite, case: Case) -> dict[str, Any]:
    """The high-resolution restore (3840x2176) with diffusers' VAE tiling; one timed run, no warm-up."""
    kw, note = fastest_recipe(suite)
    h, w = suite.sizes.big
    tiles = dict(tile_sample_min_height=64, tile_sample_min_width=64, tile_sample_stride_height=48,
                 tile_sample_stride_width=48) if suite.tiny else {}
    suite.vae.enable_tiling(**tiles)
    try:
        image = suite.image(h, w)
        out = suite.measure(lambda: run_ours(suite, kw, image=image)[0], warmup=0, runs=1)
        out["notes"] = f"{note}, {w}x{h}, VAE tiling" + (" (64 px tiles)" if suite.tiny else "")
        return out
    finally:
        suite.vae.disable_tiling()


def lora_train_case(side_index: int) -> Callable[[Suite, Case], dict]:
    """One LoRA training step of our trainer (rank 32, attention + FFN, fp32 LoRA weights, bf16
    autocast on CUDA, gradient checkpointing), timed between progress callbacks (bench_train.py)."""
    def run(suite: Suite, case: Case) -> dict[str, Any]:
        from bench_train import run_ours as train_ours

        if suite.compiled:
            raise RuntimeError("the DiT is compiled; the training cases must run eager")
        side = suite.sizes.train[side_index]
        ns = argparse.Namespace(ours_checkpointing="on", resolution=side, frames=suite.sizes.frames,
                                rank=8 if suite.tiny else 32, warmup=suite.sizes.train_warmup,
                                steps=suite.sizes.train_steps + (1 if suite.tiny else 0))
        r = train_ours(ns, suite.pipeline(), suite.pos, suite.device)
        return dict(seconds=r["step_ms_median"] / 1000, seconds_runs=[t / 1000 for t in r["step_ms_runs"]],
                    peak_gb=r["peak_memory_gb"], output=None, dit_predictions=None,
                    notes=f"{side}x{side}, rank {ns.rank}, one step (median of {len(r['step_ms_runs'])})")
    return run


def full_ft_case(side_index: int, precision: str) -> Callable[[Suite, Case], dict]:
    """One full fine-tuning step of every DiT parameter: AdamW (fused on CUDA), diffusers' gradient
    checkpointing, flow-matching loss on the noised frames. ``fp32_master``: fp32 parameters,
    gradients and moments with bf16 autocast (its weight cache off, as FSDP casts per unit);
    ``bf16``: everything bf16. Compared with ``memory_plan.py``'s one-GPU prediction."""
    def run(suite: Suite, case: Case) -> dict[str, Any]:
        import torch

        from memory_plan import calibrate_activations, count_params, estimate

        if suite.device.type != "cuda" and not suite.tiny:
            raise Skipped("full fine-tuning memory is measured on CUDA only")
        suite.release()
        side = suite.sizes.train[side_index]
        dev = suite.device
        model = build_transformer(suite.tiny, dev, torch.float32, seed=suite.args.seed)
        pdtype = torch.float32 if precision == "fp32_master" else torch.bfloat16
        for p in model.parameters():
            p.data = p.data.to(pdtype)
        model.requires_grad_(True).train()
        model.enable_gradient_checkpointing()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6, **({"fused": True} if dev.type == "cuda" else
                                                                 {"foreach": False}))
        g = torch.Generator("cpu").manual_seed(0)
        lat = torch.randn(1, 48, (suite.sizes.frames - 1) // 4 + 1, side // 16, side // 16, generator=g).to(dev)
        ctx = suite.pos.to(dev)
        tokens = lat.shape[2] * (side // 32) * (side // 32)
        mask = torch.ones_like(lat[:, :1])
        mask[:, :, 0] = 0
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False) \
            if dev.type == "cuda" and precision == "fp32_master" else contextlib.nullcontext()
        def step():
            noise = torch.randn_like(lat)
            sigma = 0.5
            noisy = (1 - mask) * lat + mask * ((1 - sigma) * lat + sigma * noise)
            ts = torch.full((1, tokens), 500.0, device=dev)
            ts[:, : tokens // lat.shape[2]] = 0
            with autocast:
                pred = model(hidden_states=noisy.to(pdtype), timestep=ts, encoder_hidden_states=ctx.to(pdtype),
                             return_dict=False)[0]
            loss = torch.nn.functional.mse_loss(pred[:, :, 1:].float(), (noise - lat)[:, :, 1:].float())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.item()

        try:
            m = suite.measure(step, warmup=suite.sizes.train_warmup, runs=suite.sizes.train_steps)
        finally:
            del opt, model
            free_memory(dev)
        from vbridge_core.tiny import TINY_TRANSFORMER_CONFIG

        cfg = dict(TINY_TRANSFORMER_CONFIG) if suite.tiny else None
        if "plan_act" not in suite.__dict__:
            suite.plan_act = calibrate_activations(cfg, latent_sides=(4, 8) if suite.tiny else (8, 16))
            suite.plan_counts = count_params(cfg)
        row = estimate(suite.plan_counts, suite.plan_act, side, suite.sizes.frames, 1, precision)
        plan_gb = row.total("adamw", checkpointing=True)
        m["output"] = None
        m["dit_predictions"] = None
        m["extra"] = dict(plan_one_gpu_gb=round(plan_gb, 2), tokens=tokens)
        m["notes"] = f"{side}x{side}, {precision}, AdamW, grad. ckpt; memory_plan predicts {plan_gb:.1f} GB"
        return m
    return run


def cases() -> list[Case]:
    """Every case, in run order (eager before compiled; the full fine-tuning last, it drops the models)."""
    return [
        Case("diffusers_default", "diffusers WanImageToVideoPipeline, {H}x{W}, {steps} steps, guidance 1", diffusers_case(1.0),
             anchor_s=3.75),
        Case("diffusers_cfg5", "diffusers WanImageToVideoPipeline, {H}x{W}, {steps} steps, guidance 5", diffusers_case(5.0),
             anchor_s=6.89),
        Case("fast", "ours: fast preset (50 calls), eager", restore_case("fast"), target_s=2.0,
             diff_to="diffusers_default"),
        Case("paper", "ours: paper preset (guidance 6, 93 calls), eager", restore_case("paper"), target_s=3.4),
        Case("turbo", "ours: turbo preset (<= 4 calls), eager", restore_case("turbo"), target_s=0.6),
        Case("fast_cached", "ours: fast + step cache, eager", restore_case("fast", cached=True), diff_to="fast"),
        Case("fast_compiled", "ours: fast, regional compile", restore_case("fast", compiled=True), target_s=2.0,
             diff_to="fast"),
        Case("paper_compiled", "ours: paper, regional compile", restore_case("paper", compiled=True),
             target_s=3.4, diff_to="paper"),
        Case("turbo_compiled", "ours: turbo, regional compile", restore_case("turbo", compiled=True),
             target_s=0.6, diff_to="turbo"),
        Case("fast_fp8", "ours: fast, fp8 weight storage", fp8_case, diff_to="fast"),
        Case("offload", "ours: model offload (turbo)", offload_case, diff_to="turbo"),
        Case("low_vram", "ours: fp8 + offload + VAE tiling (turbo)", low_vram_case, diff_to="turbo"),
        Case("big_tiled", "ours: {big}, VAE tiling (turbo)", big_tiled_case),
        Case("lora_train_512", "LoRA train step, {side0} px", lora_train_case(0)),
        Case("lora_train_960", "LoRA train step, {side1} px", lora_train_case(1)),
        Case("full_ft_512_fp32", "full fine-tune step, {side0} px, fp32 master + AdamW", full_ft_case(0, "fp32_master"),
             cuda_only=True),
        Case("full_ft_960_fp32", "full fine-tune step, {side1} px, fp32 master + AdamW", full_ft_case(1, "fp32_master"),
             cuda_only=True),
        Case("full_ft_512_bf16", "full fine-tune step, {side0} px, pure bf16 + AdamW", full_ft_case(0, "bf16"),
             cuda_only=True),
        Case("full_ft_960_bf16", "full fine-tune step, {side1} px, pure bf16 + AdamW", full_ft_case(1, "bf16"),
             cuda_only=True),
    ]


# ---------------------------------------------------------------------------------------------------
# running and reporting

def run_case(suite: Suite, case: Case) -> Row:
    """Run one case guarded: any failure becomes the row's status, never the suite's end."""
    import torch

    row = Row(case=case.name, what=describe(case, suite.sizes), target_s=case.target_s, anchor_s=case.anchor_s, diff_to=case.diff_to)
    t0 = time.perf_counter()
    try:
        if suite.compiled and not case.name.endswith("_compiled"):
            uncompile(suite)
        if suite.transformer is None and not case.name.startswith("full_ft"):
            raise RuntimeError("the inference models were released by an earlier case")
        out = case.run(suite, case)
        row.seconds = out.get("seconds")
        row.seconds_runs = out.get("seconds_runs", [])
        row.peak_gb = out.get("peak_gb")
        row.notes = out.get("notes", "")
        row.extra.update(out.get("extra", {}))
        if out.get("dit_predictions") is not None:
            row.dit_calls_per_image = out["dit_predictions"]
        if out.get("info_calls") is not None:
            row.extra["info_dit_calls_per_image"] = out["info_calls"]
            if row.dit_calls_per_image is not None and out["info_calls"] != row.dit_calls_per_image:
                row.notes += f"; info says {out['info_calls']} calls, the hook counted {row.dit_calls_per_image}"
        if out.get("warmup_s"):
            row.extra["warmup_s"] = out["warmup_s"]
        if out.get("output") is not None:
            suite.finals[case.name] = out["output"]
    except NotAvailable as e:
        row.status = f"not available: {e}"
    except Skipped as e:
        row.status = f"skipped: {e}"
    except torch.OutOfMemoryError as e:
        row.status = "OOM"
        row.peak_gb = torch.cuda.max_memory_allocated(suite.device) / 2**30 if suite.device.type == "cuda" else None
        row.notes = str(e).splitlines()[0][:160]
        logger.error("case %s ran out of memory: %s", case.name, row.notes)
    except Exception as e:  # noqa: BLE001 - the suite goes on; the row and the log say what broke
        row.status = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        logger.error("case %s failed:\n%s", case.name, traceback.format_exc())
    finally:
        free_memory(suite.device)
    row.extra["case_wall_s"] = round(time.perf_counter() - t0, 2)
    logger.info("%s: %s in %.1f s", case.name, row.status, row.extra["case_wall_s"])
    return row


def describe(case: Case, sizes: Sizes) -> str:
    """The case's description with this run's sizes filled in."""
    return case.what.format(H=sizes.height, W=sizes.width, side0=sizes.train[0], side1=sizes.train[1],
                            big=f"{sizes.big[1]}x{sizes.big[0]}", steps=sizes.steps)


def fill_diffs(suite: Suite, rows: list[Row]) -> None:
    """Max abs difference of each row's image to the image of its ``diff_to`` case."""
    for row in rows:
        if row.diff_to and row.case in suite.finals and row.diff_to in suite.finals:
            a, b = suite.finals[row.case], suite.finals[row.diff_to]
            if a.shape == b.shape:
                row.max_diff = (a - b).abs().max().item()


def select(all_cases: list[Case], only: str | None, skip: str | None) -> list[Case]:
    names = {c.name for c in all_cases}
    wanted = [n for n in (only or "").split(",") if n]
    skipped = [n for n in (skip or "").split(",") if n]
    unknown = [n for n in wanted + skipped if n not in names]
    if unknown:
        raise SystemExit(f"error: unknown case(s) {unknown}; --plan lists them")
    return [c for c in all_cases if (not wanted or c.name in wanted) and c.name not in skipped]


def _fmt(v: Optional[float], spec: str) -> str:
    return "" if v is None else format(v, spec)


def table(rows: list[Row], unit: str, judge: bool = True) -> str:
    """The Markdown table; ``judge`` marks targets met / missed (not for --tiny, whose sizes differ)."""
    lines = [f"| case | what | DiT calls/img | seconds | target / anchor (H100) | peak {unit} | max diff | vs | status "
             "| notes |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        verdict = "" if not judge or r.seconds is None or r.target_s is None else \
            (" met" if r.seconds <= r.target_s else " missed")
        goal = f"<= {r.target_s:g}{verdict}" if r.target_s else (f"anchor {r.anchor_s:g}" if r.anchor_s else "")
        calls = "" if r.dit_calls_per_image is None else f"{r.dit_calls_per_image:g}"
        lines.append(f"| {r.case} | {r.what} | {calls} | {_fmt(r.seconds, '.3f')} | {goal} | "
                     f"{_fmt(r.peak_gb, '.2f')} | {_fmt(r.max_diff, '.3g')} | {r.diff_to or ''} | {r.status} | "
                     f"{r.notes} |")
    return "\n".join(lines)


def print_plan(all_cases: list[Case], tiny: bool) -> None:
    s = TINY_SIZES if tiny else FULL_SIZES
    print(f"gpu_suite plan ({'tiny model, CPU' if tiny else 'Wan2.2-TI2V-5B random weights, bf16, one CUDA GPU'}): "
          f"{s.height}x{s.width}, F={s.frames}, {s.steps}-step recipes; big {s.big[1]}x{s.big[0]}; "
          f"train sides {s.train}")
    print("| # | case | what | target / anchor (H100) | compared with | CUDA only |")
    print("|---|---|---|---|---|---|")
    for i, c in enumerate(all_cases, 1):
        goal = f"<= {c.target_s:g} s" if c.target_s else (f"anchor {c.anchor_s:g} s" if c.anchor_s else "")
        print(f"| {i} | {c.name} | {describe(c, s)} | {goal} | {c.diff_to or ''} | {'yes' if c.cuda_only else ''} |")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", action="store_true", help="print the cases and exit (no GPU needed)")
    p.add_argument("--tiny", action="store_true", help="the tiny random models in fp32 on the CPU (a code check)")
    p.add_argument("--device", default=None, help="default cuda (--tiny: cpu)")
    p.add_argument("--only", default=None, help="comma-separated case names to run")
    p.add_argument("--skip", default=None, help="comma-separated case names to leave out")
    p.add_argument("--runs", type=int, default=None, help="timed runs per case (default 2; --tiny 1)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs per case first (default 1; --tiny 0)")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="skip the remaining cases after this many seconds (default 420)")
    p.add_argument("--cache", default="fbc", help="value of VBridgePipeline.run(cache=...) for the cached case")
    p.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; --tiny: eager)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the rows as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="log only failures")
    a = p.parse_args(argv)
    a.device = a.device or ("cpu" if a.tiny else "cuda")
    a.runs = a.runs if a.runs is not None else (1 if a.tiny else 2)
    a.warmup = a.warmup if a.warmup is not None else (0 if a.tiny else 1)
    if a.runs < 1 or a.warmup < 0:
        p.error("--runs must be >= 1 and --warmup >= 0")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    all_cases = select(cases(), args.only, args.skip)
    if args.plan:
        print_plan(all_cases, args.tiny)
        return 0
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    import torch

    from bench_restore import _quiet_libraries

    _quiet_libraries()
    for mod in ("vbridge_core",):
        logging.getLogger(mod).setLevel(logging.WARNING)
    try:
        device = torch.device(args.device)
    except RuntimeError:
        print(f"error: bad --device {args.device!r}: use cuda, cuda:N or cpu", file=sys.stderr)
        return 2
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"error: --device {args.device} needs CUDA, but torch {torch.__version__} sees no CUDA GPU. Use --tiny "
              "(CPU code check) or --plan, or run on a GPU machine.", file=sys.stderr)
        return 2
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    t_start = time.perf_counter()
    suite = Suite(args)
    suite.build()
    build_s = time.perf_counter() - t_start
    n_params = sum(p.numel() for p in suite.transformer.parameters())
    logger.info("built the models in %.1f s (DiT %.4f B parameters)", build_s, n_params / 1e9)
    rows: list[Row] = []
    for case in all_cases:
        if time.perf_counter() - t_start > args.budget_s:
            rows.append(Row(case=case.name, what=describe(case, suite.sizes), status=f"skipped: past the {args.budget_s:g} s budget",
                            target_s=case.target_s, anchor_s=case.anchor_s))
            continue
        if case.cuda_only and device.type != "cuda" and not args.tiny:
            rows.append(Row(case=case.name, what=describe(case, suite.sizes), status="skipped: CUDA only"))
            continue
        rows.append(run_case(suite, case))
    fill_diffs(suite, rows)
    total_s = time.perf_counter() - t_start
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    unit = "GB" if device.type == "cuda" else "GB (RSS rise)"
    s = suite.sizes
    print(f"gpu_suite: {'tiny model' if args.tiny else 'Wan2.2-TI2V-5B architecture, random weights'} "
          f"({n_params / 1e9:.4f} B DiT params), {s.height}x{s.width}, F={s.frames}, "
          f"{str(suite.dtype).replace('torch.', '')} on {device} ({dev_name}); median of {args.runs} run(s) after "
          f"{args.warmup} warm-up; total {total_s:.0f} s")
    print(table(rows, unit, judge=not args.tiny))
    failed = [r.case for r in rows if r.status.startswith(("failed", "OOM"))]
    if failed:
        print(f"failed cases: {', '.join(failed)} (tracebacks above in the log)")
    if args.json:
        import dataclasses

        report = dict(config=dict(model="tiny" if args.tiny else "wan2.2-ti2v-5b-random", dit_params=n_params,
                                  height=s.height, width=s.width, frames=s.frames, steps=s.steps, big=list(s.big),
                                  train=list(s.train), runs=args.runs, warmup=args.warmup,
                                  dtype=str(suite.dtype).replace("torch.", ""), device=str(device), seed=args.seed),
                      environment=dict(device_name=dev_name, torch=torch.__version__,
                                       diffusers=__import__("diffusers").__version__, python=platform.python_version(),
                                       date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())),
                      build_seconds=round(build_s, 2), total_seconds=round(total_s, 1),
                      rows=[dataclasses.asdict(r) for r in rows])
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
