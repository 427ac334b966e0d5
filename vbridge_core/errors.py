"""Error types with messages meant for people, not for stack traces.

Every error the pack raises on bad input derives from :class:`VBridgeError`, so the CLI and the
ComfyUI nodes can show the message alone (no traceback) and tests can match on the type.
"""
from __future__ import annotations


class VBridgeError(Exception):
    """Base class: the message says what is wrong and what to change."""


class ModelFileError(VBridgeError):
    """A model file is missing, unreadable or truncated."""


class WrongModelError(VBridgeError):
    """A file was found but it holds another model than the one asked for."""


class LoraMismatchError(VBridgeError):
    """A LoRA does not fit the loaded base model (other architecture or other sizes)."""


class InputError(VBridgeError):
    """An image, frame count, size or option is outside what the pipeline accepts."""


class OutputError(VBridgeError):
    """An output path cannot be written."""


class Cancelled(VBridgeError):
    """The user cancelled a run; nothing half-written is left behind."""
