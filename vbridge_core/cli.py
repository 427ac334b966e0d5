"""Command line: ``python -m vbridge_core {restore,drift-correct,train,eval,demo,perceive,...}``.

Every error the user can fix is printed as one line (``error: ...``) with exit code 2; a cancel
(Ctrl-C) exits with 130. Outputs are written to temporary names and renamed, so an interrupted run
never leaves a half-written file.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from .cli_common import HelpFormatter, collect_inputs as _collect_inputs, parse_dtype as _dtype
from .errors import Cancelled, InputError, VBridgeError
from .validate import float_arg, float_list_arg

logger = logging.getLogger("vbridge_core")

def _add_model_args(p: argparse.ArgumentParser, training: bool = False) -> None:
    """Model-file and runtime flags; ``training=True`` (train) leaves out --compile and --offload, which the
    trainer does not use (the DiT stays on the GPU while it trains)."""
    g = p.add_argument_group("model files (nothing is downloaded)")
    g.add_argument("--model", metavar="DIR", help="diffusers folder of Wan2.2-TI2V-5B (transformer/, vae/), "
                   "or a ComfyUI models/ folder; --dit/--vae override its parts")
    g.add_argument("--dit", metavar="FILE", help="DiT: wan2.2_ti2v_5B_fp16.safetensors (ComfyUI repackaged), a "
                   "diffusers transformer/ folder, or a full fine-tuned 5B transformer")
    g.add_argument("--vae", metavar="FILE", help="VAE: wan2.2_vae.safetensors or a diffusers vae/ folder")
    g.add_argument("--text-encoder", metavar="PATH", help="umt5-xxl (single file or diffusers folder) to encode the "
                   "training prompt (or give --prompt-embeds)" if training else "umt5-xxl (single file or diffusers "
                   "folder); only needed for --prompt/--negative-prompt, since V-Bridge LoRAs carry their prompt embedding")
    g.add_argument("--tokenizer", metavar="DIR", help="umt5 tokenizer folder for a single-file text encoder")
    g.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    g.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"],
                   help="compute precision (default: bf16 on GPU, fp32 on CPU)")
    g.add_argument("--vae-tiling", action="store_true", help="decode/encode in tiles (large images, low VRAM)")
    if training:
        return
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="regional torch.compile of the DiT blocks: faster sampling after a one-off compile of some "
                   "seconds. Default: on for CUDA, off on CPU; if it fails (no Triton/C++ toolchain) the run logs it "
                   "and continues eagerly")
    g.add_argument("--offload", action="store_true", help="keep the models in CPU memory and move each to the GPU "
                   "only while it works (peak VRAM of one model; slower)")
    g.add_argument("--accelerator-lora", metavar="FILE", help="step-distilled base as a LoRA (e.g. Kijai's "
                   "Wan2_2_5B_FastWanFullAttn_lora_rank_128_bf16.safetensors), always active under the V-Bridge LoRAs; "
                   "use with --preset turbo")
    g.add_argument("--accelerator-strength", type=float_arg("--accelerator-strength"), default=1.0, help="accelerator LoRA strength (default 1.0)")
    g.add_argument("--allow-partial", action="store_true", help="apply the layers of a LoRA that fit this model and "
                   "list the rest (LoHa/LoKr/DoRA keys, other architectures' layers) instead of refusing the LoRA")


def _add_sampler_args(p: argparse.ArgumentParser, frames_default: int = 5, video: bool = False) -> None:
    """The sampling flags; ``video=True`` (restore-video) leaves out the per-image ones (--batch-size,
    --save-trajectory), which that command has no use for, and states its one-seed-for-all rule."""
    g = p.add_argument_group("sampling")
    from .presets import PRESETS

    g.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="fast: guidance 1 on diffusers' grid; paper: the V-Bridge release (official grid, guidance 6, "
                   "no unconditional pass in the last 15%% of steps); turbo: <= 4 DiT calls, x0-renoise on FastWan's "
                   "published schedule (or the one a turbo-distilled LoRA names), for step-distilled bases. "
                   "Explicit flags override the preset")
    g.add_argument("--frames", type=int, default=None, help=f"pseudo-video length F = 4k+1 >= 5 (default {frames_default})")
    g.add_argument("--steps", type=int, default=None, help="sampling steps (default 50)")
    g.add_argument("--seed", type=int, default=0, help="seed; every frame uses this seed (default 0)" if video else
                   "seed; image i of the run uses seed+i (default 0)")
    g.add_argument("--shift", type=float_arg("--shift", min=0, min_inclusive=False), default=None, help="flow shift (default 5.0)")
    g.add_argument("--solver", choices=["unipc", "euler", "x0_renoise"], default=None,
                   help="unipc (default), euler, or x0_renoise (the DMD few-step sampler of step-distilled bases)")
    g.add_argument("--sigmas", type=_sigma_list, default=None, metavar="S1,S2,...",
                   help="explicit descending sigma list in (0,1], e.g. 1.0,0.757,0.522 (terminal 0 implied); "
                   "replaces --steps/--shift/--sigma-grid")
    g.add_argument("--start-sigma", type=float_arg("--start-sigma", min=0, max=1, min_inclusive=False), default=None, metavar="S",
                   help="start from the LQ image noised to sigma S in (0,1] instead of pure noise (SDEdit-style); "
                   "the schedule then covers sigmas <= S")
    g.add_argument("--cache", default=None, metavar="SPEC",
                   help="DiT step caching: none (default), fbc, fbc:THRESHOLD (First Block Cache) or mag:FILE.json "
                   "(MagCache, calibrated with the cache-calibrate command); changes the output slightly")
    g.add_argument("--no-batch-cfg", action="store_true",
                   help="run the conditional and unconditional passes as two DiT calls instead of one batched call")
    g.add_argument("--sigma-grid", choices=["diffusers", "official"], default=None,
                   help="sigma grid: diffusers' UniPC flow grid (default) or the official Wan grid")
    g.add_argument("--guidance", type=float_arg("--guidance", min=1, hint="1.0 = no negative-prompt pass"), default=None,
                   help="classifier-free guidance; 1.0 (default) = one DiT call per step, >1 adds a negative pass")
    g.add_argument("--guidance-skip-tail", type=float_arg("--guidance-skip-tail", min=0, max=1, max_inclusive=False), default=None,
                   help="fraction of the last steps without the negative pass (default 0; paper 0.15)")
    g.add_argument("--release-size", action=argparse.BooleanOptionalAction, default=None,
                   help="the release's size rule: inputs larger than 1440x2560 are resized to an area <= 2560x1440 "
                   "(sides multiples of 32) and restored at that size (default: on with --preset paper, else off)")
    g.add_argument("--prompt", default=None, help="override the LoRA's embedded prompt (needs --text-encoder)")
    g.add_argument("--negative-prompt", default=None, help="negative prompt for guidance > 1 (needs --text-encoder)")
    if not video:
        g.add_argument("--batch-size", type=int, default=1, help="images of one size per DiT call (default 1)")
        g.add_argument("--save-trajectory", action="store_true", help="also write every frame of each pseudo-video")


def _sigma_list(text: str) -> list[float]:
    """``--sigmas 1.0,0.757,0.522`` as a list of finite floats in (0, 1] (the order is checked by the sampler)."""
    return float_list_arg("--sigmas", min=0, max=1, min_inclusive=False)(text)


def _sampler_kwargs(a: argparse.Namespace, frames_default: int = 5, lora: Any = None) -> dict[str, Any]:
    """Sampler keyword arguments from the preset and the explicit flags; ``lora`` (the restoration
    LoRA file) may name the turbo preset's schedule."""
    from .presets import preset

    kw: dict[str, Any] = preset(a.preset or "fast", lora=lora)
    kw["frames"] = frames_default if a.preset is None else kw["frames"]
    for name in ("frames", "steps", "shift", "solver", "sigma_grid", "guidance", "guidance_skip_tail", "sigmas",
                 "start_sigma", "cache", "release_size"):
        v = getattr(a, name, None)
        if v is not None:
            kw[name] = v
    if getattr(a, "steps", None) is not None and getattr(a, "sigmas", None) is None and kw.get("sigmas") is not None:
        kw["sigmas"] = None  # an explicit --steps replaces the preset's sigma list
    if getattr(a, "no_batch_cfg", False):
        kw["batch_cfg"] = False
    kw.update(seed=a.seed, batch_size=getattr(a, "batch_size", 1), prompt=a.prompt, negative_prompt=a.negative_prompt)
    if a.text_encoder and (a.preset == "paper" or not getattr(a, "lora", None)):
        # with a text encoder the release's own prompt pair is used (always for a full fine-tune without a
        # LoRA, which carries no prompt); without one, the LoRA's embedded pair
        from .presets import PAPER_NEGATIVE_PROMPT, PAPER_PROMPT

        kw["prompt"] = kw["prompt"] or PAPER_PROMPT
        kw["negative_prompt"] = kw["negative_prompt"] or PAPER_NEGATIVE_PROMPT
    return kw


