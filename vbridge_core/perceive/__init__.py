"""See the degradation, pick the restorer: quality and degradation perception (Perceive-IR, adapted).

* :mod:`.labels`: families (noise, blur, jpeg, haze, low_light, rain, snow + clean), severities, tiers,
  task-name aliases;
* :mod:`.features` + :mod:`.model`: the built-in perceiver (statistics -> small MLP; weights shipped as
  ``perceiver.safetensors``), :func:`perceive` / :class:`Perceiver`;
* :mod:`.synth` + :mod:`.train`: its training data (scikit-image photos degraded by
  :mod:`vbridge_core.degrade`) and training script;
* :mod:`.clip`: the optional CLIP perceiver (prompt learning in CLIP space, few-shot from task folders);
* :mod:`.routing`: ``restore --auto`` (LoRA tasks, routing rule, :func:`~.routing.auto_restore`);
* :mod:`.weighting`: the quality-aware (difficulty-adaptive) training loss weights.
"""
from .labels import FAMILIES, LABELS, TIERS
from .model import Perceiver, PerceptionReport, perceive

__all__ = ["FAMILIES", "LABELS", "TIERS", "Perceiver", "PerceptionReport", "perceive"]
