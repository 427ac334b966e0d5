#!/usr/bin/env python
"""Per-GPU memory plan for full fine-tuning of the Wan2.2-TI2V-5B DiT with FSDP (1, 2, 4, 8 GPUs).

Everything is computed from the model itself, not from rounded numbers: the parameter counts come
from diffusers' ``WanTransformer3DModel`` built from the shipped config
(``vbridge_core/configs/wan22_ti2v_5b_transformer.json``) on the meta device, the token counts from
the real compression (VAE 16x spatial and 4x temporal, patch (1, 2, 2)): an H x W image with F
pseudo-video frames gives ``((F - 1) / 4 + 1) * (H / 32) * (W / 32)`` tokens (F=5: 512 tokens at
512 px, 1,800 at 960 px), plus 512 text tokens for cross-attention.

Per GPU, for FSDP full sharding over N GPUs (ZeRO-3: parameters, gradients and optimizer state
split N ways; each transformer block is one FSDP unit), micro-batch 1:

* **weights**: the sharded master copy, ``P * 4 / N`` bytes for fp32 masters (FSDP mixed precision
  bf16: what ``train --full`` and the V-Bridge release use), ``P * 2 / N`` for pure bf16, plus the
  unsharded bf16 copies FSDP gathers for compute: the root unit (embeddings, head) for the whole
  step and two blocks at a time (the running one and the prefetched one);
* **gradients**: sharded like the masters (fp32: ``4P/N``) plus one unsharded bf16 block gradient
  before its reduce-scatter;
* **optimizer state**: AdamW's two moments in fp32 (``8P/N``; pure bf16 training keeps them in bf16,
  ``4P/N``), or bitsandbytes' 8-bit AdamW (``2P/N`` plus one fp32 absmax per 2,048 values per
  moment); with CPU offload of the optimizer state it leaves the GPU entirely;
* **activations** (do not shrink with N: every GPU runs its own micro-batch): the bytes autograd
  saves for backward. They are **measured**, not guessed: a one-block model of the real width
  (dim 3072, 24 heads, FFN 14336; bf16, all parameters trainable) runs forward on the CPU at two
  token counts while ``torch.autograd.graph.saved_tensors_hooks`` records every saved tensor's
  storage once (parameters excluded; attention through SDPA, which saves its output and
  log-sum-exp, not the T x T scores, like the flash / cuDNN kernels on a GPU). The bytes saved
  inside the block give ``a + b * T`` per block (``a``: the cross-attention keys and values of the
  512 text tokens), the rest of the model the root's share. Without activation checkpointing a step
  holds all L blocks' activations; with diffusers' gradient checkpointing (each block recomputed
  in backward) it holds each block's input (``T * dim`` bf16 values) plus one block's activations
  while it is recomputed.

Not included (add them when sizing a job): the CUDA context and kernels (~0.5-1 GB), the
allocator's fragmentation (often 5-15 %), the VAE if it stays resident (1.4 GB in bf16; the
trainer encodes latents up front), and NCCL buffers. The anchors' LoRA steps
(``shared/anchors/README.md``: bf16 5B, no checkpointing, 14.0 GB at 512 px and 25.5 GB at 1024 px)
fit the measured activations: ``--check-anchors`` prints the comparison.

    python bench/memory_plan.py                  # Markdown table for 512 and 960 px, F=5
    python bench/memory_plan.py --json plan.json --check-anchors
"""
from __future__ import annotations

import argparse
import inspect
import json
import logging
import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "bench"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

logger = logging.getLogger("memory_plan")

GIB = 2**30
TEXT_LEN = 512
GPU_COUNTS = (1, 2, 4, 8)
RESOLUTIONS = (512, 960)
BNB_BLOCK = 2048


