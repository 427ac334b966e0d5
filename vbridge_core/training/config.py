"""Hyper-parameters of a V-Bridge LoRA training run, and the progress / result records it reports.

One :class:`TrainConfig` describes a whole run (all curriculum stages); it is stored in the LoRA's
metadata and in every checkpoint, so a resumed run can refuse a changed configuration instead of
silently mixing two.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from .. import trajectory
from ..errors import InputError
from ..limits import check_side
from ..seeds import wrap_seed
from .curriculum import Stage, StagesLike, parse_stages

#: diffusers module names of the attention projections and the feed-forward layers of every block.
DEFAULT_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2")
ROLES = ("restoration", "drift_correction")
LR_SCHEDULES = ("constant", "cosine", "linear")
OPTIMIZERS = ("adamw", "adamw8bit")
CROP_MODES = ("resize", "crop")

#: Fields that may differ between a checkpoint and the run that resumes it (they do not change the math).
RESUME_FREE_FIELDS = ("checkpoint_every", "keep_checkpoints", "validation_every", "validation_steps",
                      "log_every", "cache_dir")


@dataclass
class TrainConfig:
    """Everything that defines one LoRA training run (defaults: common Wan LoRA practice + the paper).

    ``stages`` is the resolution curriculum (``"512:400,720:300,960:300"``); when it is ``None`` a
    single stage of ``steps`` steps at ``resolution`` (default 512, or the largest multiple of 32
    the smallest image allows) is used. Crops are square.
    """

    steps: int = 400
    resolution: Optional[int] = None
    stages: Optional[StagesLike] = None
    rank: int = 32
    alpha: float = 32.0
    target_modules: Sequence[str] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    learning_rate: float = 1e-4
    weight_decay: float = 1e-2
    optimizer: str = "adamw"
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    batch_size: int = 1
    grad_accum: int = 1
    mixed_precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU; "no"; "bf16"
    gradient_checkpointing: bool = False
    frames: int = 5
    alpha_schedule: Any = "linear"
    shift: float = 5.0
    seed: int = 0
    role: str = "restoration"
    crop_mode: str = "resize"  # resize: downscale the short side to the stage resolution, then crop
    flip: bool = True
    crops_per_pair: int = 4
    validation_fraction: float = 0.1
    validation_every: int = 0
    validation_steps: int = 20
    validation_resolution: Optional[int] = None
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    log_every: int = 0
    cache_dir: Optional[str] = None
    #: Perceive-IR's difficulty-adaptive loss: weight each pair by 1 + strength * (1 - perceived quality),
    #: normalised to mean 1 (0 = off; see vbridge_core.perceive.weighting)
    quality_weighting: float = 0.0
    #: turbo distillation settings (:class:`.turbo.TurboSettings` as a dict); None for the other modes
    turbo: Optional[dict[str, Any]] = None

    def curriculum(self) -> list[Stage]:
        """The stages of this run (a single stage when ``stages`` is not set)."""
        if self.stages is not None and self.stages != "":
            return parse_stages(self.stages)
        return [Stage(self.resolution or 512, self.steps)]

    def validate(self) -> "TrainConfig":
        """Check every field; raise :class:`InputError` naming the first bad one."""
        trajectory.check_frames(self.frames)
        trajectory.alpha_schedule(self.alpha_schedule, self.frames)
        self.seed = wrap_seed(self.seed)  # seeds are taken modulo 2^64 (vbridge_core.seeds)
        for name in ("steps", "rank", "batch_size", "grad_accum", "crops_per_pair", "validation_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"{name} must be a positive integer, got {v!r}")
        for name in ("warmup_steps", "validation_every", "checkpoint_every", "keep_checkpoints", "log_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise InputError(f"{name} must be an integer >= 0, got {v!r}")
        from ..validate import finite_float

        # finite_float refuses NaN/inf, which slip through plain comparisons (nan > 0 is False, inf > 0 True)
        self.learning_rate = finite_float("learning_rate", self.learning_rate, min=0, min_inclusive=False)
        self.alpha = finite_float("alpha", self.alpha, min=0, min_inclusive=False)
        self.shift = finite_float("shift", self.shift, min=0, min_inclusive=False)
        self.weight_decay = finite_float("weight_decay", self.weight_decay, min=0)
        self.max_grad_norm = finite_float("max_grad_norm", self.max_grad_norm, min=0, hint="0 turns clipping off")
        if self.resolution is not None and (self.resolution < 32 or self.resolution % 32):
            raise InputError(f"resolution must be a multiple of 32 (>= 32), got {self.resolution}")
        if self.validation_resolution is not None and (self.validation_resolution < 32 or self.validation_resolution % 32):
            raise InputError(f"validation_resolution must be a multiple of 32, got {self.validation_resolution}")
        for name in ("resolution", "validation_resolution"):
            if getattr(self, name) is not None:
                check_side(getattr(self, name), name, "Use a smaller crop side")
        if self.role not in ROLES:
            raise InputError(f"role must be one of {ROLES}, got {self.role!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise InputError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.optimizer not in OPTIMIZERS:
            raise InputError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise InputError(f"mixed_precision must be auto, no, bf16 or fp16, got {self.mixed_precision!r}")
        if self.crop_mode not in CROP_MODES:
            raise InputError(f"crop_mode must be one of {CROP_MODES}, got {self.crop_mode!r}")
        self.validation_fraction = finite_float("validation_fraction", self.validation_fraction, min=0, max=1,
                                                max_inclusive=False)
        self.quality_weighting = finite_float("quality_weighting", self.quality_weighting, min=0, max=10,
                                              hint="0 = off")
        if not list(self.target_modules):
            raise InputError("target_modules must name at least one module (e.g. to_q,to_k,to_v,to_out.0)")
        self.curriculum()
        return self

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (stored in checkpoints and LoRA metadata)."""
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        d["stages"] = ",".join(str(s) for s in self.curriculum())
        return d


@dataclass
class TrainProgress:
    """What a progress callback receives.

    ``kind`` is ``"step"`` after every optimizer step, ``"skipped"`` when a non-finite loss made a step
    skip, ``"validation"`` after a validation pass (``metrics`` holds PSNR/SSIM), ``"checkpoint"``
    after a checkpoint was written (``path``), ``"stage"`` when a curriculum stage begins,
    ``"caching"`` while latents are being encoded (``step``/``total`` count pseudo-videos then) and
    ``"teacher"`` while turbo mode samples its teacher's targets (``step``/``total`` count views).
    """

    kind: str
    step: int
    total: int
    loss: float = float("nan")
    stage: int = 0
    resolution: int = 0
    lr: float = 0.0
    seconds: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    path: Optional[Path] = None


@dataclass
class TrainResult:
    """The outcome of a run: the LoRA file, per-step losses (NaN = skipped step) and reports.

    ``loss_curve`` and ``validation_grid`` are ``[3, H, W]`` float images in 0..1 (``None`` when
    there was nothing to draw): the loss curve, and rows of LQ | before | after | HQ for the
    validation pairs.
    """

    path: Path
    losses: list[float]
    seconds: float
    skipped_steps: list[int] = field(default_factory=list)
    validation: list[dict[str, Any]] = field(default_factory=list)
    checkpoint: Optional[Path] = None
    loss_curve: Optional[torch.Tensor] = None
    validation_grid: Optional[torch.Tensor] = None
    loss_curve_path: Optional[Path] = None
    #: sum of squares of the trained LoRA weights (equal on every process of a data-parallel run)
    lora_checksum: float = float("nan")
