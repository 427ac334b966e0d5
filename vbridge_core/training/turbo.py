"""Turbo distillation: a student LoRA that restores in K in {1, 2, 4} DiT calls what a V-Bridge
restoration LoRA (the teacher) restores in 50 steps.

Recipe (why this one)
---------------------
Regression onto the teacher's own sampled outputs, with the student unrolled over its own few-step
schedule:

* **Targets** are the teacher's 50-step ODE outputs (deterministic: flow UniPC, guidance 1) for
  every cached training view, computed once with a fixed noise per view and cached on disk. The
  student learns the teacher's noise -> output map directly, as in *Knowledge Distillation in
  Iterative Generative Models* (Luhman & Luhman 2021) and the regression term of DMD (Yin et al.
  2024); for a restoration model, whose output is nearly a function of the LQ, this is the whole map.
  Its loss is a plain MSE to fixed targets: no critic, no fake-score network, no adversary, so it
  cannot diverge the way DMD/VSD can without their tuning (two extra 5B networks we could not train
  stably on few-shot data). An optional direct MSE to the HQ latent (``hq_weight``) lets the student
  correct the teacher where the pairs say so (as OSEDiff/InvSR regress to HQ).
* **Inputs** are exactly what the few-step sampler feeds the DiT at inference
  (``SamplerSettings(sigmas=..., start_sigma=..., solver=...)``): the start state is pure noise, or,
  with ``start_sigma``, the LQ latent noised to it (SDEdit-style, as OSEDiff/InvSR start from the
  LQ); latent frame 0 holds the clean condition at timestep 0 as in
  :mod:`.flow_matching`; the DiT sees ``sigma * 1000``; ``x0 = x - sigma * v``. For a random step
  ``k`` of the K the state is produced by running the student itself (no gradient) over steps
  ``0..k-1`` with fresh noise at each re-noise, the "backward simulation" of DMD2 (Yin et al. 2024,
  §4.5), so training sees the student's own intermediate states, not ones it never meets.
* The student starts **from the teacher's weights** (same rank, alpha and layers), as progressive
  distillation starts each student from its teacher: at step 0 it is the teacher run with K calls.

The student file is an ordinary restoration LoRA whose metadata records its schedule
(``turbo_sigmas``, ``turbo_start_sigma``, ``turbo_solver``, ``turbo_calls``), which
``restore --preset turbo`` reads. Curriculum, checkpoints, exact resume, validation, Cancel and
progress are :func:`.loop.train_lora`'s: this module only supplies the objective
(:class:`TurboObjective`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from ..errors import InputError
from ..seeds import seeded_generator
from ..sampler import NUM_TRAIN_TIMESTEPS, SamplerSettings, compute_dtype, first_frame_mask, sample, token_timesteps
from .config import TrainConfig, TrainProgress, TrainResult

logger = logging.getLogger(__name__)

TURBO_SOLVERS = ("x0_renoise", "euler")
TURBO_CALLS = (1, 2, 4)
TEACHER_ADAPTER = "vbridge_turbo_teacher"
#: Metadata keys of a student LoRA (``vbridge.`` is prefixed in the file) that ``--preset turbo`` reads.
META_SIGMAS, META_START, META_SOLVER, META_CALLS = "turbo_sigmas", "turbo_start_sigma", "turbo_solver", "turbo_calls"


def default_sigmas(calls: int, start_sigma: Optional[float] = None) -> list[float]:
    """Evenly spaced noise levels from the start level down: K=4 from noise is ``[1, .75, .5, .25]``.

    This is the shape of the published few-step lists (DMD-distilled Wan bases use evenly spaced
    timesteps such as 1000/750/500/250); with ``start_sigma`` s the list is ``s * [1, (K-1)/K, ...]``.
    """
    top = 1.0 if start_sigma is None else float(start_sigma)
    return [round(top * (calls - i) / calls, 6) for i in range(calls)]


@dataclass
class TurboSettings:
    """The student's few-step schedule and the teacher's sampling (what the targets are).

    ``sigmas`` (length ``calls``, decreasing, in (0, 1]) defaults to :func:`default_sigmas`.
    ``start_sigma``: ``None`` starts from pure noise; a value in (0, 1) starts latent frames >= 1
    at ``(1 - s) LQ + s noise`` (then ``sigmas[0]`` must equal it). ``hq_weight`` adds that
    multiple of the MSE to the HQ latent. The teacher samples ``teacher_steps`` steps of the
    ``fast`` preset (UniPC, diffusers grid, guidance 1) with noise seeded by ``teacher_seed``.
    """

    calls: int = 4
    sigmas: Optional[list[float]] = None
    start_sigma: Optional[float] = None
    solver: str = "x0_renoise"
    hq_weight: float = 0.0
    teacher_steps: int = 50
    teacher_shift: float = 5.0
    teacher_seed: int = 0

    def validate(self) -> "TurboSettings":
        if self.calls not in TURBO_CALLS:
            raise InputError(f"turbo calls must be one of {TURBO_CALLS}, got {self.calls!r}")
        if self.solver not in TURBO_SOLVERS:
            raise InputError(f"turbo solver must be one of {TURBO_SOLVERS}, got {self.solver!r}")
        if self.start_sigma is not None and not (0.0 < float(self.start_sigma) < 1.0):
            raise InputError(f"turbo start_sigma must be in (0, 1) (or none for pure noise), got {self.start_sigma!r}")
        sig = self.schedule()
        if len(sig) != self.calls:
            raise InputError(f"turbo sigmas {sig} must have one entry per call ({self.calls})")
        if any(not (0.0 < s <= 1.0) or not math.isfinite(s) for s in sig) or any(a <= b for a, b in zip(sig, sig[1:])):
            raise InputError(f"turbo sigmas must decrease strictly within (0, 1], got {sig}")
        if self.start_sigma is not None and abs(sig[0] - float(self.start_sigma)) > 1e-6:
            raise InputError(f"turbo sigmas must begin at start_sigma {self.start_sigma} (the state's noise level), "
                             f"got {sig[0]}")
        if not (self.hq_weight >= 0 and math.isfinite(self.hq_weight)):
            raise InputError(f"turbo hq_weight must be >= 0, got {self.hq_weight!r}")
        from ..validate import finite_float

        self.teacher_shift = finite_float("turbo teacher_shift", self.teacher_shift, min=0, min_inclusive=False)
        if isinstance(self.teacher_steps, bool) or not isinstance(self.teacher_steps, int) or self.teacher_steps < 1:
            raise InputError(f"teacher steps must be a positive integer, got {self.teacher_steps!r}")
        return self

    def schedule(self) -> list[float]:
        """The student's noise levels, one per DiT call."""
        if self.sigmas is not None and len(self.sigmas):
            return [float(s) for s in self.sigmas]
        return default_sigmas(self.calls, self.start_sigma)

    def teacher_sampler(self) -> SamplerSettings:
        return SamplerSettings(steps=self.teacher_steps, shift=self.teacher_shift).validate()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["sigmas"] = self.schedule()
        return d

    def metadata(self) -> dict[str, Any]:
        """The student LoRA's schedule keys (read by ``restore --preset turbo``)."""
        return {META_SIGMAS: self.schedule(), META_START: None if self.start_sigma is None else float(self.start_sigma),
                META_SOLVER: self.solver, META_CALLS: self.calls}


