"""ComfyUI node adapters for V-Bridge. Each node family lives in its own module; the mappings are
collected here. Node modules import ``vbridge_core`` lazily so importing the pack stays cheap."""
from __future__ import annotations

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}
