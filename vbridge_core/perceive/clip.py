"""The optional CLIP perceiver (Perceive-IR's quality perceiver, adapted): prompt learning in CLIP space.

Perceive-IR learns text prompts for three quality tiers and rates an image by its CLIP similarity
to each prompt. ComfyUI users with Wan already have ``clip_vision_h.safetensors`` (OpenCLIP
ViT-H/14 vision tower + projection) but no matching CLIP *text* tower, so the prompts are learned
directly as vectors in the joint (projected) embedding space: CoOp learns context tokens and maps
them through the frozen text encoder to one vector per class; learning that output vector itself
is the same model with the text encoder folded into the learned parameter (as expressive for a
fixed set of classes, and it needs no text weights).

:class:`ClipPerceiver` holds 8 degradation prompts (the families + ``clean``; multi-label via a
sigmoid of ``scale * cos + bias``), 3 tier prompts (softmax over ``scale * cos``) and a linear
severity head on the normalised image embedding. The quality score is the tier probabilities
times the tier centres (0.875 / 0.575 / 0.2); the tier is the most similar tier prompt. Prompts
start at the mean embedding of their examples (prototypes), so a handful of images per task
already works; training then sharpens them with BCE + cross-entropy + severity MSE. The image
encoder stays frozen and embeddings are computed once.

Encoders (any ``callable(images [B, 3, H, W] in 0..1) -> [B, D]``): :func:`hf_clip_embedder` for a
``transformers.CLIPVisionModelWithProjection`` (:func:`load_clip_vision` reads a diffusers /
transformers folder or a single ComfyUI-style ``clip_vision_*.safetensors``), or, in ComfyUI, the
node adapter around ``CLIP_VISION.encode_image``.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError, ModelFileError
from .labels import FAMILIES, LABELS, TIERS, tier_index
from .model import PerceptionReport, prepare_image

logger = logging.getLogger(__name__)

Embedder = Callable[[torch.Tensor], torch.Tensor]
FORMAT = "vbridge-perceiver-clip"
#: Quality score at the centre of each tier (high, medium, low).
TIER_CENTRES = (0.875, 0.575, 0.2)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipPerceiver(nn.Module):
    """Learned degradation and tier prompts in a CLIP embedding space of width ``dim``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.label_prompts = nn.Parameter(torch.randn(len(LABELS), dim) / dim ** 0.5)
        self.label_bias = nn.Parameter(torch.zeros(len(LABELS)))
        self.tier_prompts = nn.Parameter(torch.randn(len(TIERS), dim) / dim ** 0.5)
        self.log_scale = nn.Parameter(torch.tensor(float(torch.log(torch.tensor(20.0)))))
        self.severity = nn.Linear(dim, len(FAMILIES))
        self.info: dict[str, Any] = {}

    @property
    def dim(self) -> int:
        return int(self.label_prompts.shape[1])

    def forward(self, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(label logits [B, 8], tier logits [B, 3], severity [B, 7]) from image embeddings [B, D]."""
        e = F.normalize(emb.float(), dim=-1)
        scale = self.log_scale.exp()
        lab = scale * e @ F.normalize(self.label_prompts, dim=-1).T + self.label_bias
        tier = scale * e @ F.normalize(self.tier_prompts, dim=-1).T
        return lab, tier, torch.sigmoid(self.severity(e))

    # ------------------------------------------------------------------ files
    def save(self, path: str | Path) -> Path:
        from ..fileio import save_safetensors_atomic

        meta = {"format": FORMAT, "dim": str(self.dim), "labels": json.dumps(list(LABELS)),
                "tiers": json.dumps(list(TIERS)), "info": json.dumps(self.info)}
        return save_safetensors_atomic(self.state_dict(), path, metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> "ClipPerceiver":
        from safetensors import safe_open

        p = Path(path)
        if not p.is_file():
            raise ModelFileError(f"CLIP perceiver file {p} not found; train one with "
                                 "`python -m vbridge_core train-perceiver --kind clip`")
        try:
            with safe_open(str(p), "pt") as f:
                meta = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise ModelFileError(f"{p} is not a readable safetensors file: {e}") from None
        if meta.get("format") != FORMAT:
            raise ModelFileError(f"{p} is not a CLIP perceiver file (format {meta.get('format')!r})")
        m = cls(int(meta["dim"]))
        m.load_state_dict(state)
        m.info = json.loads(meta.get("info", "{}"))
        return m.eval()

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def perceive(self, images: Iterable[torch.Tensor] | torch.Tensor, embedder: Embedder,
                 names: Optional[Sequence[str]] = None) -> list[PerceptionReport]:
        """One report per image, from ``embedder``'s embeddings (checked against this perceiver's width)."""
        imgs = [prepare_image(x, n) for x, n in zip(images, names or (f"image {i}" for i in range(10 ** 9)))]
        names = list(names) if names is not None else [f"image {i}" for i in range(len(imgs))]
        emb = embed_images(embedder, imgs)
        if emb.shape[1] != self.dim:
            raise InputError(f"the CLIP vision model gives {emb.shape[1]}-d embeddings but this CLIP perceiver was "
                             f"trained on {self.dim}-d ones; use the CLIP vision model it was trained with "
                             f"({self.info.get('encoder', 'see its metadata')})")
        lab, tier, sev = self(emb)
        probs, tp = torch.sigmoid(lab), torch.softmax(tier, -1)
        centres = torch.tensor(TIER_CENTRES)
        out = []
        for i, n in enumerate(names):
            scores = {k: float(v) for k, v in zip(LABELS, probs[i])}
            out.append(PerceptionReport(file=n, degradation=max(LABELS, key=lambda k: scores[k]), scores=scores,
                                        severity={f: float(v) for f, v in zip(FAMILIES, sev[i])},
                                        quality=TIERS[int(tp[i].argmax())], quality_score=float(tp[i] @ centres)))
        return out


# ------------------------------------------------------------------------------------------------
# Encoders
# ------------------------------------------------------------------------------------------------

def embed_images(embedder: Embedder, images: Sequence[torch.Tensor], batch: int = 16) -> torch.Tensor:
    """Embeddings ``[N, D]`` of ``[3, H, W]`` images (batched per size; the embedder resizes)."""
    out: list[Optional[torch.Tensor]] = [None] * len(images)
    groups: dict[tuple, list[int]] = {}
    for i, x in enumerate(images):
        groups.setdefault(tuple(x.shape), []).append(i)
    with torch.no_grad():
        for idx in groups.values():
            for k in range(0, len(idx), batch):
                chunk = idx[k:k + batch]
                e = embedder(torch.stack([images[i] for i in chunk]))
                if not isinstance(e, torch.Tensor) or e.ndim != 2 or e.shape[0] != len(chunk):
                    raise InputError(f"the CLIP embedder must return [B, D] embeddings, got "
                                     f"{getattr(e, 'shape', type(e).__name__)}")
                for i, v in zip(chunk, e.float().cpu()):
                    out[i] = v
    return torch.stack(out)  # type: ignore[arg-type]


def hf_clip_embedder(model: nn.Module) -> Embedder:
    """Embedder for a ``transformers.CLIPVisionModelWithProjection``: CLIP resize + normalisation -> image_embeds."""
    size = int(model.config.image_size)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    model.eval()

    def embed(x: torch.Tensor) -> torch.Tensor:
        dev = next(model.parameters()).device
        dt = next(model.parameters()).dtype
        h, w = x.shape[-2:]
        f = size / min(h, w)  # short side to `size`, then centre crop (CLIPImageProcessor's recipe)
        nh, nw = max(size, round(h * f)), max(size, round(w * f))
        y = F.interpolate(x.float(), size=(nh, nw), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        t, l = (nh - size) // 2, (nw - size) // 2
        y = (y[..., t:t + size, l:l + size] - mean) / std
        with torch.no_grad():
            return model(pixel_values=y.to(dev, dt)).image_embeds.float().cpu()
    return embed


def _config_from_state(state: dict[str, torch.Tensor]):
    from transformers import CLIPVisionConfig

    pe = state["vision_model.embeddings.patch_embedding.weight"]
    hidden, patch = int(pe.shape[0]), int(pe.shape[-1])
    npos = int(state["vision_model.embeddings.position_embedding.weight"].shape[0])
    layers = 1 + max(int(m.group(1)) for k in state for m in [re.match(r"vision_model\.encoder\.layers\.(\d+)\.", k)] if m)
    inter = int(state["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0])
    proj = int(state["visual_projection.weight"].shape[0])
    side = int(round((npos - 1) ** 0.5)) * patch
    heads = max(1, hidden // 64) if hidden >= 64 else max(1, hidden // 16)
    # OpenAI ViT-L/14 (clip_vision_l / clip-vit-large-patch14) uses quick_gelu; OpenCLIP ViT-H/14 / bigG use gelu
    act = "quick_gelu" if (hidden, patch) == (1024, 14) else "gelu"
    return CLIPVisionConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                            num_attention_heads=heads, image_size=side, patch_size=patch, projection_dim=proj,
                            hidden_act=act, layer_norm_eps=1e-5)


def load_clip_vision(path: str | Path, device: str | torch.device = "cpu", heads: Optional[int] = None):
    """A ``CLIPVisionModelWithProjection`` from a transformers/diffusers folder or a single safetensors file.

    Single files must hold the transformers key names (``vision_model.*``, ``visual_projection.weight``),
    as ComfyUI's ``clip_vision_h.safetensors`` / ``clip_vision_l.safetensors`` do; the architecture is
    read from the tensor shapes (attention heads = width / 64 unless ``heads`` is given).
    """
    from transformers import CLIPVisionModelWithProjection

    p = Path(path)
    if p.is_dir():
        try:
            return CLIPVisionModelWithProjection.from_pretrained(str(p), local_files_only=True).to(device).eval()
        except Exception as e:
            raise ModelFileError(f"{p} is not a CLIP vision model folder transformers can read: {e}") from None
    if not p.is_file():
        raise ModelFileError(f"CLIP vision model {p} not found (ComfyUI keeps it in models/clip_vision/, e.g. "
                             "clip_vision_h.safetensors)")
    from safetensors.torch import load_file

    try:
        state = load_file(str(p))
    except Exception as e:
        raise ModelFileError(f"{p} is not a readable safetensors file: {e}") from None
    state = {k[len("clip_vision."):] if k.startswith("clip_vision.") else k: v for k, v in state.items()}
    if "vision_model.embeddings.patch_embedding.weight" not in state or "visual_projection.weight" not in state:
        raise ModelFileError(f"{p} is not a CLIP vision model with a projection (no vision_model.* / "
                             "visual_projection.weight keys)")
    cfg = _config_from_state(state)
    if heads:
        cfg.num_attention_heads = int(heads)
    model = CLIPVisionModelWithProjection(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if "position_ids" not in k]
    if missing:
        raise ModelFileError(f"{p}: CLIP vision weights missing {missing[:5]} ({len(missing)} in all)")
    return model.to(device).eval()


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------

def train_clip_perceiver(embedder: Embedder, images: Sequence[torch.Tensor], labels: Sequence[Sequence[str]],
                         severity: Sequence[dict[str, float]], quality: Sequence[float], *, steps: int = 300,
                         seed: int = 0, lr: float = 1e-2, info: Optional[dict[str, Any]] = None) -> ClipPerceiver:
    """Learn the prompts from labelled images (families present, severity per family, quality score).

    Labels are family names or ``clean`` (an empty list also means clean). Needs at least two
    images. The encoder is frozen; only the prompts, biases, scale and severity head train.
    """
    if len(images) < 2:
        raise InputError(f"training the CLIP perceiver needs at least 2 labelled images, got {len(images)}")
    if not (len(images) == len(labels) == len(severity) == len(quality)):
        raise InputError("images, labels, severity and quality must have the same length")
    for i, labs in enumerate(labels):
        bad = [l for l in labs if l not in LABELS]
        if bad:
            raise InputError(f"example {i}: unknown label(s) {bad}; use {', '.join(LABELS)}")
    prepared = [prepare_image(x, f"training image {i}") for i, x in enumerate(images)]
    emb = embed_images(embedder, prepared)
    torch.manual_seed(seed)
    model = ClipPerceiver(emb.shape[1])
    y = torch.zeros(len(images), len(LABELS))
    for i, labs in enumerate(labels):
        for l in (labs or ["clean"]):
            y[i, LABELS.index(l)] = 1.0
    sev = torch.tensor([[float(s.get(f, 0.0)) for f in FAMILIES] for s in severity])
    tiers = torch.tensor([tier_index(q) for q in quality])
    e = F.normalize(emb, dim=-1)
    with torch.no_grad():  # prototypes: each prompt starts at the mean of its examples
        for k in range(len(LABELS)):
            if y[:, k].any():
                model.label_prompts[k] = e[y[:, k] > 0].mean(0) - e.mean(0) * 0.5
        for k in range(len(TIERS)):
            if (tiers == k).any():
                model.tier_prompts[k] = e[tiers == k].mean(0) - e.mean(0) * 0.5
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    pos_weight = ((len(y) - y.sum(0)) / y.sum(0).clamp(min=1)).clamp(0.2, 10.0)
    for step in range(int(steps)):
        lab, tl, s = model(emb)
        loss = F.binary_cross_entropy_with_logits(lab, y, pos_weight=pos_weight) + F.cross_entropy(tl, tiers) \
            + 2.0 * F.mse_loss(s, sev)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % max(1, steps // 5) == 0:
            logger.info("CLIP perceiver step %d/%d loss %.4f", step + 1, steps, float(loss.detach()))
    model.info = dict(info or {}, examples=len(images), steps=int(steps), seed=int(seed), final_loss=float(loss.detach()))
    return model.eval()


def examples_from_task_folders(root: Any, limit_per_task: int = 64) -> tuple[list, list, list, list]:
    """Labelled examples from a pair folder with task subfolders (``<task>/lq`` + ``<task>/hq``).

    Each task's LQ images are labelled with the families its name covers (:func:`.labels.task_families`;
    a task name that names no family is refused with the vocabulary); HQ images are ``clean``. The
    user's folders say *what* is wrong but not *how much*, so severity and quality of the LQ images
    come from the built-in perceiver (HQ: severity 0, quality 1).
    """
    from ..images import load_image
    from ..pairs import scan_pairs
    from .labels import task_families
    from .model import Perceiver

    from ..pairs import PairSet

    ps = root if isinstance(root, PairSet) else scan_pairs(root)
    builtin = Perceiver.builtin()
    images, labels, sev, qual = [], [], [], []
    unknown = [t for t in ps.tasks if not task_families(t)]
    if unknown:
        raise InputError(f"task folder(s) {unknown} name no degradation family the perceiver knows; name them after "
                         f"one of {', '.join(FAMILIES)} (e.g. denoise, deblur, dehaze, derain, desnow, jpeg, low_light)")
    for task in ps.tasks:
        fams = task_families(task)
        items = [i for i in ps.items if i.task == task][:limit_per_task]
        for it in items:
            lq, hq = load_image(it.lq_path), load_image(it.hq_path)
            r = builtin.perceive([lq], [it.name])[0]
            images += [lq, hq]
            labels += [fams, ["clean"]]
            sev += [{f: max(0.05, r.severity[f]) for f in fams}, {}]
            qual += [min(r.quality_score, 0.74), 1.0]  # a task's LQ image is not high quality by definition
    return images, labels, sev, qual
