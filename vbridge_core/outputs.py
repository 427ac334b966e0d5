"""Output planning that protects the user's files: checked before any model loads or any work starts.

Every command that writes files plans its outputs first and refuses, with one message that says what
to change, when

- an output would replace one of the run's own input files (``restore photos/ --out photos/``,
  ``train --out X --restoration-lora X``) or the output folder holds one of the inputs;
- two outputs of the run would get the same name (inputs ``a.png`` and ``a_base.png`` with a drift
  pass: both would write ``a_base.png``), compared case-insensitively, as macOS and Windows do;
- an output file path is an existing folder, or a folder path is an existing file.

The output folder itself is *not* created here: it appears with the first file written (see
:func:`vbridge_core.fileio.atomic_path`), so a run that fails before writing leaves no empty folder.

:func:`clean_stale_temporaries` removes the hidden temporaries an earlier run left when it was killed
(``kill -9``, power loss): only files of our own naming whose writing process is gone.
:class:`OutputLog` records which outputs of a batch were written, so a failure part-way (a full disk)
says which are complete and which are not.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Optional, Sequence

from .errors import InputError, OutputError

logger = logging.getLogger(__name__)

#: Temporary names written by :func:`vbridge_core.fileio.atomic_path`: ``.<name>.<pid>.<random>.tmp<suffix>``.
TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.(?P<rand>[A-Za-z0-9_]+)\.tmp(?P<suffix>\.[A-Za-z0-9]+)?$")
#: The older naming, without the writer's process id: ``.<name>.<random>.tmp<suffix>``.
LEGACY_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<rand>[a-z0-9_]{8})\.tmp(?P<suffix>\.[A-Za-z0-9]+)?$")
#: A temporary younger than this is left alone even when its process looks gone (another machine
#: writing to a shared folder has process ids this one cannot see).
STALE_AFTER_SECONDS = 60.0
#: A temporary of the older naming (no process id) counts as stale after this long.
LEGACY_STALE_AFTER_SECONDS = 3600.0


def _key(path: Path) -> str:
    """Comparison key of a path: resolved and case-folded (case-insensitive file systems)."""
    return str(Path(os.path.abspath(path))).casefold()


def check_output_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
    """``path`` as a folder that can be created or written, without creating it.

    Refuses an existing file of that name and a folder whose nearest existing parent is read-only.
    """
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise OutputError(f"{flag} {p} is a file, not a folder: give an output directory")
    probe = p
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.is_file():
        raise OutputError(f"cannot create output directory {p} ({flag}): {probe} is a file. Choose another folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(f"output directory {p} ({flag}) is not writable ({probe} is read-only): choose a writable "
                          f"folder or fix its permissions")
    return p


def check_output_file(path: str | os.PathLike, flag: str = "--out") -> Path:
    """``path`` as a file that can be written: not an existing folder, in a folder that can be made."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise OutputError(f"{flag} {p} is an existing folder: give a file name inside it, e.g. "
                          f"{p / ('my_model' + (p.suffix or '.safetensors'))}")
    check_output_dir(p.parent, flag=f"the folder of {flag}")
    return p


def refuse_overwriting_inputs(outputs: Mapping[str, Path | str], inputs: Mapping[str, Optional[Path | str]]) -> None:
    """Refuse when an output path (``{what: path}``) is one of the input files (``{flag: path}``).

    Compares resolved, case-folded paths, so ``--out x.safetensors --restoration-lora ./X.safetensors``
    is caught too (and hard links to the same file by inode).
    """
    for what, out in outputs.items():
        o = Path(out)
        for flag, src in inputs.items():
            if src is None:
                continue
            s = Path(src)
            same = _key(o) == _key(s)
            if not same and o.exists() and s.exists():
                try:
                    same = os.path.samefile(o, s)
                except OSError:
                    same = False
            if same:
                raise InputError(f"{what} {o} is also the input {flag}: writing it would replace that file. "
                                 f"Choose another output name")


def check_single_output(path: str | os.PathLike, inputs: Sequence[Path | str], flag: str) -> Path:
    """A single output file (a ``--json`` report, a trained file): writable, and none of ``inputs``."""
    out = check_output_file(path, flag)
    refuse_overwriting_inputs({flag: out}, {f"input {p}": p for p in inputs})
    return out


def refuse_inputs_in_output_dir(out: str | os.PathLike, inputs: Sequence[Path], flag: str = "--out") -> None:
    """Refuse an output folder that holds one of the inputs (outputs would mix with, or replace, them)."""
    o = _key(Path(out))
    for p in inputs:
        if _key(Path(p).parent) == o:
            raise InputError(f"{flag} {out} holds the input {p}: the outputs would be written among (and could "
                             f"replace) your input images. Choose another output folder, e.g. {Path(out) / 'restored'}")