def tokens_for(height: int, width: int, frames: int, patch: tuple[int, int, int] = (1, 2, 2)) -> int:
    """DiT tokens of an H x W, F-frame pseudo-video: VAE 16x spatial / 4x temporal, then the patch."""
    if (frames - 1) % 4 or height % 16 or width % 16:
        raise ValueError(f"need F = 4k+1 and sides divisible by 16, got {height}x{width}, F={frames}")
    lat_t, lat_h, lat_w = (frames - 1) // 4 + 1, height // 16, width // 16
    return (lat_t // patch[0]) * (lat_h // patch[1]) * (lat_w // patch[2])


@dataclass
class ModelCounts:
    """Parameter counts of a WanTransformer3DModel config."""

    total: int
    per_block: int
    root: int          # everything outside the blocks (embeddings, head, modulation table)
    layers: int
    dim: int
    ffn_dim: int


def count_params(cfg: dict[str, Any] | None = None) -> ModelCounts:
    """Build ``WanTransformer3DModel(**cfg)`` on the meta device and count (default: the shipped 5B config)."""
    from accelerate import init_empty_weights
    from diffusers import WanTransformer3DModel

    from vbridge_core.models import load_transformer_config

    cfg = dict(cfg) if cfg is not None else load_transformer_config()
    params = inspect.signature(WanTransformer3DModel.__init__).parameters
    with init_empty_weights():
        model = WanTransformer3DModel(**{k: v for k, v in cfg.items() if k in params})
    total = sum(p.numel() for p in model.parameters())
    per_block = sum(p.numel() for p in model.blocks[0].parameters())
    return ModelCounts(total=total, per_block=per_block, root=total - per_block * len(model.blocks),
                       layers=len(model.blocks), dim=cfg["num_attention_heads"] * cfg["attention_head_dim"],
                       ffn_dim=cfg["ffn_dim"])


# ---------------------------------------------------------------------------------------------------
# activation calibration

@dataclass
class ActivationModel:
    """Saved-for-backward bytes: ``block_const + block_per_token * T`` per block, ``root_*`` outside."""

    block_const: float
    block_per_token: float
    root_const: float
    root_per_token: float
    measured_at_tokens: tuple[int, int]
    width: int

    def block(self, tokens: int) -> float:
        return self.block_const + self.block_per_token * tokens

    def root(self, tokens: int) -> float:
        return max(0.0, self.root_const + self.root_per_token * tokens)


def _saved_bytes(model, x, ts, ctx) -> tuple[int, int]:
    """(bytes saved inside blocks[0], bytes saved elsewhere) in one forward; backward runs to check."""
    import torch

    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, tuple[int, bool]] = {}
    inside = [False]
    block = model.blocks[0]
    hooks = [block.register_forward_pre_hook(lambda *a: inside.__setitem__(0, True)),
             block.register_forward_hook(lambda *a: inside.__setitem__(0, False))]

    def pack(t):
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr and ptr not in param_ptrs and ptr not in seen:
            seen[ptr] = (st.nbytes(), inside[0])
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(hidden_states=x, timestep=ts, encoder_hidden_states=ctx, return_dict=False)[0]
        out.float().pow(2).mean().backward()
    finally:
        for h in hooks:
            h.remove()
    in_block = sum(n for n, ins in seen.values() if ins)
    return in_block, sum(n for n, ins in seen.values() if not ins)


