"""``python -m vbridge_core train-stabilizer`` and ``restore-video``: parsers and handlers.

``train-stabilizer`` trains a causal temporal stabilizer (see :mod:`vbridge_core.stabilize`) either
on real clips -- folders holding ``restored/`` (the restorer's per-frame outputs, e.g. written by
``restore-video --save-raw``), ``hq/`` (clean frames) and optionally ``lq/`` (the restorer's inputs),
frames matched by sorted file name -- or on clips synthesised from still photos (smooth random
camera motion, a :mod:`vbridge_core.degrade` degradation re-drawn per frame, and a simulated
flickering restorer: clean + a per-frame redrawn error). It never loads the 5B model.

``restore-video`` restores a folder of frames one by one with the same seed and streams them
through an optional stabilizer (a trained file or a fixed EMA strength).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Callable, Optional

from .cli_common import IMAGE_EXTS, HelpFormatter, collect_inputs, parse_dtype
from .errors import InputError
from .validate import float_arg

logger = logging.getLogger("vbridge_core")


def add_stabilizer_parsers(sub, add_model_args: Callable[[argparse.ArgumentParser], None],
                           add_sampler_args: Callable[..., None]) -> None:
    """Register ``train-stabilizer`` and ``restore-video`` on the CLI's subparsers."""
    fmt = HelpFormatter
    t = sub.add_parser("train-stabilizer", formatter_class=fmt,
                       help="train a causal temporal stabilizer (controlled or spatial) for frame-by-frame video")
    src = t.add_mutually_exclusive_group(required=True)
    src.add_argument("--clips", nargs="+", metavar="DIR", help="clip folders with restored/ + hq/ (+ lq/) frame "
                     "folders, or parents of such clip folders")
    src.add_argument("--photos", nargs="+", metavar="IN", help="still photos (files or folders) to synthesise "
                     "clips from: camera motion + degradation re-drawn per frame + simulated flickering restorer")
    t.add_argument("--out", required=True, metavar="FILE", help="stabilizer file to write (.safetensors)")
    t.add_argument("--kind", choices=["controlled", "spatial"], default="spatial",
                   help="controlled: per-pixel mix weight; spatial: + per-pixel k x k fusion kernel")
    t.add_argument("--steps", type=int, default=300, help="training steps")
    t.add_argument("--lr", type=float_arg("--lr", min=0, min_inclusive=False), default=3e-3, help="learning rate (Adam, cosine decay)")
    t.add_argument("--stability-weight", type=float_arg("--stability-weight", min=0, hint="keep it under 0.5, the oracle bound (default 0.4)"), default=0.4,
                   help="lambda of the accuracy-stability loss; must stay under the collapse bound "
                   "(clip-frames - 1), and under 0.5 (the oracle bound) it never trades accuracy for stability")
    t.add_argument("--clip-frames", type=int, default=5, help="frames per training window (tau)")
    t.add_argument("--crop", type=int, default=64, help="square crop side of the training windows")
    t.add_argument("--batch-size", type=int, default=4, help="windows per step")
    t.add_argument("--hidden", type=int, default=24, help="width of the stabilizer's conv layers")
    t.add_argument("--kernel-size", type=int, default=5, help="spatial fusion kernel size (odd)")
    t.add_argument("--no-inputs", action="store_true", help="do not feed the LQ inputs to the stabilizer "
                   "(then it needs only the restored frames at run time)")
    t.add_argument("--seed", type=int, default=0, help="seed")
    t.add_argument("--device", default=None, help="training device (default cpu; the stabilizer is small)")
    g = t.add_argument_group("synthetic clips (--photos)")
    g.add_argument("--degradation", default="gaussian_noise", help="vbridge_core.degrade degradation name "
                   "(re-drawn every frame)")
    g.add_argument("--frames", type=int, default=12, help="frames per synthetic clip")
    g.add_argument("--clips-per-photo", type=int, default=4, help="synthetic clips per photo")
    g.add_argument("--size", type=int, default=96, help="synthetic clip frame side (pixels)")
    g.add_argument("--restorer-error", type=float_arg("--restorer-error", min=0, max=1), default=0.05,
                   help="std of the simulated restorer's per-frame error (0..1 units)")

    v = sub.add_parser("restore-video", formatter_class=fmt,
                       help="restore a folder of video frames frame by frame (same seed) with an optional stabilizer")
    v.add_argument("input", metavar="DIR", help="folder of frames (sorted by name, one size)")
    v.add_argument("--out", required=True, metavar="DIR", help="output folder for the restored frames")
    v.add_argument("--lora", metavar="FILE", help="V-Bridge restoration LoRA (.safetensors)")
    v.add_argument("--lora-strength", type=float_arg("--lora-strength"), default=1.0, help="restoration LoRA strength")
    st = v.add_mutually_exclusive_group()
    st.add_argument("--stabilizer", metavar="FILE", help="trained stabilizer file (train-stabilizer)")
    st.add_argument("--ema", type=float_arg("--ema", min=0, max=1, min_inclusive=False, hint="1 = off, smaller = stronger"), metavar="B", help="fixed EMA strength b in (0, 1] (1 = off)")
    v.add_argument("--batch-frames", type=int, default=8, help="frames restored per chunk (memory)")
    v.add_argument("--save-raw", action="store_true", help="also write the unstabilized frames to OUT/raw/")
    add_model_args(v)
    add_sampler_args(v, video=True)
    from .parallel_restore import add_skip_existing_arg

    add_skip_existing_arg(v)


