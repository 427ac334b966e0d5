"""``python -m vbridge_core train``: train a restoration LoRA, (``--mode drift``) its drift-correction LoRA, or
(``--mode turbo``) a few-step student of a restoration LoRA.

Single GPU::

    python -m vbridge_core train --pairs data/ --out models/loras/vbridge/my_restore.safetensors \\
        --model Wan2.2-TI2V-5B-Diffusers --text-encoder umt5_xxl_fp16.safetensors --stages 512:400,720:300,960:300
    python -m vbridge_core train --mode drift --pairs data/ --restoration-lora models/loras/vbridge/my_restore.safetensors \\
        --out models/loras/vbridge/my_drift.safetensors --model Wan2.2-TI2V-5B-Diffusers --stages 960:300
    python -m vbridge_core train --mode turbo --pairs data/ --teacher-lora models/loras/vbridge/my_restore.safetensors \\
        --turbo-calls 4 --out models/loras/vbridge/my_restore_turbo.safetensors --model Wan2.2-TI2V-5B-Diffusers

Several GPUs (data parallel; each process takes its slice of every global batch)::

    accelerate launch --multi_gpu --num_processes 4 -m vbridge_core train --pairs data/ --out ... (same flags)

(``accelerate launch --multi_gpu`` runs torchrun; ``torchrun --nproc_per_node N -m vbridge_core train ...`` works
the same. The tests run it with two CPU processes.)

Ctrl-C writes a checkpoint at the next step boundary and exits; ``--resume auto`` continues it.
"""
from __future__ import annotations

import argparse
import logging
import signal
from pathlib import Path
from typing import Callable, Optional

import torch

from ..cli_common import HelpFormatter, parse_dtype
from ..errors import InputError
from ..validate import float_arg

logger = logging.getLogger("vbridge_core")