def calibrate_activations(cfg: dict[str, Any] | None = None, latent_sides: tuple[int, int] = (8, 16),
                          text_len: int = TEXT_LEN, threads: int | None = None,
                          trainable: str = "all") -> ActivationModel:
    """Measure saved-tensor bytes of a one-block model of ``cfg``'s width in bf16 on the CPU.

    ``latent_sides``: two latent sizes (h = w, 2 latent frames) giving two token counts for the
    linear fit. Default width: the real 5B (~0.25 B parameters, ~0.5 GB of bf16 weights).
    ``trainable``: ``"all"`` (full fine-tuning) or ``"linear"`` (only the blocks' Linear weights:
    what a LoRA on attention + FFN needs saved; norms, modulation and embeddings frozen).
    """
    import torch
    from diffusers import WanTransformer3DModel

    from vbridge_core.models import load_transformer_config

    if threads:
        torch.set_num_threads(threads)
    cfg = dict(cfg) if cfg is not None else load_transformer_config()
    cfg["num_layers"] = 1
    params = inspect.signature(WanTransformer3DModel.__init__).parameters
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = WanTransformer3DModel(**{k: v for k, v in cfg.items() if k in params})
    model = model.to_empty(device="cpu")
    for p in model.parameters():  # all bf16 (not ModelMixin.to, which warns about its fp32 modules)
        p.data = p.data.to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.02 if p.ndim < 2 else p[0].numel() ** -0.5))
    model.requires_grad_(trainable == "all").train()
    if trainable == "linear":
        for m in model.blocks.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.requires_grad_(True)
    patch = tuple(cfg["patch_size"])
    points = []
    for side in latent_sides:
        x = torch.randn(1, cfg["in_channels"], 2, side, side, generator=g).to(torch.bfloat16)
        tokens = 2 * (side // patch[1]) * (side // patch[2])
        ts = torch.full((1, tokens), 500.0)
        ctx = (0.1 * torch.randn(1, text_len, cfg["text_dim"], generator=g)).to(torch.bfloat16)
        in_block, rest = _saved_bytes(model, x, ts, ctx)
        model.zero_grad(set_to_none=True)
        points.append((tokens, in_block, rest))
        logger.info("calibration: %d tokens: %.1f MiB saved in the block, %.1f MiB outside", tokens,
                    in_block / 2**20, rest / 2**20)
    (t1, b1, r1), (t2, b2, r2) = points
    bpt = (b2 - b1) / (t2 - t1)
    rpt = (r2 - r1) / (t2 - t1)
    return ActivationModel(block_const=b1 - bpt * t1, block_per_token=bpt, root_const=r1 - rpt * t1,
                           root_per_token=rpt, measured_at_tokens=(t1, t2),
                           width=cfg["num_attention_heads"] * cfg["attention_head_dim"])


# ---------------------------------------------------------------------------------------------------
# the plan

@dataclass
class PlanRow:
    """One line of the plan, all values GiB per GPU."""

    resolution: int
    frames: int
    tokens: int
    gpus: int
    precision: str
    weights: float
    grads: float
    adamw: float
    adamw8bit: float
    act_ckpt: float
    act_full: float

    def total(self, optimizer: str = "adamw", checkpointing: bool = True, offload_optimizer: bool = False) -> float:
        opt = 0.0 if offload_optimizer else (self.adamw if optimizer == "adamw" else self.adamw8bit)
        return self.weights + self.grads + opt + (self.act_ckpt if checkpointing else self.act_full)


def estimate(counts: ModelCounts, act: ActivationModel, resolution: int, frames: int, gpus: int,
             precision: str = "fp32_master") -> PlanRow:
    """Per-GPU memory of one FSDP full-fine-tuning step (see the module docstring for each term)."""
    if precision not in ("fp32_master", "bf16"):
        raise ValueError(f"precision must be fp32_master or bf16, got {precision!r}")
    p, n = counts.total, gpus
    master = 4 if precision == "fp32_master" else 2
    gathered = 2 * counts.root + 2 * 2 * counts.per_block if n > 1 or precision == "fp32_master" else 0
    weights = master * p / n + gathered
    grads = master * p / n + 2 * counts.per_block
    adamw = (8 if precision == "fp32_master" else 4) * p / n
    adamw8 = 2 * p / n + 2 * 4 * math.ceil(p / n / BNB_BLOCK)
    t = tokens_for(resolution, resolution, frames)
    block = act.block(t)
    full = counts.layers * block + act.root(t)
    ckpt = counts.layers * t * counts.dim * 2 + block + act.root(t)
    return PlanRow(resolution=resolution, frames=frames, tokens=t, gpus=n, precision=precision,
                   weights=weights / GIB, grads=grads / GIB, adamw=adamw / GIB, adamw8bit=adamw8 / GIB,
                   act_ckpt=ckpt / GIB, act_full=full / GIB)


def plan(counts: ModelCounts, act: ActivationModel, resolutions=RESOLUTIONS, frames: int = 5,
         gpus=GPU_COUNTS, precision: str = "fp32_master") -> list[PlanRow]:
    return [estimate(counts, act, r, frames, n, precision) for r in resolutions for n in gpus]


def markdown(rows: list[PlanRow], counts: ModelCounts, act: ActivationModel, card_gb: float = 80.0,
             model_name: str = "Wan2.2-TI2V-5B DiT") -> str:
    """The plan as a Markdown table (GiB per GPU; totals above ``card_gb`` marked)."""
    def tot(v: float) -> str:
        return f"**{v:.1f}**" if v > card_gb else f"{v:.1f}"

    prec = rows[0].precision if rows else "fp32_master"
    lines = [
        f"Full fine-tuning of the {model_name} ({counts.total / 1e9:.4f} B parameters, {counts.layers} blocks "
        f"of {counts.per_block / 1e6:.1f} M), FSDP full sharding, "
        + ("fp32 master weights with bf16 compute" if prec == "fp32_master" else "pure bf16 weights and optimizer")
        + f", micro-batch 1, F={rows[0].frames if rows else 5}. GiB per GPU; **bold** = over {card_gb:g} GB. "
        f"Activations measured on a one-block model of width {act.width} "
        f"({act.block_per_token / 1024:.0f} KiB per token per block + {act.block_const / 2**20:.0f} MiB for the "
        "text keys/values).",
        "",
        "| px | tokens | GPUs | weights | grads | AdamW | 8-bit AdamW | act. (ckpt) | act. (no ckpt) "
        "| **total** AdamW + ckpt | 8-bit + ckpt | AdamW, no ckpt | AdamW offloaded + ckpt |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.resolution} | {r.tokens} | {r.gpus} | {r.weights:.1f} | {r.grads:.1f} | {r.adamw:.1f} | "
            f"{r.adamw8bit:.1f} | {r.act_ckpt:.1f} | {r.act_full:.1f} | {tot(r.total('adamw', True))} | "
            f"{tot(r.total('adamw8bit', True))} | {tot(r.total('adamw', False))} | "
            f"{tot(r.total('adamw', True, offload_optimizer=True))} |")
    return "\n".join(lines)


#: The anchors' LoRA steps (shared/anchors/README.md, H100): bf16 5B weights, bf16 LoRA params,
#: no autocast, no checkpointing: (tokens, measured peak GB).
ANCHOR_LORA_NO_CKPT = ((512, 14.0), (2048, 25.5))


def anchor_check(counts: ModelCounts, act: ActivationModel) -> list[dict[str, float]]:
    """Predicted vs measured peak of the anchors' no-checkpointing LoRA steps (weights + activations).

    ``act`` should be calibrated with ``trainable="linear"`` (a LoRA step saves less than full
    fine-tuning: with the modulation frozen, the fp32 normalised inputs it multiplies need not be kept).
    """
    out = []
    for tokens, measured in ANCHOR_LORA_NO_CKPT:
        predicted = (2 * counts.total + counts.layers * act.block(tokens) + act.root(tokens)) / GIB
        out.append(dict(tokens=tokens, measured_gb=measured, predicted_gb=round(predicted, 2)))
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=5)
    p.add_argument("--resolutions", default="512,960", help="comma-separated square sides (default 512,960)")
    p.add_argument("--gpus", default="1,2,4,8", help="comma-separated GPU counts (default 1,2,4,8)")
    p.add_argument("--precision", choices=("fp32_master", "bf16"), default="fp32_master")
    p.add_argument("--card-gb", type=float, default=80.0, help="mark totals above this (default 80)")
    p.add_argument("--tiny", action="store_true", help="the tiny test config (a fast check of the code)")
    p.add_argument("--check-anchors", action="store_true", help="compare with the anchors' LoRA-step peaks")
    p.add_argument("--json", default=None, help="also write the plan as JSON")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s",
                        stream=sys.stderr)
    from vbridge_core.tiny import TINY_TRANSFORMER_CONFIG

    cfg = dict(TINY_TRANSFORMER_CONFIG) if args.tiny else None
    try:
        resolutions = [int(v) for v in args.resolutions.split(",")]
        gpus = [int(v) for v in args.gpus.split(",")]
    except ValueError:
        print("error: --resolutions and --gpus take comma-separated integers", file=sys.stderr)
        return 2
    if any(r % 32 for r in resolutions) or any(g < 1 for g in gpus) or (args.frames - 1) % 4:
        print("error: resolutions must be multiples of 32, GPU counts positive, frames 4k+1", file=sys.stderr)
        return 2
    counts = count_params(cfg)
    act = calibrate_activations(cfg, latent_sides=(4, 8) if args.tiny else (8, 16))
    rows = plan(counts, act, resolutions, args.frames, gpus, args.precision)
    print(markdown(rows, counts, act, args.card_gb, "tiny test DiT" if args.tiny else "Wan2.2-TI2V-5B DiT"))
    checks = []
    if args.check_anchors and not args.tiny:
        lora_act = calibrate_activations(cfg, latent_sides=(8, 16), trainable="linear")
        checks = anchor_check(counts, lora_act)
    for c in checks:
        print(f"\nanchor check, {c['tokens']} tokens: the anchors' LoRA step without checkpointing measured "
              f"{c['measured_gb']} GB; bf16 weights + activations measured here with only the Linear weights "
              f"trainable predict {c['predicted_gb']} GB", end="")
    if checks:
        print()
    if args.json:
        Path(args.json).write_text(json.dumps(dict(counts=asdict(counts), activations=asdict(act),
                                                   rows=[asdict(r) | {"total_adamw_ckpt": r.total()} for r in rows],
                                                   anchor_check=checks), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
