"""Folders of LQ/HQ image pairs: scanning, loading and a side-by-side preview.

Layout: ``folder/lq/`` and ``folder/hq/`` holding images with matching file stems (the extensions
may differ: ``a.jpg`` in ``lq/`` pairs with ``a.png`` in ``hq/``), and/or one level of task
subfolders ``folder/<task>/lq/`` + ``folder/<task>/hq/``. Pairs are never dropped silently: an
image without a partner, two images with one stem, or a task folder missing ``lq/`` or ``hq/``
makes :func:`scan_pairs` fail with every problem listed.
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from .cli_common import IMAGE_EXTS
from .errors import InputError

logger = logging.getLogger(__name__)

#: How many names of each problem an error message lists before "and N more".
_LIST_LIMIT = 20


@dataclass(frozen=True)
class PairItem:
    """One LQ/HQ pair: its task (the task subfolder name, or the folder's own name), stem and files."""

    task: str
    stem: str
    lq_path: Path
    hq_path: Path

    @property
    def name(self) -> str:
        """``task/stem``: unique within a :class:`PairSet`."""
        return f"{self.task}/{self.stem}"


@dataclass
class PairSet:
    """The pairs found in a folder (``VBRIDGE_PAIRS`` in ComfyUI). Images load on demand."""

    root: Path
    items: list[PairItem] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[PairItem]:
        return iter(self.items)

    @property
    def tasks(self) -> list[str]:
        """Task names in order of first appearance."""
        return list(dict.fromkeys(i.task for i in self.items))

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lq, hq)`` of pair ``index`` as ``[3, H, W]`` float tensors in 0..1."""
        from .images import load_image

        item = self.items[index]
        return load_image(item.lq_path), load_image(item.hq_path)

    def summary(self) -> str:
        """One line per task with its pair count, after a total line."""
        counts = {t: sum(1 for i in self.items if i.task == t) for t in self.tasks}
        lines = [f"{len(self.items)} pairs in {len(counts)} task(s) from {self.root}"]
        lines += [f"  {t}: {n} pairs" for t, n in counts.items()]
        return "\n".join(lines)


def _images_by_stem(folder: Path, problems: list[str], where: str) -> dict[str, Path]:
    found: dict[str, list[Path]] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."):
            found.setdefault(p.stem, []).append(p)
    dup = {s: ps for s, ps in found.items() if len(ps) > 1}
    for s, ps in sorted(dup.items()):
        problems.append(f"{where}: several files named {s!r} ({', '.join(p.name for p in ps)}); keep one")
    return {s: ps[0] for s, ps in found.items()}


def _names(xs: list[str]) -> str:
    shown = ", ".join(xs[:_LIST_LIMIT])
    return shown + (f" and {len(xs) - _LIST_LIMIT} more" if len(xs) > _LIST_LIMIT else "")


def _scan_task(task: str, base: Path, rel: str, problems: list[str]) -> list[PairItem]:
    lq = _images_by_stem(base / "lq", problems, f"{rel}lq/")
    hq = _images_by_stem(base / "hq", problems, f"{rel}hq/")
    only_lq = sorted(set(lq) - set(hq))
    only_hq = sorted(set(hq) - set(lq))
    if only_lq:
        problems.append(f"{rel}lq/ has no HQ partner in {rel}hq/ for: {_names(only_lq)}")
    if only_hq:
        problems.append(f"{rel}hq/ has no LQ partner in {rel}lq/ for: {_names(only_hq)}")
    if not lq and not hq:
        problems.append(f"{rel}lq/ and {rel}hq/ hold no images ({', '.join(IMAGE_EXTS)})")
    return [PairItem(task, s, lq[s], hq[s]) for s in sorted(set(lq) & set(hq))]


def scan_pairs(folder: str | os.PathLike) -> PairSet:
    """Find every LQ/HQ pair under ``folder`` (see the module docstring for the layout).

    Raises :class:`InputError` when the folder is missing, holds no pairs, or anything would be
    left unpaired; the message lists each problem (file names included).
    """
    if folder is None or not str(folder).strip():
        raise InputError("no pairs folder given: enter the path of a folder with lq/ and hq/ subfolders")
    root = Path(str(folder).strip()).expanduser()
    if not root.is_dir():
        raise InputError(f"pairs folder {root} not found (expected a folder with lq/ and hq/ subfolders, "
                         "or task subfolders each holding lq/ and hq/)")
    problems: list[str] = []
    items: list[PairItem] = []

    def has(d: Path, sub: str) -> bool:
        return (d / sub).is_dir()

    if has(root, "lq") or has(root, "hq"):
        if has(root, "lq") and has(root, "hq"):
            items += _scan_task(root.name, root, "", problems)
        else:
            problems.append(f"{root} has {'lq/' if has(root, 'lq') else 'hq/'} but no "
                            f"{'hq/' if has(root, 'lq') else 'lq/'} folder")
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and p.name not in ("lq", "hq")
                      and not p.name.startswith(".")):
        if has(sub, "lq") and has(sub, "hq"):
            items += _scan_task(sub.name, sub, f"{sub.name}/", problems)
        elif has(sub, "lq") or has(sub, "hq"):
            problems.append(f"{sub.name}/ has {'lq/' if has(sub, 'lq') else 'hq/'} but no "
                            f"{'hq/' if has(sub, 'lq') else 'lq/'} folder")
    if problems:
        raise InputError(f"image pairs in {root} do not match up:\n- " + "\n- ".join(problems))
    if not items:
        raise InputError(f"no image pairs found in {root}: expected lq/ and hq/ subfolders with images of matching "
                         "names, or task subfolders (e.g. denoise/lq, denoise/hq)")
    logger.info("found %d pairs in %s", len(items), root)
    return PairSet(root, items)


def folder_fingerprint(folder: str | os.PathLike) -> str:
    """A hash of the image files (names, sizes, mtimes) under ``folder``, two levels deep.

    Changes whenever a pair is added, removed or replaced; ``""`` for a missing folder.
    """
    root = Path(str(folder).strip()).expanduser() if folder else None
    if root is None or not root.is_dir():
        return ""
    h = hashlib.sha1()
    for p in sorted(root.glob("**/*")):
        if p.is_file() and p.suffix.lower() in IMAGE_EXTS and len(p.relative_to(root).parts) <= 3:
            st = p.stat()
            h.update(f"{p.relative_to(root)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def preview_pairs(pairs: PairSet, max_pairs: int = 8, max_side: int = 256, gap: int = 4) -> torch.Tensor:
    """``[N, 3, h, 2w + gap]``: LQ | HQ side by side for the first ``max_pairs`` pairs.

    Every image is resized to one common size: the first HQ image's size scaled so its longer side
    is at most ``max_side`` (rounded to even pixels). The gap between LQ and HQ is white.
    """
    from .images import resize_image

    if not len(pairs):
        raise InputError("no pairs to preview")
    n = min(max_pairs, len(pairs))
    loaded = [pairs.load(i) for i in range(n)]
    h0, w0 = loaded[0][1].shape[-2:]
    scale = min(1.0, max_side / max(h0, w0))
    h, w = max(2, round(h0 * scale / 2) * 2), max(2, round(w0 * scale / 2) * 2)
    rows = []
    for lq, hq in loaded:
        sep = torch.ones(3, h, gap)
        rows.append(torch.cat([resize_image(lq, (h, w)), sep, resize_image(hq, (h, w))], dim=-1))
    return torch.stack(rows)