def add_train_parser(sub, add_model_args: Callable[..., None]) -> None:
    """Register ``train`` on the CLI's subparsers."""
    t = sub.add_parser("train", help="train a restoration (or drift-correction) LoRA from LQ/HQ pairs",
                       formatter_class=HelpFormatter, description=__doc__.split("\n\n")[0])
    d = t.add_argument_group("data")
    d.add_argument("--pairs", metavar="DIR", help="folder with lq/ and hq/ (matching file stems), or task subfolders "
                   "each with lq/ and hq/ (mixed into one multi-task set)")
    d.add_argument("--from-clean", metavar="DIR", help="synthesise pairs from the clean photos in DIR (written to "
                   "--pairs, or to <out>.checkpoints/pairs) with --degradations")
    d.add_argument("--degradations", default="gaussian_noise,gaussian_blur,jpeg",
                   help="comma-separated degradations for --from-clean (one task each)")
    d.add_argument("--val-pairs", metavar="DIR", help="validation pairs (default: hold out --val-fraction per task)")
    d.add_argument("--val-fraction", type=float_arg("--val-fraction", min=0, max=1, max_inclusive=False), default=0.1, help="share of each task's pairs held out for validation")
    d.add_argument("--crop-mode", choices=["resize", "crop"], default="resize",
                   help="resize: scale the short side to the stage resolution, then crop (the paper's curriculum); "
                   "crop: crop at native scale")
    d.add_argument("--crops-per-pair", type=int, default=4, help="augmented views (crop + flip) cached per pair and stage")
    d.add_argument("--no-flip", action="store_true", help="no random horizontal flips")

    o = t.add_argument_group("output")
    o.add_argument("--out", required=True, metavar="FILE", help="LoRA file to write (.safetensors), e.g. "
                   "ComfyUI/models/loras/vbridge/name.safetensors")
    o.add_argument("--mode", choices=["restoration", "drift", "turbo"], default="restoration",
                   help="drift: train the drift-correction LoRA on the restoration LoRA's outputs; turbo: distil "
                   "--teacher-lora into a LoRA that restores in --turbo-calls DiT calls (restore --preset turbo)")
    o.add_argument("--restoration-lora", metavar="FILE", help="(--mode drift) the trained restoration LoRA")
    o.add_argument("--restore-steps", type=int, default=30, help="(--mode drift) sampling steps of the restoration "
                   "pass that makes the drift-correction inputs")
    tb = t.add_argument_group("turbo distillation (--mode turbo)")
    tb.add_argument("--teacher-lora", metavar="FILE", help="the restoration LoRA to distil (its 50-step outputs on the "
                    "training LQs are sampled once and cached)")
    tb.add_argument("--turbo-calls", type=int, choices=[1, 2, 4], default=4, help="DiT calls per image of the student")
    tb.add_argument("--turbo-sigmas", default=None, help="comma-separated noise levels, one per call, decreasing "
                    "(default: evenly spaced from the start level, e.g. 1,0.75,0.5,0.25)")
    tb.add_argument("--turbo-start-sigma", type=float_arg("--turbo-start-sigma", min=0, max=1, min_inclusive=False, max_inclusive=False), default=None, help="start from the LQ latent noised to this "
                    "level instead of pure noise (0..1; the sigmas then begin at it)")
    tb.add_argument("--turbo-solver", choices=["x0_renoise", "euler"], default="x0_renoise",
                    help="x0_renoise: predict the clean latent at each level and re-noise it to the next (as "
                    "DMD-distilled Wan bases sample); euler: flow Euler steps between the levels")
    tb.add_argument("--turbo-hq-weight", type=float_arg("--turbo-hq-weight", min=0), default=0.0, help="add this multiple of the MSE to the HQ "
                    "latent to the MSE to the teacher's output")
    tb.add_argument("--teacher-steps", type=int, default=50, help="sampling steps of the teacher's targets")
    o.add_argument("--checkpoint-every", type=int, default=100, help="write a resumable checkpoint every N steps (0: never)")
    o.add_argument("--keep-checkpoints", type=int, default=2, help="how many checkpoints to keep")
    o.add_argument("--resume", metavar="PATH", help="continue from a checkpoint file, its folder, or 'auto'")
    o.add_argument("--cache-dir", metavar="DIR", help="keep the per-stage latent cache on disk here")

    s = t.add_argument_group("schedule")
    s.add_argument("--stages", default=None, help="resolution curriculum as resolution:steps, e.g. 512:400,720:300,960:300 "
                   "(default: one stage of --steps at --resolution)")
    s.add_argument("--steps", type=int, default=400, help="training steps when --stages is not given")
    s.add_argument("--resolution", type=int, default=None, help="square crop side (multiple of 32) when --stages is "
                   "not given (default: largest multiple of 32 that fits, at most 512)")
    s.add_argument("--lr", type=float_arg("--lr", min=0, min_inclusive=False), default=1e-4, help="learning rate")
    s.add_argument("--lr-schedule", choices=["constant", "cosine", "linear"], default="constant", help="LR schedule")
    s.add_argument("--warmup-steps", type=int, default=0, help="linear LR warmup steps")
    s.add_argument("--weight-decay", type=float_arg("--weight-decay", min=0), default=1e-2, help="AdamW weight decay")
    s.add_argument("--optimizer", choices=["adamw", "adamw8bit"], default="adamw",
                   help="adamw8bit needs bitsandbytes")
    s.add_argument("--max-grad-norm", type=float_arg("--max-grad-norm", min=0, hint="0 turns clipping off"), default=1.0, help="gradient clipping (0: off)")
    s.add_argument("--batch-size", type=int, default=1, help="pseudo-videos per process and micro-step")
    s.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step")
    s.add_argument("--seed", type=int, default=0, help="seed")

    m = t.add_argument_group("LoRA and objective")
    m.add_argument("--rank", type=int, default=32, help="LoRA rank")
    m.add_argument("--alpha", type=float_arg("--alpha", min=0, min_inclusive=False), default=None, help="LoRA alpha (default: rank)")
    m.add_argument("--target-modules", default="to_q,to_k,to_v,to_out.0,ffn.net.0.proj,ffn.net.2",
                   help="comma-separated diffusers module names the LoRA wraps")
    m.add_argument("--frames", type=int, default=5, help="pseudo-video length F = 4k+1")
    m.add_argument("--alpha-schedule", default="linear", help="LQ->HQ blend schedule (name or comma-separated values)")
    m.add_argument("--shift", type=float_arg("--shift", min=0, min_inclusive=False), default=5.0, help="flow shift of the noise-level sampling")
    m.add_argument("--mixed-precision", choices=["auto", "no", "bf16", "fp16"], default="auto",
                   help="auto: bf16 autocast on GPU, fp32 on CPU")
    m.add_argument("--quality-weighting", type=float_arg("--quality-weighting", min=0, max=10, hint="0 = off"), default=0.0, metavar="STRENGTH",
                   help="quality-aware loss (Perceive-IR): weight each pair by 1 + STRENGTH x its perceived difficulty "
                   "(1 - quality score of its LQ), normalised to mean 1; 0 = off, 1 = hardest pairs up to ~2x")
    m.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations (less memory, slower)")
    m.add_argument("--prompt", default=None, help="training prompt (default: the V-Bridge release prompt; needs "
                   "--text-encoder)")
    m.add_argument("--prompt-embeds", metavar="FILE", help="take the prompt embedding from this file instead of a text "
                   "encoder: a V-Bridge LoRA, or a .safetensors with 'prompt_embeds' [1, L, 4096]")

    v = t.add_argument_group("validation")
    v.add_argument("--val-every", type=int, default=0, help="validate every N steps (always before and after)")
    v.add_argument("--val-steps", type=int, default=20, help="sampling steps of a validation restore")
    v.add_argument("--val-resolution", type=int, default=None, help="validation crop side (default: last stage's)")
    from .full_cli import add_full_args

    add_full_args(t)
    add_model_args(t, training=True)


