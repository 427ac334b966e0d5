"""Atomic file writes (write to a temporary name beside the target, then rename) and safe output names.

A crash, a cancel or a full disk never leaves a half-written output under the final name. A
user-typed output name (a node's ``output_name``) becomes a plain file name inside one folder.

This module imports torch only for type checking, so :mod:`vbridge_core.train_runtime` stays cheap.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

from .errors import InputError, OutputError

if TYPE_CHECKING:  # pragma: no cover
    import torch

logger = logging.getLogger(__name__)

#: Longest output file stem accepted from a user-typed name.
MAX_NAME_LENGTH = 100
#: Characters kept in an output name; anything else becomes "_".
_NAME_CHARS = re.compile(r"[^A-Za-z0-9._+=@,-]")


def ensure_writable_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` if needed and check that files can be created in it."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create output directory {p}: {e.strerror}. Choose a writable --out directory.") from None
    if not os.access(p, os.W_OK | os.X_OK):
        raise OutputError(f"output directory {p} is not writable. Choose a writable --out directory or fix its permissions.")
    return p


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    target = Path(path)
    ensure_writable_dir(target.parent)
    # the writer's process id in the name lets a later run remove what a killed one left
    # (vbridge_core.outputs.clean_stale_temporaries); the random part keeps concurrent writers apart
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp" + target.suffix,
                               dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600 files; give the output the mode a plain open() would (0666 minus the umask)
        # so other users / the web server can read the images and LoRAs, as with any other tool's output
        with contextlib.suppress(OSError):
            os.chmod(tmp_path, 0o666 & ~_current_umask())
        os.replace(tmp_path, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json_atomic(path: str | os.PathLike, obj: object) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def save_safetensors_atomic(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                            metadata: Mapping[str, str] | None = None) -> Path:
    """Save a safetensors file atomically (contiguous CPU copies of the tensors)."""
    from safetensors.torch import save_file

    data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(data, str(tmp), metadata=dict(metadata) if metadata else None)
    return Path(path)


def safe_output_name(name: Any, what: str, example: str, folder_hint: str, suffix: str = ".safetensors") -> str:
    """A safe file stem from a user-typed ``name``; raises :class:`InputError` for unusable names.

    Surrounding blanks and a trailing ``suffix`` are dropped. Folders are refused outright (``a/b``,
    ``..\\x``, ``../evil``), as are names starting with a dot, so the file always lands in the output
    folder itself. Other unusual characters (spaces, ``:``, ``*`` ...) become ``_``. ``what`` names
    the file kind ("LoRA"), ``example`` is a sample stem and ``folder_hint`` where such files are
    saved (``models/loras/vbridge/``), all for the error messages.
    """
    if not isinstance(name, str):
        raise InputError(f"output_name must be text, got {type(name).__name__}")
    stem = name.strip()
    if stem.lower().endswith(suffix):
        stem = stem[: -len(suffix)].rstrip()
    if not stem:
        raise InputError(f"output_name is empty: type a name for the {what} file, e.g. {example} "
                         f"(it is saved as {folder_hint}{example}{suffix})")
    if "/" in stem or "\\" in stem or stem.startswith(".") or "\x00" in stem:
        raise InputError(f"output_name {name!r} must be a plain file name (no folders, not starting with '.'), "
                         f"e.g. {example}; the {what} is always saved in {folder_hint}")
    clean = _NAME_CHARS.sub("_", stem)
    if clean != stem:
        logger.info("%s name %r saved as %r (only letters, digits and . _ - + = @ , are kept)", what, stem, clean)
    if len(clean) > MAX_NAME_LENGTH:
        raise InputError(f"output_name is {len(clean)} characters long; keep it under {MAX_NAME_LENGTH}")
    return clean


def safe_output_path(folder: str | os.PathLike, name: Any, what: str, example: str, folder_hint: str,
                     suffix: str = ".safetensors") -> Path:
    """``folder/<safe_output_name(name, ...)><suffix>``, checked to lie directly inside ``folder``."""
    base = Path(folder).expanduser().resolve()
    path = (base / (safe_output_name(name, what, example, folder_hint, suffix) + suffix)).resolve()
    if path.parent != base:  # cannot happen after sanitising; kept as the last line of defence
        raise InputError(f"output_name {name!r} would write outside {base}")
    return path
