"""ComfyUI-VBridge: ComfyUI entry point. Exports the node mappings only; imports nothing heavy and
queries no device at import time."""
try:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
except ImportError:  # imported as a top-level module (e.g. by pytest's rootdir conftest handling)
    from nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
