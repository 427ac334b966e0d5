"""``PerceiveImage``, ``AutoRestore`` and ``TrainPerceiver``: see the degradation, pick the restorer.

Thin adapters over :mod:`vbridge_core.perceive`: ComfyUI ``IMAGE`` batches become ``[3, H, W]``
tensors, ComfyUI's ``CLIP_VISION`` becomes an embedder (``encode_image(...).image_embeds``), and
perceiver files live in ``models/vbridge_perceivers``. The built-in perceiver needs no model file.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Optional

from . import comfy_bridge
from .restore_nodes import _check_model, _frames_input, _seed_input, _steps_input

logger = logging.getLogger(__name__)

CATEGORY = "V-Bridge"
BUILTIN = "built-in"


def _perceiver_choices() -> list[str]:
    comfy_bridge.perceiver_output_dir()
    return [BUILTIN] + [n for n in comfy_bridge.filename_list(comfy_bridge.PERCEIVER_FOLDER)]


def comfy_clip_embedder(clip_vision: Any) -> Callable[[Any], Any]:
    """An embedder (``[B, 3, H, W]`` -> ``[B, D]``) around ComfyUI's ``CLIP_VISION.encode_image``."""
    from vbridge_core.errors import InputError
    from vbridge_core.images import bchw_to_comfy

    if not hasattr(clip_vision, "encode_image"):
        raise InputError(f"clip_vision must come from ComfyUI's 'Load CLIP Vision' node, got {type(clip_vision).__name__}")

    def embed(x: Any) -> Any:
        out = clip_vision.encode_image(bchw_to_comfy(x))
        e = getattr(out, "image_embeds", None)
        if e is None:
            e = out["image_embeds"]
        return e.float().cpu()
    return embed


def perceive_fn(perceiver: str, clip_vision: Any = None) -> Callable[[Any, Any], list]:
    """``fn(images, names) -> reports`` for the node's perceiver choice."""
    from vbridge_core.errors import InputError
    from vbridge_core.perceive.model import Perceiver

    if perceiver in (None, "", BUILTIN):
        return Perceiver.builtin().perceive
    path = comfy_bridge.full_path(comfy_bridge.PERCEIVER_FOLDER, perceiver)
    from safetensors import safe_open

    if not Path(path).is_file():
        raise InputError(f"perceiver {perceiver} not found in models/{comfy_bridge.PERCEIVER_FOLDER}")
    with safe_open(str(path), "pt") as f:
        kind = (f.metadata() or {}).get("format")
    if kind == "vbridge-perceiver-clip":
        from vbridge_core.perceive.clip import ClipPerceiver

        if clip_vision is None:
            raise InputError(f"{perceiver} is a CLIP perceiver: connect 'clip_vision' (Load CLIP Vision with the model "
                             "it was trained with, e.g. clip_vision_h.safetensors)")
        cp = ClipPerceiver.load(path)
        emb = comfy_clip_embedder(clip_vision)
        return lambda images, names: cp.perceive(images, emb, names)
    return Perceiver.load(path).perceive


def _images(image: Any) -> list:
    from vbridge_core.images import comfy_to_bchw

    return list(comfy_to_bchw(image))


def _perceiver_inputs() -> dict[str, Any]:
    return {"perceiver": (_perceiver_choices(), {"default": BUILTIN, "tooltip": (
        "built-in: the small perceiver shipped with the pack (no model file). Or a perceiver trained with "
        "'V-Bridge Train Perceiver' (models/vbridge_perceivers); a CLIP one needs 'clip_vision' connected.")})}


def _clip_input() -> dict[str, Any]:
    return {"clip_vision": ("CLIP_VISION", {"tooltip": (
        "Only for a CLIP perceiver: ComfyUI's Load CLIP Vision (e.g. clip_vision_h.safetensors, which Wan "
        "image-to-video users already have).")})}


def _lora_folder(name: str) -> Path:
    """An absolute folder as given; a relative one inside the first ComfyUI ``loras`` folder holding LoRAs there."""
    p = Path((name or "").strip())
    if p.is_absolute():
        return p
    cands = [d / p for d in comfy_bridge.lora_root_dirs()]
    for c in cands:
        if c.is_dir() and any(c.glob("*.safetensors")):
            return c
    return cands[0]


