"""The LoRA training loop: curriculum stages, cached latents, accumulation, checkpoints, validation.

``train_lora`` trains one peft LoRA adapter on ``pipe.transformer`` (the base stays frozen) with the
TI2V flow-matching objective of :mod:`.flow_matching` (frame 0 clean at timestep 0, loss on the
noised frames only) and writes it in our LoRA format. Per optimizer step it draws, from one
seeded generator, the pairs, views, noise levels and noise of the whole global batch; with
several processes (``accelerate launch``) each rank takes its slice and the LoRA gradients are
averaged in one flat all-reduce, so N processes with batch ``b`` follow the same math as one
process with batch ``N*b``. (The 5B base is not wrapped in DDP: DDP would broadcast its frozen
10 GB of weights at start and hide ``.config``; only the LoRA gradients need to travel.)

Everything a step depends on is in the checkpoint, so ``resume=`` continues exactly. Only the
main process writes files.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..errors import Cancelled, InputError, OutputError, VBridgeError
from . import checkpoint as ckpt
from .config import RESUME_FREE_FIELDS, TrainConfig, TrainProgress, TrainResult
from .curriculum import format_stages, stage_at, stage_start, total_steps
from .dataset import TrainingPairs, split_validation
from .flow_matching import flow_matching_loss, sample_sigmas
from .latent_cache import build_stage_cache, describe, vae_on

logger = logging.getLogger(__name__)

TRAIN_ADAPTER = "vbridge_training"
ProgressCallback = Callable[[TrainProgress], None]


class TrainingCancelled(Cancelled):
    """Raised when ``should_cancel`` stopped a run; ``checkpoint`` is the state file to resume from."""

    def __init__(self, message: str, checkpoint: Optional[Path]) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint


def make_accelerator(device: torch.device):
    """An ``accelerate.Accelerator`` for this process (CPU-only when the pipeline runs on the CPU).

    Mixed precision is handled by the loop itself (autocast), so the Accelerator only provides the
    process group: ranks, the main-process flag, reductions and barriers.
    """
    from accelerate import Accelerator

    return Accelerator(cpu=device.type == "cpu")


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Learning-rate multiplier at 0-based optimizer ``step``: linear warmup, then the schedule to 0."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(1, total - warmup)
    p = min(1.0, (step - warmup) / span)
    return 0.5 * (1 + math.cos(math.pi * p)) if schedule == "cosine" else 1.0 - p


def make_optimizer(params: list[torch.nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, or bitsandbytes' 8-bit AdamW when asked for (and installed)."""
    if config.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except Exception as e:
            raise InputError(f"optimizer adamw8bit needs bitsandbytes (pip install bitsandbytes): {e}") from None
        return bnb.optim.AdamW8bit(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)


def _autocast(pipe, config: TrainConfig):
    mp = config.mixed_precision
    if pipe.device.type != "cuda" or mp == "no" or (mp == "auto" and pipe.dtype == torch.float32):
        return contextlib.nullcontext()
    dtype = torch.float16 if mp == "fp16" else torch.bfloat16
    return torch.autocast("cuda", dtype=dtype)


def _reduce_grads(params: list[torch.nn.Parameter], accelerator) -> None:
    """Average the LoRA gradients over all processes in one flat buffer."""
    if accelerator is None or accelerator.num_processes == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    flat = accelerator.reduce(flat, reduction="mean")
    off = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[off:off + n].view_as(p).clone()
        off += n


def _any_true(flag: bool, accelerator) -> bool:
    if accelerator is None or accelerator.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)


def _mean_across(value: float, accelerator) -> float:
    if accelerator is None or accelerator.num_processes == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=accelerator.device)
    return float(accelerator.reduce(t, reduction="mean").item())


