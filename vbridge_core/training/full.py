"""Full fine-tuning of the DiT (all weights, or chosen blocks), sharded with FSDP over all processes.

The paper's release fine-tunes the whole 5B transformer; this trains the same objective, data,
curriculum and drift mode as the LoRA loop (:mod:`.loop`), but on the DiT's own weights:

* **Sharding**: with several processes (``torchrun`` / ``accelerate launch``) every DiT block and
  then the whole model are wrapped with PyTorch's FSDP2 ``fully_shard`` on a 1-D device mesh (full
  sharding: parameters, gradients and optimizer state split over the ranks; each forward gathers one
  block at a time). The process group is accelerate's (NCCL on GPUs, gloo on CPUs). accelerate's
  own FSDP plugin is GPU-only (on CPU it silently becomes DDP), so the same ``fully_shard`` calls run
  on every device and the 2-process CPU tests cover the code GPUs run. One process trains unsharded.
* **Precision**: fp32 master weights; on GPUs bf16 compute (``--mixed-precision bf16``/auto) through
  FSDP's ``MixedPrecisionPolicy`` with fp32 gradient reduction. ``--gradient-checkpointing``
  recomputes each block's activations. ``--cpu-offload`` keeps the sharded parameters, gradients and
  optimizer state in CPU memory (FSDP's ``CPUOffloadPolicy``; the optimizer steps on the CPU).
  ``--optimizer adamw8bit`` uses bitsandbytes' 8-bit AdamW when it is installed, on one process
  (see :func:`make_full_optimizer` for why sharded runs use ``--cpu-offload`` instead).
* **Same batches as one process**: each optimizer step draws the whole global batch (pairs, views,
  noise levels, noise) from one seeded generator and every rank takes its slice, as the LoRA loop
  does; FSDP averages the gradients, so N processes with batch b follow one process with batch N*b.
* **Checkpoints and resume**: every ``checkpoint_every`` steps the full (unsharded) trained weights
  and optimizer state are gathered to rank 0 and written as safetensors + JSON
  (:mod:`.full_files`, no pickle); resuming reads them on rank 0 and scatters them into the shards,
  so a run may resume with another number of processes (same global batch). Only rank 0 writes.
"""
from __future__ import annotations

import logging
import math
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..errors import InputError
from . import full_files as ff
from .checkpoint import checkpoint_dir, config_differences
from .config import RESUME_FREE_FIELDS, TrainConfig, TrainProgress, TrainResult
from .curriculum import format_stages, stage_at, stage_start, total_steps
from .dataset import TrainingPairs, split_validation
from .flow_matching import flow_matching_loss, sample_sigmas
from .latent_cache import build_stage_cache, describe, vae_on
from .loop import TrainingCancelled, _any_true, _mean_across, _write_final, lr_factor, make_optimizer

logger = logging.getLogger(__name__)

#: Config fields that may differ on resume besides the LoRA loop's: the per-process batch (the global batch counts),
#: the validation crop (it does not touch the training math) and the LoRA-only fields.
FULL_RESUME_FREE = RESUME_FREE_FIELDS + ("batch_size", "validation_resolution", "rank", "alpha", "target_modules")


@dataclass
class FullOptions:
    """What full fine-tuning adds to :class:`.TrainConfig`.

    ``train_blocks``: ``None`` trains every weight; ``"0-9,29"`` only those transformer blocks.
    ``max_shard_size``: bytes above which the output DiT is split into shards with an index (0: one
    file). ``save_dtype``: dtype of the written DiT. ``diffusers_folder``: also write a diffusers
    ``transformer/`` folder there.
    """

    train_blocks: Optional[str] = None
    cpu_offload: bool = False
    max_shard_size: int = 0
    save_dtype: str = "bf16"
    diffusers_folder: Optional[str] = None


