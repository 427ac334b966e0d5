"""Weight patches from LoRA files that are not Linear LoRAs: ``diff``, ``diff_b``, norm and conv keys.

Why this module exists
----------------------
Many Wan LoRAs made for ComfyUI (extracted accelerator LoRAs, LyCORIS norm training, LoRAs with
trained biases) carry more than ``lora_down``/``lora_up`` pairs on Linear layers. ComfyUI's
``comfy/lora.py`` (``load_lora`` + ``calculate_weight``, ``comfy/weight_adapter/lora.py``) applies
them as patches of the base weights, and so do we, with the same arithmetic:

* ``<x>.diff``        ``weight += strength * diff`` (a full-rank weight delta; norms, modulation tables)
* ``<x>.diff_b``      ``bias   += strength * diff_b``
* ``<x>.w_norm`` / ``<x>.b_norm``  the same for a norm layer's weight / bias
* ``<x>.set_weight``  ``weight = set_weight`` (strength is ignored, as in ComfyUI)
* a ``lora_down``/``lora_up`` pair on a non-Linear weight (the Conv3d ``patch_embedding``):
  ``weight += strength * alpha / rank * (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)``

ComfyUI keeps one patch per weight per file, the last of ``lora``, ``w_norm``, ``diff``,
``set_weight`` (and ``diff_b`` over ``b_norm`` for the bias); the reader in :mod:`.lora` follows
that order.

How patches live beside peft adapters
-------------------------------------
Linear LoRAs stay peft adapters (switchable without touching the base). A patch has to change the
base tensor itself, so the original of every patched tensor is kept (on the CPU) and the tensor is
recomputed as ``original + sum(strength * delta)`` over the *active* adapters whenever the active
set changes (:func:`sync_patches`). Switching between the restoration and the drift adapter
therefore swaps their patches too, and removing an adapter restores the original tensors exactly.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Mapping

import torch

logger = logging.getLogger(__name__)

#: kinds of patch, in ComfyUI's order of precedence (a later kind replaces an earlier one on one weight)
PATCH_KINDS = ("lora", "w_norm", "diff", "set")

_PATCHES_ATTR = "_vbridge_param_patches"      # adapter name -> {param name: ParamPatch}
_ORIGINALS_ATTR = "_vbridge_param_originals"  # param name -> original tensor (CPU)
_APPLIED_ATTR = "_vbridge_param_applied"      # the (param, adapter, strength) set last written


@dataclass(frozen=True)
class ParamPatch:
    """One patch of one base tensor (see the module docstring for the arithmetic).

    ``tensor`` is the diff / the new value / the LoRA ``up``; ``down`` and ``alpha`` only for
    ``kind == "lora"`` (``alpha`` None means scale 1, as in ComfyUI).
    """

    kind: str
    tensor: torch.Tensor
    down: torch.Tensor | None = None
    alpha: float | None = None

    def fits(self, shape: torch.Size) -> bool:
        """Whether this patch can be applied to a tensor of ``shape`` (ComfyUI skips it otherwise)."""
        if self.kind == "lora":
            assert self.down is not None
            return (int(self.tensor.shape[0]) == int(shape[0]) and self.down.shape[0] == self.tensor.shape[1]
                    and self.tensor.shape[0] * self.down[0].numel() == torch.Size(shape).numel())
        return tuple(self.tensor.shape) == tuple(shape)

    def shape_text(self) -> str:
        if self.kind == "lora":
            assert self.down is not None
            return f"LoRA {tuple(self.tensor.shape)} x {tuple(self.down.shape)}"
        return f"{self.kind} {tuple(self.tensor.shape)}"

    def delta(self, shape: torch.Size, strength: float) -> torch.Tensor:
        """``strength`` times this patch's weight delta, fp32 (not for ``set``)."""
        if self.kind == "lora":
            assert self.down is not None
            rank = int(self.down.shape[0])
            scale = 1.0 if self.alpha is None else self.alpha / rank
            d = self.tensor.float().flatten(1) @ self.down.float().flatten(1)
            return (strength * scale) * d.reshape(shape)
        return strength * self.tensor.float()


