"""``python -m vbridge_core perceive``, ``train-perceiver``, ``lora-tasks`` and the ``restore --auto`` hook.

* ``perceive IMAGES... [--json FILE]``: per image the top degradation, every label's probability,
  severities and the quality tier (built-in perceiver, or ``--perceiver FILE`` with ``--clip-vision``
  for a CLIP perceiver);
* ``train-perceiver``: the built-in perceiver from degradations of the bundled photos, or a CLIP
  perceiver (``--kind clip --clip-vision FILE``) from degradations or from task folders (``--tasks DIR``);
* ``lora-tasks FILE [--set TASKS] [--sidecar]``: show or declare the tasks a LoRA covers;
* ``restore --auto --lora-dir DIR``: each image restored by the LoRA covering its degradation.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from .cli_common import HelpFormatter, collect_inputs
from .errors import InputError
from .validate import float_arg

logger = logging.getLogger("vbridge_core")


def add_perceive_parsers(sub) -> None:
    """Register ``perceive``, ``train-perceiver``, ``merge-perceivers`` and ``lora-tasks`` on the CLI's subparsers."""
    fmt = HelpFormatter
    p = sub.add_parser("perceive", formatter_class=fmt,
                       help="rate images: degradation (noise, blur, jpeg, haze, low_light, rain, snow, clean), "
                       "severity and quality tier")
    p.add_argument("inputs", nargs="+", metavar="IMAGES", help="images or folders of images")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    _add_perceiver_args(p)

    t = sub.add_parser("train-perceiver", formatter_class=fmt,
                       help="train the built-in perceiver, or a CLIP perceiver (few-shot from task folders)")
    t.add_argument("--out", required=True, metavar="FILE", help="perceiver file to write (.safetensors)")
    t.add_argument("--kind", choices=["builtin", "clip"], default="builtin",
                   help="builtin: statistics + small MLP (no model files); clip: prompts in a CLIP vision space")
    t.add_argument("--tasks", metavar="DIR", help="(clip) pair folder with task subfolders (<task>/lq, <task>/hq): "
                   "each task's LQ images are examples of the degradation its name says, HQ images of clean")
    t.add_argument("--clip-vision", metavar="FILE", help="(clip) CLIP vision model: ComfyUI's clip_vision_h.safetensors "
                   "or a transformers folder")
    t.add_argument("--samples", type=int, default=None, help="degraded training crops (default: builtin 36000, "
                   "clip 400 when no --tasks)")
    t.add_argument("--epochs", type=int, default=120, help="(builtin) passes over the training features")
    t.add_argument("--probe-epochs", type=int, default=None, help="(builtin) passes of the snow probe, a small conv "
                   "net that tells snow from clean, over its crops (default 8; 0 = statistics only, minutes faster)")
    t.add_argument("--hard-snow-share", type=float_arg("--hard-snow-share", min=0, max=1), default=None,
                   help="(builtin) share of the probe's clean crops added again as snow with opaque, hard-edged "
                   "flakes and streaks drawn on (default 0; with the v3 recipe 0.5 found such snow 97 %% of the time "
                   "instead of ~50 %%, but called more clean texture snow: bench/RESULTS.md)")
    t.add_argument("--snow-pair-share", type=float_arg("--snow-pair-share", min=0, max=1), default=None,
                   help="(builtin) share of the probe's clean crops added again with degrade.py snow of random "
                   "parameters, so the probe sees the same background with and without flakes (default 0.5, "
                   "SNOW_PAIR_SHARE in vbridge_core/perceive/train.py: the shipped file's)")
    t.add_argument("--probe-decision", type=float_arg("--probe-decision", min=0, max=1), default=None,
                   help="(builtin) the snow probe says snow above this probability of its training mix (default 0.65, "
                   "PROBE_DECISION in vbridge_core/perceive/train.py; 0.5 with --snow-pair-share 0 makes the v3 probe)")
    t.add_argument("--sky-share", type=float_arg("--sky-share", min=0, max=1), default=None,
                   help="(builtin) clean crops of procedural blue skies added to the snow probe's training crops, as a "
                   "share of --samples, so flakes on a clear sky are not taken for clouds (default 1/24: 1500 with "
                   "36000 samples, SKY_SHARE in vbridge_core/perceive/train.py, the shipped file's; 0 = none)")
    t.add_argument("--haze-offset", type=float_arg("--haze-offset", min=-10, max=10), default=None,
                   help="(builtin) added to the fitted MLPs' haze logit, so weak or patchy haze is called haze "
                   "rather than clean (default 0, HAZE_LOGIT_OFFSET in vbridge_core/perceive/train.py: the shipped "
                   "file's; 4 found most missed haze but read clean flat sky as haze: bench/RESULTS.md)")
    t.add_argument("--extra-photos", nargs="+", metavar="PATH", default=None,
                   help="(builtin) your own clean photos (files or folders, each at least 128 px a side) added to "
                   "the training photos, so content the bundled photos lack (architecture, fences, water, ...) "
                   "is learned as clean; they must carry no visible degradation (the shipped file: the nine photos of "
                   "bench/perceiver_photos.py)")
    t.add_argument("--steps", type=int, default=300, help="(clip) prompt-learning steps")
    t.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest for these small batches)")
    t.add_argument("--device", default="cpu", help="(clip) device of the CLIP vision model")
    t.add_argument("--seed", type=int, default=0, help="seed")

    m = sub.add_parser("merge-perceivers", formatter_class=fmt,
                       help="join built-in perceiver files into one: all their MLPs in one ensemble (files trained on "
                       "different photos included), the first snow probe")
    m.add_argument("inputs", nargs="+", metavar="FILE", help="two or more built-in perceiver files")
    m.add_argument("--out", required=True, metavar="FILE", help="perceiver file to write (.safetensors)")

    s = sub.add_parser("lora-tasks", formatter_class=fmt,
                       help="show or declare which tasks (degradations) a restoration LoRA covers, for restore --auto")
    s.add_argument("loras", nargs="+", metavar="FILE", help="LoRA files (.safetensors) or folders of them")
    s.add_argument("--set", metavar="TASKS", help="comma-separated tasks, e.g. denoise or gaussian_noise,jpeg or all")
    s.add_argument("--sidecar", action="store_true", help="with --set: write <name>.tasks.json next to the file "
                   "instead of rewriting the LoRA's metadata")


