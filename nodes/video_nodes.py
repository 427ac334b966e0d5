"""``RestoreVideo`` and ``TrainStabilizer``: frame-by-frame video restoration with a causal temporal stabilizer.

``RestoreVideo`` restores every frame of a ComfyUI IMAGE batch with the V-Bridge pipeline (one seed
for all frames, ``batch_frames`` frames per DiT call) and streams the results through a stabilizer
(:mod:`vbridge_core.stabilize`): none, a fixed EMA, or a learned one from
``models/vbridge_stabilizers/``. ``TrainStabilizer`` trains such a learned stabilizer from still
photos (synthesised flickering clips) or from real clip folders; it never loads the 5B model.

Progress goes to ComfyUI's progress bar; Cancel stops within one sampler step (video) or one
training step (the stabilizer file is only written at the end, so nothing is left behind).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

from . import comfy_bridge
from .restore_nodes import MAX_SEED, _check_model, _frames_input, _steps_input

logger = logging.getLogger(__name__)

CATEGORY = "V-Bridge/video"
NONE = "none"
STABILIZERS = ["none", "ema", "learned"]
KINDS = ["controlled", "spatial"]
#: Frames of each synthetic training clip (windows of clip_frames are drawn from them).
SYNTH_FRAMES = 12
#: Side of the synthetic training clips (the stabilizer is convolutional: it runs on any size).
SYNTH_SIZE = 96
#: At most this many synthetic clips in all (memory), at most 4 per photo.
MAX_SYNTH_CLIPS = 64
#: Held-out synthetic clips for the report.
EVAL_CLIPS = 4

_STABILITY_TIP = (
    "lambda of the accuracy-stability loss L = accuracy + lambda * mean|z~_t - z~_(t-1)|. Below the oracle bound "
    "1/2 the perfect (clean) frames still minimise the loss, so stabilizing never pays by giving up accuracy; "
    "0.4 is the paper's well-behaved setting. At or above the collapse bound clip_frames - 1 a frozen first "
    "frame minimises the loss (the stabilizer would learn to stop the video): such values are refused.")


def _degradation_names() -> list[str]:
    from vbridge_core.degrade import DEGRADATIONS

    return [NONE] + list(DEGRADATIONS)


def _learned_stabilizer(name: str, device: Any) -> tuple[Any, Path]:
    """Load ``name`` from the vbridge_stabilizers folder, with clear errors for 'none' and missing files."""
    from vbridge_core.errors import InputError, ModelFileError
    from vbridge_core.stabilize import load_stabilizer

    folder = comfy_bridge.STABILIZER_FOLDER
    if not name or name == NONE:
        raise InputError("stabilizer 'learned' needs a stabilizer_file: train one with 'V-Bridge Train Stabilizer' "
                         f"(or the train-stabilizer CLI) into models/{folder}/ and pick it (refresh the page first)")
    path = comfy_bridge.full_path(folder, name)
    if not path.is_file():
        have = comfy_bridge.filename_list(folder)
        raise ModelFileError(f"stabilizer file {name!r} not found in models/{folder}/ (looked at {path}); "
                             f"available: {', '.join(have) if have else 'none'}")
    st = load_stabilizer(path, device=device)
    if getattr(st, "channels", 3) not in (None, 3):
        raise InputError(f"{name} is a {st.channels}-channel (latent) stabilizer; RestoreVideo stabilizes RGB frames")
    return st, path


class RestoreVideo:
    """Restore a video frame by frame (same seed, batched DiT calls) and stabilize it causally."""

    DESCRIPTION = (
        "Restores every frame of a clip (an IMAGE batch, e.g. from Load Video -> Get Video Components) with the "
        "V-Bridge model, all frames with the same seed and up to batch_frames frames per DiT call, then removes "
        "the frame-to-frame flicker with a causal stabilizer: 'ema' mixes each frame with the previous "
        "stabilized one (z~ = b z + (1-b) z~prev), 'learned' uses a stabilizer file trained with 'V-Bridge Train "
        "Stabilizer' (per-pixel mixing, optionally motion-aware). Each output frame depends only on the frames "
        "up to it.\n\nOutputs the stabilized frames, the raw per-frame restorations and a report with per-frame "
        "time and the stability score (mean change between consecutive frames, lower = steadier) of raw vs "
        "stabilized. Cost: one restore per frame (see the README for VRAM and time); nothing is written to disk.")
    CATEGORY = CATEGORY
    FUNCTION = "restore"
    RETURN_TYPES = ("IMAGE", "IMAGE", "STRING")
    RETURN_NAMES = ("restored", "raw", "report")
    OUTPUT_TOOLTIPS = (
        "All frames restored and stabilized, same count and size as the input.",
        "All frames restored, before stabilization (for comparison).",
        "Settings, per-frame time and the stability score of raw vs stabilized frames.",
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        """Model, frames, stabilizer choice and sampler settings."""
        comfy_bridge.register_stabilizer_folder()
        files = [NONE] + comfy_bridge.filename_list(comfy_bridge.STABILIZER_FOLDER)
        return {
            "required": {
                "vbridge_model": ("VBRIDGE_MODEL", {"tooltip": "The model from 'V-Bridge Load Model'."}),
                "frames_in": ("IMAGE", {"tooltip": (
                    "The clip as an IMAGE batch, one image per frame in order (e.g. Load Video -> Get Video "
                    "Components, or image batches). At least 2 frames of one size.")}),
                "stabilizer": (STABILIZERS, {"default": "ema", "tooltip": (
                    "none: raw per-frame restorations. ema: fixed exponential moving average with ema_strength. "
                    "learned: the stabilizer_file (trained with 'V-Bridge Train Stabilizer').")}),
                "ema_strength": ("FLOAT", {"default": 0.5, "min": 0.01, "max": 1.0, "step": 0.01, "tooltip": (
                    "b in z~ = b z + (1 - b) z~prev, used when stabilizer is ema. 1 = no stabilization; smaller is "
                    "steadier but smears motion (moving edges leave trails).")}),
                "stabilizer_file": (files, {"default": NONE, "tooltip": (
                    "Learned stabilizer from models/vbridge_stabilizers/, used when stabilizer is learned.")}),
                "batch_frames": ("INT", {"default": 8, "min": 1, "max": 64, "tooltip": (
                    "Frames restored together in one DiT call per step: more is faster but needs more VRAM (about "
                    "one restore's activations per frame). Results do not depend on it.")}),
                "frames": _frames_input(),
                "steps": _steps_input(),
                "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True, "tooltip": (
                    "Noise seed, the same for every frame: fixed noise keeps the restorations of similar frames "
                    "alike, which already removes much flicker.")}),
            },
        }

    def restore(self, vbridge_model: Any, frames_in: Any, stabilizer: str, ema_strength: float, stabilizer_file: str,
                batch_frames: int, frames: int, steps: int, seed: int) -> tuple[Any, Any, str]:
        """Restore and stabilize ``frames_in``; returns ``(restored, raw, report)``."""
        from vbridge_core.errors import InputError
        from vbridge_core.images import bchw_to_comfy, comfy_to_bchw
        from vbridge_core.stabilize import restore_video
        from vbridge_core.stabilize.report import video_report

        _check_model(vbridge_model)
        x = comfy_to_bchw(frames_in)
        if x.shape[0] < 2:
            raise InputError(f"RestoreVideo needs a clip of at least 2 frames, got {x.shape[0]} image(s); for single "
                             "images use 'V-Bridge Restore (Trajectory)'")
        if stabilizer not in STABILIZERS:
            raise InputError(f"stabilizer must be one of {STABILIZERS}, got {stabilizer!r}")
        name = ""
        spec: Any = None
        if stabilizer == "ema":
            from vbridge_core.validate import finite_float

            spec = finite_float("ema_strength", ema_strength, min=0, max=1, min_inclusive=False,
                                hint="1 = off, smaller = stronger")
        elif stabilizer == "learned":
            spec, path = _learned_stabilizer(stabilizer_file, getattr(vbridge_model, "device", None))
            name = path.name
        if stabilizer != "learned" and stabilizer_file not in (None, "", NONE):
            logger.info("stabilizer_file %s ignored: stabilizer is %s", stabilizer_file, stabilizer)
        steps = int(steps)
        bar = comfy_bridge.ProgressBar(x.shape[0] * steps, desc="V-Bridge video")
        preview = comfy_bridge.latent_previewer()

        def should_cancel() -> bool:
            comfy_bridge.throw_if_interrupted()  # raises ComfyUI's interrupt exception itself
            return False

        def on_step(done: int, total: int, info: Any) -> None:
            shot = preview(info.denoised) if preview is not None else None
            bar.update_absolute(done, shot)

        comfy_bridge.make_room()
        try:
            result = restore_video(vbridge_model, x, stabilizer=spec, batch_frames=int(batch_frames), seed=int(seed),
                                   step_callback=on_step, should_cancel=should_cancel, trajectory_frames=int(frames),
                                   steps=steps)
        finally:
            bar.close()
        report = video_report(result, x, name)
        logger.info("V-Bridge video:\n%s", report)
        return bchw_to_comfy(result.frames), bchw_to_comfy(result.raw), report


class TrainStabilizer:
    """Train a learned temporal stabilizer (controlled or spatial) for 'V-Bridge Restore Video'."""

    DESCRIPTION = (
        "Trains a small causal stabilizer (tens of thousands of parameters; no 5B model needed) that removes the "
        "flicker of frame-by-frame restoration. From still photos (the 'photos' batch, the HQ images of "
        "'pairs', or a folder of photos) it synthesises clips: a smooth random camera motion over each photo, "
        "the chosen degradation re-drawn every frame, and a simulated flickering restorer. A folder of real "
        "clips (subfolders with restored/ + hq/ (+ lq/) frames) trains on those instead.\n\n"
        "controlled: predicts a per-pixel mix weight between the current frame and the previous stabilized one. "
        "spatial: also a per-pixel 5x5 kernel, so moving content is matched rather than smeared.\n\nSaves "
        "models/vbridge_stabilizers/<output_name>.safetensors (pick it in 'V-Bridge Restore Video' after a "
        "refresh). Outputs the path, a report (PSNR and stability score before/after on held-out clips) and a "
        "preview (raw | stabilized | clean).")
    CATEGORY = CATEGORY
    FUNCTION = "train"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING", "STRING", "IMAGE")
    RETURN_NAMES = ("stabilizer_path", "report", "preview")
    OUTPUT_TOOLTIPS = (
        "Full path of the written stabilizer (models/vbridge_stabilizers/<output_name>.safetensors).",
        "Training summary with PSNR and stability score before -> after on held-out clips.",
        "A few held-out frames as raw | stabilized | clean.",
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        """Stabilizer kind, output name, training settings; the photos or clips come from an optional source."""
        degradations = _degradation_names()
        return {
            "required": {
                "kind": (KINDS, {"default": "spatial", "tooltip": (
                    "controlled: per-pixel mix weight (cheapest). spatial: + per-pixel 5x5 fusion kernel that "
                    "follows small motion (a little slower, better on moving edges).")}),
                "output_name": ("STRING", {"default": "my_stabilizer", "tooltip": (
                    "File name, saved as models/vbridge_stabilizers/<name>.safetensors (overwritten if it exists). "
                    "A plain name: no folders; characters other than letters, digits and . _ - become _.")}),
                "steps": ("INT", {"default": 300, "min": 1, "max": 100000, "tooltip": (
                    "Training steps (4 random clip windows each). 300 takes about a minute on a CPU.")}),
                "stability_weight": ("FLOAT", {"default": 0.4, "min": 0.0, "max": 100.0, "step": 0.05,
                                               "tooltip": _STABILITY_TIP}),
                "clip_frames": ("INT", {"default": 5, "min": 2, "max": SYNTH_FRAMES, "tooltip": (
                    "Frames per training window (tau). The collapse bound is clip_frames - 1.")}),
                "degradation": (degradations, {"default": "gaussian_noise" if "gaussian_noise" in degradations
                                               else NONE, "tooltip": (
                    "Degradation applied to the synthetic clips, re-drawn every frame (the restorer's inputs the "
                    "stabilizer sees). none: light Gaussian noise. Use the degradation your videos have.")}),
                "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True, "tooltip": (
                    "Seed of the synthetic clips, the training windows and the initial weights.")}),
            },
            "optional": {
                "photos": ("IMAGE", {"tooltip": (
                    "Still photos (an IMAGE batch) to synthesise flickering clips from.")}),
                "pairs": ("VBRIDGE_PAIRS", {"tooltip": (
                    "Pairs from 'V-Bridge Load Image Pairs': their HQ images are used as photos.")}),
                "folder": ("STRING", {"default": "", "tooltip": (
                    "Optional folder: of photos (clips are synthesised from them), or of real clips (subfolders "
                    "holding restored/, hq/ and optionally lq/ frame folders, e.g. from the restore-video CLI "
                    "with --save-raw).")}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def train(self, kind: str, output_name: str, steps: int, stability_weight: float, clip_frames: int,
              degradation: str, seed: int, photos: Any = None, pairs: Any = None, folder: str = "",
              unique_id: Optional[str] = None) -> tuple[str, str, Any]:
        """Train, write the file and return ``(stabilizer_path, report, preview)``."""
        import torch

        from vbridge_core.errors import InputError
        from vbridge_core.images import bchw_to_comfy
        from vbridge_core.stabilize import (TrainStabilizerConfig, collapse_bound, stabilizer_output_path,
                                            train_stabilizer)
        from vbridge_core.stabilize.report import comparison_frames, evaluate_stabilizer, training_report

        if kind not in KINDS:
            raise InputError(f"kind must be one of {KINDS}, got {kind!r}")
        from vbridge_core.validate import finite_float

        # NaN passes `>= bound` and trained a stabilizer of NaN weights: refuse non-finite values first
        stability_weight = finite_float("stability_weight", stability_weight, min=0,
                                        hint="keep it under 0.5, the oracle bound (default 0.4)")
        bound = collapse_bound(int(clip_frames))
        if float(stability_weight) >= bound:  # refuse before any work (train_stabilizer checks it again)
            raise InputError(f"stability_weight {stability_weight:g} is at or above the collapse bound {bound:g} "
                             f"(clip_frames - 1): training would learn to freeze the first frame. Use a weight under "
                             f"0.5 (the oracle bound; 0.4 is the default) or at least under {bound:g}")
        out_path = stabilizer_output_path(comfy_bridge.stabilizer_output_dir(), output_name)
        dev = comfy_bridge.torch_device()
        seed = int(seed) % (2 ** 31)  # synthetic clip seeds are derived from it
        with torch.inference_mode(False):  # ComfyUI runs nodes in inference mode; training needs autograd
            train_clips, eval_clips, source, held_out = _training_clips(
                photos, pairs, folder, int(clip_frames), degradation, seed)
            bar = comfy_bridge.ProgressBar(int(steps), desc="V-Bridge stabilizer")
            every = max(1, int(steps) // 20)

            def on_step(step: int, loss: float) -> None:
                bar.update_absolute(step)
                if step % every == 0 or step == int(steps):
                    comfy_bridge.show_text(unique_id, f"step {step}/{steps} | loss {loss:.5f}")
                comfy_bridge.throw_if_interrupted()  # Cancel: stop after this step, nothing written

            cfg = TrainStabilizerConfig(kind=kind, steps=int(steps), stability_weight=float(stability_weight),
                                        clip_frames=int(clip_frames), seed=seed,
                                        device=str(dev) if dev is not None else None)
            try:
                with torch.enable_grad():
                    result = train_stabilizer(train_clips, kind, cfg, out=out_path, callback=on_step,
                                              metadata={"source": source, "node": "TrainStabilizer"})
            finally:
                bar.close()
            st = result.stabilizer.cpu()
            evaluation = evaluate_stabilizer(st, eval_clips)
            preview = comparison_frames(eval_clips[0], evaluation["stabilized"][0])
        report = training_report(result, evaluation, source, held_out)
        comfy_bridge.show_text(unique_id, report)
        logger.info("V-Bridge stabilizer trained:\n%s", report)
        return str(result.path), report, bchw_to_comfy(preview)


def _photo_list(photos: Any, pairs: Any, folder_photos: list[Path]) -> list[Any]:
    """Photos as ``[3, H, W]`` tensors (normal tensors, usable outside inference mode)."""
    from vbridge_core.errors import InputError
    from vbridge_core.images import comfy_to_bchw, load_image

    out = []
    if photos is not None:
        out += [p.clone() for p in comfy_to_bchw(photos)]
    if pairs is not None:
        if not hasattr(pairs, "items") or not hasattr(pairs, "load"):
            raise InputError("pairs must come from 'V-Bridge Load Image Pairs'")
        out += [pairs.load(i)[1] for i in range(len(pairs))]
    out += [load_image(p) for p in folder_photos]
    return out


def _training_clips(photos: Any, pairs: Any, folder: str, clip_frames: int, degradation: str, seed: int
                    ) -> tuple[list[Any], list[Any], str, str]:
    """``(training clips, evaluation clips, source text, evaluation text)`` from the node's sources."""
    from vbridge_core.cli_common import collect_inputs
    from vbridge_core.errors import InputError
    from vbridge_core.stabilize import synthesize_clips
    from vbridge_core.stabilize_cli import load_clip_folders

    folder = (folder or "").strip()
    folder_photos: list[Path] = []
    if folder:
        p = Path(folder).expanduser()
        if not p.is_dir():
            raise InputError(f"folder {folder!r} does not exist (give a folder of photos or of clip folders)")
        is_clip = lambda d: (d / "restored").is_dir() or (d / "hq").is_dir()  # noqa: E731
        if is_clip(p) or any(is_clip(q) for q in p.iterdir() if q.is_dir()):
            if photos is not None or pairs is not None:
                raise InputError("folder holds real clips: disconnect photos/pairs (real and synthetic clips are "
                                 "not mixed)")
            clips = load_clip_folders([str(p)])
            short = [c.name for c in clips if c.restored.shape[0] < clip_frames]
            if short:
                raise InputError(f"clips {short} have fewer than clip_frames={clip_frames} frames")
            if len(clips) >= 2:
                return clips[:-1], clips[-1:], f"{len(clips) - 1} real clips in {p}", f"the held-out clip {clips[-1].name}"
            return clips, clips, f"1 real clip in {p}", "the training clip (only one: none held out)"
        folder_photos = collect_inputs([str(p)])
    imgs = _photo_list(photos, pairs, folder_photos)
    if not imgs:
        raise InputError("no training data: connect 'photos' (an IMAGE batch) or 'pairs', or give a folder of photos "
                         "or of real clips")
    per_photo = max(1, min(4, MAX_SYNTH_CLIPS // len(imgs)))
    deg = None if degradation == NONE else degradation
    n_frames = max(SYNTH_FRAMES, clip_frames)
    train = synthesize_clips(imgs, n_frames=n_frames, seed=seed, degradation=deg, size=SYNTH_SIZE,
                             clips_per_photo=per_photo)
    evals = synthesize_clips(imgs[:EVAL_CLIPS], n_frames=n_frames, seed=seed + 7919, degradation=deg, size=SYNTH_SIZE)
    source = (f"{len(train)} synthetic clips from {len(imgs)} photo(s) ({n_frames} frames, {SYNTH_SIZE} px, "
              f"degradation {degradation}, simulated restorer)")
    return train, evals, source, f"{len(evals)} held-out synthetic clips (new camera motion and noise)"
