"""The built-in perceiver: hand-crafted statistics -> a small MLP ensemble (+ a snow probe) -> labels, severities, quality.

:class:`PerceiverNet` is the network (feature standardisation, then an average of a few MLPs with two
hidden layers and three heads each: 8 label logits (multi-label, sigmoid), 7 severities (sigmoid, 0
where a family is absent) and the quality score (sigmoid)). :class:`Perceiver` runs it on whole images of any size: the image is
checked (finite values, 1/3/4 channels, at least :data:`MIN_SIDE` px), a copy of a huge image is
downscaled to :data:`MAX_SIDE` on its long side, up to 3 x 3 crops of :data:`CROP` px are taken at
native scale on an even grid, and their outputs are averaged. When the averaged top label is ``snow`` or
``clean``, a small conv net on the crops' pixels (:class:`SnowProbe`) decides which of the two comes
first (the statistics confuse a few soft flakes with fine bright texture). The weights ship in the package as
``perceiver.safetensors`` (written by ``python -m vbridge_core train-perceiver``).
"""
from __future__ import annotations

import copy
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError, ModelFileError
from .features import FEATURE_NAMES, FEATURE_VERSION, crop_features
from .labels import FAMILIES, LABELS, tier_of

logger = logging.getLogger(__name__)

#: The shipped weights.
BUILTIN_PATH = Path(__file__).with_name("perceiver.safetensors")
#: Crop side the perceiver looks at (native pixels).
CROP = 128
#: Smallest image side that still carries enough pixels to judge.
MIN_SIDE = 24
#: Long side above which the perceiver works on a downscaled copy (bounded time and memory).
MAX_SIDE = 2048
#: At most this many crops per axis.
GRID = 3
FORMAT = "vbridge-perceiver-mlp"
#: Channels of the snow probe's convolutions.
PROBE_WIDTH: tuple[int, int, int] = (24, 48, 48)


class _Member(nn.Module):
    """One MLP of the ensemble: two hidden layers, three heads (label logits, severity, quality)."""

    def __init__(self, n_features: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(n_features, hidden), nn.GELU(), nn.Dropout(dropout),
                                  nn.Linear(hidden, hidden), nn.GELU())
        self.labels = nn.Linear(hidden, len(LABELS))
        self.severity = nn.Linear(hidden, len(FAMILIES))
        self.quality = nn.Linear(hidden, 1)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.body(z)
        return self.labels(h), torch.sigmoid(self.severity(h)), torch.sigmoid(self.quality(h))[:, 0]


class SnowProbe(nn.Module):
    """A small conv net that tells snow from clean on a crop's pixels -> one logit per crop.

    The statistics summarise away the *shape* of small bright spots, so they confuse a few soft flakes
    on a photo with fine bright texture (grass blades, coins, gravel). The probe sees the crop minus its
    7 x 7 local mean (the detail layer, where flakes and grain live, free of the scene's brightness),
    through four 3 x 3 convolutions with batch norm (the first three at stride 2; every pixel is still
    seen), then the mean and the max of each channel over the crop (the max keeps a few isolated flakes
    from being averaged away). It is trained on crops that are clean or carry snow alone, and is asked
    only when the MLPs' top label is ``snow`` or ``clean`` (:meth:`Perceiver.perceive`)."""

    def __init__(self, width: Sequence[int] = PROBE_WIDTH) -> None:
        super().__init__()
        c1, c2, c3 = (int(w) for w in width)
        layers: list[nn.Module] = []
        for cin, cout, stride in ((3, c1, 2), (c1, c2, 2), (c2, c3, 2), (c3, c3, 1)):
            layers += [nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout), nn.GELU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(2 * c3, 1)
        self.width = (c1, c2, c3)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        detail = crops - F.avg_pool2d(crops, 7, 1, 3, count_include_pad=False)
        h = self.body(4.0 * detail)
        return self.head(torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1))[:, 0]