def _add_perceiver_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("perceiver")
    g.add_argument("--perceiver", metavar="FILE", help="perceiver file (default: the built-in one shipped with the "
                   "package); a CLIP perceiver also needs --clip-vision")
    g.add_argument("--clip-vision", metavar="FILE", help="CLIP vision model for a CLIP perceiver "
                   "(clip_vision_h.safetensors or a transformers folder)")


def add_auto_restore_args(r: argparse.ArgumentParser) -> None:
    """``restore --auto``'s flags (added to the restore parser by cli.py)."""
    g = r.add_argument_group("automatic routing (--auto)")
    g.add_argument("--auto", action="store_true", help="perceive each image and restore it with the LoRA in "
                   "--lora-dir whose tasks cover its degradation; clean images are copied unchanged")
    g.add_argument("--lora-dir", metavar="DIR", help="(--auto) folder of restoration LoRAs with declared tasks")
    g.add_argument("--force-restore", action="store_true", help="(--auto) also restore images rated clean (with "
                   "the LoRA of their strongest degradation)")
    _add_perceiver_args(g)  # type: ignore[arg-type]


def perceive_function(perceiver: Optional[str], clip_vision: Optional[str],
                      device: str = "cpu") -> Callable[[Sequence[Any], Sequence[str]], list]:
    """``fn(images, names) -> reports`` for the built-in perceiver, a built-in file, or a CLIP perceiver file."""
    from .perceive.model import Perceiver

    if perceiver is None:
        if clip_vision:
            raise InputError("--clip-vision is used with a CLIP perceiver file: give --perceiver FILE too "
                             "(train one with `train-perceiver --kind clip`)")
        p = Perceiver.builtin()
        return p.perceive
    from safetensors import safe_open

    path = Path(perceiver)
    if not path.is_file():
        raise InputError(f"--perceiver {path} not found")
    try:
        with safe_open(str(path), "pt") as f:
            fmt = (f.metadata() or {}).get("format")
    except Exception as e:
        raise InputError(f"--perceiver {path} is not a readable safetensors file: {e}") from None
    if fmt == "vbridge-perceiver-clip":
        from .perceive.clip import ClipPerceiver, hf_clip_embedder, load_clip_vision

        if not clip_vision:
            raise InputError(f"{path.name} is a CLIP perceiver: give --clip-vision FILE (the CLIP vision model it was "
                             "trained with, e.g. clip_vision_h.safetensors)")
        cp = ClipPerceiver.load(path)
        emb = hf_clip_embedder(load_clip_vision(clip_vision, device=device))
        return lambda images, names: cp.perceive(images, emb, names)
    return Perceiver.load(path).perceive