# ------------------------------------------------------------------ the few-step sampler, training side
def start_state(cond: torch.Tensor, noise: torch.Tensor, start_sigma: Optional[float]) -> torch.Tensor:
    """The first state: pure ``noise``, or the LQ latent (``cond`` on every frame) noised to ``start_sigma``."""
    if start_sigma is None:
        return noise.float()
    s = float(start_sigma)
    return (1 - s) * cond.float().expand_as(noise) + s * noise.float()


def predict_x0(transformer: torch.nn.Module, x: torch.Tensor, cond: torch.Tensor, sigma: float,
               prompt: torch.Tensor) -> torch.Tensor:
    """One DiT call at noise level ``sigma``: the clean-latent estimate ``x - sigma * v`` (frame 0 = ``cond``).

    Frame 0 is replaced by the condition and its tokens get timestep 0, as in the sampler and in
    :func:`.flow_matching.flow_matching_loss`. Returns fp32 (the graph is kept when grad is on).
    """
    b = x.shape[0]
    mask = first_frame_mask(tuple(x.shape), x.device)
    model_in = (1 - mask) * cond.float() + mask * x
    ts = token_timesteps(mask, torch.tensor(float(sigma) * NUM_TRAIN_TIMESTEPS), b, tuple(transformer.config.patch_size))
    ctx = prompt.expand(b, -1, -1) if prompt.shape[0] == 1 and b > 1 else prompt
    dtype = compute_dtype(transformer)
    v = transformer(hidden_states=model_in.to(dtype), timestep=ts.to(x.device),
                    encoder_hidden_states=ctx.to(x.device, dtype), return_dict=False)[0].float()
    return (1 - mask) * cond.float() + mask * (x - float(sigma) * v)


