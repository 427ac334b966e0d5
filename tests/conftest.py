"""Shared fixtures: tiny random-weight Wan2.2 models saved to disk in the real formats."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
logging.getLogger("diffusers").setLevel(logging.ERROR)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A diffusers-style folder (transformer/, vae/) holding the tiny random-weight model."""
    from vbridge_core.tiny import save_tiny_diffusers_folder

    return save_tiny_diffusers_folder(tmp_path_factory.mktemp("tiny_wan") / "Wan2.2-TI2V-tiny")


@pytest.fixture(scope="session")
def tiny_prompt():
    from vbridge_core.tiny import tiny_prompt_embeds

    return tiny_prompt_embeds()


@pytest.fixture
def models_env(monkeypatch, models_root):
    """``$VBRIDGE_MODELS_DIR`` set to the test file's own ``models_root`` fixture (a ComfyUI-like models
    folder, see ``tiny_files.comfy_models_root``); node test files use it for every test via
    ``pytestmark = pytest.mark.usefixtures("models_env")``."""
    monkeypatch.setenv("VBRIDGE_MODELS_DIR", str(models_root))