def train_lora(pipe, pairs: Any, config: TrainConfig, out_path: str | Path, *, prompt_embeds: torch.Tensor,
               negative_prompt_embeds: Optional[torch.Tensor] = None, metadata: Optional[dict[str, Any]] = None,
               callback: Optional[ProgressCallback] = None, should_cancel: Optional[Callable[[], bool]] = None,
               resume: Optional[str | Path] = None, validation_pairs: Any = None, accelerator: Any = None,
               write_plots: bool = True, objective: Any = None) -> TrainResult:
    """Train a LoRA on ``pipe.transformer`` and write it to ``out_path``; see the module docstring.

    ``pairs``: a folder, a :class:`~vbridge_core.pairs.PairSet`, a :class:`.TrainingPairs` or a list
    of ``(lq, hq)`` ``[3, H, W]`` tensors. ``validation_pairs`` (same forms) replaces the held-out
    split. ``callback`` gets a :class:`.TrainProgress` after every step (and on validation,
    checkpoint, stage and caching events). ``should_cancel`` is polled before every step; when it
    returns True a checkpoint is written and :class:`TrainingCancelled` raised (its
    ``checkpoint`` resumes the run). ``resume``: a checkpoint file, its folder, or ``"auto"``.

    The adapter is trained on the bare base (other adapters of ``pipe`` are switched off meanwhile)
    and removed afterwards, so the pipeline is left as it was.

    ``objective`` replaces the flow-matching loss (e.g. :class:`.turbo.TurboObjective`): its
    ``setup``/``prepare_stage``/``loss``/``validation_sample``/``teardown`` hooks run at the
    matching points of the loop; everything else (curriculum, checkpoints, resume) stays the same.
    """
    from peft import LoraConfig

    from ..lora import lora_state_from_peft, remove_lora, set_active_loras, write_lora

    t_start = time.perf_counter()
    config.validate()
    out_path = Path(out_path)
    acc = accelerator if accelerator is not None else make_accelerator(pipe.device)
    world, rank, is_main = acc.num_processes, acc.process_index, acc.is_main_process

    def report(p: TrainProgress) -> None:
        if callback is not None and is_main:
            callback(p)

    # ---------------------------------------------------------------- data
    data = TrainingPairs.from_any(pairs)
    min_h, min_w = data.check()
    if config.stages in (None, "") and config.resolution is None:
        side = min(512, min(min_h, min_w) // 32 * 32)
        if side < 32:
            raise InputError(f"training images must be at least 32 px on each side; the smallest is {min_w}x{min_h}")
        config.resolution = side
    stages = config.curriculum()
    total = total_steps(stages)
    if validation_pairs is not None:
        train_set, val_set = data, TrainingPairs.from_any(validation_pairs)
        val_set.check()
    else:
        train_set, val_set = split_validation(data, config.validation_fraction, config.seed)
    logger.info("training %s LoRA: %d training pairs in %d task(s), %d held out for validation; stages %s "
                "(%d steps), %d process(es)", config.role, len(train_set), len(train_set.tasks), len(val_set),
                format_stages(stages), total, world)
    folder = ckpt.checkpoint_dir(out_path)
    weights = None
    if config.quality_weighting:  # per-pair loss weights from the perceived difficulty, computed once
        from ..perceive.weighting import pair_weights

        weights = pair_weights(train_set, config.quality_weighting)

    # ---------------------------------------------------------------- model
    transformer = pipe.transformer
    vae_home = next(pipe.vae.parameters()).device
    pipe._activate(None)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # peft warns that another adapter joins an existing peft_config: several adapters are the design
        warnings.filterwarnings("ignore", message=".*Already found a `peft_config`.*")
        torch.manual_seed(config.seed)
        transformer.add_adapter(LoraConfig(r=config.rank, lora_alpha=config.alpha,
                                           target_modules=list(config.target_modules), init_lora_weights=True),
                                adapter_name=TRAIN_ADAPTER)
    set_active_loras(transformer, {TRAIN_ADAPTER: 1.0})
    names_params = [(n, p) for n, p in transformer.named_parameters() if TRAIN_ADAPTER in n]
    params = [p for _, p in names_params]
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    had_gc = bool(getattr(transformer, "gradient_checkpointing", False))
    was_training = transformer.training

    def restore_model() -> None:
        """Leave the pipeline as it was: no training adapter, no trainable weights, VAE back home."""
        transformer.train(was_training)
        if not had_gc and config.gradient_checkpointing and hasattr(transformer, "disable_gradient_checkpointing"):
            transformer.disable_gradient_checkpointing()
        remove_lora(transformer, TRAIN_ADAPTER)
        if objective is not None:
            objective.teardown(pipe)
        for p in transformer.parameters():
            p.requires_grad_(False)
        pipe._activate(None)
        pipe.vae.to(vae_home)
    if config.gradient_checkpointing and hasattr(transformer, "enable_gradient_checkpointing"):
        transformer.enable_gradient_checkpointing()
    opt = make_optimizer(params, config)
    gen = torch.Generator().manual_seed(config.seed)
    from ..runtime import pad_prompt_embeds

    prompt = pad_prompt_embeds(prompt_embeds).to(pipe.device)  # trained as the official model sees prompts

    try:  # a failure before the loop (e.g. a refused resume) must still remove the adapter
        if objective is not None:
            objective.setup(pipe, TRAIN_ADAPTER, prompt)
        losses: list[float] = []
        skipped: list[int] = []
        history: list[dict[str, Any]] = []
        start = 0
        last_ckpt: Optional[Path] = None
        if resume is not None:
            rpath = ckpt.find_resume(resume, out_path)
            if rpath is not None:
                state = ckpt.load_checkpoint(rpath)
                diff = ckpt.config_differences(state["config"], config.to_dict(), RESUME_FREE_FIELDS)
                if diff:
                    raise InputError(f"cannot resume from {rpath}: the run's settings differ in {', '.join(diff)}; "
                                     "resume with the same settings, or start a new run")
                saved = state["lora"]
                if set(saved) != {n for n, _ in names_params}:
                    raise InputError(f"checkpoint {rpath} holds a different set of LoRA layers")
                with torch.no_grad():
                    for n, p in names_params:
                        p.copy_(saved[n].to(p))
                opt.load_state_dict(state["optimizer"])
                gen.set_state(state["generator"])
                start, losses, skipped, history = state["step"], list(state["losses"]), list(state["skipped"]), \
                    list(state.get("validation", []))
                last_ckpt = rpath
                logger.info("resumed from %s at step %d of %d", rpath, start, total)

        def lora_meta(step: int) -> dict[str, Any]:
            meta = dict(role=config.role, frames=config.frames, alpha_schedule=config.alpha_schedule,
                        steps=step, base_model="Wan2.2-TI2V-5B", resolution_curriculum=format_stages(stages),
                        shift=config.shift, rank=config.rank, lora_alpha=config.alpha,
                        train_config=config.to_dict(), tasks=train_set.tasks, train_pairs=len(train_set))
            if history:
                meta["validation"] = history[-1]
            meta.update(metadata or {})
            return meta

        def write_lora_file(path: Path, step: int) -> Path:
            state = lora_state_from_peft(transformer, TRAIN_ADAPTER)
            return write_lora(path, state, rank=config.rank, alpha=config.alpha, metadata=lora_meta(step),
                              prompt_embeds=prompt_embeds.cpu(),
                              negative_prompt_embeds=negative_prompt_embeds.cpu() if negative_prompt_embeds is not None
                              else None)

        def save_state(step: int) -> Optional[Path]:
            nonlocal last_ckpt
            if is_main:
                state = dict(lora={n: p.detach().cpu().clone() for n, p in names_params}, optimizer=opt.state_dict(),
                             generator=gen.get_state(), losses=losses, skipped=skipped, validation=history,
                             config=config.to_dict())
                # the LoRA first, the state last: a state file on disk always has its LoRA beside it,
                # even when the process is killed between the two writes
                write_lora_file(ckpt.lora_path(folder, step), step)
                last_ckpt = ckpt.save_checkpoint(folder, step, state, config.keep_checkpoints)
                report(TrainProgress("checkpoint", step, total, path=last_ckpt))
            acc.wait_for_everyone()
            return last_ckpt

        # ---------------------------------------------------------------- validation
        val = None
        before_outs: Optional[list[torch.Tensor]] = None
        after_outs: Optional[list[torch.Tensor]] = None

        def validate(step: int, label: str) -> list[torch.Tensor]:
            was = transformer.training
            transformer.eval()
            try:
                with vae_on(pipe), _autocast(pipe, config):
                    metrics, outs = val.run(pipe, prompt, seed=config.seed)
            finally:
                transformer.train(was)
            history.append(dict(step=step, label=label, **{k: round(v, 6) for k, v in metrics.items()}))
            logger.info("validation at step %d (%s): PSNR %.3f dB, SSIM %.4f, latent MSE %.5f", step, label,
                        metrics["psnr"], metrics["ssim"], metrics["latent_mse"])
            report(TrainProgress("validation", step, total, metrics=metrics))
            return outs

        if len(val_set) and is_main:
            val_res = config.validation_resolution or stages[-1].resolution
            with vae_on(pipe):
                val = _ValidationHolder.build(pipe, val_set, val_res, config)
            if objective is not None:
                val.sample_fn = objective.validation_sample
            set_active_loras(transformer, {})
            before_outs = validate(start, "base")
            if start:
                history.pop()  # the resumed history already holds the pre-training row
            set_active_loras(transformer, {TRAIN_ADAPTER: 1.0})

        # ---------------------------------------------------------------- loop
    except BaseException:
        restore_model()
        raise

    cache = None
    cache_stage = -1
    transformer.train()
    if pipe.device.type != "cpu":
        pipe.vae.to("cpu")
    result_path: Optional[Path] = None
    checksum = float("nan")
    try:
        step = start
        while step < total:
            if should_cancel is not None and should_cancel():
                path = save_state(step)
                raise TrainingCancelled(f"training cancelled at step {step} of {total}; resume from {path}", path)
            si, stage = stage_at(stages, step)
            if si != cache_stage:
                report(TrainProgress("stage", step, total, stage=si, resolution=stage.resolution))
                cache = build_stage_cache(pipe, train_set, stage.resolution, si, config,
                                          progress=lambda d, n: report(TrainProgress("caching", d, n, stage=si,
                                                                                      resolution=stage.resolution)))
                cache_stage = si
                if objective is not None:
                    objective.prepare_stage(pipe, cache, si, stage.resolution, report, is_main=is_main,
                                            barrier=acc.wait_for_everyone)
                logger.info("stage %d/%d: %d px from step %d, latents %s", si + 1, len(stages), stage.resolution,
                            stage_start(stages, si), describe(cache))
            lr = config.learning_rate * lr_factor(step, total, config.warmup_steps, config.lr_schedule)
            for g in opt.param_groups:
                g["lr"] = lr
            step_loss = 0.0
            finite = True
            gb = world * config.batch_size
            for _ in range(config.grad_accum):
                mine = slice(rank * config.batch_size, (rank + 1) * config.batch_size)
                if objective is not None:
                    with _autocast(pipe, config):
                        loss = objective.loss(transformer, cache, gen, gb, mine, pipe.device)
                else:
                    pi = torch.randint(len(cache), (gb,), generator=gen)
                    vi = torch.randint(len(cache[0]), (gb,), generator=gen)
                    sig = sample_sigmas(gb, config.shift, gen)
                    shape = (gb,) + tuple(cache[0][0].shape[1:])
                    noise = torch.randn(shape, generator=gen)
                    z = torch.cat([cache[int(p)][int(v)] for p, v in zip(pi[mine], vi[mine])]).to(pipe.device)
                    with _autocast(pipe, config):
                        loss = flow_matching_loss(transformer, z, prompt, sig[mine].to(pipe.device),
                                                  noise[mine].to(pipe.device),
                                                  None if weights is None else weights[pi[mine]].to(pipe.device))
                lv = float(loss.detach())
                if not math.isfinite(lv):
                    finite = False
                    break
                (loss / config.grad_accum).backward()
                step_loss += lv / config.grad_accum
            if _any_true(not finite, acc):
                opt.zero_grad(set_to_none=True)
                skipped.append(step + 1)
                losses.append(float("nan"))
                logger.warning("step %d: non-finite loss, step skipped (%d skipped so far)", step + 1, len(skipped))
                report(TrainProgress("skipped", step + 1, total, stage=si, resolution=stage.resolution, lr=lr))
            else:
                _reduce_grads(params, acc)
                if config.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(_mean_across(step_loss, acc))
                report(TrainProgress("step", step + 1, total, loss=losses[-1], stage=si,
                                     resolution=stage.resolution, lr=lr, seconds=time.perf_counter() - t_start))
            step += 1
            every = config.log_every or max(1, total // 20)
            if is_main and (step % every == 0 or step == total):
                recent = [v for v in losses[-every:] if math.isfinite(v)]
                logger.info("step %d/%d (stage %d, %d px) loss %.4f lr %.2e", step, total, si + 1, stage.resolution,
                            sum(recent) / len(recent) if recent else float("nan"), lr)
            if val is not None and config.validation_every and step % config.validation_every == 0 and step < total:
                validate(step, "training")
            if config.checkpoint_every and step % config.checkpoint_every == 0 and step < total:
                save_state(step)
        with torch.no_grad():
            checksum = float(sum(p.detach().double().pow(2).sum() for p in params))
        logger.info("process %d/%d finished: LoRA checksum %.10e", rank, world, checksum)
        if val is not None:
            after_outs = validate(total, "final")
        if is_main:
            result_path = _write_final(lambda path: write_lora_file(path, total), out_path,
                                       ckpt.lora_path(folder, total), "LoRA")
        acc.wait_for_everyone()
    finally:
        restore_model()

    from .plots import run_pictures

    curve, grid, curve_path = run_pictures(losses, [stage_start(stages, i) for i in range(1, len(stages))],
                                           f"{config.role} loss", val, before_outs, after_outs, out_path,
                                           write=is_main and write_plots)
    secs = time.perf_counter() - t_start
    fin = [v for v in losses if math.isfinite(v)]
    logger.info("trained %s LoRA: %d steps in %.1f s, loss %.4f -> %.4f, %d skipped; wrote %s", config.role, total,
                secs, fin[0] if fin else float("nan"), fin[-1] if fin else float("nan"), len(skipped), out_path)
    return TrainResult(path=Path(result_path or out_path), losses=losses, seconds=secs, skipped_steps=skipped,
                       validation=history, checkpoint=last_ckpt, loss_curve=curve, validation_grid=grid,
                       loss_curve_path=curve_path, lora_checksum=checksum)


def _write_final(write: Callable[[Path], Path], out_path: Path, fallback: Path, what: str) -> Path:
    """Write the trained weights to ``out_path``; if that fails (full disk, a folder in the way, no
    permission), write them to ``fallback`` in the checkpoint folder instead and raise an
    :class:`OutputError` that says where they are, so hours of training are never lost to a bad path."""
    try:
        return write(out_path)
    except (OSError, VBridgeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        try:
            saved = write(fallback)
        except (OSError, VBridgeError) as e2:
            raise OutputError(f"could not write the trained {what} to {out_path} ({reason}), nor to {fallback} "
                              f"({e2}); the last checkpoint, if any, is in {fallback.parent}") from None
        raise OutputError(f"could not write the trained {what} to {out_path} ({reason}); it was saved as {saved} "
                          f"instead: copy it where you want it") from None


class _ValidationHolder:
    """Builds the :class:`.validation.ValidationSet` (kept separate so the import stays lazy)."""

    @staticmethod
    def build(pipe, pairs: TrainingPairs, resolution: int, config: TrainConfig):
        from .validation import ValidationSet

        return ValidationSet(pipe, pairs, resolution, config)
