#!/usr/bin/env python
"""Train the shipped built-in perceiver (``vbridge_core/perceive/perceiver.safetensors``) with one command.

The shipped file (v11, bench/RESULTS.md, stops 23-24) is one ensemble of two ``train-perceiver`` runs on the same
seed, joined by ``merge-perceivers``:

* part **a** (v10): the default recipe plus the nine photos of ``tid2013/`` and ``debian/``; its snow probe is the
  file's snow probe;
* part **b** (v9 with a haze offset): the same plus the 17 photos of ``train/lom-train`` and ``train/ubu-train``,
  with 3 added to its haze logit (``--haze-offset 3``) and no snow probe of its own (``--probe-epochs 0``).

Their statistics and MLP phases run on one thread each, so the two runs share two cores: they are started side by
side, each with ``--threads 1``, and merged when both are done (12-13 min wall on the 2-core dev machine, 19.5 on
a busier day; one after the other they would take about 27 min). The photos come from ``perceiver_photos.py
--train-groups``, which checks each against the SHA-256 of the shipped training; they are written into ``--photos
DIR`` when it lacks them (a folder that has them is used as it is), else into a temporary folder. The result's
weights are compared with the shipped file's, tensor by tensor (the metadata differs: it records each run's
timings).

    python bench/train_builtin_perceiver.py --out FILE [--photos DIR] [--debs DIR] [--keep-parts] [-- ARGS]

``-- ARGS`` are passed to both ``train-perceiver`` runs (before the part's own options, which win), e.g.
``-- --samples 400 --epochs 2`` for a quick look at the plumbing; the result then is not the shipped file.
"""
from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from vbridge_core.errors import InputError  # noqa: E402

logger = logging.getLogger("train_builtin_perceiver")

#: Photo folders (relative to the ``perceiver_photos.py`` output) each part trains with.
PART_PHOTOS: dict[str, tuple[str, ...]] = {
    "a": ("tid2013", "debian"),
    "b": ("tid2013", "debian", "train/lom-train", "train/ubu-train"),
}
#: Each part's own ``train-perceiver`` options (after the photos).
PART_OPTIONS: dict[str, tuple[str, ...]] = {
    "a": (),
    "b": ("--sky-share", "0", "--probe-epochs", "0", "--haze-offset", "3"),
}


def same_weights(a: str | Path, b: str | Path) -> bool:
    """True when two safetensors files hold the same tensor names with bit-identical values (metadata aside)."""
    import torch
    from safetensors import safe_open

    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        return set(fa.keys()) == set(fb.keys()) and all(torch.equal(fa.get_tensor(k), fb.get_tensor(k))
                                                        for k in fa.keys())


def part_command(part: str, photos: Path, out: Path, passthrough: Sequence[str] = ()) -> list[str]:
    """The ``python -m vbridge_core train-perceiver`` command line of one part, one torch thread."""
    return [sys.executable, "-m", "vbridge_core", "train-perceiver", "--threads", "1", *passthrough,
            "--extra-photos", *[str(photos / d) for d in PART_PHOTOS[part]], *PART_OPTIONS[part], "--out", str(out)]


def ensure_photos(photos: Path, debs: Optional[Path]) -> None:
    """Write the recipe's photos into ``photos`` with ``perceiver_photos.py --train-groups`` unless all are there."""
    needed = {d for dirs in PART_PHOTOS.values() for d in dirs}
    if all((photos / d).is_dir() and any((photos / d).iterdir()) for d in needed):
        logger.info("using the photos in %s", photos)
        return
    import perceiver_photos

    args = ["--out", str(photos), "--train-groups", *(["--debs", str(debs)] if debs else [])]
    if perceiver_photos.main(args) != 0:
        raise InputError(f"could not build the training photos in {photos} (perceiver_photos.py said why above); "
                         "pass --debs DIR with the packages, or --photos DIR with a folder it wrote before")


def run_parts(photos: Path, work: Path, passthrough: Sequence[str] = ()) -> dict[str, Path]:
    """Start both parts side by side and wait for both; return part -> file. When one fails the other is stopped
    (no point finishing half a recipe) and the error shows the failed part's log."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # cwd=ROOT puts vbridge_core on `-m`'s path
    procs, files, logs, t0 = {}, {}, {}, time.perf_counter()
    failed: list[str] = []
    try:
        for part in PART_PHOTOS:
            files[part], logs[part] = work / f"part-{part}.safetensors", work / f"part-{part}.log"
            cmd = part_command(part, photos, files[part], passthrough)
            logger.info("part %s: %s", part, " ".join(cmd[1:]))
            with open(logs[part], "w") as log:
                procs[part] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        pending = dict(procs)
        while pending and not failed:
            for part, proc in list(pending.items()):
                rc = proc.poll()
                if rc is not None:
                    del pending[part]
                    logger.info("part %s finished after %.0f s (exit %d)", part, time.perf_counter() - t0, rc)
                    if rc != 0:
                        failed.append(part)
            time.sleep(0.2)
    finally:  # a failed part, an error or Ctrl-C here: stop what still runs
        for part, proc in procs.items():
            if proc.poll() is None:
                proc.terminate()
                proc.wait()
                logger.warning("stopped part %s", part)
    if failed:
        tails = "\n".join(f"--- part {p} ({logs[p]}):\n" + "\n".join(logs[p].read_text().splitlines()[-15:])
                          for p in failed)
        raise InputError(f"train-perceiver failed for part {', '.join(failed)}:\n{tails}")
    return files


def merge_parts(files: dict[str, Path], out: Path) -> Path:
    """``merge-perceivers a b --out OUT``: one ensemble, part a's snow probe, both parts' info."""
    from vbridge_core.perceive.model import Perceiver

    return Perceiver.merged([Perceiver.load(files[p]) for p in PART_PHOTOS]).save(out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough: list[str] = []
    if "--" in argv:
        k = argv.index("--")
        argv, passthrough = argv[:k], argv[k + 1:]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="perceiver file to write (.safetensors)")
    ap.add_argument("--photos", default=None, help="folder written by perceiver_photos.py --train-groups (built "
                    "there if it lacks the recipe's photos; default: a temporary folder)")
    ap.add_argument("--debs", default=None, help="folder holding the .deb files (default: downloaded)")
    ap.add_argument("--keep-parts", action="store_true", help="keep the two parts and their logs next to --out "
                    "(OUT.part-a.safetensors, ...)")
    a = ap.parse_args(argv)
    out = Path(a.out)
    t0 = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            photos = Path(a.photos) if a.photos else Path(tmp) / "photos"
            ensure_photos(photos, Path(a.debs) if a.debs else None)
            t1 = time.perf_counter()
            files = run_parts(photos, Path(tmp), passthrough)
            t2 = time.perf_counter()
            merge_parts(files, out)
            if a.keep_parts:
                for part, f in files.items():
                    for src in (f, f.with_suffix(".log")):
                        os.replace(src, out.with_name(f"{out.stem}.{src.stem}{src.suffix}"))
    except InputError as e:
        logger.error("%s", e)
        return 2
    from vbridge_core.perceive.model import BUILTIN_PATH

    same = same_weights(out, BUILTIN_PATH)
    logger.info("wrote %s in %.0f s (photos %.0f s, the two parts side by side %.0f s, merge %.0f s); its weights %s "
                "the shipped %s", out, time.perf_counter() - t0, t1 - t0, t2 - t1, time.perf_counter() - t2,
                "are bit-identical to" if same else "differ from", BUILTIN_PATH.name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
