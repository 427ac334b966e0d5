"""Data-parallel ``restore``, ``drift-correct`` and ``restore-video``; resumable with ``--skip-existing``.

``torchrun --nproc_per_node N -m vbridge_core restore IN --out DIR ...`` (or ``accelerate launch``)
splits the inputs across the processes by image area (:func:`~vbridge_core.parallel.split_by_cost`);
each process loads the model on its own device, restores its share with the seed a one-process run
gives that image (``seed + index in the sorted input list``), and writes its outputs itself (a
shared or per-node output folder both work). Rank 0 then writes one ``vbridge_settings.json`` that
records ``world_size``, the images of each rank and every rank's device and time. ``restore-video``
splits by clip (a folder of clip folders), each clip on one process, since the stabilizer is causal.

``--skip-existing`` leaves out images whose final output is already there. Each image's outputs are
written when it is done, the final PNG last (atomically), so a killed run resumes where it stopped.
The one-process CLI comes here too when ``--skip-existing`` is given.
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from .errors import InputError
from .parallel import ProcessGroup, SharedProgress, image_area, image_hw, launched_world_size, process_group, split_by_cost

logger = logging.getLogger("vbridge_core")


def add_skip_existing_arg(p: argparse.ArgumentParser) -> None:
    """``--skip-existing`` on a restore-like parser."""
    p.add_argument("--skip-existing", action="store_true", help="leave out inputs whose output is already in --out "
                   "(resume an interrupted run; with torchrun/accelerate launch every process skips its own)")


def wants_parallel(a: argparse.Namespace) -> bool:
    """True when this command runs under a multi-process launcher or resumes (``--skip-existing``)."""
    return launched_world_size() > 1 or bool(getattr(a, "skip_existing", False))


def _write_image(out: Path, name: str, final: torch.Tensor, traj: Optional[torch.Tensor], suffix: str = "") -> None:
    """An image's outputs, its trajectory first and the final PNG last (the marker ``--skip-existing`` reads)."""
    from .images import save_png

    if traj is not None:
        for k, fr in enumerate(traj):
            save_png(fr, out / f"{name}{suffix}_trajectory" / f"frame_{k:02d}.png")
        save_png(torch.cat(list(traj), dim=-1), out / f"{name}{suffix}_trajectory.png")
    save_png(final, out / f"{name}{suffix}.png")


def sampler_settings(a: argparse.Namespace) -> dict[str, Any]:
    """The sampler keywords, the same on every rank whether or not it loads the model (the turbo preset
    reads its schedule from the restoration LoRA's metadata, as the one-process CLI does)."""
    from .cli import _sampler_kwargs

    lora = None
    if a.preset == "turbo" and getattr(a, "lora", None):
        from .lora import read_lora

        lora = read_lora(a.lora)
    return _sampler_kwargs(a, lora=lora)


def steps_per_pass(kw: dict[str, Any]) -> int:
    """Sampler steps of one image under ``kw`` (an explicit sigma list or a start sigma changes the count)."""
    from dataclasses import fields

    from .sampler import SamplerSettings

    names = {f.name for f in fields(SamplerSettings)}
    return SamplerSettings(**{k: v for k, v in kw.items() if k in names}).validate().total_steps()


def load_pipeline(a: argparse.Namespace, device: torch.device, drift: bool = True) -> Any:
    """The pipeline of a restore-like command on this process's device (LoRAs, accelerator LoRA, compile)."""
    from .cli_common import parse_dtype
    from .pipeline import VBridgePipeline

    pipe = VBridgePipeline.from_files(a.model, dit=a.dit, vae=a.vae, lora=getattr(a, "lora", None),
                                      lora_strength=getattr(a, "lora_strength", 1.0),
                                      drift_lora=getattr(a, "drift_lora", None) if drift else None,
                                      drift_strength=getattr(a, "drift_strength", 1.0), device=device,
                                      dtype=parse_dtype(a.dtype), text_encoder=a.text_encoder, tokenizer=a.tokenizer,
                                      vae_tiling=a.vae_tiling, offload=a.offload,
                                      accelerator_lora=getattr(a, "accelerator_lora", None),
                                      accelerator_strength=getattr(a, "accelerator_strength", 1.0))
    pipe.maybe_compile(a.compile)
    return pipe


