"""The progressive resolution curriculum (paper §3.3): a list of ``resolution:steps`` stages.

Training runs the stages in order (e.g. ``512:400,720:300,960:300``; a side that is not a multiple
of 32, such as 720, is rounded down to one, 704): the objective never changes,
only the side of the square training crops grows, so the LoRA first learns global restoration at
low resolution and then fine detail. Steps are counted globally across stages, so a checkpoint at
step ``n`` names one stage and one position in it, which is what resume needs.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable, Sequence, Union

from ..errors import InputError

logger = logging.getLogger(__name__)

#: Spatial granularity of a training crop: 16x VAE compression times the 2x2 DiT patch.
RESOLUTION_MULTIPLE = 32


@dataclass(frozen=True)
class Stage:
    """One curriculum stage: square crops of ``resolution`` pixels for ``steps`` optimizer steps."""

    resolution: int
    steps: int

    def __str__(self) -> str:
        return f"{self.resolution}:{self.steps}"


StagesLike = Union[str, Sequence[Union[Stage, Sequence[int], str]]]


def _check(stage: Stage) -> Stage:
    if isinstance(stage.resolution, bool) or not isinstance(stage.resolution, int) or stage.resolution < 32:
        raise InputError(f"stage {stage}: resolution must be a whole number of pixels >= 32 (a multiple of "
                         f"{RESOLUTION_MULTIPLE}), got {stage.resolution!r}; e.g. 512, 704, 960")
    if stage.resolution % RESOLUTION_MULTIPLE:
        # 720 (the paper's example) is not a multiple of 32: the DiT needs an even latent side.
        fixed = stage.resolution // RESOLUTION_MULTIPLE * RESOLUTION_MULTIPLE
        logger.info("stage %s: resolution %d rounded down to %d (a multiple of %d)", stage, stage.resolution, fixed,
                    RESOLUTION_MULTIPLE)
        stage = Stage(fixed, stage.steps)
    from ..limits import check_side

    check_side(stage.resolution, f"stage {stage}: the resolution", "Train at a smaller resolution, e.g. 512:400,720:300,960:300")
    if isinstance(stage.steps, bool) or not isinstance(stage.steps, int) or stage.steps < 1:
        raise InputError(f"stage {stage}: steps must be a positive integer, got {stage.steps!r}")
    return stage


def parse_stages(stages: StagesLike) -> list[Stage]:
    """Parse ``"512:400,720:300"`` (or a list of :class:`Stage` / ``(res, steps)`` / ``"res:steps"``).

    Raises :class:`InputError` with the offending item and an example on any malformed stage.
    """
    items: Iterable = stages.replace(" ", "").split(",") if isinstance(stages, str) else stages
    out: list[Stage] = []
    for item in items:
        if isinstance(item, Stage):
            out.append(_check(item))
            continue
        if isinstance(item, str):
            if not item:
                continue
            parts = item.split(":")
            if len(parts) != 2 or not all(p.strip().lstrip("-").isdigit() for p in parts):
                raise InputError(f"bad stage {item!r}: write stages as resolution:steps, e.g. 512:400,720:300,960:300")
            out.append(_check(Stage(int(parts[0]), int(parts[1]))))
            continue
        try:
            res, steps = item
        except (TypeError, ValueError):
            raise InputError(f"bad stage {item!r}: give (resolution, steps) pairs or 'resolution:steps'") from None
        out.append(_check(Stage(int(res), int(steps))))
    if not out:
        raise InputError("no curriculum stages given: e.g. --stages 512:400,720:300,960:300")
    return out


def format_stages(stages: Sequence[Stage]) -> str:
    """The inverse of :func:`parse_stages` (stored in LoRA metadata)."""
    return ",".join(str(s) for s in stages)


def total_steps(stages: Sequence[Stage]) -> int:
    """Optimizer steps of the whole curriculum."""
    return sum(s.steps for s in stages)


def stage_at(stages: Sequence[Stage], step: int) -> tuple[int, Stage]:
    """``(index, stage)`` that global step ``step`` (0-based) belongs to."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    end = 0
    for i, s in enumerate(stages):
        end += s.steps
        if step < end:
            return i, s
    return len(stages) - 1, stages[-1]


def stage_start(stages: Sequence[Stage], index: int) -> int:
    """Global step at which stage ``index`` begins."""
    return sum(s.steps for s in stages[:index])
