"""``LoadImagePairs`` and ``ImageQualityMetrics``: few-shot pair folders and PSNR/SSIM in the graph."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CATEGORY = "V-Bridge/data"
#: This pack's folder (custom_nodes/<pack>/): relative sample paths in the shipped workflows resolve here.
PACK_DIR = Path(__file__).resolve().parents[1]


def resolve_pairs_folder(folder: str) -> str:
    """An existing folder for a (possibly relative) pairs path, independent of the folder ComfyUI started in.

    Absolute paths are kept. A relative path is tried against the current folder, ComfyUI's own folder,
    and this pack: ``custom_nodes/<any pack folder name>/rest`` and plain ``rest`` both resolve to
    ``<pack>/rest``, so the shipped workflows find the sample pairs wherever ComfyUI was started from
    and whatever the pack's folder is called. The first existing candidate wins; if none exists the
    path is returned unchanged (the scan then says it is missing).
    """
    from . import comfy_bridge

    p = Path(folder).expanduser()
    if not folder or p.is_absolute():
        return folder
    candidates = [Path.cwd() / p]
    base = comfy_bridge.comfy_base_dir()
    if base is not None:
        candidates.append(base / p)
    parts = p.parts
    if len(parts) > 2 and parts[0] == "custom_nodes":
        candidates.append(PACK_DIR.joinpath(*parts[2:]))
    candidates.append(PACK_DIR / p)
    for c in candidates:
        if c.is_dir():
            return str(c)
    return folder


class LoadImagePairs:
    """Scan a folder of LQ/HQ pairs (for training and evaluation) and preview them."""

    DESCRIPTION = (
        "Finds the LQ/HQ image pairs in a folder: lq/ and hq/ subfolders with matching file names (the "
        "extensions may differ), and/or one level of task subfolders each holding lq/ and hq/ "
        "(e.g. pairs/denoise/lq, pairs/denoise/hq). Images without a partner are listed in an error instead "
        "of being skipped. Outputs the pair list for the V-Bridge training node, an LQ | HQ preview of the "
        "first 8 pairs and a summary.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("VBRIDGE_PAIRS", "IMAGE", "STRING")
    RETURN_NAMES = ("pairs", "preview", "summary")
    OUTPUT_TOOLTIPS = (
        "The pairs found (files are read when used).",
        "LQ | HQ side by side for up to 8 pairs, resized to one common size.",
        "How many pairs per task.",
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        """One folder path."""
        return {
            "required": {
                "folder": ("STRING", {"default": "", "tooltip": (
                    "Path of a folder with lq/ and hq/ subfolders (matching file stems), optionally one level of "
                    "task subfolders each holding lq/ and hq/. Relative paths are looked up from ComfyUI's folder "
                    "and from this pack (custom_nodes/ComfyUI-VBridge/...), wherever ComfyUI was started.")}),
            }
        }

    @classmethod
    def IS_CHANGED(cls, folder: str) -> str:
        """Re-scan when files are added, removed or replaced in the folder."""
        from vbridge_core.pairs import folder_fingerprint

        return folder_fingerprint(resolve_pairs_folder(folder))

    def load(self, folder: str) -> tuple[Any, Any, str]:
        """Scan ``folder`` and return ``(pairs, preview, summary)``."""
        from vbridge_core.images import bchw_to_comfy
        from vbridge_core.pairs import preview_pairs, scan_pairs

        pairs = scan_pairs(resolve_pairs_folder(folder))
        return pairs, bchw_to_comfy(preview_pairs(pairs)), pairs.summary()


class ImageQualityMetrics:
    """PSNR and SSIM of restored images against references, with a side-by-side comparison."""

    DESCRIPTION = (
        "Measures restored images against references with PSNR and SSIM (data range 1; the Y channel is "
        "BT.601 luma as MATLAB's rgb2ycbcr, the usual restoration-paper convention). One row per image and a "
        "mean. Connect 'degraded' to also score the input and show degraded | restored | reference.")
    CATEGORY = CATEGORY
    FUNCTION = "measure"
    RETURN_TYPES = ("STRING", "IMAGE")
    RETURN_NAMES = ("metrics", "comparison")
    OUTPUT_TOOLTIPS = (
        "A table of PSNR (dB) and SSIM per image, with the mean.",
        "Side by side per image: (degraded |) restored | reference.",
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        """Restored and reference images, metric channels, optional degraded input."""
        return {
            "required": {
                "restored": ("IMAGE", {"tooltip": "Restored images to score."}),
                "reference": ("IMAGE", {"tooltip": (
                    "Ground-truth images, same size as the restored ones: one per restored image, or one for all.")}),
                "psnr_channel": (["rgb", "y"], {"default": "rgb", "tooltip": (
                    "PSNR over all RGB channels, or over the Y (luma) channel.")}),
                "ssim_channel": (["y", "rgb"], {"default": "y", "tooltip": (
                    "SSIM on the Y (luma) channel (common in papers), or the mean over RGB channels.")}),
            },
            "optional": {
                "degraded": ("IMAGE", {"tooltip": (
                    "Optional degraded inputs: scored too and shown left of the restored images.")}),
            },
        }

    def measure(self, restored: Any, reference: Any, psnr_channel: str, ssim_channel: str,
                degraded: Any = None) -> tuple[str, Any]:
        """Return ``(metrics table, comparison IMAGE)``."""
        from vbridge_core.compare import quality_report
        from vbridge_core.images import bchw_to_comfy, comfy_to_bchw

        table, comparison = quality_report(
            comfy_to_bchw(restored), comfy_to_bchw(reference),
            comfy_to_bchw(degraded) if degraded is not None else None,
            psnr_channel=psnr_channel, ssim_channel=ssim_channel)
        return table, bchw_to_comfy(comparison)
