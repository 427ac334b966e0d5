"""``python -m vbridge_core benchmark ROOT --out DIR``: restore and score a multi-task test set.

Layouts of ``ROOT`` (detected by their folders):

* ours (what LoadImagePairs reads): ``ROOT/<task>/lq/`` + ``ROOT/<task>/hq/`` (or ``ROOT/lq`` + ``ROOT/hq``);
* the FoundIR test release (``House-Leo/FoundIR``): ``ROOT/<NNTask>/LQ/`` + ``ROOT/<NNTask>/GT/``
  (``01Blur`` ... ``20Lowlight_Noise_JPEG``), or its two downloads unpacked side by side,
  ``ROOT/LQ/<task>/`` + ``ROOT/GT/<task>/``, or one task as ``ROOT/LQ`` + ``ROOT/GT``.

Every LQ image is restored once (seed ``seed + index`` in the sorted list of all tasks, as one
``restore`` call over them would) into ``DIR/<task>/<stem>.png``, then scored against its reference
with :func:`vbridge_core.metrics.image_metrics` (``--protocol foundir``: PSNR on RGB, SSIM on Y;
``release``: the authors' Y and RGB variants), beside the score of the LQ input itself (before).
Writes ``--json`` (default ``DIR/benchmark.json``: ``{"tasks": {NAME: {"psnr", "ssim", "n", "lq":
{...}}}, "mean": {...}, "images": {...}}``; ``mean`` averages the tasks, each task counting once,
as the paper's average column) and ``DIR/benchmark.md`` (a Markdown table in the paper's task order).

Runs data-parallel under ``torchrun`` / ``accelerate launch`` like ``restore`` (each process restores
and scores its share; rank 0 merges and writes the reports); ``--skip-existing`` resumes an
interrupted run (existing outputs are scored, not restored again); ``--limit N`` takes the first
N pairs of each task for a quick run.
"""
from __future__ import annotations

import argparse
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from .cli_common import IMAGE_EXTS, HelpFormatter
from .errors import InputError
from .validate import float_arg

logger = logging.getLogger("vbridge_core")

#: The FoundIR test set's 20 task folders in the paper's order (Table 1 of FoundIR; V-Bridge reports these).
FOUNDIR_TASKS = ("01Blur", "02Blur_Noise", "03Blur_JPEG", "04Blur_Noise_JPEG", "05Noise", "06JPEG", "07Noise_JPEG",
                 "08Haze", "09Lowlight_Haze", "10Rain", "11Raindrop", "12NightRain", "13Rain_Haze", "14Lowlight",
                 "15Lowlight_Blur", "16Lowlight_Noise", "17Lowlight_JPEG", "18Lowlight_Blur_Noise",
                 "19Lowlight_Blur_JPEG", "20Lowlight_Noise_JPEG")


@dataclass(frozen=True)
class BenchPair:
    """One test image: its task, stem, LQ input and HQ reference."""

    task: str
    stem: str
    lq: Path
    hq: Path

    @property
    def name(self) -> str:
        return f"{self.task}/{self.stem}"


def _images(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(folder.iterdir())
            if p.is_file() and p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".")}


def _pair_folder(task: str, lq: Path, hq: Path, problems: list[str]) -> list[BenchPair]:
    a, b = _images(lq), _images(hq)
    lonely = sorted(set(a) ^ set(b))
    if lonely:
        problems.append(f"{task}: {len(lonely)} image(s) without a partner in {lq.name}/ and {hq.name}/, e.g. "
                        f"{', '.join(lonely[:5])}")
    return [BenchPair(task, s, a[s], b[s]) for s in sorted(set(a) & set(b))]


def _dirs(p: Path) -> list[Path]:
    return sorted(q for q in p.iterdir() if q.is_dir() and not q.name.startswith("."))


