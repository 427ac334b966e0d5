"""The only module that touches ComfyUI (``comfy.*``, ``folder_paths``), always lazily.

Outside ComfyUI (pytest, scripts) every function falls back to plain behaviour: tqdm progress,
no-op cancel checks, and model folders under ``$VBRIDGE_MODELS_DIR`` (default ``./models``).
"""
from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path
from typing import Any, Callable, Optional

logger = logging.getLogger(__name__)

#: Our LoRAs live in this subfolder of ComfyUI's ``loras`` folder.
LORA_SUBFOLDER = "vbridge"


def _try_import(name: str) -> Optional[Any]:
    try:
        return importlib.import_module(name)
    except Exception:  # noqa: BLE001 - any failure means "not inside ComfyUI"
        return None


def in_comfyui() -> bool:
    """True when running inside a ComfyUI process (``folder_paths`` and ``comfy`` importable)."""
    return _try_import("folder_paths") is not None and _try_import("comfy.model_management") is not None


class ProgressBar:
    """ComfyUI's progress bar inside ComfyUI (with an optional preview image), tqdm outside."""

    def __init__(self, total: int, desc: str = "V-Bridge") -> None:
        self.total = total
        utils = _try_import("comfy.utils")
        self._comfy = utils.ProgressBar(total) if utils is not None and in_comfyui() else None
        self._tqdm = None
        if self._comfy is None:
            from tqdm.auto import tqdm

            self._tqdm = tqdm(total=total, desc=desc, leave=False)

    def update_absolute(self, value: int, preview: Any = None, total: Optional[int] = None) -> None:
        """Show ``value`` of ``total`` (default: the total given at creation; a new total is kept).

        Inside ComfyUI this also raises ComfyUI's interrupt exception when Cancel was pressed
        (ComfyUI's progress hook checks it); see :meth:`update_keep_interrupt` for code that must
        react to Cancel itself.
        """
        if total is not None:
            self.total = total
        if self._comfy is not None:
            self._comfy.update_absolute(value, self.total, preview)
        elif self._tqdm is not None:
            if self._tqdm.total != self.total:
                self._tqdm.total = self.total
            self._tqdm.n = value
            self._tqdm.refresh()

    def update_keep_interrupt(self, value: int, preview: Any = None, total: Optional[int] = None) -> None:
        """Like :meth:`update_absolute`, but never raises on Cancel: the interrupt stays pending.

        ComfyUI's progress hook raises (and clears) the interrupt flag when Cancel was pressed. Code
        that must write a checkpoint before stopping (training) polls :func:`interrupt_requested`
        at its own safe points instead, so here the exception is swallowed and the flag set again.
        """
        mm = _try_import("comfy.model_management") if self._comfy is not None else None
        if mm is None:
            self.update_absolute(value, preview, total)
            return
        try:
            self.update_absolute(value, preview, total)
        except mm.InterruptProcessingException:
            mm.interrupt_current_processing(True)

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()


def throw_if_interrupted() -> None:
    """Raise ComfyUI's interrupt exception if the user pressed Cancel; no-op outside ComfyUI."""
    mm = _try_import("comfy.model_management")
    if mm is not None and in_comfyui():
        mm.throw_exception_if_processing_interrupted()


def interrupt_requested() -> bool:
    """True when the user pressed Cancel in ComfyUI (the flag is only read, not cleared); False outside."""
    mm = _try_import("comfy.model_management")
    if mm is not None and in_comfyui() and hasattr(mm, "processing_interrupted"):
        return bool(mm.processing_interrupted())
    return False