def _prompt_embeddings(a: argparse.Namespace, pipe) -> tuple[torch.Tensor, Optional[torch.Tensor], dict]:
    """The training prompt pair: from --prompt-embeds, the restoration LoRA (drift mode), or the text encoder."""
    from ..presets import PAPER_NEGATIVE_PROMPT, PAPER_PROMPT

    if a.prompt_embeds:
        p = Path(a.prompt_embeds)
        if not p.is_file():
            raise InputError(f"--prompt-embeds {p} not found")
        from safetensors.torch import load_file

        from ..lora import NEGATIVE_PROMPT_EMBEDS_KEY, PROMPT_EMBEDS_KEY

        t = load_file(str(p))
        pos = t.get(PROMPT_EMBEDS_KEY, t.get("prompt_embeds"))
        neg = t.get(NEGATIVE_PROMPT_EMBEDS_KEY, t.get("negative_prompt_embeds"))
        if pos is None:
            raise InputError(f"{p} holds no prompt embedding ('prompt_embeds' or '{PROMPT_EMBEDS_KEY}')")
        return pos, neg, {"prompt": f"(embedding from {p.name})"}
    if a.mode in ("drift", "turbo") and not a.text_encoder:
        return None, None, {}  # the restoration / teacher LoRA's own embeddings
    if not a.text_encoder:
        raise InputError("training needs the prompt embedding: give --text-encoder (umt5-xxl file or diffusers folder) "
                         "to encode --prompt (default: the V-Bridge release prompt), or --prompt-embeds FILE (a "
                         "V-Bridge LoRA or a .safetensors holding 'prompt_embeds')")
    prompt = a.prompt or PAPER_PROMPT
    return pipe._encode(prompt), pipe._encode(PAPER_NEGATIVE_PROMPT), \
        {"prompt": prompt, "negative_prompt": PAPER_NEGATIVE_PROMPT}