class PerceiverNet(nn.Module):
    """Standardised features -> ``members`` MLPs (averaged) -> (label logits [B, 8], severity [B, 7], quality [B]).

    An ensemble of small MLPs trained from different seeds: one MLP's verdict on the borderline
    families (snow vs clean) moves with its seed; the average does much less."""

    def __init__(self, n_features: int = len(FEATURE_NAMES), hidden: int = 128, dropout: float = 0.1,
                 members: int = 1) -> None:
        super().__init__()
        self.register_buffer("feat_mean", torch.zeros(n_features))
        self.register_buffer("feat_std", torch.ones(n_features))
        self.members = nn.ModuleList(_Member(n_features, hidden, dropout) for _ in range(members))

    @property
    def hidden(self) -> int:
        return self.members[0].body[0].out_features

    def forward(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z = (feats - self.feat_mean) / self.feat_std
        outs = [m(z) for m in self.members]
        if len(outs) == 1:
            return outs[0]
        return tuple(torch.stack(o).mean(0) for o in zip(*outs))  # type: ignore[return-value]

    @classmethod
    def combine(cls, nets: Sequence["PerceiverNet"]) -> "PerceiverNet":
        """One ensemble from nets (single MLPs or ensembles); it averages every member's outputs.

        Nets fitted on the same features share one standardisation, kept as is. Nets fitted on different training
        sets (e.g. two perceiver files) standardise differently: each member's standardisation is then folded into
        its first layer (:meth:`folded`) and the ensemble standardises nothing, so every member gives the outputs it
        gave in its own net (to float rounding)."""
        first = nets[0]
        if any(n.hidden != first.hidden for n in nets):
            raise ValueError(f"cannot combine nets of different widths {sorted({n.hidden for n in nets})}")
        same = all(torch.equal(n.feat_mean, first.feat_mean) and torch.equal(n.feat_std, first.feat_std) for n in nets)
        if not same:
            nets = [n.folded() for n in nets]
            first = nets[0]
        out = cls(first.feat_mean.numel(), first.hidden, members=0)
        out.feat_mean.copy_(first.feat_mean)
        out.feat_std.copy_(first.feat_std)
        for n in nets:
            out.members.extend(n.members)
        return out

    def folded(self) -> "PerceiverNet":
        """A copy whose first layers take raw features: ``W (f - m) / s + b`` = ``(W / s) f + (b - W m / s)``,
        with mean 0 and std 1 as its own standardisation (the same outputs, to float rounding)."""
        out = copy.deepcopy(self)
        with torch.no_grad():
            for m in out.members:
                lin = m.body[0]
                w = lin.weight.clone()
                lin.weight.copy_(w / self.feat_std)
                lin.bias.sub_((w * (self.feat_mean / self.feat_std)).sum(1))
            out.feat_mean.zero_()
            out.feat_std.fill_(1.0)
        return out


@dataclass
class PerceptionReport:
    """What the perceiver says about one image (the CLI's JSON entry, see :meth:`to_dict`)."""

    file: str
    degradation: str
    scores: dict[str, float]
    severity: dict[str, float]
    quality: str
    quality_score: float

    def to_dict(self) -> dict[str, Any]:
        """``{"file", "degradation", "scores", "severity", "quality", "quality_score"}`` (rounded)."""
        return {"file": self.file, "degradation": self.degradation,
                "scores": {k: round(v, 4) for k, v in self.scores.items()},
                "severity": {k: round(v, 4) for k, v in self.severity.items()},
                "quality": self.quality, "quality_score": round(self.quality_score, 4)}

    def present(self, threshold: float = 0.5) -> list[str]:
        """Every family with a probability >= ``threshold`` (the multi-label answer), strongest first."""
        fams = [f for f in FAMILIES if self.scores[f] >= threshold]
        return sorted(fams, key=lambda f: -self.scores[f])


def snow_or_clean_first(probs: torch.Tensor) -> bool:
    """Whether ``snow`` or ``clean`` has the highest of the 8 label probabilities."""
    return LABELS[int(probs.argmax())] in ("snow", "clean")


def order_snow_clean(probs: torch.Tensor, p_snow: float) -> torch.Tensor:
    """``probs`` with the ``snow`` and ``clean`` values swapped if needed so that snow is the larger of
    the two exactly when the probe's ``p_snow`` > 0.5."""
    si, ci = LABELS.index("snow"), LABELS.index("clean")
    hi, lo = max(probs[si], probs[ci]), min(probs[si], probs[ci])
    out = probs.clone()
    out[si], out[ci] = (hi, lo) if p_snow > 0.5 else (lo, hi)
    return out


def report_from_outputs(file: str, probs: torch.Tensor, severity: torch.Tensor, quality: float) -> PerceptionReport:
    """Build a report from averaged outputs: ``probs`` [8], ``severity`` [7], ``quality`` in 0..1."""
    scores = {lab: float(p) for lab, p in zip(LABELS, probs)}
    sev = {f: float(s) for f, s in zip(FAMILIES, severity)}
    top = max(LABELS, key=lambda k: scores[k])
    return PerceptionReport(file=file, degradation=top, scores=scores, severity=sev, quality=tier_of(quality),
                            quality_score=float(quality))


def prepare_image(image: Any, what: str = "image") -> torch.Tensor:
    """Check one image and return it as float32 ``[3, H, W]`` in 0..1, long side <= :data:`MAX_SIDE`.

    Accepts ``[C, H, W]`` with C = 1 (gray), 3 or 4 (alpha dropped), or a 2-D gray ``[H, W]``.
    """
    if not isinstance(image, torch.Tensor):
        raise InputError(f"{what}: expected an image tensor, got {type(image).__name__}")
    x = image
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3 or x.shape[0] not in (1, 3, 4):
        raise InputError(f"{what}: expected an image [C, H, W] with 1, 3 or 4 channels, got shape {tuple(image.shape)}")
    if not x.is_floating_point():
        x = x.float() / (255.0 if x.dtype == torch.uint8 else 65535.0)
    x = x.detach().to("cpu", torch.float32)
    h, w = x.shape[-2:]
    if min(h, w) < MIN_SIDE:
        raise InputError(f"{what} is {w}x{h} px: too small to judge its degradation (the perceiver needs at least "
                         f"{MIN_SIDE} px on each side); upscale it or leave it out")
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).sum())
        raise InputError(f"{what} holds {bad} NaN/inf value(s); fix the node or file that produced it "
                         "(images must be finite values in 0..1)")
    x = x[:3] if x.shape[0] == 4 else (x.expand(3, -1, -1) if x.shape[0] == 1 else x)
    x = x.clamp(0.0, 1.0)
    if max(h, w) > MAX_SIDE:
        f = MAX_SIDE / max(h, w)
        size = (max(MIN_SIDE, round(h * f)), max(MIN_SIDE, round(w * f)))
        logger.info("%s is %dx%d px: perceiving a copy downscaled to %dx%d", what, w, h, size[1], size[0])
        x = F.interpolate(x[None], size=size, mode="area")[0]
    return x.contiguous()