def show_text(node_id: Optional[str], text: str) -> None:
    """Show ``text`` on node ``node_id`` in ComfyUI's UI (progress text); logged at debug level outside."""
    if node_id is None or not in_comfyui():
        logger.debug("%s", text)
        return
    server = _try_import("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is None or not hasattr(instance, "send_progress_text"):
        return
    try:
        instance.send_progress_text(text, str(node_id))
    except Exception as e:  # noqa: BLE001 - status text is best effort
        logger.debug("send_progress_text failed: %s", e)


def comfy_base_dir() -> Optional[Path]:
    """ComfyUI's own folder (``folder_paths.base_path``) inside ComfyUI, else None."""
    fp = _try_import("folder_paths")
    base = getattr(fp, "base_path", None) if fp is not None else None
    return Path(base) if base else None


def models_root() -> Path:
    """Root of the model folders outside ComfyUI (``$VBRIDGE_MODELS_DIR`` or ``./models``)."""
    return Path(os.environ.get("VBRIDGE_MODELS_DIR", "models"))


def register_lora_folder() -> None:
    """Make ``models/loras/vbridge`` known to ComfyUI (it is inside ``loras`` already, so LoraLoader
    sees our files as ``vbridge/<name>``); creates the folder when possible."""
    fp = _try_import("folder_paths")
    base = Path(fp.models_dir) / "loras" / LORA_SUBFOLDER if fp is not None else models_root() / "loras" / LORA_SUBFOLDER
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        logger.debug("cannot create %s: %s", base, e)


def lora_output_dir() -> Path:
    """Where trained LoRAs are written: ``<ComfyUI loras folder>/vbridge`` (the first, default ``loras``
    folder, so LoadVBridge and LoraLoader list the file as ``vbridge/<name>.safetensors``);
    ``$VBRIDGE_MODELS_DIR/loras/vbridge`` outside ComfyUI. Not created here."""
    fp = _try_import("folder_paths")
    if fp is not None:
        dirs = fp.get_folder_paths("loras")
        base = Path(dirs[0]) if dirs else Path(fp.models_dir) / "loras"
        return base / LORA_SUBFOLDER
    return models_root() / "loras" / LORA_SUBFOLDER


#: ComfyUI model folder (``models/vbridge_stabilizers``) of the temporal stabilizers for video.
STABILIZER_FOLDER = "vbridge_stabilizers"


def register_stabilizer_folder() -> None:
    """Make ``models/vbridge_stabilizers`` a ComfyUI model folder (``.safetensors`` files), created when possible.

    Inside ComfyUI the folder is added to ``folder_paths`` (kept after any path that
    ``extra_model_paths.yaml`` gave it); outside, it is ``$VBRIDGE_MODELS_DIR/vbridge_stabilizers``.
    """
    fp = _try_import("folder_paths")
    if fp is not None:
        base = Path(fp.models_dir) / STABILIZER_FOLDER
        if STABILIZER_FOLDER not in fp.folder_names_and_paths:
            fp.folder_names_and_paths[STABILIZER_FOLDER] = ([str(base)], {".safetensors"})
        else:
            fp.add_model_folder_path(STABILIZER_FOLDER, str(base))
    else:
        base = models_root() / STABILIZER_FOLDER
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        logger.debug("cannot create %s: %s", base, e)


def stabilizer_output_dir() -> Path:
    """Where trained stabilizers are written: the first ``vbridge_stabilizers`` folder (registered here)."""
    register_stabilizer_folder()
    fp = _try_import("folder_paths")
    if fp is not None:
        dirs = fp.get_folder_paths(STABILIZER_FOLDER)
        return Path(dirs[0]) if dirs else Path(fp.models_dir) / STABILIZER_FOLDER
    return models_root() / STABILIZER_FOLDER


def filename_list(folder: str) -> list[str]:
    """File names ComfyUI knows in ``folder`` (e.g. ``diffusion_models``, ``vae``, ``loras``)."""
    fp = _try_import("folder_paths")
    if fp is not None:
        return list(fp.get_filename_list(folder))
    root = models_root() / folder
    if not root.is_dir():
        return []
    return sorted(str(p.relative_to(root)).replace(os.sep, "/") for p in root.rglob("*.safetensors"))


def full_path(folder: str, name: str) -> Path:
    """Absolute path of ``name`` in ComfyUI's ``folder``; the plain folder outside ComfyUI."""
    fp = _try_import("folder_paths")
    if fp is not None:
        found = fp.get_full_path(folder, name)
        if found:
            return Path(found)
        dirs = fp.get_folder_paths(folder)
        return Path(dirs[0] if dirs else folder) / name
    return models_root() / folder / name


def torch_device() -> Optional[Any]:
    """ComfyUI's compute device inside ComfyUI; ``None`` outside (callers pick CUDA if available, else CPU).

    Queried when called (at execution), never at import.
    """
    mm = _try_import("comfy.model_management")
    if mm is not None and in_comfyui():
        return mm.get_torch_device()
    return None


def make_room() -> None:
    """Inside ComfyUI: unload ComfyUI's own models from the GPU before our model runs.

    ComfyUI's memory manager does not see our model, so models it keeps resident (the umt5 text
    encoder after CLIPTextEncode, for instance) would compete with ours for VRAM. ComfyUI reloads
    them when a later node needs them. No-op outside ComfyUI.
    """
    mm = _try_import("comfy.model_management")
    if mm is not None and in_comfyui():
        mm.unload_all_models()
        mm.soft_empty_cache()


def latent_previewer() -> Optional[Callable[[Any], Any]]:
    """A function turning a normalised Wan2.2 latent ``[B, 48, T, h, w]`` into a ProgressBar preview.

    Inside ComfyUI it uses ComfyUI's own previewer for its ``Wan22`` latent format (TAESD or the
    cheap ``latent_rgb_factors`` projection, as the user's preview setting says) on the last latent
    frame. Returns ``None`` outside ComfyUI or when previews are switched off. A failing preview
    is logged once and then skipped; it never stops sampling.
    """
    if not in_comfyui():
        return None
    lp = _try_import("latent_preview")
    formats = _try_import("comfy.latent_formats")
    if lp is None or formats is None or not hasattr(formats, "Wan22"):
        return None
    fmt = formats.Wan22()
    try:
        previewer = lp.get_previewer(torch_device(), fmt)
    except Exception as e:  # noqa: BLE001 - e.g. a TAESD file that does not fit: fall back to rgb factors
        logger.debug("ComfyUI previewer unavailable (%s); using latent_rgb_factors", e)
        previewer = None
        if getattr(fmt, "latent_rgb_factors", None) is not None and hasattr(lp, "Latent2RGBPreviewer"):
            previewer = lp.Latent2RGBPreviewer(fmt.latent_rgb_factors, getattr(fmt, "latent_rgb_factors_bias", None))
    if previewer is None:
        return None
    failed = []

    def preview(latents: Any) -> Any:
        if failed:
            return None
        try:
            return previewer.decode_latent_to_preview_image("JPEG", latents[:1, :, -1:])
        except Exception as e:  # noqa: BLE001 - previews are best effort
            failed.append(e)
            logger.warning("latent preview failed (%s); continuing without previews", e)
            return None

    return preview


#: ComfyUI model folder (``models/vbridge_perceivers``) of trained perceivers (built-in or CLIP kind).
PERCEIVER_FOLDER = "vbridge_perceivers"


def perceiver_output_dir() -> Path:
    """The first ``vbridge_perceivers`` folder (registered in ComfyUI's folder_paths here, created when possible)."""
    fp = _try_import("folder_paths")
    if fp is not None:
        base = Path(fp.models_dir) / PERCEIVER_FOLDER
        if PERCEIVER_FOLDER not in fp.folder_names_and_paths:
            fp.folder_names_and_paths[PERCEIVER_FOLDER] = ([str(base)], {".safetensors"})
        dirs = fp.get_folder_paths(PERCEIVER_FOLDER)
        base = Path(dirs[0]) if dirs else base
    else:
        base = models_root() / PERCEIVER_FOLDER
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        logger.debug("cannot create %s: %s", base, e)
    return base


def lora_root_dirs() -> list[Path]:
    """Every ``loras`` folder ComfyUI knows (models/loras and those of extra_model_paths.yaml);
    ``$VBRIDGE_MODELS_DIR/loras`` outside ComfyUI."""
    fp = _try_import("folder_paths")
    if fp is not None:
        dirs = [Path(d) for d in fp.get_folder_paths("loras")]
        if dirs:
            return dirs
        return [Path(fp.models_dir) / "loras"]
    return [models_root() / "loras"]