def format_table(reports: Sequence[Any]) -> str:
    """One line per image: file, degradation (+ other labels present), severity, quality."""
    head = f"{'file':<32} {'degradation':<12} {'p':>5} {'also present':<22} {'severity':>8}  quality"
    lines = [head, "-" * len(head)]
    for r in reports:
        also = [f for f in r.present() if f != r.degradation]
        sev = r.severity.get(r.degradation, 0.0)
        lines.append(f"{str(r.file)[-32:]:<32} {r.degradation:<12} {r.scores[r.degradation]:>5.2f} "
                     f"{','.join(also)[:22]:<22} {sev:>8.2f}  {r.quality} ({r.quality_score:.2f})")
    return "\n".join(lines)


def cmd_perceive(a: argparse.Namespace) -> int:
    from .fileio import write_text_atomic
    from .images import load_image

    paths = collect_inputs(a.inputs)
    if a.json:
        from .outputs import check_single_output

        check_single_output(a.json, paths, "--json")  # e.g. `perceive *.png --json x.png` must not replace x.png
    fn = perceive_function(a.perceiver, a.clip_vision)
    reports = []
    for p in paths:  # one at a time: a folder of large photos never sits in memory at once
        reports += fn([load_image(p)], [str(p)])
    print(format_table(reports))
    if a.json:
        # the schema's own key order (file, degradation, scores, severity, quality, quality_score)
        write_text_atomic(a.json, json.dumps({"images": [r.to_dict() for r in reports]}, indent=2) + "\n")
        logger.info("wrote %s", a.json)
    return 0


def cmd_merge_perceivers(a: argparse.Namespace) -> int:
    """``merge-perceivers FILE FILE ... --out FILE``: :meth:`~.perceive.model.Perceiver.merged`, written atomically."""
    from .perceive.model import Perceiver

    merged = Perceiver.merged([Perceiver.load(f) for f in a.inputs])
    merged.save(a.out)
    logger.info("wrote %s: %d MLPs from %d files, snow probe %s", a.out, len(merged.net.members), len(a.inputs),
                "kept" if merged.probe is not None else "none")
    return 0


def cmd_train_perceiver(a: argparse.Namespace) -> int:
    if a.kind == "builtin":
        if a.tasks or a.clip_vision:
            raise InputError("--tasks and --clip-vision are for --kind clip; the built-in perceiver trains on "
                             "degraded photos only")
        from .perceive.train import DEFAULT_SAMPLES, train_builtin

        recipe_opts = {"probe_epochs": a.probe_epochs, "hard_snow_share": a.hard_snow_share,
                       "snow_pair_share": a.snow_pair_share, "probe_decision": a.probe_decision,
                       "sky_share": a.sky_share, "haze_offset": a.haze_offset, "extra": a.extra_photos}
        _, info = train_builtin(a.out, seed=a.seed, count=a.samples or DEFAULT_SAMPLES, epochs=a.epochs,
                                threads=a.threads,  # options not given keep train_builtin's defaults
                                **{k: v for k, v in recipe_opts.items() if v is not None})
        logger.info("built-in perceiver: %s", info)
        return 0
    if a.extra_photos:
        raise InputError("--extra-photos is for the built-in perceiver (--kind builtin); the CLIP perceiver learns "
                         "clean from the HQ images of --tasks")
    if not a.clip_vision:
        raise InputError("--kind clip needs --clip-vision FILE (ComfyUI's models/clip_vision/clip_vision_h.safetensors "
                         "or a transformers CLIP vision folder)")
    import torch

    from .perceive.clip import examples_from_task_folders, hf_clip_embedder, load_clip_vision, train_clip_perceiver

    if a.threads:
        torch.set_num_threads(a.threads)
    emb = hf_clip_embedder(load_clip_vision(a.clip_vision, device=a.device))
    if a.tasks:
        images, labels, sev, qual = examples_from_task_folders(a.tasks)
        source = {"tasks": str(a.tasks)}
    else:
        from .perceive.synth import clean_photos, make_samples

        samples = make_samples(clean_photos("train"), a.samples or 400, seed=a.seed, size=224)
        images = [s.image for s in samples]
        labels = [s.families or ["clean"] for s in samples]
        sev = [s.severity for s in samples]
        qual = [s.quality for s in samples]
        source = {"degradations": "vbridge_core.degrade on the bundled photos", "samples": len(samples)}
    model = train_clip_perceiver(emb, images, labels, sev, qual, steps=a.steps, seed=a.seed,
                                 info=dict(source, encoder=Path(a.clip_vision).name))
    model.save(a.out)
    logger.info("wrote CLIP perceiver %s (%d examples)", a.out, len(images))
    return 0


