"""ComfyUI node adapters for V-Bridge. Each node family lives in its own module; the mappings are
collected here. Node modules import ``vbridge_core`` (and torch) lazily, inside the functions, so
importing the pack stays cheap and queries no device.

Inside ComfyUI the pack folder is not on ``sys.path`` (ComfyUI imports it by file location), so the
folder is appended to it when ``vbridge_core`` is not importable otherwise (e.g. not pip-installed).
Appending, not prepending, keeps ComfyUI's own top-level ``nodes`` module first.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_PACK_ROOT = str(Path(__file__).resolve().parents[1])
if importlib.util.find_spec("vbridge_core") is None and _PACK_ROOT not in sys.path:
    sys.path.append(_PACK_ROOT)

from .data_nodes import ImageQualityMetrics, LoadImagePairs  # noqa: E402
from .loader_nodes import LoadVBridge  # noqa: E402
from .perceive_nodes import AutoRestore, PerceiveImage, TrainPerceiver  # noqa: E402
from .restore_nodes import DriftCorrect, RestoreTrajectory  # noqa: E402
from .train_nodes import TrainLoRA, TrainLoRASettings  # noqa: E402
from .video_nodes import RestoreVideo, TrainStabilizer  # noqa: E402

NODE_CLASS_MAPPINGS: dict[str, type] = {
    "LoadVBridge": LoadVBridge,
    "RestoreTrajectory": RestoreTrajectory,
    "DriftCorrect": DriftCorrect,
    "LoadImagePairs": LoadImagePairs,
    "ImageQualityMetrics": ImageQualityMetrics,
    "TrainLoRASettings": TrainLoRASettings,
    "TrainLoRA": TrainLoRA,
    "RestoreVideo": RestoreVideo,
    "TrainStabilizer": TrainStabilizer,
    "PerceiveImage": PerceiveImage,
    "AutoRestore": AutoRestore,
    "TrainPerceiver": TrainPerceiver,
}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {
    "LoadVBridge": "V-Bridge Load Model",
    "RestoreTrajectory": "V-Bridge Restore (Trajectory)",
    "DriftCorrect": "V-Bridge Drift Correct",
    "LoadImagePairs": "V-Bridge Load Image Pairs",
    "ImageQualityMetrics": "V-Bridge Image Quality Metrics",
    "TrainLoRASettings": "V-Bridge LoRA Training Settings",
    "TrainLoRA": "V-Bridge Train LoRA",
    "RestoreVideo": "V-Bridge Restore Video",
    "TrainStabilizer": "V-Bridge Train Stabilizer",
    "PerceiveImage": "V-Bridge Perceive",
    "AutoRestore": "V-Bridge Auto Restore",
    "TrainPerceiver": "V-Bridge Train Perceiver",
}