def _write_outputs(out: Path, name: str, final, traj, suffix: str = "") -> list[Path]:
    from .images import save_png

    written = [save_png(final, out / f"{name}{suffix}.png")]
    if traj is not None:
        import torch

        strip = torch.cat(list(traj), dim=-1)  # frames side by side
        written.append(save_png(strip, out / f"{name}{suffix}_trajectory.png"))
        for k, fr in enumerate(traj):
            written.append(save_png(fr, out / f"{name}{suffix}_trajectory" / f"frame_{k:02d}.png"))
    return [Path(w) for w in written]


def _progress(prefix: str):
    def cb(info) -> None:
        step = info.extra.get("overall_step", info.step)
        total = info.extra.get("overall_total", info.total)
        if step == total or step % max(1, total // 10) == 0:
            logger.info("%s: step %d/%d", prefix, step, total)
    return cb


def plan_restore_outputs(a: argparse.Namespace, paths: Sequence[Path], drift_only: bool = False,
                         names: Optional[Sequence[str]] = None) -> Path:
    """Check where ``restore`` / ``drift-correct`` will write, before any model loads (issue 9).

    Refuses an output folder that holds an input, outputs that would replace an input, and two
    inputs whose outputs would share a name; removes temporaries a killed earlier run left in the
    folder. The folder itself is created only by the first output written, so a run that fails
    before that leaves no empty folder. ``names`` are the output stems (default: the input stems).
    """
    from .outputs import (check_output_dir, clean_stale_temporaries, existing_outputs, plan_outputs,
                          refuse_inputs_in_output_dir, restore_output_names)

    out = check_output_dir(a.out)
    refuse_inputs_in_output_dir(out, paths)
    base = bool(getattr(a, "drift_lora", None)) and not drift_only
    stems = list(names) if names is not None else [p.stem for p in paths]
    plan = plan_outputs({str(p): restore_output_names(s, base=base, trajectory=bool(getattr(a, "save_trajectory", False)))
                         for p, s in zip(paths, stems)}, out, paths)
    clean_stale_temporaries(out)
    old = existing_outputs(out, plan)
    if old and not getattr(a, "skip_existing", False):
        logger.info("%d file(s) from an earlier run in %s will be replaced (e.g. %s)", len(old), out, old[0])
    return out


def preflight_sampling(a: argparse.Namespace, sizes: Sequence[tuple[int, int]], drift_only: bool = False) -> None:
    """Check frames, steps, sigmas and image sizes before any model loads (issue 9), so a typo costs
    a second, not a 10 GB load followed by a traceback."""
    from .limits import check_image_size
    from .parallel_restore import sampler_settings, steps_per_pass
    from .trajectory import check_frames

    kw = sampler_settings(a)
    check_frames(kw["frames"])
    if not drift_only:
        steps_per_pass(kw)
    if getattr(a, "drift_lora", None):
        dkw = dict(kw, frames=a.drift_frames or kw["frames"], steps=a.drift_steps or kw["steps"])
        check_frames(dkw["frames"])
        steps_per_pass(dkw)
    if not kw.get("release_size"):  # the release rule shrinks large images itself
        for i, (h, w) in enumerate(sizes):
            check_image_size(h, w, f"input {i + 1}")


def cmd_restore(a: argparse.Namespace, drift_only: bool = False) -> int:
    from .fileio import write_json_atomic
    from .images import load_image
    from .outputs import OutputLog
    from .pipeline import VBridgePipeline
    from .parallel_restore import cmd_restore_parallel, wants_parallel

    if getattr(a, "auto", False) or getattr(a, "lora_dir", None):  # per-image LoRA routing (issue 11)
        from .perceive_cli import cmd_restore_auto

        return cmd_restore_auto(a, _sampler_kwargs(a))
    if wants_parallel(a):  # torchrun / accelerate launch, or --skip-existing
        return cmd_restore_parallel(a, drift_only)
    if drift_only and not a.drift_lora:
        raise InputError("drift-correct needs --drift-lora FILE (a V-Bridge drift-correction LoRA)")
    paths = _collect_inputs(a.inputs)
    out = plan_restore_outputs(a, paths, drift_only)
    images = [load_image(p) for p in paths]
    if not drift_only and not getattr(a, "lora", None) and not a.text_encoder:
        from .pipeline import RELEASE_PROMPT_HELP

        raise InputError(RELEASE_PROMPT_HELP)  # before loading 10 GB of weights for nothing
    preflight_sampling(a, [(int(x.shape[-2]), int(x.shape[-1])) for x in images], drift_only)
    pipe = VBridgePipeline.from_files(a.model, dit=a.dit, vae=a.vae, lora=getattr(a, "lora", None),
                                      lora_strength=getattr(a, "lora_strength", 1.0), drift_lora=a.drift_lora,
                                      drift_strength=a.drift_strength, device=a.device, dtype=_dtype(a.dtype),
                                      text_encoder=a.text_encoder, tokenizer=a.tokenizer, vae_tiling=a.vae_tiling,
                                      offload=a.offload, accelerator_lora=a.accelerator_lora,
                                      accelerator_strength=a.accelerator_strength, allow_partial_lora=a.allow_partial)
    pipe.maybe_compile(a.compile)
    kw = _sampler_kwargs(a, lora=pipe.adapter_file("restoration"))
    settings: dict[str, Any] = {"inputs": [str(p) for p in paths], "sampler": {k: v for k, v in kw.items()}}
    t0 = time.perf_counter()
    if not drift_only:
        res = pipe.restore(images, return_trajectory=a.save_trajectory, callback=_progress("restore"), **kw)
        settings["restore_info"] = res.info
        base = res.final
        base_res = res
    else:
        base, base_res = images, None
    if a.drift_lora:
        dkw = dict(kw, frames=a.drift_frames or kw["frames"], steps=a.drift_steps or kw["steps"])
        res = pipe.drift_correct(base, return_trajectory=a.save_trajectory, callback=_progress("drift-correct"), **dkw)
        settings["drift_info"] = res.info
    # written only now, so a cancelled drift pass leaves no partial set of outputs; a failure while
    # writing (a full disk) says which images are complete
    log = OutputLog([p.name for p in paths], out)
    base_trajs = (base_res.trajectory or [None] * len(paths)) if base_res is not None and a.drift_lora else None
    for k, (p, f, tr) in enumerate(zip(paths, res.final, res.trajectory or [None] * len(paths))):
        with log.item(p.name):
            if base_trajs is not None:
                _write_outputs(out, p.stem, base_res.final[k], base_trajs[k], suffix="_base")
            _write_outputs(out, p.stem, f, tr)
    settings.update(dit=a.dit, vae=a.vae, model=a.model, lora=getattr(a, "lora", None), drift_lora=a.drift_lora,
                    lora_strength=getattr(a, "lora_strength", None) if getattr(a, "lora", None) else None,
                    drift_strength=a.drift_strength if a.drift_lora else None, preset=a.preset or "fast",
                    accelerator_lora=a.accelerator_lora,
                    accelerator_strength=a.accelerator_strength if a.accelerator_lora else None,
                    dit_calls_per_image=sum(i.get("dit_calls_per_image", 0) for k, i in settings.items()
                                            if k in ("restore_info", "drift_info")),
                    lora_skipped={r: ad["skipped"] for r, ad in pipe.adapters.items() if ad.get("skipped")} or None,
                    seconds=round(time.perf_counter() - t0, 3))
    write_json_atomic(out / "vbridge_settings.json", settings)
    logger.info("wrote %d image(s) and vbridge_settings.json to %s", len(paths), out)
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    from .eval_cli import cmd_eval as run

    return run(a)


def _cmd_train(a: argparse.Namespace) -> int:
    from .training.cli import cmd_train

    return cmd_train(a)


def _benchmark(a: argparse.Namespace) -> int:
    from .benchmark import cmd_benchmark

    return cmd_benchmark(a)


def _stab_cli(name: str):
    def run(a: argparse.Namespace) -> int:
        from . import stabilize_cli

        return getattr(stabilize_cli, name)(a)
    return run


def _cache_cli(a: argparse.Namespace) -> int:
    from .cache_cli import cmd_cache_calibrate

    return cmd_cache_calibrate(a)


def _perceive_cli(name: str):
    def run(a: argparse.Namespace) -> int:
        from . import perceive_cli

        return getattr(perceive_cli, name)(a)
    return run


def cmd_demo(a: argparse.Namespace) -> int:
    from .demo import default_demo_dir, run_demo

    out = Path(a.out) if a.out else default_demo_dir()
    logger.info("demo outputs go to %s%s", out, "" if a.out else " (a temporary folder; --out DIR to choose)")
    run_demo(out, train_steps=a.train_steps, steps=a.steps, seed=a.seed)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .parallel_restore import add_skip_existing_arg

    fmt = HelpFormatter
    prog = "vbridge" if Path(sys.argv[0] if sys.argv else "").name == "vbridge" else "python -m vbridge_core"
    p = argparse.ArgumentParser(prog=prog, description="V-Bridge: few-shot image restoration with "
                                "the Wan2.2-TI2V-5B video diffusion transformer.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("restore", help="restore images (optionally followed by drift correction)", formatter_class=fmt)
    r.add_argument("inputs", nargs="+", metavar="IN", help="degraded images or folders of images")
    r.add_argument("--out", required=True, metavar="DIR", help="output folder (created if missing)")
    r.add_argument("--lora", metavar="FILE", help="V-Bridge restoration LoRA (.safetensors)")
    r.add_argument("--lora-strength", type=float_arg("--lora-strength"), default=1.0, help="restoration LoRA strength")
    r.add_argument("--drift-lora", metavar="FILE", help="drift-correction LoRA: refines the restored frame")
    r.add_argument("--drift-strength", type=float_arg("--drift-strength"), default=1.0, help="drift-correction LoRA strength")
    r.add_argument("--drift-frames", type=int, default=None, help="frames of the drift trajectory (default: --frames)")
    r.add_argument("--drift-steps", type=int, default=None, help="steps of the drift pass (default: --steps)")
    _add_model_args(r)
    _add_sampler_args(r)
    add_skip_existing_arg(r)
    from .perceive_cli import add_auto_restore_args, add_perceive_parsers

    add_auto_restore_args(r)

    d = sub.add_parser("drift-correct", help="refine already restored images with a drift-correction LoRA",
                       formatter_class=fmt)
    d.add_argument("inputs", nargs="+", metavar="IN", help="restored images or folders")
    d.add_argument("--out", required=True, metavar="DIR", help="output folder")
    d.add_argument("--drift-lora", required=True, metavar="FILE", help="drift-correction LoRA")
    d.add_argument("--drift-strength", type=float_arg("--drift-strength"), default=1.0, help="LoRA strength")
    d.add_argument("--drift-frames", type=int, default=None, help="frames of the drift trajectory (default 5)")
    d.add_argument("--drift-steps", type=int, default=None, help="steps (default 50)")
    _add_model_args(d)
    _add_sampler_args(d)
    add_skip_existing_arg(d)

    from .training.cli import add_train_parser

    add_train_parser(sub, _add_model_args)
    from .stabilize_cli import add_stabilizer_parsers

    add_stabilizer_parsers(sub, _add_model_args, _add_sampler_args)
    from .cache_cli import add_cache_parser

    add_cache_parser(sub, _add_model_args, _add_sampler_args)
    from .benchmark import add_benchmark_parser

    add_benchmark_parser(sub, _add_model_args, _add_sampler_args)

    add_perceive_parsers(sub)

    from .eval_cli import add_eval_parser

    add_eval_parser(sub, fmt)

    m = sub.add_parser("demo", help="offline smoke test: tiny model, train -> restore -> drift-correct",
                       formatter_class=fmt)
    m.add_argument("--out", default=None, metavar="DIR", help="output folder (default: vbridge_demo in the system "
                   "temp folder, never the current folder)")
    m.add_argument("--train-steps", type=int, default=60, help="LoRA training steps per stage")
    m.add_argument("--steps", type=int, default=20, help="sampling steps")
    m.add_argument("--seed", type=int, default=0, help="seed")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the process exit code."""
    try:  # the float options' type= checks raise InputError (NaN, inf, out of range): one error line too
        args = build_parser().parse_args(argv)
    except VBridgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    for noisy in ("diffusers", "transformers", "peft", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    handlers = {"restore": cmd_restore, "drift-correct": lambda a: cmd_restore(a, drift_only=True),
                "train": _cmd_train, "eval": cmd_eval, "demo": cmd_demo,
                "train-stabilizer": _stab_cli("cmd_train_stabilizer"), "restore-video": _stab_cli("cmd_restore_video"),
                "cache-calibrate": _cache_cli, "benchmark": _benchmark,
                "perceive": _perceive_cli("cmd_perceive"), "train-perceiver": _perceive_cli("cmd_train_perceiver"),
                "merge-perceivers": _perceive_cli("cmd_merge_perceivers"), "lora-tasks": _perceive_cli("cmd_lora_tasks")}
    try:
        return handlers[args.command](args)
    except (KeyboardInterrupt, Cancelled) as e:
        # str(e), not e: a KeyboardInterrupt object is always truthy but prints as an empty string
        reason = str(e) or "interrupted (Ctrl-C)"
        print(f"cancelled: {reason}; no partial output was written", file=sys.stderr)
        return 130
    except VBridgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        _leave_process_group()


def _leave_process_group() -> None:
    """Under torchrun / accelerate launch, leave the process group before exiting: a gloo group left to
    the interpreter's shutdown can abort the process ("terminate called without an active exception")
    after all the work is done, failing a finished run."""
    from .parallel import launched_world_size

    dist = sys.modules.get("torch.distributed")
    if launched_world_size() > 1 and dist is not None and dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception as e:  # noqa: BLE001 - shutting down; the run's result stands
            logger.debug("leaving the process group: %s", e)