def parse_blocks(spec: Optional[str], n_blocks: int) -> Optional[list[int]]:
    """``"0-9,29"`` -> ``[0, ..., 9, 29]`` (checked against the model's ``n_blocks``); None/"all" -> None."""
    if spec is None or str(spec).strip().lower() in ("", "all"):
        return None
    out: set[int] = set()
    for part in str(spec).split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise InputError(f"--train-blocks {spec!r}: give block numbers and ranges, e.g. 0-9,29")
        a, b = int(m.group(1)), int(m.group(2) or m.group(1))
        if b < a or b >= n_blocks:
            raise InputError(f"--train-blocks {spec!r}: blocks run from 0 to {n_blocks - 1}")
        out.update(range(a, b + 1))
    return sorted(out)


def _trainable(name: str, blocks: Optional[list[int]]) -> bool:
    if blocks is None:
        return True
    m = re.match(r"^blocks\.(\d+)\.", name)
    return bool(m) and int(m.group(1)) in blocks


def _save_dtype(name: str) -> torch.dtype:
    table = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if name not in table:
        raise InputError(f"save dtype {name!r}: use bf16, fp16 or fp32")
    return table[name]


def shard_transformer(transformer: torch.nn.Module, device: torch.device, world: int, *, mixed: Optional[torch.dtype],
                      cpu_offload: bool) -> torch.nn.Module:
    """Wrap each block, then the model, with FSDP2 ``fully_shard`` over all ``world`` ranks (in place)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    # diffusers' Wan returns its output as a view; FSDP2 warns that an in-place op on it would skip a hook.
    # Our losses and the sampler only use it out of place, so the warning would be noise in every log.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    mesh = init_device_mesh(device.type, (world,))
    kw: dict[str, Any] = dict(mesh=mesh, reshard_after_forward=True,
                              offload_policy=CPUOffloadPolicy() if cpu_offload else OffloadPolicy())
    # The blocks (nearly all weights and compute) run in ``mixed`` with fp32 gradient reduction; the root
    # (patch/time/text embeddings, head: diffusers keeps the time embedder and modulation in fp32 for
    # accuracy) stays fp32, so timesteps are never rounded to bf16 before the time embedding.
    block_mp = MixedPrecisionPolicy(param_dtype=mixed, reduce_dtype=torch.float32) if mixed is not None \
        else MixedPrecisionPolicy()
    for block in transformer.blocks:
        fully_shard(block, mp_policy=block_mp, **kw)
    fully_shard(transformer, **kw)
    return transformer


def make_full_optimizer(params: list[torch.nn.Parameter], config: TrainConfig, sharded: bool) -> torch.optim.Optimizer:
    """AdamW, or bitsandbytes' 8-bit AdamW (``adamw8bit``) for an unsharded run.

    bitsandbytes' 8-bit optimizers do not work on FSDP2's sharded DTensor parameters
    (bitsandbytes-foundation/bitsandbytes#1633), and torchao's, which do, keep their state in tensor
    subclasses that a safetensors checkpoint cannot hold; sharded runs therefore refuse ``adamw8bit``
    and offer ``--cpu-offload``, which moves the whole optimizer state to CPU memory instead.
    """
    if config.optimizer == "adamw8bit" and sharded:
        raise InputError("--optimizer adamw8bit does not work on FSDP-sharded weights (bitsandbytes' 8-bit AdamW "
                         "needs whole tensors); with several processes use --optimizer adamw, and --cpu-offload to "
                         "keep the optimizer state in CPU memory")
    return make_optimizer(params, config)


def _full_state(model: torch.nn.Module, names: set[str], sharded: bool) -> dict[str, torch.Tensor]:
    """The trained weights, unsharded, on the CPU (complete on rank 0; every rank must call this)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not sharded:
        return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if n in names}
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v for k, v in sd.items() if k in names}


