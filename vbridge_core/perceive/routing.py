"""Route each image to the restoration LoRA that covers what is wrong with it (``restore --auto``).

Which tasks a LoRA covers is read, in this order, from:

1. a sidecar ``<lora stem>.tasks.json`` next to the file (``{"tasks": ["denoise", "deblur"]}``), the
   way to declare tasks for a LoRA you cannot or do not want to rewrite;
2. its metadata: ``vbridge.tasks`` (the task folder names the trainer saw) and ``vbridge.degradations``
   (the ``--degradations`` of a ``--from-clean`` run), both written by ``python -m vbridge_core train``;
   ``python -m vbridge_core lora-tasks FILE --set ...`` stamps them into older files.

Task names map to families with :func:`.labels.task_families` (``denoise`` -> noise, ``gaussian_blur`` ->
blur, ...); ``all`` / ``all_in_one`` / ``multi`` cover every family. Drift-correction LoRAs are skipped.

Rule per image: ``clean`` images pass through unchanged (unless ``force``: then the strongest family
decides); otherwise the LoRAs covering the top degradation are candidates, preferring the one that
also covers most of the other families present, then the most specialised (fewest families), then
the file name. When no LoRA covers it, the LoRA trained on the most tasks (at least two) is used as a
multi-task fallback; with none of those either, the plan fails before any model work with a message
naming the perceived degradation and the tasks available.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from ..errors import InputError
from .labels import FAMILIES, task_families
from .model import PerceptionReport

logger = logging.getLogger(__name__)

ALL_TASKS = ("all", "all_in_one", "allinone", "multi", "multi_task", "universal")


@dataclass
class LoraTasks:
    """A restoration LoRA file and the tasks / families it covers."""

    path: Path
    tasks: list[str]
    families: list[str]
    source: str

    @property
    def name(self) -> str:
        return self.path.name


def sidecar_path(lora: str | Path) -> Path:
    """``<stem>.tasks.json`` next to the LoRA."""
    p = Path(lora)
    return p.with_name(p.stem + ".tasks.json")


def _families(tasks: Sequence[str]) -> list[str]:
    if any(str(t).lower() in ALL_TASKS for t in tasks):
        return list(FAMILIES)
    out: list[str] = []
    for t in tasks:
        out += [f for f in task_families(t) if f not in out]
    return out


def read_lora_tasks(path: str | Path) -> Optional[LoraTasks]:
    """The tasks of one LoRA file (sidecar first, then metadata), ``None`` for a drift-correction LoRA."""
    from safetensors import safe_open

    p = Path(path)
    try:
        with safe_open(str(p), "pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise InputError(f"{p} is not a readable safetensors file: {e}") from None

    def val(key: str) -> Any:
        raw = meta.get("vbridge." + key)
        if raw is None:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return raw

    if val("role") == "drift_correction":
        return None
    side = sidecar_path(p)
    if side.is_file():
        try:
            data = json.loads(side.read_text())
            tasks = data["tasks"] if isinstance(data, dict) else data
            tasks = [str(t) for t in ([tasks] if isinstance(tasks, str) else tasks)]
        except (ValueError, KeyError, TypeError) as e:
            raise InputError(f"{side}: expected {{\"tasks\": [\"denoise\", ...]}}: {e}") from None
        return LoraTasks(p, tasks, _families(tasks), "sidecar")
    tasks: list[str] = []
    for key in ("tasks", "degradations"):
        v = val(key)
        if isinstance(v, str):
            v = [s for s in v.split(",") if s.strip()]
        tasks += [str(t).strip() for t in (v or []) if str(t).strip() and str(t).strip() not in tasks]
    return LoraTasks(p, tasks, _families(tasks), "metadata" if tasks else "none")


def scan_lora_dir(folder: str | Path) -> list[LoraTasks]:
    """Every restoration LoRA (``*.safetensors``) directly in ``folder`` with its tasks, by name."""
    d = Path(folder)
    if not d.is_dir():
        raise InputError(f"--lora-dir {d} is not a folder of LoRA files")
    out = []
    for p in sorted(d.glob("*.safetensors")):
        t = read_lora_tasks(p)
        if t is not None:
            out.append(t)
    if not out:
        raise InputError(f"{d} holds no restoration LoRA (.safetensors); train one with `python -m vbridge_core train`")
    return out


def describe_available(loras: Sequence[LoraTasks]) -> str:
    """``denoise.safetensors: noise (tasks denoise); old.safetensors: no tasks declared`` for messages."""
    parts = []
    for l in loras:
        if l.families:
            parts.append(f"{l.name}: {', '.join(l.families)} (tasks {', '.join(l.tasks)})")
        else:
            parts.append(f"{l.name}: no tasks declared" + (f" (tasks {', '.join(l.tasks)} name no known degradation)"
                                                            if l.tasks else ""))
    return "; ".join(parts)


@dataclass
class Route:
    """The decision for one image: ``lora`` None means pass through unchanged."""

    report: PerceptionReport
    target: str
    lora: Optional[LoraTasks]
    reason: str


def plan_routes(reports: Sequence[PerceptionReport], loras: Sequence[LoraTasks], force: bool = False) -> list[Route]:
    """Decide the LoRA for each perceived image (see the module docstring); raises if one has no LoRA."""
    usable = [l for l in loras if l.families]
    multi = sorted([l for l in usable if len(l.families) >= 2], key=lambda l: (-len(l.families), l.name))
    routes, missing = [], []
    for r in reports:
        if r.degradation == "clean" and not force:
            routes.append(Route(r, "clean", None, "rated clean: passed through unchanged"))
            continue
        target = r.degradation if r.degradation != "clean" else max(FAMILIES, key=lambda f: r.scores[f])
        present = set(r.present()) | {target}
        cands = [l for l in usable if target in l.families]
        if cands:
            best = sorted(cands, key=lambda l: (-len(present & set(l.families)), len(l.families), l.name))[0]
            routes.append(Route(r, target, best, f"{target}: covered by tasks {', '.join(best.tasks)}"))
        elif multi:
            routes.append(Route(r, target, multi[0], f"{target}: no task LoRA covers it; multi-task fallback "
                                                     f"{multi[0].name}"))
        else:
            missing.append((r.file, target))
    if missing:
        shown = "; ".join(f"{f}: {t}" for f, t in missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise InputError(f"no LoRA covers the perceived degradation of {len(missing)} image(s) ({shown}). Available: "
                         f"{describe_available(loras)}. Train a LoRA for it, declare a LoRA's tasks with `python -m "
                         "vbridge_core lora-tasks FILE --set TASKS` (or a <name>.tasks.json sidecar), or add a "
                         "multi-task LoRA")
    return routes


@dataclass
class AutoRestoreResult:
    """Outputs (input order) and one report row per image."""

    images: list[torch.Tensor]
    rows: list[dict[str, Any]] = field(default_factory=list)

    def table(self) -> str:
        """A plain-text table: file, perceived, LoRA, tier before -> after."""
        head = f"{'file':<28} {'perceived':<22} {'LoRA':<28} quality before -> after"
        lines = [head, "-" * len(head)]
        for r in self.rows:
            lines.append(f"{r['file'][:28]:<28} {r['perceived'][:22]:<22} {(r['lora'] or '(passed through)')[:28]:<28} "
                         f"{r['quality_before']} ({r['score_before']:.2f}) -> {r['quality_after']} "
                         f"({r['score_after']:.2f})")
        return "\n".join(lines)


def auto_restore(pipe: Any, images: Sequence[torch.Tensor], names: Sequence[str], loras: Sequence[LoraTasks],
                 perceive_fn: Callable[[Sequence[torch.Tensor], Sequence[str]], list[PerceptionReport]],
                 force: bool = False, strength: float = 1.0, seed: int = 0,
                 on_image: Optional[Callable[[int, int], None]] = None, **sampler: Any) -> AutoRestoreResult:
    """Perceive, plan, restore each image with its LoRA (image i uses ``seed + i``), perceive again.

    The pipeline's own restoration adapter is put back afterwards, so a shared model is left as it
    was. Raises :class:`InputError` before any model work when an image has no LoRA.
    """
    from ..lora import read_lora, remove_lora

    reports = perceive_fn(list(images), list(names))
    routes = plan_routes(reports, loras, force=force)
    outputs: list[Optional[torch.Tensor]] = [None] * len(images)
    previous = dict(pipe.adapters["restoration"]) if "restoration" in pipe.adapters else None
    cache: dict[Path, Any] = {}
    try:
        order = sorted(range(len(images)), key=lambda i: (routes[i].lora.name if routes[i].lora else "", i))
        loaded: Optional[Path] = None
        for done, i in enumerate(order):
            rt = routes[i]
            if rt.lora is None:
                outputs[i] = images[i].clamp(0, 1)
            else:
                if loaded != rt.lora.path:
                    lf = cache.setdefault(rt.lora.path, read_lora(rt.lora.path))
                    pipe.load_lora(lf, role="restoration", strength=strength)
                    loaded = rt.lora.path
                res = pipe.restore([images[i]], seed=seed + i, **sampler)
                outputs[i] = res.final[0]
            if on_image is not None:
                on_image(done + 1, len(images))
    finally:
        if previous is not None:
            pipe.load_lora(previous["file"], role="restoration", strength=previous["strength"])
        elif "restoration" in pipe.adapters:
            remove_lora(pipe.transformer, pipe.adapters.pop("restoration")["name"])
            pipe._activate(None)
    after = perceive_fn([o for o in outputs], list(names))  # type: ignore[misc]
    rows = []
    for rt, a, name in zip(routes, after, names):
        b = rt.report
        rows.append({"file": name, "perceived": b.degradation, "present": b.present(),
                     "scores": {k: round(v, 4) for k, v in b.scores.items()},
                     "lora": rt.lora.name if rt.lora else None, "reason": rt.reason,
                     "quality_before": b.quality, "score_before": round(b.quality_score, 4),
                     "quality_after": a.quality, "score_after": round(a.quality_score, 4),
                     "perceived_after": a.degradation})
    return AutoRestoreResult([o for o in outputs], rows)  # type: ignore[misc]
