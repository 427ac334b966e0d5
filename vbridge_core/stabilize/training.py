"""The accuracy-stability loss, its oracle and collapse bounds, and training learned stabilizers."""
from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from ..errors import InputError
from ..seeds import seeded_generator, wrap_seed
from .files import save_stabilizer
from .frames import as_sequence as _as_sequence
from .mixers import LearnedStabilizer, StabilizerConfig, count_parameters

logger = logging.getLogger("vbridge_core.stabilize")

#: Under this stability weight the perfect outputs minimise the unified loss (paper's oracle bound).
ORACLE_BOUND = 0.5


def collapse_bound(clip_frames: int) -> float:
    """Stability weight above which a constant output minimises the loss on ``clip_frames``-frame clips.

    ``tau - 1``: the number of frames after the (fixed, passed-through) first one.
    """
    if clip_frames < 2:
        raise InputError(f"a training clip needs at least 2 frames, got {clip_frames}")
    return float(clip_frames - 1)


def _l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).abs().mean()


def stabilization_loss(outputs: torch.Tensor, targets: torch.Tensor, stability_weight: float
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unified accuracy-stability loss on ``[B, T, C, H, W]`` (frame 0 is the fixed passed-through one).

    Returns ``(loss, accuracy_term, stability_term)``; see the module docstring for the bounds.
    """
    acc = _l1(outputs[:, 1:], targets[:, 1:])
    stab = _l1(outputs[:, 1:], outputs[:, :-1])
    return acc + stability_weight * stab, acc, stab


@dataclass
class StabilizerClip:
    """One training clip: restorer outputs, clean targets and (optionally) the restorer's inputs, ``[T, C, H, W]``."""

    restored: torch.Tensor
    target: torch.Tensor
    inputs: Optional[torch.Tensor] = None
    name: str = ""

    def check(self) -> "StabilizerClip":
        r = _as_sequence(self.restored, "restored frames")
        y = _as_sequence(self.target, "target frames")
        if r.shape != y.shape:
            raise InputError(f"clip {self.name or ''}: restored {tuple(r.shape)} and target {tuple(y.shape)} differ")
        if r.shape[0] < 2:
            raise InputError(f"clip {self.name or ''}: a training clip needs at least 2 frames, got {r.shape[0]}")
        x = None
        if self.inputs is not None:
            x = _as_sequence(self.inputs, "input frames")
            if x.shape[0] != r.shape[0] or x.shape[-2:] != r.shape[-2:]:
                raise InputError(f"clip {self.name}: inputs {tuple(x.shape)} do not match restored {tuple(r.shape)}")
        return StabilizerClip(r.float(), y.float(), None if x is None else x.float(), self.name)


@dataclass
class TrainStabilizerConfig:
    """Training settings. ``clip_frames`` = tau (window length); the collapse bound is ``tau - 1``."""

    kind: str = "controlled"
    steps: int = 300
    learning_rate: float = 3e-3
    stability_weight: float = 0.4
    clip_frames: int = 5
    crop: int = 64
    batch_size: int = 4
    hidden: int = 24
    kernel_size: int = 5
    use_inputs: Optional[bool] = None  # None: use them when every clip has inputs
    seed: int = 0
    allow_collapse: bool = False
    device: Optional[str] = None


@dataclass
class TrainStabilizerResult:
    """The trained stabilizer, its loss curve and where it was written (if anywhere)."""

    stabilizer: LearnedStabilizer
    losses: list[float]
    path: Optional[Path] = None
    info: dict[str, Any] = field(default_factory=dict)


def _windows(clips: Sequence[StabilizerClip], cfg: TrainStabilizerConfig, g: torch.Generator
             ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """A batch of random (clip, time window, crop) samples: ``[B, tau, C, h, w]`` each."""
    zs, ys, xs = [], [], []
    # one window length and crop for the whole batch, fitting the shortest / smallest clip, so clips of
    # different lengths and sizes can be stacked
    tau = min(cfg.clip_frames, min(c.restored.shape[0] for c in clips))
    ch = min(cfg.crop, min(c.restored.shape[2] for c in clips))
    cw = min(cfg.crop, min(c.restored.shape[3] for c in clips))
    for _ in range(cfg.batch_size):
        c = clips[int(torch.randint(len(clips), (1,), generator=g))]
        t_len, _, h, w = c.restored.shape
        t0 = int(torch.randint(t_len - tau + 1, (1,), generator=g))
        i = int(torch.randint(h - ch + 1, (1,), generator=g))
        j = int(torch.randint(w - cw + 1, (1,), generator=g))
        sl = (slice(t0, t0 + tau), slice(None), slice(i, i + ch), slice(j, j + cw))
        zs.append(c.restored[sl])
        ys.append(c.target[sl])
        if c.inputs is not None:
            xs.append(c.inputs[sl])
    return torch.stack(zs), torch.stack(ys), (torch.stack(xs) if len(xs) == len(zs) else None)


def _unroll(st: LearnedStabilizer, z: torch.Tensor, x: Optional[torch.Tensor]) -> torch.Tensor:
    """Run the stabilizer causally over ``[B, T, C, H, W]`` (differentiable)."""
    outs = [z[:, 0]]
    for t in range(1, z.shape[1]):
        outs.append(st.step(z[:, t], outs[-1], x[:, t] if x is not None else None,
                            x[:, t - 1] if x is not None else None))
    return torch.stack(outs, dim=1)


def train_stabilizer(clips: Sequence[StabilizerClip | tuple], kind: str = "controlled",
                     config: Optional[TrainStabilizerConfig] = None, out: Optional[str | os.PathLike] = None,
                     callback: Optional[Callable[[int, float], Any]] = None,
                     metadata: Optional[dict[str, Any]] = None, **overrides: Any) -> TrainStabilizerResult:
    """Train a controlled or spatial stabilizer on clips of (restored, target[, inputs]) frames.

    Only the stabilizer's parameters are optimised (the restorer's outputs are data). ``config``
    fields may be overridden by keyword (``steps=...``). Refuses a stability weight above the
    collapse bound ``clip_frames - 1`` unless ``allow_collapse=True``. Writes ``out`` if given.
    """
    cfg = config or TrainStabilizerConfig()
    cfg = TrainStabilizerConfig(**{**asdict(cfg), "kind": kind, **overrides})
    if cfg.kind not in ("controlled", "spatial"):
        raise InputError(f"only 'controlled' and 'spatial' stabilizers are trained (the EMA has no parameters); "
                         f"got {cfg.kind!r}")
    for name in ("steps", "batch_size", "crop", "clip_frames"):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise InputError(f"{name} must be a positive integer, got {v!r}")
    from ..validate import finite_float

    # NaN passes every plain comparison below (nan < 0 and nan >= bound are both False) and would train a
    # stabilizer whose weights are all NaN, so both floats are checked to be finite first
    cfg.learning_rate = finite_float("learning rate", cfg.learning_rate, min=0, min_inclusive=False)
    cfg.stability_weight = finite_float("stability weight", cfg.stability_weight, min=0,
                                        hint=f"keep it under the oracle bound {ORACLE_BOUND} (default 0.4)")
    checked = [(c if isinstance(c, StabilizerClip) else StabilizerClip(*c)).check() for c in clips]
    if not checked:
        raise InputError("no training clips given")
    tau = min(cfg.clip_frames, min(c.restored.shape[0] for c in checked))
    bound = collapse_bound(tau)
    if cfg.stability_weight < 0:
        raise InputError(f"stability weight must be >= 0, got {cfg.stability_weight}")
    if cfg.stability_weight >= bound and not cfg.allow_collapse:
        raise InputError(f"stability weight {cfg.stability_weight} is at or above the collapse bound {bound:g} "
                         f"(clip_frames - 1 for {tau}-frame windows): training would freeze the first frame. Use a "
                         f"weight under {ORACLE_BOUND} (the oracle bound) or at least under {bound:g}")
    if cfg.stability_weight > ORACLE_BOUND:
        logger.warning("stability weight %.3g is above the oracle bound %.1f: accuracy may be traded for stability",
                       cfg.stability_weight, ORACLE_BOUND)
    chans = {c.restored.shape[1] for c in checked}
    if len(chans) != 1:
        raise InputError(f"training clips have different channel counts {sorted(chans)}")
    has_inputs = all(c.inputs is not None for c in checked)
    use_inputs = has_inputs if cfg.use_inputs is None else bool(cfg.use_inputs)
    if use_inputs and not has_inputs:
        raise InputError("use_inputs=True needs the restorer's input frames in every clip")
    if not use_inputs:
        checked = [StabilizerClip(c.restored, c.target, None, c.name) for c in checked]
    from ..pipeline import resolve_device

    dev = resolve_device(cfg.device) if cfg.device else torch.device("cpu")
    torch.manual_seed(wrap_seed(cfg.seed))
    st = LearnedStabilizer(StabilizerConfig(kind=cfg.kind, channels=chans.pop(), hidden=cfg.hidden,
                                            kernel_size=cfg.kernel_size, use_inputs=use_inputs)).to(dev)
    opt = torch.optim.Adam(st.parameters(), lr=cfg.learning_rate)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, cfg.steps), eta_min=cfg.learning_rate * 0.05)
    g = seeded_generator(cfg.seed)
    losses: list[float] = []
    t0 = time.perf_counter()
    st.train()
    for step in range(1, cfg.steps + 1):
        z, y, x = _windows(checked, cfg, g)
        z, y = z.to(dev), y.to(dev)
        x = x.to(dev) if x is not None else None
        outs = _unroll(st, z, x)
        loss, acc, stab = stabilization_loss(outs, y, cfg.stability_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if callback is not None:
            callback(step, losses[-1])
    st.eval()
    info = dict(kind=cfg.kind, steps=cfg.steps, seconds=round(time.perf_counter() - t0, 3),
                parameters=count_parameters(st), final_loss=losses[-1] if losses else None)
    meta = {"training": {**asdict(cfg), "use_inputs": use_inputs, "clip_frames": tau, "clips": len(checked), "loss": "L1 accuracy + "
                         "stability_weight * L1(z~_t, z~_{t-1}), frames 2..tau"},
            "stability_weight": cfg.stability_weight, "collapse_bound": bound, "oracle_bound": ORACLE_BOUND,
            **(metadata or {})}
    st.metadata = {k: v for k, v in meta.items()}  # type: ignore[attr-defined]
    path = save_stabilizer(st, out, metadata=meta) if out is not None else None
    logger.info("trained %s stabilizer (%d parameters, %d steps, %.1f s), final loss %.4f", cfg.kind, info["parameters"],
                cfg.steps, info["seconds"], info["final_loss"] or float("nan"))
    return TrainStabilizerResult(st, losses, path, info)