def find_benchmark(root: str | Path) -> tuple[str, list[BenchPair]]:
    """``(layout, pairs)`` of a test set folder (see the module docstring); ``layout`` is ``foundir`` or ``pairs``."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"benchmark folder {root} not found")
    problems: list[str] = []
    pairs: list[BenchPair] = []
    if (root / "LQ").is_dir() and (root / "GT").is_dir():
        lq_tasks = {d.name: d for d in _dirs(root / "LQ")}
        if lq_tasks:  # the two downloads side by side: LQ/<task>/, GT/<task>/
            for t, d in lq_tasks.items():
                if not (root / "GT" / t).is_dir():
                    problems.append(f"LQ/{t}/ has no GT/{t}/")
                    continue
                pairs += _pair_folder(t, d, root / "GT" / t, problems)
        else:
            pairs += _pair_folder(root.name, root / "LQ", root / "GT", problems)
        layout = "foundir"
    elif any((d / "LQ").is_dir() and (d / "GT").is_dir() for d in _dirs(root)):
        for d in _dirs(root):
            if (d / "LQ").is_dir() and (d / "GT").is_dir():
                pairs += _pair_folder(d.name, d / "LQ", d / "GT", problems)
        layout = "foundir"
    else:
        from .pairs import scan_pairs

        ps = scan_pairs(root)
        pairs = [BenchPair(i.task, i.stem, i.lq_path, i.hq_path) for i in ps]
        layout = "pairs"
    if problems:
        raise InputError(f"benchmark {root} does not match up:\n- " + "\n- ".join(problems))
    if not pairs:
        raise InputError(f"no test pairs in {root}: expected task folders with LQ/ and GT/ (FoundIR) or lq/ and hq/")
    return layout, pairs


def limit_per_task(pairs: Sequence[BenchPair], limit: int) -> list[BenchPair]:
    """The first ``limit`` pairs of each task (in the sorted order they were found)."""
    seen: dict[str, int] = {}
    kept = []
    for p in pairs:
        seen[p.task] = seen.get(p.task, 0) + 1
        if seen[p.task] <= limit:
            kept.append(p)
    return kept


def task_order(tasks: Sequence[str]) -> list[str]:
    """The paper's order for FoundIR tasks, then the others by name."""
    known = [t for t in FOUNDIR_TASKS if t in tasks]
    return known + sorted(t for t in tasks if t not in FOUNDIR_TASKS)


def score_pair(restored_path: Path, pair: BenchPair, protocol: str) -> dict[str, Any]:
    """Metrics of one restored image and of its LQ input (``lq``: None when its size differs from the reference)."""
    from .images import load_image
    from .metrics import image_metrics

    hq = load_image(pair.hq)
    out = load_image(restored_path)
    if out.shape != hq.shape:
        raise InputError(f"{pair.name}: restored {tuple(out.shape[1:])} and reference {tuple(hq.shape[1:])} differ "
                         "in size")
    after = {k: float(v) for k, v in image_metrics(out[None], hq[None], protocol).items()}
    lq = load_image(pair.lq)
    before = {k: float(v) for k, v in image_metrics(lq[None], hq[None], protocol).items()} \
        if lq.shape == hq.shape else None
    return dict(after, lq=before)


def _mean(xs: Sequence[float]) -> float:
    return math.fsum(xs) / len(xs) if xs else float("nan")


def summarize_scores(scores: dict[str, dict[str, Any]], pairs: Sequence[BenchPair]) -> dict[str, Any]:
    """Per-task means (``n`` images; ``lq``: the inputs' means) and the mean over tasks."""
    by_task: dict[str, list[dict[str, Any]]] = {}
    for p in pairs:
        by_task.setdefault(p.task, []).append(scores[p.name])
    keys = [k for k in next(iter(scores.values())) if k != "lq"]
    tasks: dict[str, Any] = {}
    for t in task_order(list(by_task)):
        rows = by_task[t]
        entry: dict[str, Any] = {k: _mean([r[k] for r in rows]) for k in keys}
        entry["n"] = len(rows)
        lq_rows = [r["lq"] for r in rows if r["lq"] is not None]
        entry["lq"] = {k: _mean([r[k] for r in lq_rows]) for k in keys} if len(lq_rows) == len(rows) else None
        tasks[t] = entry
    mean: dict[str, Any] = {k: _mean([e[k] for e in tasks.values()]) for k in keys}
    mean["n"] = sum(e["n"] for e in tasks.values())
    mean["tasks"] = len(tasks)
    mean["lq"] = {k: _mean([e["lq"][k] for e in tasks.values()]) for k in keys} \
        if all(e["lq"] is not None for e in tasks.values()) else None
    return {"tasks": tasks, "mean": mean}


def markdown_table(summary: dict[str, Any]) -> str:
    """The scores as a Markdown table: one row per task in the paper's order, LQ (before) beside restored."""
    keys = [k for k in summary["mean"] if k not in ("n", "tasks", "lq")]
    fmt = {k: (".2f" if k.startswith("psnr") else ".4f") for k in keys}
    head = ["task", "n"] + [f"{k.upper()} LQ" for k in keys] + [f"{k.upper()} restored" for k in keys]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]

    def row(name: str, e: dict[str, Any]) -> str:
        lq = [format(e["lq"][k], fmt[k]) if e["lq"] else "n/a" for k in keys]
        return "| " + " | ".join([name, str(e["n"])] + lq + [format(e[k], fmt[k]) for k in keys]) + " |"
    lines += [row(t, e) for t, e in summary["tasks"].items()]
    lines.append(row(f"**mean of {summary['mean']['tasks']} tasks**", summary["mean"]))
    return "\n".join(lines)