def grid_crops(x: torch.Tensor, crop: int = CROP, grid: int = GRID) -> torch.Tensor:
    """Up to ``grid`` x ``grid`` square crops of side ``min(crop, H, W)`` evenly spread over ``x`` -> [N, 3, c, c]."""
    h, w = x.shape[-2:]
    c = min(crop, h, w)
    ny, nx = min(grid, math.ceil(h / c)), min(grid, math.ceil(w / c))
    tops = [round(i * (h - c) / max(1, ny - 1)) for i in range(ny)] if ny > 1 else [(h - c) // 2]
    lefts = [round(j * (w - c) / max(1, nx - 1)) for j in range(nx)] if nx > 1 else [(w - c) // 2]
    return torch.stack([x[:, t:t + c, l:l + c] for t in tops for l in lefts])


class Perceiver:
    """The built-in perceiver (see the module docstring). ``Perceiver.builtin()`` loads the shipped weights."""

    _cache: dict[str, "Perceiver"] = {}

    def __init__(self, net: PerceiverNet, info: Optional[dict[str, Any]] = None,
                 probe: Optional[SnowProbe] = None) -> None:
        self.net = net.eval()
        self.info = info or {}
        self.probe = probe.eval() if probe is not None else None

    # ------------------------------------------------------------------ files
    @classmethod
    def load(cls, path: str | Path) -> "Perceiver":
        """Read a perceiver file written by :meth:`save`."""
        from safetensors import safe_open

        p = Path(path)
        if not p.is_file():
            raise ModelFileError(f"perceiver file {p} not found; train one with `python -m vbridge_core train-perceiver`")
        try:
            with safe_open(str(p), "pt") as f:
                meta = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises several types for a corrupt header
            raise ModelFileError(f"{p} is not a readable safetensors file: {e}") from None
        if meta.get("format") != FORMAT:
            raise ModelFileError(f"{p} is not a built-in perceiver file (format {meta.get('format')!r}); a CLIP "
                                 "perceiver is used with a CLIP vision model (ClipPerceiver)")
        try:
            names = json.loads(meta.get("features", "[]"))
        except ValueError:
            names = None
        version = meta.get("feature_version", "1")
        if names != list(FEATURE_NAMES) or version != str(FEATURE_VERSION):
            n = len(names) if isinstance(names, list) else "?"
            raise ModelFileError(f"{p} was trained on another feature set (version {version}, {n} features; this "
                                 f"version of the pack computes version {FEATURE_VERSION}, {len(FEATURE_NAMES)} "
                                 "features); retrain it with this version (`python -m vbridge_core train-perceiver "
                                 "--out FILE`) or use the shipped perceiver")
        net = PerceiverNet(len(FEATURE_NAMES), int(meta.get("hidden", 128)), members=int(meta.get("members", 1)))
        probe = None
        probe_state = {k[len("probe."):]: v for k, v in state.items() if k.startswith("probe.")}
        try:
            if meta.get("snow_probe") == "1":
                probe = SnowProbe(json.loads(meta.get("probe_width", json.dumps(list(PROBE_WIDTH)))))
                probe.load_state_dict(probe_state)
            net.load_state_dict({k: v for k, v in state.items() if not k.startswith("probe.")})
        except (RuntimeError, ValueError, TypeError) as e:
            raise ModelFileError(f"{p} does not hold the weights its metadata describes ({e}); retrain it with "
                                 "`python -m vbridge_core train-perceiver`") from None
        return cls(net, json.loads(meta.get("info", "{}")), probe)

    @classmethod
    def merged(cls, parts: Sequence["Perceiver"]) -> "Perceiver":
        """One perceiver from several: all their MLPs in one ensemble (:meth:`PerceiverNet.combine`, so files trained
        on different photos can be joined; the ensemble averages all members alike), the first part's snow probe
        that has one, and the parts' descriptions under ``info["merged"]``. Joining files that miss the targets on
        opposite sides (bench/RESULTS.md, stop 23) averages their label logits."""
        if len(parts) < 2:
            raise InputError(f"merging needs at least two perceivers, got {len(parts)}")
        widths = sorted({p.net.hidden for p in parts})
        if len(widths) > 1:
            raise InputError(f"cannot merge perceivers of different MLP widths {widths}: one file holds one width; "
                             "train them with the same recipe")
        net = PerceiverNet.combine([p.net for p in parts])
        probe = next((p.probe for p in parts if p.probe is not None), None)
        return cls(net, {"merged": [p.info for p in parts]}, probe)

    @classmethod
    def builtin(cls) -> "Perceiver":
        """The shipped perceiver (loaded once per process)."""
        key = str(BUILTIN_PATH)
        if key not in cls._cache:
            cls._cache[key] = cls.load(BUILTIN_PATH)
        return cls._cache[key]

    def save(self, path: str | Path) -> Path:
        """Write the weights and a description atomically as safetensors."""
        from ..fileio import save_safetensors_atomic

        meta = {"format": FORMAT, "features": json.dumps(list(FEATURE_NAMES)), "feature_version": str(FEATURE_VERSION),
                "labels": json.dumps(list(LABELS)),
                "hidden": str(self.net.hidden), "members": str(len(self.net.members)), "info": json.dumps(self.info)}
        state = dict(self.net.state_dict())
        if self.probe is not None:
            meta.update(snow_probe="1", probe_width=json.dumps(list(self.probe.width)))
            state.update({f"probe.{k}": v for k, v in self.probe.state_dict().items()})
        return save_safetensors_atomic(state, path, metadata=meta)

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def outputs(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-crop (probabilities [N, 8], severity [N, 7], quality [N]) from features [N, D]."""
        logits, sev, q = self.net(feats)
        return torch.sigmoid(logits), sev, q

    def perceive(self, images: Iterable[torch.Tensor] | torch.Tensor,
                 names: Optional[Sequence[str]] = None) -> list[PerceptionReport]:
        """One :class:`PerceptionReport` per image (``[B, C, H, W]`` batch or a list of ``[C, H, W]``)."""
        imgs = list(images)
        names = list(names) if names is not None else [f"image {i}" for i in range(len(imgs))]
        if len(names) != len(imgs):
            raise InputError(f"{len(imgs)} images but {len(names)} names")
        reports = []
        for name, img in zip(names, imgs):
            x = prepare_image(img, name)
            crops = grid_crops(x)
            probs, sev, q = self.outputs(crop_features(crops))
            probs = probs.mean(0)
            if self.probe is not None:
                probs = self.arbitrate(probs, crops)
            reports.append(report_from_outputs(name, probs, sev.mean(0), float(q.mean())))
        return reports

    @torch.no_grad()
    def arbitrate(self, probs: torch.Tensor, crops: torch.Tensor) -> torch.Tensor:
        """Let the snow probe order ``snow`` and ``clean`` when the MLPs rank one of them first.

        The two scores keep their values but swap places if the probe (mean probability over the crops)
        disagrees: snow first when it says > 0.5, clean first otherwise. Other verdicts stand (the probe
        never saw noise, blur, ...)."""
        if not snow_or_clean_first(probs):
            return probs
        return order_snow_clean(probs, float(torch.sigmoid(self.probe(crops)).mean()))  # type: ignore[misc]


def perceive(images: Iterable[torch.Tensor] | torch.Tensor, names: Optional[Sequence[str]] = None,
             perceiver: Any = None) -> list[PerceptionReport]:
    """Perceive ``images`` with ``perceiver`` (default: the built-in one)."""
    return (perceiver or Perceiver.builtin()).perceive(images, names)