def _step_counter(progress: SharedProgress) -> Callable[[Any], None]:
    """A sampler callback (one per pipeline call) that adds each step's finished image-steps to ``progress``."""
    seen = {"n": 0}

    def cb(info: Any) -> None:
        done = int(info.extra.get("overall_step", info.step))
        progress.update(done - seen["n"])
        seen["n"] = done
    return cb


def restore_share(pipe: Any, paths: Sequence[Path], indices: Sequence[int], out: Path, kw: dict[str, Any], *,
                  restore: bool, drift: Optional[dict[str, Any]], save_trajectory: bool, progress: SharedProgress,
                  names: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Restore ``paths[i]`` for ``i`` in ``indices`` (seed ``kw['seed'] + i``) and write them to ``out``.

    ``restore``: run the restoration LoRA; ``drift``: sampler settings of a drift-correction pass
    (None: none). With both, the restoration output is also written as ``NAME_base.png``.
    ``names`` (default: the file stems) are the output names, relative to ``out``. Returns the last
    pipeline infos (``restore_info`` / ``drift_info``) and the seconds spent.
    """
    from .images import load_image
    from .outputs import OutputLog

    names = list(names) if names is not None else [p.stem for p in paths]
    log = OutputLog([paths[i].name for i in indices], out)  # a failure while writing says what is complete
    base_seed, batch = int(kw["seed"]), max(1, int(kw.get("batch_size", 1)))
    run_kw = {k: v for k, v in kw.items() if k != "seed"}
    info: dict[str, Any] = {}
    t0 = time.perf_counter()
    for c0 in range(0, len(indices), batch):
        chunk = list(indices[c0:c0 + batch])
        images = [load_image(paths[i]) for i in chunk]
        seeds = [base_seed + i for i in chunk]
        base_res = None
        if restore:
            base_res = pipe.restore(images, seeds=seeds, return_trajectory=save_trajectory,
                                    callback=_step_counter(progress), **run_kw)
            info["restore_info"] = base_res.info
            images = base_res.final
        res = base_res
        if drift is not None:
            res = pipe.drift_correct(images, seeds=seeds, return_trajectory=save_trajectory,
                                     callback=_step_counter(progress), **dict(run_kw, **drift))
            info["drift_info"] = res.info
        for j, i in enumerate(chunk):
            with log.item(paths[i].name):
                if drift is not None and base_res is not None:
                    _write_image(out, names[i], base_res.final[j],
                                 base_res.trajectory[j] if save_trajectory else None, suffix="_base")
                _write_image(out, names[i], res.final[j], res.trajectory[j] if save_trajectory else None)
    info["seconds"] = round(time.perf_counter() - t0, 3)
    return info


def _merge_settings(group: ProcessGroup, shares: list[list[int]], names: Sequence[str], local: dict[str, Any],
                    skipped: list[str]) -> Optional[dict[str, Any]]:
    """Gather every rank's report; rank 0 gets the merged record (others ``None``)."""
    reports = group.all_gather(dict(local, rank=group.rank, device=str(group.device), skipped=skipped))
    if not group.is_main:
        return None
    merged: dict[str, Any] = dict(world_size=group.world, images_per_rank=[len(s) for s in shares],
                                  ranks=[dict(rank=r["rank"], device=r["device"], images=[names[i] for i in shares[k]],
                                              skipped=r["skipped"], seconds=r.get("seconds", 0.0))
                                         for k, r in enumerate(reports)],
                                  skipped=sum(len(r["skipped"]) for r in reports))
    for key in ("restore_info", "drift_info"):
        infos = [r[key] for r in reports if key in r]
        if infos:
            merged[key] = dict(infos[0], images=sum(len(s) for s in shares) - merged["skipped"],
                               seconds=round(max(i["seconds"] for i in infos), 3))
    return merged


def cmd_restore_parallel(a: argparse.Namespace, drift_only: bool = False) -> int:
    """``restore`` / ``drift-correct`` over all processes of the launch (see the module docstring)."""
    from .cli import plan_restore_outputs, preflight_sampling
    from .cli_common import collect_inputs
    from .fileio import write_json_atomic

    if drift_only and not a.drift_lora:
        raise InputError("drift-correct needs --drift-lora FILE (a V-Bridge drift-correction LoRA)")
    paths = collect_inputs(a.inputs)
    out = plan_restore_outputs(a, paths, drift_only)
    preflight_sampling(a, [image_hw(p) for p in paths], drift_only)
    group = process_group(a.device)
    kw = sampler_settings(a)
    shares = split_by_cost([image_area(p) for p in paths], group.world)
    mine = shares[group.rank]
    todo = [i for i in mine if not (a.skip_existing and (out / f"{paths[i].stem}.png").is_file())]
    skipped = [paths[i].stem for i in mine if i not in todo]
    if skipped:
        logger.info("process %d/%d: %d of its %d image(s) already restored, skipped", group.rank, group.world,
                    len(skipped), len(mine))
    drift = None
    if a.drift_lora:
        drift = dict(frames=a.drift_frames or kw["frames"], steps=a.drift_steps or kw["steps"])
    steps_per_image = (0 if drift_only else steps_per_pass(kw)) + (steps_per_pass(dict(kw, **drift)) if drift else 0)
    total = group.sum_int(len(todo) * steps_per_image)
    local: dict[str, Any] = {}
    progress = SharedProgress(group, total, "drift-correct" if drift_only else "restore")
    if todo:
        pipe = load_pipeline(a, group.device)
        local = restore_share(pipe, paths, todo, out, kw, restore=not drift_only, drift=drift,
                              save_trajectory=a.save_trajectory, progress=progress)
    progress.finish()
    merged = _merge_settings(group, shares, [p.stem for p in paths], local, skipped)
    if merged is not None:
        settings: dict[str, Any] = {"inputs": [str(p) for p in paths], "sampler": dict(kw), **merged}
        settings.update(dit=a.dit, vae=a.vae, model=a.model, lora=getattr(a, "lora", None), drift_lora=a.drift_lora,
                        lora_strength=getattr(a, "lora_strength", None) if getattr(a, "lora", None) else None,
                        drift_strength=a.drift_strength if a.drift_lora else None, preset=a.preset or "fast",
                        accelerator_lora=a.accelerator_lora,
                        accelerator_strength=a.accelerator_strength if a.accelerator_lora else None,
                        dit_calls_per_image=sum(settings[k].get("dit_calls_per_image", 0)
                                                for k in ("restore_info", "drift_info") if k in settings),
                        seconds=round(max(r["seconds"] for r in settings["ranks"]), 3))
        write_json_atomic(out / "vbridge_settings.json", settings)
        logger.info("wrote %d image(s) over %d process(es) (%d skipped) and vbridge_settings.json to %s",
                    len(paths) - settings["skipped"], group.world, settings["skipped"], out)
    group.barrier()
    return 0


# ---------------------------------------------------------------------------------------------- video
def video_clips(folder: Path) -> list[tuple[str, list[Path]]]:
    """``(name, frame paths)`` per clip: the folder's own frames (name ``""``), or one per subfolder of frames."""
    from .cli_common import IMAGE_EXTS, collect_inputs

    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder of frames (or of clip folders)")
    if any(p.suffix.lower() in IMAGE_EXTS for p in folder.iterdir() if p.is_file()):
        return [("", collect_inputs([str(folder)]))]
    subs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    clips = [(s.name, collect_inputs([str(s)])) for s in subs
             if any(q.suffix.lower() in IMAGE_EXTS for q in s.iterdir() if q.is_file())]
    if not clips:
        raise InputError(f"{folder} holds neither frames nor clip folders of frames")
    return clips


def plan_video_outputs(a: argparse.Namespace, clips: Sequence[tuple[str, Sequence[Path]]]) -> Path:
    """Check ``restore-video``'s output folder before any model loads: it must not hold (or be inside
    the folder of) input frames, and no output may replace an input; stale temporaries of a killed
    run are removed. The folder is created by the first frame written."""
    from .outputs import check_output_dir, clean_stale_temporaries, plan_outputs, refuse_inputs_in_output_dir

    out = check_output_dir(a.out)
    frames = [p for _, fs in clips for p in fs]
    refuse_inputs_in_output_dir(out, frames)
    for name, fs in clips:
        refuse_inputs_in_output_dir(out / name if name else out, frames)
        sub = f"{name}/" if name else ""
        plan_outputs({f"{sub}{p.name}": [f"{sub}{p.stem}.png"] + ([f"{sub}raw/{p.stem}.png"] if a.save_raw else [])
                      for p in fs}, out, frames)
    clean_stale_temporaries(out)
    return out


def holds_clip_folders(folder: Path) -> bool:
    """True when ``folder`` holds clip folders of frames rather than frames."""
    try:
        return bool(video_clips(folder)[0][0])
    except (InputError, OSError):
        return False


def cmd_restore_video_parallel(a: argparse.Namespace) -> int:
    """``restore-video`` split by clip over all processes; each clip's frames in one process, in order."""
    from .fileio import write_json_atomic
    from .images import save_png
    from .stabilize import restore_video
    from .stabilize_cli import _frames

    src = Path(a.input)
    clips = video_clips(src)
    out = plan_video_outputs(a, clips)
    from .cli import preflight_sampling

    preflight_sampling(a, [image_hw(f[0]) for _, f in clips])
    group = process_group(a.device)
    kw = sampler_settings(a)
    seed = kw.pop("seed")
    kw.pop("batch_size", None)
    traj_frames = kw.pop("frames", None)
    shares = split_by_cost([len(f) * image_area(f[0]) for _, f in clips], group.world)

    def done(k: int) -> bool:
        name, frames = clips[k]
        return all((out / name / f"{p.stem}.png").is_file() for p in frames)
    mine = shares[group.rank]
    todo = [k for k in mine if not (a.skip_existing and done(k))]
    skipped = [clips[k][0] or src.name for k in mine if k not in todo]
    total = group.sum_int(sum(len(clips[k][1]) for k in todo) * steps_per_pass(kw))
    progress = SharedProgress(group, total, "restore-video")
    local: dict[str, Any] = {"clips": {}}
    t0 = time.perf_counter()
    if todo:
        pipe = load_pipeline(a, group.device)
        stab = a.stabilizer if a.stabilizer else a.ema
        for k in todo:
            name, frame_paths = clips[k]
            folder = src / name if name else src
            seen = {"n": 0}

            def step_cb(d: int, n: int, info: Any) -> None:
                progress.update(d - seen["n"])
                seen["n"] = d
            res = restore_video(pipe, _frames(folder, "input"), stabilizer=stab, batch_frames=a.batch_frames,
                                seed=seed, trajectory_frames=traj_frames, step_callback=step_cb, **kw)
            target = out / name if name else out
            for p, f, r in zip(frame_paths, res.frames, res.raw):
                if a.save_raw:
                    save_png(r.clamp(0, 1), target / "raw" / f"{p.stem}.png")
                save_png(f.clamp(0, 1), target / f"{p.stem}.png")
            local["clips"][name or src.name] = res.info
    local["seconds"] = round(time.perf_counter() - t0, 3)
    progress.finish()
    reports = group.all_gather(dict(local, rank=group.rank, device=str(group.device), skipped=skipped))
    if group.is_main:
        write_json_atomic(out / "vbridge_video_settings.json", {
            "input": str(src.resolve()), "stabilizer": a.stabilizer, "ema": a.ema,
            "sampler": dict(kw, frames=traj_frames, seed=seed), "world_size": group.world,
            "clips_per_rank": [len(s) for s in shares],
            "ranks": [dict(rank=r["rank"], device=r["device"], clips=[clips[k][0] or src.name for k in shares[i]],
                           skipped=r["skipped"], seconds=r["seconds"]) for i, r in enumerate(reports)],
            "info": {c: inf for r in reports for c, inf in r["clips"].items()},
            "model": a.model, "dit": a.dit, "vae": a.vae, "lora": a.lora, "lora_strength": a.lora_strength})
        logger.info("restored %d clip(s) over %d process(es) into %s", len(clips), group.world, out)
    group.barrier()
    return 0