def _all_weights(model: torch.nn.Module, sharded: bool) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not sharded:
        return {k: v.detach() for k, v in model.state_dict().items()}
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def train_full(pipe, pairs: Any, config: TrainConfig, options: FullOptions, out_path: str | Path, *,
               prompt_embeds: torch.Tensor, accelerator: Any, metadata: Optional[dict[str, Any]] = None,
               callback: Optional[Callable[[TrainProgress], None]] = None,
               should_cancel: Optional[Callable[[], bool]] = None, resume: Optional[str | Path] = None,
               validation_pairs: Any = None, write_plots: bool = True) -> TrainResult:
    """Fine-tune ``pipe.transformer`` itself and write the DiT to ``out_path``; see the module docstring.

    Arguments as :func:`.loop.train_lora`. The pipeline's transformer is trained in place (and left
    sharded when several processes ran): load a fresh pipeline for anything else afterwards.
    """
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    t_start = time.perf_counter()
    config.validate()
    acc = accelerator
    world, rank, is_main = acc.num_processes, acc.process_index, acc.is_main_process
    sharded = world > 1
    out_path = Path(out_path)
    device = pipe.device

    def report(p: TrainProgress) -> None:
        if callback is not None and is_main:
            callback(p)

    data = TrainingPairs.from_any(pairs)
    min_h, min_w = data.check()
    if config.stages in (None, "") and config.resolution is None:
        config.resolution = max(32, min(512, min(min_h, min_w) // 32 * 32))
    stages = config.curriculum()
    total = total_steps(stages)
    if validation_pairs is not None:
        train_set, val_set = data, TrainingPairs.from_any(validation_pairs)
    else:
        train_set, val_set = split_validation(data, config.validation_fraction, config.seed)
    folder = checkpoint_dir(out_path)

    if options.cpu_offload and not sharded:
        raise InputError("--cpu-offload offloads FSDP shards: launch several processes (torchrun / accelerate launch)")

    # ---------------------------------------------------------------- model
    transformer = pipe.transformer
    pipe._activate(None)
    blocks = parse_blocks(options.train_blocks, len(transformer.blocks))
    for p in transformer.parameters():  # fp32 master weights; bf16 compute comes from the FSDP policy
        if p.dtype != torch.float32:
            p.data = p.data.float()
    names = {n for n, _ in transformer.named_parameters() if _trainable(n, blocks)}
    for n, p in transformer.named_parameters():
        p.requires_grad_(n in names)
    n_train = sum(p.numel() for n, p in transformer.named_parameters() if n in names)
    mixed = None
    if device.type == "cuda" and config.mixed_precision in ("auto", "bf16", "fp16"):
        mixed = torch.float16 if config.mixed_precision == "fp16" else torch.bfloat16
    if config.gradient_checkpointing and hasattr(transformer, "enable_gradient_checkpointing"):
        transformer.enable_gradient_checkpointing()
    if sharded:
        shard_transformer(transformer, device, world, mixed=mixed, cpu_offload=options.cpu_offload)
    if not options.cpu_offload:
        transformer.to(device)
    params = [p for n, p in transformer.named_parameters() if n in names]
    opt = make_full_optimizer(params, config, sharded)
    gen = torch.Generator().manual_seed(config.seed)
    prompt = prompt_embeds.to(device)
    # what the training math depends on (output format and offloading may change on resume)
    cfg_dict = dict(config.to_dict(), global_batch=world * config.batch_size, train_blocks=options.train_blocks)
    logger.info("full fine-tuning: %d of %d weights trainable (%s), %d training pairs, stages %s (%d steps), "
                "%d process(es)%s", n_train, sum(p.numel() for p in transformer.parameters()),
                "all" if blocks is None else f"blocks {options.train_blocks}", len(train_set),
                format_stages(stages), total, world, ", FSDP full sharding" if sharded else "")

    losses: list[float] = []
    skipped: list[int] = []
    history: list[dict[str, Any]] = []
    start = 0
    last_ckpt: Optional[Path] = None
    load_opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=sharded, cpu_offload=sharded)
    if resume is not None:
        spath = ff.find_state(resume, folder) if is_main else None
        spath = acc_broadcast(acc, spath)
        if spath is not None:
            state = ff.load_state(spath) if is_main else None
            info = acc_broadcast(acc, None if state is None else
                                 {k: v for k, v in state.items() if k not in ("model", "optimizer")})
            diff = config_differences(info["config"], cfg_dict, FULL_RESUME_FREE)
            if diff:
                raise InputError(f"cannot resume from {spath}: the run's settings differ in {', '.join(diff)}; "
                                 "resume with the same settings (the global batch must match)")
            if is_main and set(state["model"]) != names:
                raise InputError(f"training state {spath} holds another set of trained weights")
            set_model_state_dict(transformer, state["model"] if is_main else {},
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=sharded,
                                                          strict=False))
            set_optimizer_state_dict(transformer, opt, state["optimizer"] if is_main else {}, options=load_opts)
            gen.set_state(info["generator"])
            start, losses, skipped, history = info["step"], list(info["losses"]), list(info["skipped"]), \
                list(info["validation"])
            last_ckpt = spath
            logger.info("resumed from %s at step %d of %d", spath, start, total)

    def save(step: int) -> Optional[Path]:
        nonlocal last_ckpt
        model_sd = _full_state(transformer, names, sharded)
        osd = get_optimizer_state_dict(transformer, opt, options=StateDictOptions(full_state_dict=True,
                                                                                    cpu_offload=sharded))
        if is_main:
            last_ckpt = ff.save_state(folder, step, model=model_sd, optimizer=osd, generator=gen.get_state(),
                                      info=dict(losses=losses, skipped=skipped, validation=history, config=cfg_dict),
                                      keep=config.keep_checkpoints)
            report(TrainProgress("checkpoint", step, total, path=last_ckpt))
        acc.wait_for_everyone()
        return last_ckpt

    val = None
    before_outs = after_outs = None

    def validate(step: int, label: str) -> list[torch.Tensor]:
        transformer.eval()
        try:
            with vae_on(pipe):  # every rank runs it: the sharded DiT needs all of them for each forward
                metrics, outs = val.run(pipe, prompt, seed=config.seed)
        finally:
            transformer.train()
        history.append(dict(step=step, label=label, **{k: round(v, 6) for k, v in metrics.items()}))
        if is_main:
            logger.info("validation at step %d (%s): PSNR %.3f dB, SSIM %.4f, latent MSE %.5f", step, label,
                        metrics["psnr"], metrics["ssim"], metrics["latent_mse"])
        report(TrainProgress("validation", step, total, metrics=metrics))
        return outs

    if len(val_set):
        from .validation import ValidationSet

        with vae_on(pipe):
            val = ValidationSet(pipe, val_set, config.validation_resolution or stages[-1].resolution, config)
        before_outs = validate(start, "base")
        if start:
            history.pop()

    cache, cache_stage = None, -1
    transformer.train()
    if device.type != "cpu":
        pipe.vae.to("cpu")
    step = start
    while step < total:
        if _any_true(bool(should_cancel is not None and should_cancel()), acc):
            path = save(step)
            raise TrainingCancelled(f"training cancelled at step {step} of {total}; resume from {path}", path)
        si, stage = stage_at(stages, step)
        if si != cache_stage:
            report(TrainProgress("stage", step, total, stage=si, resolution=stage.resolution))
            cache = build_stage_cache(pipe, train_set, stage.resolution, si, config)
            cache_stage = si
            logger.info("stage %d/%d: %d px from step %d, latents %s", si + 1, len(stages), stage.resolution,
                        stage_start(stages, si), describe(cache))
        lr = config.learning_rate * lr_factor(step, total, config.warmup_steps, config.lr_schedule)
        for g in opt.param_groups:
            g["lr"] = lr
        step_loss, finite = 0.0, True
        gb = world * config.batch_size
        for _ in range(config.grad_accum):
            pi = torch.randint(len(cache), (gb,), generator=gen)
            vi = torch.randint(len(cache[0]), (gb,), generator=gen)
            sig = sample_sigmas(gb, config.shift, gen)
            noise = torch.randn((gb,) + tuple(cache[0][0].shape[1:]), generator=gen)
            mine = slice(rank * config.batch_size, (rank + 1) * config.batch_size)
            z = torch.cat([cache[int(p)][int(v)] for p, v in zip(pi[mine], vi[mine])]).to(device)
            loss = flow_matching_loss(transformer, z, prompt, sig[mine].to(device), noise[mine].to(device))
            lv = float(loss.detach())
            finite = finite and math.isfinite(lv)
            (loss / config.grad_accum).backward()  # every rank runs every backward: FSDP's collectives pair up
            step_loss += lv / config.grad_accum
        if _any_true(not finite, acc):
            opt.zero_grad(set_to_none=True)
            skipped.append(step + 1)
            losses.append(float("nan"))
            logger.warning("step %d: non-finite loss, step skipped (%d skipped so far)", step + 1, len(skipped))
        else:
            if config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(_mean_across(step_loss, acc))
            report(TrainProgress("step", step + 1, total, loss=losses[-1], stage=si, resolution=stage.resolution,
                                 lr=lr, seconds=time.perf_counter() - t_start))
        step += 1
        every = config.log_every or max(1, total // 20)
        if is_main and (step % every == 0 or step == total):
            logger.info("step %d/%d (stage %d, %d px) loss %.4f lr %.2e", step, total, si + 1, stage.resolution,
                        losses[-1], lr)
        if val is not None and config.validation_every and step % config.validation_every == 0 and step < total:
            validate(step, "training")
        if config.checkpoint_every and step % config.checkpoint_every == 0 and step < total:
            save(step)
    if val is not None:
        after_outs = validate(total, "final")

    weights = _all_weights(transformer, sharded)
    result_path = out_path
    if is_main:
        meta = {"vbridge.kind": "full_finetune", "vbridge.role": config.role, "vbridge.steps": str(total),
                "vbridge.base_model": "Wan2.2-TI2V-5B", "vbridge.train_config": _json(cfg_dict),
                "vbridge.trained": "all" if blocks is None else f"blocks {options.train_blocks}"}
        if history:
            meta["vbridge.validation"] = _json(history[-1])
        meta.update({f"vbridge.{k}": str(v) for k, v in (metadata or {}).items()})
        written: list[Path] = []

        def write(path: Path) -> Path:
            written[:] = ff.write_dit(weights, path, dtype=_save_dtype(options.save_dtype),
                                      config=dict(transformer.config), metadata=meta,
                                      max_shard_size=options.max_shard_size, diffusers_folder=options.diffusers_folder)
            return written[0] if len(written) == 1 or not written[-1].name.endswith(".index.json") else written[-1]

        result_path = _write_final(write, Path(out_path), folder / f"{Path(out_path).stem}-final.safetensors",
                                   "DiT")
        files = written
        logger.info("wrote the fine-tuned DiT: %s", ", ".join(str(f) for f in files))
    acc.wait_for_everyone()

    from .plots import run_pictures

    curve, grid, curve_path = run_pictures(losses, [stage_start(stages, i) for i in range(1, len(stages))],
                                           f"{config.role} loss (full fine-tuning)", val, before_outs, after_outs,
                                           out_path, write=is_main and write_plots)
    secs = time.perf_counter() - t_start
    return TrainResult(path=Path(result_path), losses=losses, seconds=secs, skipped_steps=skipped,
                       validation=history, checkpoint=last_ckpt, loss_curve=curve, validation_grid=grid,
                       loss_curve_path=curve_path)


def _json(obj: Any) -> str:
    import json

    return json.dumps(obj, default=str)


def acc_broadcast(acc: Any, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (small picklable objects only)."""
    if acc.num_processes == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
