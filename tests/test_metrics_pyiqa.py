"""The ``foundir`` protocol equals FoundIR's scoring tool, pyiqa, on real photos.

pyiqa itself is the reference, not copied constants: its metric modules (``pyiqa/archs/psnr_arch.py``,
``ssim_arch.py``, ``utils/color_util.py``, ``matlab_utils``) are loaded from the installed package
by path. ``import pyiqa`` is avoided on purpose: the package ``__init__`` pulls torchvision, which
does not import beside the CPU torch wheel CI uses (DESIGN.md section 5). CI installs pyiqa with
``--no-deps`` (its dependency list would replace torch) and scikit-image, whose bundled sample
photos are the test images. Both are required: a missing one fails this test rather than skipping it.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from vbridge_core.metrics import image_metrics, ssim

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def _load_pyiqa_metrics():
    """pyiqa's PSNR / SSIM classes and its default metric options, without running ``pyiqa/__init__``."""
    spec = importlib.util.find_spec("pyiqa")
    assert spec is not None and spec.submodule_search_locations, (
        "pyiqa is not installed: `pip install --no-deps pyiqa` (see .ci/run); its metric code is the reference")
    root = Path(list(spec.submodule_search_locations)[0])
    saved = {k: v for k, v in sys.modules.items() if k == "pyiqa" or k.startswith("pyiqa.")}
    try:
        for name, folder in (("pyiqa", root), ("pyiqa.utils", root / "utils"), ("pyiqa.archs", root / "archs")):
            pkg = types.ModuleType(name)
            pkg.__path__ = [str(folder)]  # a bare package: its __init__ (torchvision imports) never runs
            sys.modules[name] = pkg
        psnr_arch = importlib.import_module("pyiqa.archs.psnr_arch")
        ssim_arch = importlib.import_module("pyiqa.archs.ssim_arch")
        configs = importlib.import_module("pyiqa.default_model_configs").DEFAULT_CONFIGS
    finally:
        for k in [k for k in sys.modules if k == "pyiqa" or k.startswith("pyiqa.")]:
            del sys.modules[k]
        sys.modules.update(saved)
    classes = {"PSNR": psnr_arch.PSNR, "SSIM": ssim_arch.SSIM}

    def build(name: str):
        opts = dict(configs[name]["metric_opts"])  # pyiqa's own defaults for create_metric(name)
        return classes[opts.pop("type")](**opts).eval()

    return build("psnr"), build("ssim")


@pytest.fixture(scope="module")
def pyiqa_metrics():
    return _load_pyiqa_metrics()


def _photo_pairs():
    """(name, distorted, reference) [1, 3, H, W] float32 0..1 from 8-bit data, as pyiqa loads files."""
    from skimage import data

    g = np.random.default_rng(0)
    pairs = []
    for name in PHOTOS:
        ref8 = getattr(data, name)()
        noisy8 = np.clip(ref8.astype(np.float64) + g.normal(0.0, 25.0, ref8.shape), 0, 255).round().astype(np.uint8)
        # a softer distortion too: a 3x3 box blur plus mild noise
        k = np.ones((3, 3)) / 9.0
        pad = np.pad(ref8.astype(np.float64), ((1, 1), (1, 1), (0, 0)), mode="edge")
        blur = sum(pad[i:i + ref8.shape[0], j:j + ref8.shape[1]] * k[i, j] for i in range(3) for j in range(3))
        soft8 = np.clip(blur + g.normal(0.0, 4.0, ref8.shape), 0, 255).round().astype(np.uint8)

        def t(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(a).permute(2, 0, 1).unsqueeze(0).float() / 255.0

        pairs.append((f"{name}_noisy", t(noisy8), t(ref8)))
        pairs.append((f"{name}_soft", t(soft8), t(ref8)))
    return pairs


def test_foundir_protocol_equals_pyiqa(pyiqa_metrics):
    iqa_psnr, iqa_ssim = pyiqa_metrics
    worst_psnr = worst_ssim = 0.0
    old_gap = []
    for name, dist, ref in _photo_pairs():
        ours = image_metrics(dist, ref, "foundir")
        with torch.no_grad():
            p_ref = float(iqa_psnr(dist, ref))
            s_ref = float(iqa_ssim(dist, ref))
        worst_psnr = max(worst_psnr, abs(float(ours["psnr"]) - p_ref))
        worst_ssim = max(worst_ssim, abs(float(ours["ssim"]) - s_ref))
        if name.endswith("_noisy"):
            old_gap.append(abs(float(ssim(dist, ref, channel="y")) - s_ref))  # BT.601 Y, the previous foundir SSIM
    assert worst_psnr < 1e-4, worst_psnr
    assert worst_ssim < 1e-4, worst_ssim
    # the comparison can fail: the BT.601-luma SSIM is far from pyiqa's on noisy photos
    assert min(old_gap) > 0.01, old_gap
