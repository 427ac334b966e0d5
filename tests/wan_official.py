"""Import the official Wan2.2 modules (PyPI ``wan22``) for reference tests, without its heavy package init.

``wan/__init__.py`` pulls optional dependencies (easydict, ftfy, opencv, ...) and its
``flash_attention`` asserts CUDA, so we register bare package objects for ``wan`` and
``wan.modules`` and load only ``attention``, ``model`` and ``vae2_2`` from their files; the model's
``flash_attention`` is replaced by an SDPA equivalent (same masking of padded keys) for CPU tests.
"""
from __future__ import annotations

import importlib.util
import sys
import types

import pytest
import torch
import torch.nn.functional as F


def _sdpa_attention(q, k, v, q_lens=None, k_lens=None, dropout_p=0.0, softmax_scale=None, q_scale=None,
                    causal=False, window_size=(-1, -1), deterministic=False, dtype=torch.bfloat16, version=None):
    """SDPA stand-in for ``wan.modules.attention.flash_attention``: q/k/v are [B, L, N, D]."""
    out_dtype = q.dtype
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if q_scale is not None:
        q = q * q_scale
    mask = None
    if k_lens is not None:
        ar = torch.arange(k.shape[2], device=k.device)
        mask = (ar[None, :] < k_lens[:, None].to(k.device))[:, None, None, :]
    x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=softmax_scale)
    return x.transpose(1, 2).to(out_dtype)


def load_official():
    """Return ``(model_module, vae2_2_module)`` from the installed ``wan22`` package, or skip."""
    if "wan.modules.model" in sys.modules and "wan.modules.vae2_2" in sys.modules:
        return sys.modules["wan.modules.model"], sys.modules["wan.modules.vae2_2"]
    spec = importlib.util.find_spec("wan")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the official Wan2.2 package is not installed (pip install --no-deps wan22)")
    root = list(spec.submodule_search_locations)[0]
    if "wan.modules.model" not in sys.modules:
        for name, path in (("wan", root), ("wan.modules", root + "/modules")):
            if name not in sys.modules or not hasattr(sys.modules[name], "__path__"):
                pkg = types.ModuleType(name)
                pkg.__path__ = [path]
                sys.modules[name] = pkg
        for sub in ("attention", "model", "vae2_2"):
            full = f"wan.modules.{sub}"
            s = importlib.util.spec_from_file_location(full, f"{root}/modules/{sub}.py")
            mod = importlib.util.module_from_spec(s)
            sys.modules[full] = mod
            s.loader.exec_module(mod)
        sys.modules["wan.modules.model"].flash_attention = _sdpa_attention
    return sys.modules["wan.modules.model"], sys.modules["wan.modules.vae2_2"]