def _config(a: argparse.Namespace):
    from ..trajectory import parse_schedule
    from .config import TrainConfig

    return TrainConfig(
        steps=a.steps, resolution=a.resolution, stages=a.stages, rank=a.rank, alpha=a.alpha or float(a.rank),
        target_modules=[m.strip() for m in a.target_modules.split(",") if m.strip()], learning_rate=a.lr,
        weight_decay=a.weight_decay, optimizer=a.optimizer, lr_schedule=a.lr_schedule, warmup_steps=a.warmup_steps,
        max_grad_norm=a.max_grad_norm, batch_size=a.batch_size, grad_accum=a.grad_accum,
        mixed_precision=a.mixed_precision, gradient_checkpointing=a.gradient_checkpointing, frames=a.frames,
        alpha_schedule=parse_schedule(a.alpha_schedule), shift=a.shift, seed=a.seed,
        role="drift_correction" if a.mode == "drift" else "restoration", crop_mode=a.crop_mode, flip=not a.no_flip,
        crops_per_pair=a.crops_per_pair, validation_fraction=a.val_fraction, validation_every=a.val_every,
        validation_steps=a.val_steps, validation_resolution=a.val_resolution, checkpoint_every=a.checkpoint_every,
        keep_checkpoints=a.keep_checkpoints, cache_dir=a.cache_dir,
        quality_weighting=a.quality_weighting).validate()


def _turbo_settings(a: argparse.Namespace):
    """The turbo settings of ``--mode turbo`` (checked before the model loads), else None."""
    if a.mode != "turbo":
        return None
    from .turbo import TurboSettings

    if not a.teacher_lora:
        raise InputError("--mode turbo needs --teacher-lora FILE (the restoration LoRA to distil)")
    if not Path(a.teacher_lora).is_file():
        raise InputError(f"--teacher-lora {a.teacher_lora} not found")
    sigmas = None
    if a.turbo_sigmas:
        try:
            sigmas = [float(x) for x in a.turbo_sigmas.split(",") if x.strip()]
        except ValueError:
            raise InputError(f"--turbo-sigmas must be comma-separated numbers, got {a.turbo_sigmas!r}") from None
    return TurboSettings(calls=a.turbo_calls, sigmas=sigmas, start_sigma=a.turbo_start_sigma, solver=a.turbo_solver,
                         hq_weight=a.turbo_hq_weight, teacher_steps=a.teacher_steps, teacher_seed=a.seed).validate()


def check_train_outputs(a: argparse.Namespace) -> Path:
    """Check ``--out`` before the model loads (issue 9): a file name, not a folder; not one of the run's
    input files; its folder creatable. Removes temporaries a killed earlier run left beside it."""
    from ..outputs import check_output_file, clean_stale_temporaries, refuse_overwriting_inputs
    from .checkpoint import checkpoint_dir

    out = check_output_file(a.out)
    if out.suffix.lower() != ".safetensors":
        raise InputError(f"--out {out}: the trained weights are written as a .safetensors file; end the name with "
                         f".safetensors, e.g. {out.with_suffix('.safetensors')}")
    inputs = {"--restoration-lora": getattr(a, "restoration_lora", None), "--teacher-lora": getattr(a, "teacher_lora", None),
              "--prompt-embeds": getattr(a, "prompt_embeds", None), "--dit": getattr(a, "dit", None),
              "--vae": getattr(a, "vae", None), "--text-encoder": getattr(a, "text_encoder", None)}
    if a.resume and a.resume != "auto":
        inputs["--resume"] = a.resume
    sidecars = {"--out": out, "the loss plot": out.with_name(out.stem + ".loss.png"),
                "the validation grid": out.with_name(out.stem + ".validation.png")}
    refuse_overwriting_inputs(sidecars, inputs)
    for folder in (out.parent, checkpoint_dir(out)):
        clean_stale_temporaries(folder, recursive=False)
    return out


def _synthesise_pairs(a: argparse.Namespace, is_main: bool, barrier: Callable[[], None]) -> Path:
    from .checkpoint import checkpoint_dir

    target = Path(a.pairs) if a.pairs else checkpoint_dir(a.out) / "pairs"
    if is_main:
        from ..degrade import make_pairs

        names = [n.strip() for n in a.degradations.split(",") if n.strip()]
        records = make_pairs(a.from_clean, target, names, seed=a.seed)
        logger.info("synthesised %d pairs from %s into %s (%s)", len(records), a.from_clean, target, ", ".join(names))
    barrier()
    return target