def cmd_lora_tasks(a: argparse.Namespace) -> int:
    from .perceive.routing import read_lora_tasks, sidecar_path

    files: list[Path] = []
    for item in map(Path, a.loras):
        files += sorted(item.glob("*.safetensors")) if item.is_dir() else [item]
    for f in files:
        if not f.is_file():
            raise InputError(f"LoRA file {f} not found")
    if a.set is not None:
        tasks = [t.strip() for t in a.set.split(",") if t.strip()]
        from .perceive.routing import _families

        if not tasks or not _families(tasks):
            raise InputError(f"--set {a.set!r} names no degradation the perceiver knows; use task names such as "
                             "denoise, deblur, jpeg, dehaze, low_light, derain, desnow (or degrade names, or all)")
        for f in files:
            if a.sidecar:
                from .fileio import write_json_atomic

                write_json_atomic(sidecar_path(f), {"tasks": tasks})
            else:
                stamp_lora_tasks(f, tasks)
    for f in files:
        t = read_lora_tasks(f)
        if t is None:
            print(f"{f.name}: drift-correction LoRA (not used by restore --auto)")
        else:
            print(f"{f.name}: tasks {', '.join(t.tasks) or '(none declared)'} -> families "
                  f"{', '.join(t.families) or '(none)'} [{t.source}]")
    return 0


def stamp_lora_tasks(path: str | Path, tasks: Sequence[str]) -> Path:
    """Rewrite a LoRA file (atomically) with ``vbridge.tasks`` set; tensors and other metadata unchanged."""
    from safetensors import safe_open

    from .fileio import save_safetensors_atomic

    p = Path(path)
    with safe_open(str(p), "pt") as f:
        meta = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta["vbridge.tasks"] = json.dumps(list(tasks), sort_keys=True)
    meta.setdefault("vbridge.format_version", "1")
    return save_safetensors_atomic(tensors, p, metadata=meta)


def cmd_restore_auto(a: argparse.Namespace, sampler_kwargs: dict[str, Any]) -> int:
    """``restore --auto``: perceive, route per image, restore, write outputs and the per-image report."""
    import time

    from .fileio import write_json_atomic, write_text_atomic
    from .images import load_image, save_png
    from .outputs import OutputLog
    from .perceive.routing import auto_restore, scan_lora_dir
    from .pipeline import VBridgePipeline
    from .cli_common import parse_dtype

    if not a.lora_dir:
        raise InputError("--auto needs --lora-dir DIR (restoration LoRAs whose tasks are declared; see lora-tasks)")
    if getattr(a, "lora", None):
        raise InputError("--auto picks a LoRA per image from --lora-dir; leave out --lora")
    if getattr(a, "drift_lora", None):
        raise InputError("--auto does not run drift correction; run `drift-correct` on its outputs afterwards")
    loras = scan_lora_dir(a.lora_dir)
    paths = collect_inputs(a.inputs)
    from .cli import plan_restore_outputs

    out = plan_restore_outputs(a, paths)
    images = [load_image(p) for p in paths]
    names = [p.name for p in paths]
    fn = perceive_function(a.perceiver, a.clip_vision)
    # plan first (cheap): a folder with no matching LoRA fails before the 5B model loads
    from .perceive.routing import plan_routes

    plan_routes(fn(images, names), loras, force=a.force_restore)
    pipe = VBridgePipeline.from_files(a.model, dit=a.dit, vae=a.vae, device=a.device, dtype=parse_dtype(a.dtype),
                                      text_encoder=a.text_encoder, tokenizer=a.tokenizer, vae_tiling=a.vae_tiling,
                                      offload=a.offload, accelerator_lora=getattr(a, "accelerator_lora", None),
                                      accelerator_strength=getattr(a, "accelerator_strength", 1.0))
    pipe.maybe_compile(a.compile)
    kw = dict(sampler_kwargs)
    seed = kw.pop("seed", 0)
    kw.pop("batch_size", None)
    t0 = time.perf_counter()
    res = auto_restore(pipe, images, names, loras, fn, force=a.force_restore, strength=a.lora_strength, seed=seed,
                       on_image=lambda d, n: logger.info("auto restore: %d/%d images", d, n), **kw)
    log = OutputLog([p.name for p in paths], out)
    for p, img in zip(paths, res.images):
        with log.item(p.name):
            save_png(img, out / f"{p.stem}.png")
    table = res.table()
    print(table)
    write_text_atomic(out / "auto_restore_report.txt", table + "\n")
    write_json_atomic(out / "auto_restore_report.json", {"images": res.rows, "sampler": dict(kw, seed=seed),
                                                         "lora_dir": str(a.lora_dir),
                                                         "seconds": round(time.perf_counter() - t0, 3)})
    logger.info("wrote %d image(s) and auto_restore_report.json to %s", len(paths), out)
    return 0