class PerceiveImage:
    """Rate each image: degradation (multi-label), severity and quality tier."""

    DESCRIPTION = (
        "Looks at each image and says what is wrong with it: a probability for noise, blur, jpeg, haze, low_light, "
        "rain, snow and clean (several can be present), a severity 0..1 for each, and a quality tier "
        "(high / medium / low, as in Perceive-IR) with its score. CPU only, fast.")
    CATEGORY = CATEGORY
    FUNCTION = "perceive"
    RETURN_TYPES = ("STRING", "STRING", "STRING", "IMAGE", "STRING")
    RETURN_NAMES = ("report", "labels", "tiers", "preview", "json")
    OUTPUT_IS_LIST = (False, True, True, False, False)
    OUTPUT_TOOLTIPS = (
        "A table: one row per image with the top degradation, others present, severity and quality.",
        "The top label of each image (a list, one entry per image).",
        "The quality tier of each image (a list: high / medium / low).",
        "Small previews with the verdict written on them.",
        "The full result as JSON (the same schema as `python -m vbridge_core perceive --json`).",
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"image": ("IMAGE", {"tooltip": "Image(s) to rate."}), **_perceiver_inputs()},
                "optional": _clip_input()}

    def perceive(self, image: Any, perceiver: str = BUILTIN, clip_vision: Any = None) -> tuple:
        import json

        from vbridge_core.images import bchw_to_comfy
        from vbridge_core.perceive.preview import annotate
        from vbridge_core.perceive_cli import format_table

        imgs = _images(image)
        names = [f"image {i}" for i in range(len(imgs))]
        reports = perceive_fn(perceiver, clip_vision)(imgs, names)
        return (format_table(reports), [r.degradation for r in reports], [r.quality for r in reports],
                bchw_to_comfy(annotate(imgs, reports)), json.dumps({"images": [r.to_dict() for r in reports]}))


class AutoRestore:
    """Restore each image with the LoRA whose tasks cover its perceived degradation."""

    DESCRIPTION = (
        "For a batch of mixed photos: perceives each image, restores it with the restoration LoRA in the LoRA "
        "folder whose declared tasks cover its top degradation (a multi-task LoRA when none fits), and passes "
        "clean images through unchanged unless 'force_restore' is on. The report lists per image what was seen, "
        "which LoRA ran and the quality tier before -> after. LoRAs trained by this pack declare their tasks; "
        "declare older ones with `python -m vbridge_core lora-tasks FILE --set denoise` or a <name>.tasks.json.")
    CATEGORY = CATEGORY
    FUNCTION = "restore"
    RETURN_TYPES = ("IMAGE", "STRING", "STRING")
    RETURN_NAMES = ("restored", "report", "json")
    OUTPUT_TOOLTIPS = ("The restored images (clean ones unchanged), in input order.",
                       "Per image: perceived degradation, LoRA used, quality tier before -> after.",
                       "The report as JSON.")

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "vbridge_model": ("VBRIDGE_MODEL", {"tooltip": (
                    "The model from 'V-Bridge Load Model' (its own restoration LoRA is put back afterwards).")}),
                "image": ("IMAGE", {"tooltip": "Images to restore (a batch shares one size)."}),
                "lora_folder": ("STRING", {"default": comfy_bridge.LORA_SUBFOLDER, "tooltip": (
                    "Folder of restoration LoRAs: a subfolder of ComfyUI's models/loras (default vbridge, where "
                    "'V-Bridge Train LoRA' writes) or an absolute path.")}),
                "frames": _frames_input(),
                "steps": _steps_input(),
                "seed": _seed_input(),
                "lora_strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 2.0, "step": 0.05,
                                            "tooltip": "Strength of whichever LoRA is used."}),
                "force_restore": ("BOOLEAN", {"default": False, "tooltip": (
                    "Off: images rated clean pass through unchanged. On: they are restored too, with the LoRA of "
                    "their strongest degradation.")}),
                **_perceiver_inputs(),
            },
            "optional": _clip_input(),
        }

    def restore(self, vbridge_model: Any, image: Any, lora_folder: str, frames: int, steps: int, seed: int,
                lora_strength: float, force_restore: bool, perceiver: str = BUILTIN, clip_vision: Any = None) -> tuple:
        import json

        import torch

        from vbridge_core.images import bchw_to_comfy
        from vbridge_core.perceive.routing import auto_restore, scan_lora_dir
        from vbridge_core.validate import finite_float

        _check_model(vbridge_model)
        lora_strength = finite_float("lora_strength", lora_strength, hint="1.0 = as trained")
        loras = scan_lora_dir(_lora_folder(lora_folder))
        imgs = _images(image)
        names = [f"image {i}" for i in range(len(imgs))]
        bar = comfy_bridge.ProgressBar(len(imgs), desc="V-Bridge auto restore")

        def cancel() -> bool:
            comfy_bridge.throw_if_interrupted()
            return False

        comfy_bridge.make_room()
        try:
            res = auto_restore(vbridge_model, imgs, names, loras, perceive_fn(perceiver, clip_vision),
                               force=force_restore, strength=lora_strength, seed=seed, frames=frames, steps=steps,
                               should_cancel=cancel, on_image=lambda d, n: bar.update_absolute(d))
        finally:
            bar.close()
        return (bchw_to_comfy(torch.stack(res.images)), res.table(), json.dumps({"images": res.rows}))