def cmd_train(a: argparse.Namespace) -> int:
    """Handle ``train``: load the model, build the dataset, train, write the LoRA (see the module docstring)."""
    from ..pipeline import VBridgePipeline, resolve_device
    from .loop import make_accelerator, train_lora

    if getattr(a, "full", False):  # the whole DiT, sharded with FSDP: its own module
        from .full_cli import cmd_train_full

        return cmd_train_full(a)
    if not a.pairs and not a.from_clean:
        raise InputError("give --pairs DIR (lq/ and hq/ folders) or --from-clean DIR with --degradations")
    if a.mode == "drift" and not a.restoration_lora:
        raise InputError("--mode drift needs --restoration-lora FILE (the LoRA trained with --mode restoration)")
    turbo = _turbo_settings(a)
    cfg = _config(a)
    check_train_outputs(a)
    if a.mode != "turbo":  # a turbo student takes its teacher's modules
        from .targets import check_target_modules

        check_target_modules(cfg.target_modules)
    if a.resume:
        from .checkpoint import find_resume

        find_resume(a.resume, a.out)  # a missing or old pickled state is refused before the model loads
    device = resolve_device(a.device) if a.device else None
    acc = make_accelerator(device or (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")))
    if device is None or (device.type == "cuda" and acc.num_processes > 1):
        device = acc.device
    pairs_dir = _synthesise_pairs(a, acc.is_main_process, acc.wait_for_everyone) if a.from_clean else Path(a.pairs)
    from ..pairs import scan_pairs

    from .dataset import TrainingPairs

    pairs = scan_pairs(pairs_dir)
    if acc.is_main_process:
        logger.info("%s", pairs.summary())
    TrainingPairs.from_any(pairs).check()  # unreadable files or mismatched sizes fail before the model loads
    pipe = VBridgePipeline.from_files(a.model, dit=a.dit, vae=a.vae, device=device, dtype=parse_dtype(a.dtype),
                                      text_encoder=a.text_encoder, tokenizer=a.tokenizer, vae_tiling=a.vae_tiling)
    pos, neg, meta = _prompt_embeddings(a, pipe)
    if a.from_clean:  # restore --auto reads the degradations a LoRA was trained on (issue 11)
        meta["degradations"] = [n.strip() for n in a.degradations.split(",") if n.strip()]

    stop = {"requested": False}

    def on_sigint(signum, frame):  # first Ctrl-C: checkpoint at the next step; second: stop now
        if stop["requested"]:
            raise KeyboardInterrupt
        stop["requested"] = True
        logger.warning("stopping: a checkpoint is written after the current step (Ctrl-C again to abort now)")

    old = signal.signal(signal.SIGINT, on_sigint)
    try:
        kw = dict(metadata=meta, resume=a.resume, should_cancel=lambda: stop["requested"], accelerator=acc,
                  validation_pairs=scan_pairs(a.val_pairs) if a.val_pairs else None)
        if a.mode == "drift":
            from .drift import train_drift_lora

            res = train_drift_lora(pipe, pairs, a.restoration_lora, cfg, a.out, prompt_embeds=pos,
                                   negative_prompt_embeds=neg, restore_settings=dict(steps=a.restore_steps, seed=a.seed),
                                   cache_dir=a.cache_dir, **kw)
        elif a.mode == "turbo":
            from .turbo import train_turbo_lora

            res = train_turbo_lora(pipe, pairs, a.teacher_lora, cfg, a.out, turbo=turbo, prompt_embeds=pos,
                                   negative_prompt_embeds=neg, cache_dir=a.cache_dir, **kw)
        else:
            res = train_lora(pipe, pairs, cfg, a.out, prompt_embeds=pos, negative_prompt_embeds=neg, **kw)
    finally:
        signal.signal(signal.SIGINT, old)
    if acc.is_main_process:
        fin = [x for x in res.losses if x == x]
        logger.info("wrote %s (%d steps, loss %.4f -> %.4f, %d skipped)%s", res.path, len(res.losses),
                    fin[0] if fin else float("nan"), fin[-1] if fin else float("nan"), len(res.skipped_steps),
                    f"; loss curve {res.loss_curve_path}" if res.loss_curve_path else "")
    return 0