def add_benchmark_parser(sub, add_model_args: Callable[..., None], add_sampler_args: Callable[..., None]) -> None:
    """Register ``benchmark`` on the CLI's subparsers."""
    b = sub.add_parser("benchmark", formatter_class=HelpFormatter,
                       help="restore and score a multi-task test set (FoundIR layout or task/lq+hq folders)",
                       description=__doc__.split("\n\n")[0])
    b.add_argument("root", metavar="ROOT", help="test set: task folders with LQ/ and GT/ (FoundIR) or lq/ and hq/")
    b.add_argument("--out", required=True, metavar="DIR", help="restored images go to DIR/<task>/, reports to DIR")
    b.add_argument("--json", metavar="FILE", help="JSON report (default DIR/benchmark.json)")
    b.add_argument("--protocol", choices=["foundir", "release"], default="foundir",
                   help="foundir: PSNR on RGB, SSIM on Y (FoundIR's pyiqa); release: the authors' Y and RGB variants")
    b.add_argument("--limit", type=int, default=None, metavar="N", help="first N pairs of each task (quick runs)")
    b.add_argument("--tasks", default=None, help="comma-separated task names to run (default: all)")
    b.add_argument("--lora", metavar="FILE", help="V-Bridge restoration LoRA (.safetensors)")
    b.add_argument("--lora-strength", type=float_arg("--lora-strength"), default=1.0, help="restoration LoRA strength")
    b.add_argument("--drift-lora", metavar="FILE", help="drift-correction LoRA: refines each restored image")
    b.add_argument("--drift-strength", type=float_arg("--drift-strength"), default=1.0, help="drift-correction LoRA strength")
    b.add_argument("--drift-frames", type=int, default=None, help="frames of the drift trajectory (default: --frames)")
    b.add_argument("--drift-steps", type=int, default=None, help="steps of the drift pass (default: --steps)")
    add_model_args(b)
    add_sampler_args(b)
    from .parallel_restore import add_skip_existing_arg

    add_skip_existing_arg(b)


def cmd_benchmark(a: argparse.Namespace) -> int:
    """Handle ``benchmark`` (see the module docstring)."""
    from .cli import plan_restore_outputs
    from .fileio import write_json_atomic, write_text_atomic
    from .parallel import SharedProgress, image_area, process_group, split_by_cost
    from .parallel_restore import load_pipeline, restore_share, sampler_settings, steps_per_pass

    if a.limit is not None and a.limit < 1:
        raise InputError("--limit must be at least 1")
    layout, pairs = find_benchmark(a.root)
    if a.tasks:
        wanted = [t.strip() for t in a.tasks.split(",") if t.strip()]
        unknown = sorted(set(wanted) - {p.task for p in pairs})
        if unknown:
            raise InputError(f"--tasks: no task(s) {unknown} in {a.root}; it has {sorted({p.task for p in pairs})}")
        pairs = [p for p in pairs if p.task in wanted]
    if a.limit:
        pairs = limit_per_task(pairs, a.limit)
    names = [p.name for p in pairs]
    out = plan_restore_outputs(a, [p.lq for p in pairs], names=names)
    group = process_group(a.device)
    kw = sampler_settings(a)
    shares = split_by_cost([image_area(p.lq) for p in pairs], group.world)
    mine = shares[group.rank]
    todo = [i for i in mine if not (a.skip_existing and (out / f"{names[i]}.png").is_file())]
    drift = dict(frames=a.drift_frames or kw["frames"], steps=a.drift_steps or kw["steps"]) if a.drift_lora else None
    total = group.sum_int(len(todo) * (steps_per_pass(kw) + (steps_per_pass(dict(kw, **drift)) if drift else 0)))
    if group.is_main:
        logger.info("benchmark %s (%s layout): %d images in %d task(s), %d process(es)", a.root, layout, len(pairs),
                    len({p.task for p in pairs}), group.world)
    progress = SharedProgress(group, total, "benchmark")
    info: dict[str, Any] = {}
    if todo:
        pipe = load_pipeline(a, group.device)
        info = restore_share(pipe, [p.lq for p in pairs], todo, out, kw, restore=True, drift=drift,
                             save_trajectory=a.save_trajectory, progress=progress, names=names)
    progress.finish()
    scores = {names[i]: score_pair(out / f"{names[i]}.png", pairs[i], a.protocol) for i in mine}
    gathered = group.all_gather(dict(scores=scores, info=info, restored=len(todo), device=str(group.device)))
    if group.is_main:
        all_scores = {k: v for g in gathered for k, v in g["scores"].items()}
        summary = summarize_scores(all_scores, pairs)
        report = dict(summary, protocol=a.protocol, layout=layout, root=str(a.root), limit=a.limit,
                      world_size=group.world, images_per_rank=[len(s) for s in shares],
                      restored_per_rank=[g["restored"] for g in gathered], sampler=dict(kw),
                      lora=a.lora, drift_lora=a.drift_lora, dit=a.dit, vae=a.vae, model=a.model,
                      restore_info=next((g["info"].get("restore_info") for g in gathered if g["info"]), None),
                      images={n: all_scores[n] for n in names})
        write_json_atomic(Path(a.json) if a.json else out / "benchmark.json", report)
        table = markdown_table(summary)
        write_text_atomic(out / "benchmark.md", f"Benchmark {a.root} ({a.protocol} protocol)\n\n{table}\n")
        print(table)
    group.barrier()
    return 0