def _frames(folder: Path, what: str):
    import torch

    from .images import load_image

    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder of {what} frames")
    frames = [load_image(p) for p in collect_inputs([str(folder)])]
    sizes = sorted({tuple(f.shape) for f in frames})
    if len(sizes) > 1:
        raise InputError(f"{folder}: frames of different sizes {sizes}; all frames of a clip must have one size")
    return torch.stack(frames)


VIDEO_SETTINGS = "vbridge_video_settings.json"


def _is_video_output(p: Path) -> bool:
    """A ``restore-video`` output of one clip: its settings file, or ``raw/`` inside a folder-of-clips output."""
    return (p / VIDEO_SETTINGS).is_file() or ((p / "raw").is_dir() and (p.parent / VIDEO_SETTINGS).is_file())


def _is_clip(p: Path) -> bool:
    """A clip folder: ``restored/`` or ``hq/`` frame folders, or a ``restore-video`` output of one clip."""
    return (p / "restored").is_dir() or (p / "hq").is_dir() or _is_video_output(p)


def _is_clips_output(p: Path) -> bool:
    """A ``restore-video`` output of a folder of clips: the settings file on top, one folder per clip below."""
    return (p / VIDEO_SETTINGS).is_file() and not (p / "raw").is_dir() and not any(
        f.suffix.lower() in IMAGE_EXTS for f in p.iterdir() if f.is_file())


def _clip_dirs(paths: list[str]) -> list[Path]:
    out: list[Path] = []
    for p in map(Path, paths):
        if _is_clip(p) and not _is_clips_output(p):
            out.append(p)
        elif p.is_dir():
            subs = sorted(q for q in p.iterdir() if q.is_dir() and _is_clip(q))
            if not subs:
                raise InputError(f"{p} holds no clip folders (each needs restored/ and hq/ frame folders, or is "
                                 f"a `restore-video --save-raw` output folder with hq/ beside its input)")
            out.extend(subs)
        else:
            raise InputError(f"clip folder {p} does not exist")
    return out