def next_state(x: torch.Tensor, x0: torch.Tensor, sigma: float, sigma_next: float, solver: str,
               fresh_noise: torch.Tensor) -> torch.Tensor:
    """The state at ``sigma_next`` after a call at ``sigma`` predicted ``x0``.

    ``x0_renoise``: ``(1 - s') x0 + s' * fresh_noise``; ``euler``: the flow Euler step
    ``x + (s' - s) v`` with ``v = (x - x0) / s`` (deterministic, ``fresh_noise`` unused).
    """
    if solver == "x0_renoise":
        return (1 - sigma_next) * x0 + sigma_next * fresh_noise.float()
    v = (x - x0) / sigma
    return x + (sigma_next - sigma) * v


def few_step_sample(transformer: torch.nn.Module, cond: torch.Tensor, noise: torch.Tensor, prompt: torch.Tensor,
                    sigmas: Sequence[float], start_sigma: Optional[float], solver: str,
                    fresh_noises: Sequence[torch.Tensor]) -> torch.Tensor:
    """The student's K-call restoration in latent space (what validation and the tests run).

    ``fresh_noises`` has ``K - 1`` tensors like ``noise`` (the re-noise draws of ``x0_renoise``).
    Returns the last clean estimate with frame 0 = ``cond``.
    """
    x = start_state(cond, noise, start_sigma)
    x0 = x
    for k, s in enumerate(sigmas):
        x0 = predict_x0(transformer, x, cond, s, prompt)
        if k + 1 < len(sigmas):
            x = next_state(x, x0, s, sigmas[k + 1], solver, fresh_noises[k])
    return x0


# ------------------------------------------------------------------ teacher targets, computed once
def _tensor_digest(tensors: Sequence[torch.Tensor]) -> str:
    h = hashlib.sha1()
    for t in tensors:
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().float().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def view_noise(shape: Sequence[int], seed: int, pair: int, view: int) -> torch.Tensor:
    """The fixed noise of one training view (the teacher starts from it; so does the student's start state)."""
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + pair * 1009 + view) % (2**63 - 1))
    return torch.randn(tuple(shape), generator=g)


