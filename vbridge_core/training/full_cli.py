"""``python -m vbridge_core train --full``: fine-tune the whole DiT (or chosen blocks) instead of a LoRA.

One node, 8 GPUs (FSDP full sharding, bf16, activation checkpointing)::

    torchrun --nproc_per_node 8 -m vbridge_core train --full --pairs data/ --model Wan2.2-TI2V-5B-Diffusers \\
        --prompt-embeds my_restore_lora.safetensors --stages 512:4000,960:4200 --lr 2e-5 \\
        --gradient-checkpointing --checkpoint-every 500 --out models/diffusion_models/vbridge_full.safetensors

The output is a whole DiT in the original layout (what ComfyUI's UNETLoader and ``--dit`` load);
``--save-diffusers DIR`` also writes a diffusers ``transformer/`` folder. ``--resume auto`` continues
from the newest training state in ``<out stem>.checkpoints/``.
"""
from __future__ import annotations

import argparse
import logging
import signal

import torch

from ..errors import InputError

logger = logging.getLogger("vbridge_core")


def add_full_args(t: argparse.ArgumentParser) -> None:
    """The ``--full`` flags of ``train``."""
    f = t.add_argument_group("full fine-tuning (--full; several processes shard the model with FSDP)")
    f.add_argument("--full", action="store_true", help="train the DiT's own weights (not a LoRA) and write a whole "
                   "DiT to --out; launch with torchrun / accelerate launch to shard it over GPUs")
    f.add_argument("--train-blocks", default=None, metavar="LIST", help="(--full) train only these transformer "
                   "blocks, e.g. 0-9,29 (default: every weight)")
    f.add_argument("--cpu-offload", action="store_true", help="(--full) keep sharded weights, gradients and "
                   "optimizer state in CPU memory; the optimizer steps on the CPU")
    f.add_argument("--max-shard-size", default="0", metavar="SIZE", help="(--full) split the output DiT into "
                   "shards with an index above this size, e.g. 5GB (0: one file, what ComfyUI's UNETLoader reads)")
    f.add_argument("--save-dtype", choices=["bf16", "fp16", "fp32"], default="bf16",
                   help="(--full) dtype of the written DiT")
    f.add_argument("--save-diffusers", metavar="DIR", help="(--full) also write a diffusers transformer/ folder here")


def cmd_train_full(a: argparse.Namespace) -> int:
    """Handle ``train --full`` (see the module docstring)."""
    from ..cli_common import parse_dtype
    from ..pairs import scan_pairs
    from ..pipeline import VBridgePipeline, resolve_device
    from .cli import _config, _prompt_embeddings, _synthesise_pairs, check_train_outputs
    from .dataset import TrainingPairs
    from .full import FullOptions, train_full
    from .full_files import parse_size
    from .loop import make_accelerator

    if not a.pairs and not a.from_clean:
        raise InputError("give --pairs DIR (lq/ and hq/ folders) or --from-clean DIR with --degradations")
    if a.mode == "drift" and not a.restoration_lora:
        raise InputError("--mode drift needs --restoration-lora FILE (the restoration LoRA whose outputs are the "
                         "drift-correction inputs)")
    if not str(a.out).endswith(".safetensors"):
        raise InputError(f"--out {a.out}: a full fine-tune is written as a .safetensors file (original layout)")
    cfg = _config(a)
    check_train_outputs(a)
    options = FullOptions(train_blocks=a.train_blocks, cpu_offload=a.cpu_offload,
                          max_shard_size=parse_size(a.max_shard_size), save_dtype=a.save_dtype,
                          diffusers_folder=a.save_diffusers)
    device = resolve_device(a.device) if a.device else None
    acc = make_accelerator(device or (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")))
    if device is None or (device.type == "cuda" and acc.num_processes > 1):
        device = acc.device
    pairs_dir = _synthesise_pairs(a, acc.is_main_process, acc.wait_for_everyone) if a.from_clean else a.pairs
    pairs = scan_pairs(pairs_dir)
    TrainingPairs.from_any(pairs).check()
    pipe = VBridgePipeline.from_files(a.model, dit=a.dit, vae=a.vae, device=device, dtype=parse_dtype(a.dtype),
                                      text_encoder=a.text_encoder, tokenizer=a.tokenizer, vae_tiling=a.vae_tiling)
    pos, neg, meta = _prompt_embeddings(a, pipe)
    train_pairs = pairs
    if a.mode == "drift":
        from ..lora import read_lora, remove_lora
        from .checkpoint import checkpoint_dir
        from .drift import restored_pairs

        cfg.role = "drift_correction"
        if pos is None:
            pos = read_lora(a.restoration_lora).prompt_embeds
        train_pairs = restored_pairs(pipe, pairs, a.restoration_lora, a.cache_dir or checkpoint_dir(a.out) / "cache",
                                     dict(steps=a.restore_steps, seed=a.seed), is_main=acc.is_main_process,
                                     barrier=acc.wait_for_everyone)
        for ad in list(pipe.adapters.values()):  # the restoration LoRA made the inputs; the DiT trains bare
            remove_lora(pipe.transformer, ad["name"])
        pipe.adapters.clear()
        meta["restoration_lora"] = str(a.restoration_lora)
    if pos is None:
        raise InputError("full fine-tuning needs the prompt embedding: --prompt-embeds FILE or --text-encoder")

    stop = {"requested": False}

    def on_sigint(signum, frame):  # first Ctrl-C: save a training state at the next step; second: stop now
        if stop["requested"]:
            raise KeyboardInterrupt
        stop["requested"] = True
        logger.warning("stopping: a training state is written after the current step (Ctrl-C again to abort now)")

    old = signal.signal(signal.SIGINT, on_sigint)
    try:
        res = train_full(pipe, train_pairs, cfg, options, a.out, prompt_embeds=pos, accelerator=acc, metadata=meta,
                         should_cancel=lambda: stop["requested"], resume=a.resume,
                         validation_pairs=scan_pairs(a.val_pairs) if a.val_pairs else None)
    finally:
        signal.signal(signal.SIGINT, old)
    if acc.is_main_process:
        fin = [x for x in res.losses if x == x]
        logger.info("wrote %s (%d steps, loss %.4f -> %.4f)", res.path, len(res.losses),
                    fin[0] if fin else float("nan"), fin[-1] if fin else float("nan"))
    return 0