def _video_settings(folder: Path) -> dict:
    """The ``vbridge_video_settings.json`` of a restore-video output folder, or of its parent (folder of clips)."""
    import json

    for f in (folder / VIDEO_SETTINGS, folder.parent / VIDEO_SETTINGS):
        if f.is_file():
            try:
                data = json.loads(f.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise InputError(f"{f} is not readable JSON ({e}); rerun restore-video to rewrite it") from None
            return data if isinstance(data, dict) else {}
    return {}


def _restored_frames(out: Path, settings: Optional[dict] = None) -> Path:
    """The restorer's own frames in a ``restore-video`` output: ``raw/``, or the frames themselves when no
    stabilizer was used; stabilized frames without ``raw/`` are refused (a stabilizer learns from raw ones)."""
    if (out / "raw").is_dir():
        return out / "raw"
    settings = _video_settings(out) if settings is None else settings
    if settings.get("stabilizer") or settings.get("ema") is not None:
        raise InputError(f"{out} holds stabilized frames without raw/: a stabilizer must learn from the "
                         f"restorer's own frames; rerun restore-video with --save-raw (and the same --out)")
    return out


def _restore_video_output(out: Path, clip_name: str = "") -> tuple[Path, Optional[Path], Path]:
    """``(restored, lq or None, hq)`` frame folders of a ``restore-video --save-raw`` output folder ``out``.

    The restorer's own (unstabilized) frames are ``out/raw/``; the LQ frames are the input folder the
    settings file records (``input/<clip>`` for a folder of clips); the clean frames are ``out/hq/`` or
    an ``hq/`` folder beside that input folder (the ``clip/lq`` + ``clip/hq`` layout).
    """
    settings = _video_settings(out)
    raw = _restored_frames(out, settings)
    src = settings.get("input")
    lq = Path(src) if src else None
    if lq is not None and clip_name and (lq / clip_name).is_dir():
        lq = lq / clip_name  # a folder of clips: each clip's frames are input/<clip>
    if lq is not None and not lq.is_dir():
        lq = None
    candidates = [out / "hq"] + ([lq.parent / "hq"] if lq is not None else [])
    hq = next((c for c in candidates if c.is_dir()), None)
    if hq is None:
        raise InputError(f"{out} is a restore-video output but no clean frames were found for it: put the clean "
                         f"(HQ) frames, same file names, in {' or '.join(str(c) for c in candidates)}")
    return raw, lq, hq


def load_clip_folders(paths: list[str], use_inputs: bool = True) -> list:
    """Real training clips, frames matched by sorted file name. Each path is a clip folder or a parent of such:

    * ``restored/`` + ``hq/`` (+ ``lq/``) frame folders; when ``restored/`` is a ``restore-video
      --save-raw`` output, its ``raw/`` frames (the restorer's own, unstabilized) are used;
    * a ``restore-video --save-raw`` output folder itself: ``raw/`` frames, the recorded input
      folder as ``lq``, and clean frames from its ``hq/`` or an ``hq/`` beside the input folder.

    Returns :class:`~vbridge_core.stabilize.StabilizerClip` objects (``inputs`` from the LQ frames when
    present and ``use_inputs``).
    """
    from .stabilize import StabilizerClip

    clips = []
    for d in _clip_dirs(paths):
        if (d / "restored").is_dir():  # clip/{restored,hq,lq}; restored/ may be a restore-video output
            restored_dir, lq_dir, hq_dir = d / "restored", d / "lq", d / "hq"
            if _is_video_output(restored_dir):
                restored_dir = _restored_frames(restored_dir)
        elif _is_video_output(d):  # the restore-video output folder itself (one clip of a folder of clips)
            clip_name = "" if (d / VIDEO_SETTINGS).is_file() else d.name
            restored_dir, lq_dir, hq_dir = _restore_video_output(d, clip_name)
        else:
            raise InputError(f"{d} has no restored/ folder: restore its lq/ frames first, e.g. "
                             f"`python -m vbridge_core restore-video {d / 'lq'} --out {d / 'restored'} --save-raw ...`")
        restored, hq = _frames(restored_dir, "restored"), _frames(hq_dir, "hq")
        lq = _frames(lq_dir, "lq") if lq_dir is not None and lq_dir.is_dir() and use_inputs else None
        clips.append(StabilizerClip(restored, hq, lq, name=d.name))
    return clips


def cmd_train_stabilizer(a: argparse.Namespace) -> int:
    from .images import load_image
    from .outputs import check_single_output
    from .stabilize import TrainStabilizerConfig, synthesize_clips, train_stabilizer

    check_single_output(a.out, [], "--out")  # before the clips are built and trained on
    if a.photos:
        photos = [load_image(p) for p in collect_inputs(a.photos)]
        clips = synthesize_clips(photos, n_frames=a.frames, seed=a.seed, degradation=a.degradation, size=a.size,
                                 clips_per_photo=a.clips_per_photo, restorer_amplitude=a.restorer_error)
        source = {"photos": [str(p) for p in a.photos], "degradation": a.degradation, "frames": a.frames,
                  "size": a.size, "restorer": f"simulated (clean + per-frame error std {a.restorer_error})"}
    else:
        clips = load_clip_folders(a.clips, use_inputs=not a.no_inputs)
        source = {"clips": [str(p) for p in a.clips]}
    cfg = TrainStabilizerConfig(kind=a.kind, steps=a.steps, learning_rate=a.lr, stability_weight=a.stability_weight,
                                clip_frames=a.clip_frames, crop=a.crop, batch_size=a.batch_size, hidden=a.hidden,
                                kernel_size=a.kernel_size, use_inputs=False if a.no_inputs else None, seed=a.seed,
                                device=a.device)
    every = max(1, a.steps // 10)
    res = train_stabilizer(clips, a.kind, cfg, out=a.out, metadata={"source": source},
                           callback=lambda s, l: s % every == 0 and logger.info("step %d loss %.5f", s, l))
    logger.info("wrote %s (%s, %d parameters)", res.path, a.kind, res.info["parameters"])
    return 0


def cmd_restore_video(a: argparse.Namespace) -> int:
    from .cli import _sampler_kwargs
    from .fileio import write_json_atomic
    from .images import save_png
    from .pipeline import VBridgePipeline
    from .parallel_restore import cmd_restore_video_parallel, holds_clip_folders, plan_video_outputs, wants_parallel
    from .stabilize import load_stabilizer, restore_video

    if a.stabilizer:  # a missing, foreign or broken (NaN/inf) stabilizer file is refused before any model loads
        load_stabilizer(a.stabilizer)
    if wants_parallel(a) or holds_clip_folders(Path(a.input)):
        return cmd_restore_video_parallel(a)  # several processes, --skip-existing, or a folder of clips
    src = Path(a.input)
    paths = collect_inputs([str(src)])
    frames = _frames(src, "input")
    out = plan_video_outputs(a, [("", paths)])
    from .cli import preflight_sampling

    preflight_sampling(a, [tuple(frames.shape[-2:])] if len(frames) else [])
    stab = a.stabilizer if a.stabilizer else a.ema
    pipe = VBridgePipeline.from_files(a.model, dit=a.dit, vae=a.vae, lora=a.lora, lora_strength=a.lora_strength,
                                      device=a.device, dtype=parse_dtype(a.dtype), text_encoder=a.text_encoder,
                                      tokenizer=a.tokenizer, vae_tiling=a.vae_tiling, offload=a.offload,
                                      accelerator_lora=a.accelerator_lora, accelerator_strength=a.accelerator_strength,
                                      allow_partial_lora=a.allow_partial)
    pipe.maybe_compile(a.compile)
    kw = _sampler_kwargs(a, lora=pipe.adapter_file("restoration"))
    seed = kw.pop("seed")
    kw.pop("batch_size", None)  # --batch-frames batches the frames
    traj_frames = kw.pop("frames", None)
    res = restore_video(pipe, frames, stabilizer=stab, batch_frames=a.batch_frames, seed=seed,
                        trajectory_frames=traj_frames,
                        callback=lambda d, n: logger.info("restored %d/%d frames", d, n), **kw)
    for p, f, r in zip(paths, res.frames, res.raw):
        save_png(f.clamp(0, 1), out / f"{p.stem}.png")
        if a.save_raw:
            save_png(r.clamp(0, 1), out / "raw" / f"{p.stem}.png")
    write_json_atomic(out / "vbridge_video_settings.json",
                      {"input": str(src.resolve()), "stabilizer": a.stabilizer, "ema": a.ema,
                       "sampler": dict(kw, frames=traj_frames, seed=seed), "info": res.info, "model": a.model,
                       "dit": a.dit, "vae": a.vae, "lora": a.lora, "lora_strength": a.lora_strength})
    logger.info("wrote %d frame(s) to %s", len(paths), out)
    return 0