class TurboObjective:
    """The distillation objective plugged into :func:`.loop.train_lora` (``objective=``).

    Hooks the loop calls: :meth:`setup` (after the training adapter is added: load the teacher,
    copy its weights into the student), :meth:`prepare_stage` (after a stage's latents are cached:
    the teacher's outputs for them), :meth:`loss` (one micro-batch, all randomness from the loop's
    generator so resume is exact), :meth:`validation_sample` and :meth:`teardown`.
    """

    def __init__(self, teacher_lora: str | Path, settings: TurboSettings, cache_dir: Path,
                 callback: Optional[Callable[[TrainProgress], None]] = None,
                 should_cancel: Optional[Callable[[], bool]] = None) -> None:
        from ..lora import read_lora

        self.settings = settings.validate()
        self.sigmas = settings.schedule()
        self.teacher_path = Path(teacher_lora)
        if not self.teacher_path.is_file():
            raise InputError(f"teacher LoRA {self.teacher_path} not found: train a restoration LoRA first "
                             "(python -m vbridge_core train ...)")
        self.teacher = read_lora(self.teacher_path)
        self.cache_dir = Path(cache_dir)
        self.callback = callback
        self.should_cancel = should_cancel
        self.targets: list[list[torch.Tensor]] = []
        self.train_adapter: Optional[str] = None
        self.prompt: Optional[torch.Tensor] = None

    # ---------------------------------------------------------------- hooks
    def setup(self, pipe, train_adapter: str, prompt: torch.Tensor) -> None:
        """Load the teacher as a second adapter and start the student from the teacher's weights."""
        from ..lora import apply_lora, set_active_loras

        self.train_adapter = train_adapter
        self.prompt = prompt
        apply_lora(pipe.transformer, self.teacher, TEACHER_ADAPTER, 1.0)
        set_active_loras(pipe.transformer, {train_adapter: 1.0})
        modules = dict(pipe.transformer.named_modules())
        copied = 0
        with torch.no_grad():
            for name, layer in self.teacher.weights.items():
                mod = modules.get(name)
                if mod is None or not hasattr(mod, "lora_A") or train_adapter not in mod.lora_A:
                    raise InputError(f"the student has no LoRA layer {name} of the teacher: train the student with "
                                     "the teacher's target modules (the turbo mode sets them itself)")
                a, b = mod.lora_A[train_adapter].weight, mod.lora_B[train_adapter].weight
                if tuple(a.shape) != tuple(layer.down.shape) or tuple(b.shape) != tuple(layer.up.shape):
                    raise InputError(f"teacher layer {name} has rank {layer.rank}; the student must have the same rank")
                # fold any alpha/rank difference into B so the student's delta equals the teacher's
                ratio = (layer.alpha / layer.rank) / float(mod.scaling[train_adapter])
                a.copy_(layer.down.to(a))
                b.copy_((layer.up.float() * ratio).to(b))
                copied += 1
        logger.info("turbo student starts from the teacher %s (%d layers); schedule %s, solver %s, start %s",
                    self.teacher_path.name, copied, self.sigmas, self.settings.solver, self.settings.start_sigma)

    def teardown(self, pipe) -> None:
        from ..lora import loaded_loras, remove_lora

        if TEACHER_ADAPTER in loaded_loras(pipe.transformer):
            remove_lora(pipe.transformer, TEACHER_ADAPTER)

    def _key(self, cache: list[list[torch.Tensor]], resolution: int) -> str:
        st = self.teacher_path.stat()
        conds = [z[:, :, :1] for vs in cache for z in vs]
        spec = dict(teacher=f"{self.teacher_path.resolve()}|{st.st_size}|{st.st_mtime_ns}",
                    steps=self.settings.teacher_steps, shift=self.settings.teacher_shift, seed=self.settings.teacher_seed,
                    res=resolution, conds=_tensor_digest(conds), prompt=_tensor_digest([self.prompt.cpu()]),
                    shape=list(cache[0][0].shape))
        return hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]

    @torch.no_grad()
    def prepare_stage(self, pipe, cache: list[list[torch.Tensor]], stage_index: int, resolution: int,
                      report: Callable[[TrainProgress], None], is_main: bool = True,
                      barrier: Optional[Callable[[], None]] = None) -> None:
        """The teacher's 50-step latents for every cached view of this stage (loaded from disk when cached).

        The teacher samples with the ``fast`` settings from :func:`view_noise`; with several
        processes only the main one samples, the others wait at ``barrier`` and read the file.
        """
        from safetensors.torch import load_file

        from ..fileio import save_safetensors_atomic
        from ..lora import set_active_loras

        path = self.cache_dir / f"turbo_teacher_{self._key(cache, resolution)}.safetensors"
        partial = path.with_name(path.stem + ".partial.safetensors")
        n = sum(len(vs) for vs in cache)
        if is_main and not path.is_file():
            tr = pipe.transformer
            was = tr.training
            tr.eval()
            set_active_loras(tr, {TEACHER_ADAPTER: 1.0})
            settings = self.settings.teacher_sampler()
            flat: dict[str, torch.Tensor] = load_file(str(partial)) if partial.is_file() else {}
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            logger.info("stage %d: sampling the teacher (%d steps) for %d training views (%d cached)",
                        stage_index + 1, settings.steps, n, len(flat))
            try:
                for i, views in enumerate(cache):
                    for v, z in enumerate(views):
                        if f"{i}.{v}" in flat:
                            continue
                        if self.should_cancel is not None and self.should_cancel():
                            from .loop import TrainingCancelled

                            # keep what is done: the rerun (--resume auto) samples only the rest
                            save_safetensors_atomic(flat, partial)
                            raise TrainingCancelled(f"cancelled while sampling the teacher ({len(flat)} of {n} "
                                                    "views kept); run again with the same settings to continue",
                                                    None)
                        cond = z[:, :, :1].to(pipe.device)
                        noise = view_noise(z.shape, self.settings.teacher_seed, i, v).to(pipe.device)
                        out = sample(tr, cond, noise, self.prompt, settings)
                        flat[f"{i}.{v}"] = out.cpu().contiguous()
                        report(TrainProgress("teacher", len(flat), n, stage=stage_index, resolution=resolution))
            finally:
                set_active_loras(tr, {self.train_adapter: 1.0})
                tr.train(was)
            save_safetensors_atomic(flat, path)
            partial.unlink(missing_ok=True)
            logger.info("stage %d: cached the teacher's outputs in %s", stage_index + 1, path)
        if barrier is not None:
            barrier()
        if not path.is_file():
            raise InputError(f"teacher outputs {path} are missing (was the main process stopped?)")
        flat = load_file(str(path))
        self.targets = [[flat[f"{i}.{v}"] for v in range(len(vs))] for i, vs in enumerate(cache)]

    def loss(self, transformer: torch.nn.Module, cache: list[list[torch.Tensor]], gen: torch.Generator,
             global_batch: int, mine: slice, device: torch.device) -> torch.Tensor:
        """One micro-batch: draw views, a step k and the noises; roll the student to step k; regress x0.

        Everything random comes from ``gen`` in a fixed order over the whole global batch, so a
        resumed run and a run over several processes draw the same numbers.
        """
        k_calls = len(self.sigmas)
        pi = torch.randint(len(cache), (global_batch,), generator=gen)
        vi = torch.randint(len(cache[0]), (global_batch,), generator=gen)
        ks = torch.randint(k_calls, (global_batch,), generator=gen)
        shape = (global_batch,) + tuple(cache[0][0].shape[1:])
        fresh = [torch.randn(shape, generator=gen) for _ in range(k_calls - 1)]
        idx = list(range(global_batch))[mine]
        total = torch.zeros((), device=device)
        for j in idx:  # per sample: each has its own step k (batch 1 is the common case)
            p, v, k = int(pi[j]), int(vi[j]), int(ks[j])
            z = cache[p][v].to(device)
            cond = z[:, :, :1]
            noise = view_noise(z.shape, self.settings.teacher_seed, p, v).to(device)
            x = start_state(cond, noise, self.settings.start_sigma)
            with torch.no_grad():  # backward simulation: the student's own state at step k
                for i in range(k):
                    x0 = predict_x0(transformer, x, cond, self.sigmas[i], self.prompt)
                    x = next_state(x, x0, self.sigmas[i], self.sigmas[i + 1], self.settings.solver,
                                   fresh[i][j:j + 1].to(device))
            x0 = predict_x0(transformer, x.detach(), cond, self.sigmas[k], self.prompt)
            target = self.targets[p][v].to(device)
            loss = torch.nn.functional.mse_loss(x0[:, :, 1:], target[:, :, 1:].float())
            if self.settings.hq_weight > 0:
                loss = loss + self.settings.hq_weight * torch.nn.functional.mse_loss(x0[:, :, 1:], z[:, :, 1:].float())
            total = total + loss
        return total / max(1, len(idx))

    @torch.no_grad()
    def validation_sample(self, transformer: torch.nn.Module, cond: torch.Tensor, noise: torch.Tensor,
                          prompt: torch.Tensor, seed: int) -> torch.Tensor:
        """Validation restores with the student's own K-call schedule (re-noise draws seeded by ``seed``)."""
        g = seeded_generator(seed, 7919)
        fresh = [torch.randn(tuple(noise.shape), generator=g).to(noise.device) for _ in range(len(self.sigmas) - 1)]
        return few_step_sample(transformer, cond, noise, prompt, self.sigmas, self.settings.start_sigma,
                               self.settings.solver, fresh)


