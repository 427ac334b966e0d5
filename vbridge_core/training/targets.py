"""``--target-modules`` checked against the Wan DiT's real module names, before the model loads.

peft wraps a module when its dotted path equals a target or ends with ``"." + target``; a target that
matches nothing would be ignored (or, when none matches, fail deep inside peft after the 10 GB model
loaded). The names come from diffusers' ``WanTransformer3DModel`` itself, built on the meta device
(no memory), so they follow the installed diffusers version.
"""
from __future__ import annotations

import functools
from typing import Iterable, Optional

import torch

from ..errors import InputError


@functools.lru_cache(maxsize=1)
def wan_module_paths() -> tuple[str, ...]:
    """Dotted paths of every ``nn.Linear`` in the Wan2.2 DiT architecture (one block's worth suffices)."""
    from diffusers import WanTransformer3DModel

    from ..tiny import TINY_TRANSFORMER_CONFIG

    with torch.device("meta"):
        model = WanTransformer3DModel(**dict(TINY_TRANSFORMER_CONFIG, num_layers=1))
    return tuple(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))


def _matches(path: str, target: str) -> bool:
    return path == target or path.endswith("." + target)


def suggested_names(paths: Iterable[str]) -> list[str]:
    """The layer names of one transformer block (``blocks.0.attn1.to_q`` -> ``attn1.to_q``)."""
    return [p.split(".", 2)[2] for p in paths if p.startswith("blocks.0.")]


def check_target_modules(targets: Iterable[str], model: Optional[torch.nn.Module] = None) -> list[str]:
    """Refuse targets that match no linear layer of the Wan DiT (``model``, or the architecture).

    Returns the targets. The message lists the names that exist, so a typo is one edit away.
    """
    targets = [t.strip() for t in targets if str(t).strip()]
    paths = (tuple(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)) if model is not None
             else wan_module_paths())
    missing = [t for t in targets if not any(_matches(p, t) for p in paths)]
    if missing:
        raise InputError(f"--target-modules {','.join(missing)} match{'es' if len(missing) == 1 else ''} no layer of "
                         f"the Wan2.2 DiT. Each block's linear layers are {', '.join(suggested_names(paths))}; a name "
                         f"selects every layer whose path ends with it (to_q: attn1.to_q and attn2.to_q). Default: "
                         f"to_q,to_k,to_v,to_out.0,ffn.net.0.proj,ffn.net.2")
    return targets