def split_param_name(name: str) -> tuple[str, str]:
    """``blocks.0.attn1.to_q.bias`` -> (``blocks.0.attn1.to_q``, ``bias``); ``scale_shift_table`` -> ("", it)."""
    mod, _, attr = name.rpartition(".")
    return mod, attr


def find_param(transformer: torch.nn.Module, name: str) -> torch.nn.Parameter | None:
    """The tensor a patch targets, looking through peft's wrapper (``base_layer``) if one was injected."""
    mod_name, attr = split_param_name(name)
    try:
        mod = transformer.get_submodule(mod_name) if mod_name else transformer
    except AttributeError:
        return None
    if hasattr(mod, "get_base_layer"):
        mod = mod.get_base_layer()
    p = getattr(mod, attr, None)
    return p if isinstance(p, torch.Tensor) else None


def _registry(transformer: torch.nn.Module, attr: str) -> dict:
    d = transformer.__dict__.get(attr)
    if d is None:
        d = {}
        transformer.__dict__[attr] = d
    return d


def patch_adapters(transformer: torch.nn.Module) -> list[str]:
    """Names of the adapters that carry weight patches."""
    return list(_registry(transformer, _PATCHES_ATTR))


def add_patches(transformer: torch.nn.Module, adapter_name: str, patches: Mapping[str, ParamPatch]) -> None:
    """Register ``patches`` under ``adapter_name`` (not applied until :func:`sync_patches`)."""
    if patches:
        _registry(transformer, _PATCHES_ATTR)[adapter_name] = dict(patches)
        transformer.__dict__.pop(_APPLIED_ATTR, None)  # new contents under a maybe known name: rewrite


def drop_patches(transformer: torch.nn.Module, adapter_name: str) -> None:
    """Forget the patches of ``adapter_name`` (the next :func:`sync_patches` restores the tensors)."""
    if _registry(transformer, _PATCHES_ATTR).pop(adapter_name, None) is not None:
        transformer.__dict__.pop(_APPLIED_ATTR, None)


def sync_patches(transformer: torch.nn.Module, active: Mapping[str, float]) -> None:
    """Set every patched tensor to its original plus the patches of the ``active`` adapters.

    Does nothing when the active patches are the ones already written. Runs outside inference mode
    (ComfyUI executes nodes inside it) so the parameters stay ordinary tensors.
    """
    registry = _registry(transformer, _PATCHES_ATTR)
    originals: dict[str, torch.Tensor] = _registry(transformer, _ORIGINALS_ATTR)
    wanted: dict[str, list[tuple[ParamPatch, float]]] = {}
    signature = []
    for adapter, strength in active.items():
        for pname, patch in registry.get(adapter, {}).items():
            wanted.setdefault(pname, []).append((patch, float(strength)))
            signature.append((pname, adapter, float(strength)))
    signature = tuple(sorted(signature, key=lambda s: (s[0], s[1])))
    if transformer.__dict__.get(_APPLIED_ATTR) == signature:
        return
    with torch.inference_mode(False), torch.no_grad():
        for pname in sorted(set(originals) | set(wanted)):
            p = find_param(transformer, pname)
            if p is None:  # the model changed under us; nothing to restore into
                originals.pop(pname, None)
                continue
            if pname not in originals:
                originals[pname] = p.detach().to("cpu", copy=True)
            orig = originals[pname]
            if pname not in wanted:
                p.data.copy_(orig.to(device=p.device, dtype=p.dtype))
                del originals[pname]
                continue
            value = orig.to(device=p.device, dtype=torch.float32)
            for patch, strength in wanted[pname]:
                if patch.kind == "set":
                    value = patch.tensor.to(device=p.device, dtype=torch.float32).reshape(p.shape).clone()
                else:
                    value = value + patch.delta(p.shape, strength).to(p.device)
            p.data.copy_(value.to(p.dtype))
    transformer.__dict__[_APPLIED_ATTR] = signature
    if wanted:
        logger.debug("weight patches active on %d tensors (%s)", len(wanted), ", ".join(sorted(active)))