class TrainPerceiver:
    """Train a perceiver: the built-in kind on degraded photos, or a CLIP one few-shot from task folders."""

    DESCRIPTION = (
        "Trains a perceiver for 'V-Bridge Perceive' / 'V-Bridge Auto Restore' and writes it to "
        "models/vbridge_perceivers. builtin: image statistics + a small network, trained on scikit-image's "
        "photos degraded with random noise/blur/JPEG/haze/low-light/rain/snow (a few minutes on a CPU; connect "
        "'pairs' and their HQ images join those photos, so content like yours is learned as clean). clip: "
        "learns degradation and quality-tier prompts in the space of the connected CLIP vision model, from your "
        "own task folders (connect 'pairs' from Load Image Pairs with task subfolders such as denoise/, derain/) "
        "or, without pairs, from degraded photos.")
    CATEGORY = CATEGORY
    FUNCTION = "train"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("perceiver_path", "info")
    OUTPUT_TOOLTIPS = ("Path of the trained perceiver file (pick it in V-Bridge Perceive / Auto Restore).",
                       "What was trained: examples, labels and training accuracy.")

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "kind": (["builtin", "clip"], {"default": "clip", "tooltip": (
                    "clip: prompt learning on a CLIP vision model (connect clip_vision). builtin: retrain the "
                    "statistics-based perceiver (the shipped one is already trained).")}),
                "output_name": ("STRING", {"default": "my_perceiver", "tooltip": (
                    "File name in models/vbridge_perceivers (no folders).")}),
                "samples": ("INT", {"default": 400, "min": 50, "max": 100000, "tooltip": (
                    "Degraded training images when no pairs are connected (builtin: 36000 is the shipped setting).")}),
                "steps": ("INT", {"default": 300, "min": 10, "max": 5000, "tooltip": "CLIP prompt-learning steps."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 2 ** 31 - 1,
                                  "tooltip": "Seed of the synthetic degradations and the training run (same seed, same perceiver)."}),
            },
            "optional": {
                "pairs": ("VBRIDGE_PAIRS", {"tooltip": (
                    "(clip) Task folders from 'V-Bridge Load Image Pairs': each task's LQ images teach the "
                    "degradation its folder name says (denoise, deblur, dejpeg, dehaze, low_light, derain, desnow). "
                    "(builtin) Their HQ images join the training photos as clean content, so photos like yours are "
                    "not misread (each at least 128 px a side).")}),
                **_clip_input(),
            },
        }

    def train(self, kind: str, output_name: str, samples: int, steps: int, seed: int, pairs: Any = None,
              clip_vision: Any = None) -> tuple[str, str]:
        import json

        from vbridge_core.errors import InputError
        from vbridge_core.fileio import safe_output_name

        name = safe_output_name(output_name, what="perceiver", example="my_perceiver",
                                folder_hint=f"models/{comfy_bridge.PERCEIVER_FOLDER}/")
        out = comfy_bridge.perceiver_output_dir() / f"{name}.safetensors"
        if kind == "builtin":
            from vbridge_core.perceive.train import train_builtin

            extra = [item.hq_path for item in pairs] if pairs is not None else []
            _, info = train_builtin(out, seed=seed, count=samples, extra=extra)
            return str(out), json.dumps(info)
        if clip_vision is None:
            raise InputError("kind clip needs 'clip_vision' connected (Load CLIP Vision, e.g. clip_vision_h.safetensors)")
        from vbridge_core.perceive.clip import examples_from_task_folders, train_clip_perceiver
        from vbridge_core.perceive.synth import clean_photos, make_samples

        emb = comfy_clip_embedder(clip_vision)
        if pairs is not None:
            images, labels, sev, qual = examples_from_task_folders(pairs)
            source = {"tasks": [str(t) for t in pairs.tasks]}
        else:
            ss = make_samples(clean_photos("train"), samples, seed=seed, size=224)
            images, labels = [s.image for s in ss], [s.families or ["clean"] for s in ss]
            sev, qual = [s.severity for s in ss], [s.quality for s in ss]
            source = {"degradations": len(ss)}
        model = train_clip_perceiver(emb, images, labels, sev, qual, steps=steps, seed=seed,
                                     info=dict(source, encoder="ComfyUI CLIP_VISION"))
        model.save(out)
        return str(out), json.dumps(model.info)