def teacher_target_modules(teacher) -> list[str]:
    """The module-name suffixes (``attn1.to_q``...) the teacher's layers sit on, for the student's peft config."""
    out = set()
    for name in teacher.weights:
        parts = name.split(".")
        out.add(".".join(parts[2:]) if parts[0] == "blocks" and len(parts) > 2 else name)
    return sorted(out)


def train_turbo_lora(pipe, pairs: Any, teacher_lora: str | Path, config: TrainConfig, out_path: str | Path, *,
                     turbo: Optional[TurboSettings] = None, prompt_embeds: Optional[torch.Tensor] = None,
                     negative_prompt_embeds: Optional[torch.Tensor] = None, cache_dir: Optional[str | Path] = None,
                     metadata: Optional[dict[str, Any]] = None, **train_kwargs: Any) -> TrainResult:
    """Distil ``teacher_lora`` into a K-call student LoRA written to ``out_path``; see the module docstring.

    The student takes the teacher's rank, alpha and layers (``config``'s are replaced, with a log
    line when they differ) and its prompt embeddings by default. ``turbo`` is stored in
    ``config.turbo`` so resuming with other turbo settings is refused. Other ``train_kwargs`` go to
    :func:`.loop.train_lora` (callback, should_cancel, resume, validation_pairs, accelerator...).
    """
    from ..lora import read_lora
    from .checkpoint import checkpoint_dir
    from .loop import make_accelerator, train_lora

    turbo = (turbo or TurboSettings()).validate()
    tpath = Path(teacher_lora)
    if not tpath.is_file():
        raise InputError(f"teacher LoRA {tpath} not found: train a restoration LoRA first (python -m vbridge_core "
                         "train ...), then pass it as --teacher-lora")
    lf = read_lora(tpath)
    if lf.role != "restoration":
        raise InputError(f"{tpath} is a {lf.role} LoRA; the turbo teacher must be a restoration LoRA")
    ranks = {l.rank for l in lf.weights.values()}
    if len(ranks) != 1:
        raise InputError(f"teacher {tpath.name} has layers of different ranks {sorted(ranks)}; the turbo student "
                         "copies the teacher and needs one rank")
    targets = teacher_target_modules(lf)
    if (config.rank, float(config.alpha)) != (lf.rank, float(lf.alpha)):
        logger.info("turbo student takes the teacher's rank %d / alpha %g (asked: %d / %g)", lf.rank, lf.alpha,
                    config.rank, config.alpha)
    config.rank, config.alpha, config.target_modules = lf.rank, float(lf.alpha), targets
    config.role = "restoration"
    config.turbo = turbo.to_dict()
    config.validate()
    pos = prompt_embeds if prompt_embeds is not None else lf.prompt_embeds
    neg = negative_prompt_embeds if negative_prompt_embeds is not None else lf.negative_prompt_embeds
    if pos is None:
        raise InputError(f"{tpath} carries no prompt embedding: pass prompt_embeds (or --prompt with a text encoder)")
    acc = train_kwargs.pop("accelerator", None) or make_accelerator(pipe.device)
    cache = Path(cache_dir) if cache_dir else checkpoint_dir(out_path) / "cache"
    objective = TurboObjective(tpath, turbo, cache, should_cancel=train_kwargs.get("should_cancel"))
    meta: dict[str, Any] = dict(turbo.metadata(), turbo_teacher=tpath.name, turbo_teacher_steps=turbo.teacher_steps,
                                turbo_hq_weight=turbo.hq_weight,
                                turbo_recipe="teacher-output regression with backward simulation")
    for k in ("prompt", "negative_prompt"):
        if f"vbridge.{k}" in lf.metadata:
            meta[k] = lf.metadata[f"vbridge.{k}"]
    meta.update(metadata or {})
    return train_lora(pipe, pairs, config, out_path, prompt_embeds=pos, negative_prompt_embeds=neg, metadata=meta,
                      accelerator=acc, objective=objective, **train_kwargs)