def restore_output_names(stem: str, *, base: bool, trajectory: bool) -> list[str]:
    """The relative output names ``restore`` writes for an input of file stem ``stem``.

    ``base``: a drift pass follows, so the restoration output is kept as ``<stem>_base``;
    ``trajectory``: each output also gets ``<name>_trajectory.png`` and a ``<name>_trajectory/`` folder.
    """
    kinds = [stem] + ([f"{stem}_base"] if base else [])
    names: list[str] = []
    for k in kinds:
        names.append(f"{k}.png")
        if trajectory:
            names += [f"{k}_trajectory.png", f"{k}_trajectory/"]
    return names


def plan_outputs(sources: Mapping[str, Sequence[str]], out: str | os.PathLike,
                 inputs: Sequence[Path] = ()) -> dict[str, str]:
    """Check a run's planned outputs; returns ``{output name: source}``.

    ``sources`` maps each input (a display name) to the output names, relative to ``out``, it would
    write (folders end with ``/``). Raises :class:`InputError` when two inputs would write the same
    name or when an output would replace an input file.
    """
    seen: dict[str, tuple[str, str]] = {}
    plan: dict[str, str] = {}
    for src, names in sources.items():
        for name in names:
            k = name.rstrip("/").casefold()
            if k in seen and seen[k][0] != src:
                other, oname = seen[k]
                raise InputError(f"inputs {other} and {src} would both write {Path(out) / name.rstrip('/')} "
                                 f"(as {oname} and {name}): rename one of them, or restore them in separate runs "
                                 f"with different --out folders")
            seen[k] = (src, name)
            plan[name] = src
    input_keys = {_key(p): p for p in inputs}
    for name in plan:
        target = Path(out) / name.rstrip("/")
        if _key(target) in input_keys:
            raise InputError(f"output {target} would replace the input {input_keys[_key(target)]}; choose another "
                             f"output folder")
    return plan


def existing_outputs(out: str | os.PathLike, names: Iterable[str]) -> list[str]:
    """The planned output names (files only) that already exist in ``out``."""
    return [n for n in names if not n.endswith("/") and (Path(out) / n).exists()]


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists, owned by someone else
    return True


def clean_stale_temporaries(folder: str | os.PathLike, recursive: bool = True, now: Optional[float] = None) -> list[Path]:
    """Delete the hidden temporaries an interrupted earlier run left in ``folder``; returns them.

    Only names of our own pattern (``.<name>.<pid>.<random>.tmp<suffix>``) are touched, and only when
    the process that wrote one no longer exists and the file is older than
    :data:`STALE_AFTER_SECONDS`; the older naming without a process id after
    :data:`LEGACY_STALE_AFTER_SECONDS`. A missing folder is fine (nothing to clean).
    """
    root = Path(folder)
    if not root.is_dir():
        return []
    now = time.time() if now is None else now
    removed: list[Path] = []
    it = root.rglob(".*.tmp*") if recursive else root.glob(".*.tmp*")
    for p in it:
        try:
            if not p.is_file() or p.is_symlink():
                continue
            age = now - p.stat().st_mtime
        except OSError:
            continue
        m = TEMP_RE.match(p.name)
        if m:
            stale = age > STALE_AFTER_SECONDS and not _pid_alive(int(m.group("pid")))
        else:
            stale = bool(LEGACY_TEMP_RE.match(p.name)) and age > LEGACY_STALE_AFTER_SECONDS
        if stale:
            try:
                p.unlink()
                removed.append(p)
            except OSError as e:
                logger.warning("could not remove the stale temporary %s: %s", p, e)
    if removed:
        logger.info("removed %d temporary file(s) an interrupted earlier run left in %s", len(removed), root)
    return removed


@dataclass
class OutputLog:
    """Which outputs of a batch were written; turns a failure part-way into one clear message.

    ``with log.item(name): write...`` records ``name`` as written when the block succeeds. An
    ``OSError`` (disk full, permissions) or :class:`OutputError` inside becomes an :class:`OutputError`
    that says how many of the batch were written, which, and which were not.
    """

    planned: list[str]
    out: Path
    written: list[str] = field(default_factory=list)

    @contextlib.contextmanager
    def item(self, name: str) -> Iterator[None]:
        """Record ``name`` as written when the block succeeds; turn a write failure into the batch message."""
        try:
            yield
        except (OSError, OutputError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise OutputError(f"{reason}. {self.summary(name)}") from None
        self.written.append(name)

    def summary(self, failed: str) -> str:
        rest = [n for n in self.planned if n not in self.written]
        shown = ", ".join(self.written[:10]) + (" ..." if len(self.written) > 10 else "")
        missing = ", ".join(rest[:10]) + (" ..." if len(rest) > 10 else "")
        return (f"{len(self.written)} of {len(self.planned)} outputs were written to {self.out}"
                f"{' (' + shown + ')' if self.written else ''}; not written: {missing} "
                f"(failed at {failed})")

