#!/usr/bin/env python
"""Build the extra clean photos the shipped perceiver was trained with: ``OUT/tid2013`` and ``OUT/debian``.

The built-in perceiver v6 is the default ``train-perceiver`` recipe plus nine real photos that the bundled
scikit-image set lacks (architecture, boats, a fence, sky, forest, leaves):

* ``tid2013/``: the five TID2013 reference photos (Kodak scans, 512 x 384 BMP) that pyiqa 0.1.16 ships in its
  wheel, copied byte for byte (``pip install --no-deps pyiqa==0.1.16``; ``.ci/run`` installs it);
* ``debian/``: four photos of Debian 12's wallpaper packages (``mate-backgrounds`` 1.26.0-1,
  ``plasma-workspace-wallpapers`` 4:5.27.5-2), 4x area-downscaled to 8-bit PNG so that their JPEG coding
  and sensor detail fall below a pixel. Chosen as real photographs sharp over most of the frame; the other
  four that passed that rule are the benchmark's ``deb-test`` group (bench/RESULTS.md, stop 20).

Each output is checked against the SHA-256 it had when the shipped file was trained (a different JPEG
decoder can change a few pixel values; the script then warns, and a retrain will differ slightly).
The .deb files come from ``--debs DIR`` or, without it, from ``apt-get download`` (Debian/Ubuntu, network).

    python bench/perceiver_photos.py --out DIR [--debs DIR]
    python -m vbridge_core train-perceiver --extra-photos DIR/tid2013 DIR/debian --out FILE   # the shipped recipe
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_perceive import TID2013_PHOTOS, tid2013_folder  # noqa: E402
from vbridge_core.errors import InputError  # noqa: E402
from vbridge_core.images import load_image, save_png  # noqa: E402

logger = logging.getLogger("perceiver_photos")

#: Output name -> (Debian package, file inside it).
DEBIAN_PHOTOS: dict[str, tuple[str, str]] = {
    "Blinds.png": ("mate-backgrounds", "usr/share/backgrounds/mate/nature/Blinds.jpg"),
    "EveningGlow.png": ("plasma-workspace-wallpapers", "usr/share/wallpapers/EveningGlow/contents/images/2560x1600.jpg"),
    "Kite.png": ("plasma-workspace-wallpapers", "usr/share/wallpapers/Kite/contents/images/2560x1600.jpg"),
    "Path.png": ("plasma-workspace-wallpapers", "usr/share/wallpapers/Path/contents/images/2560x1600.jpg"),
}
#: The package versions the shipped file was trained from (Debian 12).
DEBIAN_VERSIONS = {"mate-backgrounds": "1.26.0-1", "plasma-workspace-wallpapers": "4:5.27.5-2"}
#: Downscale factor of the Debian photos.
DOWNSCALE = 4
#: SHA-256 of every output file when the shipped perceiver was trained.
SHA256: dict[str, str] = {
    "tid2013/I03.bmp": "28441215ca5b6358e6267717250a02eeec4fa5ef73ae454870b8426320f980a8",
    "tid2013/I04.bmp": "c8500941a30397bc9e613a297e1286bdb955f49926148f58e7963d6e82b03c9f",
    "tid2013/I06.bmp": "445c2c0fcb47898e9cd8e6de640f2545621d27cbb248c69ef2c84d8204723061",
    "tid2013/I08.bmp": "b5d6738ece811f45f43c5bce425ad5d18d5c78466989001fe1129fcdd08efdab",
    "tid2013/I19.bmp": "b8a2ede827d8db21c45f9ca1fb1c043bcec571b5a7243b4ea1aab3fb4feb7e0b",
    "debian/Blinds.png": "5293da84c442179c841327bca4137cb2af0d6c0ed07f5f408cb87595ad8e54cb",
    "debian/EveningGlow.png": "4d66c83b2179824f8ded3a0133d080116ea70000db9ccecf8753d75c344669bb",
    "debian/Kite.png": "c193c4176946d8d46644dc65705034934b198477c208090137cb0716322cc2ad",
    "debian/Path.png": "064cac1bb218f44d435ed163f69ffe520917e13d18e2810d44cb7c27dc7b591c",
}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def copy_tid2013(out: Path) -> list[Path]:
    """Copy pyiqa's five TID2013 reference photos into ``out`` (byte for byte)."""
    src = tid2013_folder()
    out.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copyfile(src / n, out / n)) for n in TID2013_PHOTOS]


def _find_debs(debs: Path | None, work: Path) -> dict[str, Path]:
    """Package -> .deb file: from ``debs`` if given, else downloaded with apt-get into ``work``."""
    found: dict[str, Path] = {}
    for pkg in DEBIAN_VERSIONS:
        if debs is not None:
            hits = sorted(debs.glob(f"{pkg}_*.deb"))
            if not hits:
                raise InputError(f"--debs {debs}: no {pkg}_*.deb there (apt-get download {pkg})")
            found[pkg] = hits[-1]
            continue
        if shutil.which("apt-get") is None:
            raise InputError(f"apt-get not found: download {pkg}_{DEBIAN_VERSIONS[pkg]}_all.deb from Debian 12 and "
                             "pass its folder with --debs DIR")
        subprocess.run(["apt-get", "download", "-q", pkg], cwd=work, check=True)
        found[pkg] = sorted(work.glob(f"{pkg}_*.deb"))[-1]
    return found


def debian_photos(out: Path, debs: Path | None = None) -> list[Path]:
    """Extract the four Debian wallpaper photos and write them 4x area-downscaled as 8-bit PNG into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        files = _find_debs(debs, work)
        for pkg, deb in files.items():
            if DEBIAN_VERSIONS[pkg] not in deb.name.replace("%3a", ":"):
                logger.warning("%s is not version %s: the photos may differ", deb.name, DEBIAN_VERSIONS[pkg])
            subprocess.run(["dpkg-deb", "-x", str(deb), str(work / pkg)], check=True)
        written = []
        for name, (pkg, inner) in DEBIAN_PHOTOS.items():
            src = work / pkg / inner
            if not src.is_file():
                raise InputError(f"{files[pkg].name} holds no {inner}: use {pkg} {DEBIAN_VERSIONS[pkg]}")
            x = load_image(src)
            h, w = x.shape[-2:]
            small = F.interpolate(x[None], size=(h // DOWNSCALE, w // DOWNSCALE), mode="area")[0]
            written.append(save_png(small, out / name))
    return written


def check(out: Path) -> int:
    """Warn for every output whose SHA-256 differs from the shipped training's; return how many differ."""
    bad = 0
    for rel, want in SHA256.items():
        if _sha256(out / rel) != want:
            logger.warning("%s differs from the photo the shipped perceiver was trained on (another JPEG decoder?): "
                           "a retrain will not be bit-identical", rel)
            bad += 1
    return bad


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder to write tid2013/ and debian/ into")
    ap.add_argument("--debs", default=None, help="folder holding the two .deb files (default: apt-get download)")
    a = ap.parse_args(argv)
    out = Path(a.out)
    try:
        copy_tid2013(out / "tid2013")
        debian_photos(out / "debian", Path(a.debs) if a.debs else None)
    except InputError as e:
        logger.error("%s", e)
        return 2
    bad = check(out)
    logger.info("wrote %s/tid2013 (5 photos) and %s/debian (4 photos)%s; train with: python -m vbridge_core "
                "train-perceiver --extra-photos %s/tid2013 %s/debian --out FILE", out, out,
                f", {bad} differ from the shipped training's" if bad else "", out, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
