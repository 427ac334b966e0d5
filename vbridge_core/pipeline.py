"""VBridgePipeline: restore images along a pseudo-temporal trajectory, then drift-correct them.

``restore(images)`` pads each image by reflection to a multiple of 32, encodes it with the Wan2.2
VAE as the clean first frame, samples an F-frame pseudo-video with the restoration LoRA active,
decodes it and returns the last frame cropped back to the input size (and, on request, every
frame). ``drift_correct(images)`` does the same from the base output with the drift-correction
LoRA active. Both adapters sit on one base transformer; switching between them reloads nothing.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch

from . import trajectory
from .errors import InputError
from .sampler import SampleStats, SamplerSettings, StepCallback, sample
from .seeds import seeded_generator

logger = logging.getLogger(__name__)

ROLES = ("restoration", "drift_correction", "accelerator")
#: Adapters that are switched per pass; the ``accelerator`` (a step-distilled base as a LoRA) stays on under them.
PASS_ROLES = ("restoration", "drift_correction")

@dataclass
class RestoreResult:
    """Outputs of one restore / drift-correct call.

    ``final``: one ``[3, H, W]`` float tensor in 0..1 per input, at the input's size.
    ``trajectory``: one ``[F, 3, H, W]`` tensor per input (frame 0 = the decoded condition, last =
    ``final``) when requested, else ``None``. ``info``: settings, timings and memory.
    """

    final: list[torch.Tensor]
    trajectory: Optional[list[torch.Tensor]] = None
    info: dict[str, Any] = field(default_factory=dict)

    def stacked(self) -> torch.Tensor:
        """``final`` as one ``[B, 3, H, W]`` tensor (inputs must share a size)."""
        sizes = {tuple(x.shape) for x in self.final}
        if len(sizes) != 1:
            raise InputError(f"outputs have different sizes {sorted(sizes)}; use .final for a list")
        return torch.stack(self.final)


def default_device() -> torch.device:
    """CUDA when available, else CPU (queried at call time, never at import)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: torch.device | str | None) -> torch.device:
    """``device`` as a ``torch.device`` (``None``: :func:`default_device`), checked to exist here.

    Raises :class:`InputError` for names torch does not know (``--device foo``) and for a CUDA device
    this machine lacks (torch built without CUDA, no GPU visible, or ``cuda:3`` on a 2-GPU machine),
    instead of a traceback from deep inside the first weight copy.
    """
    if device is None:
        return default_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {device!r} asked for, but this PyTorch sees no CUDA GPU (CPU-only build or "
                             "no GPU visible); use cpu, or install a CUDA build of torch")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} "
                             "CUDA device(s), cuda:0 ...")
    return dev


#: What to do when no prompt embedding exists: a full fine-tune (the authors' release) carries no prompt.
RELEASE_PROMPT_HELP = (
    "no prompt embedding: the model has no V-Bridge LoRA carrying one (e.g. the authors' full fine-tuned "
    "checkpoint). Supply the release's prompt pair, encoded once by umt5-xxl and then cached on disk "
    "(~/.cache/vbridge/prompt_embeds): CLI: add --preset paper --text-encoder "
    "models/text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors (the pair in vbridge_core/presets.py is used); "
    "Python: pos, neg = vbridge_core.presets.release_prompt_embeds(TEXT_ENCODER) and "
    "restore(..., prompt_embeds=pos, negative_prompt_embeds=neg); ComfyUI: connect CLIPTextEncode (CLIPLoader "
    "type wan, umt5_xxl) with the release prompt to 'conditioning' and its negative prompt to 'negative' "
    "(workflows/restore_paper_release.json).")


def _is_compile_failure(e: BaseException) -> bool:
    """Whether ``e`` comes from torch.compile (dynamo tracing or the backend compiler), not from the model."""
    mod = type(e).__module__ or ""
    if mod.startswith(("torch._dynamo", "torch._inductor")):
        return True
    try:
        from torch._dynamo.exc import BackendCompilerFailed, InternalTorchDynamoError, TorchRuntimeError

        return isinstance(e, (BackendCompilerFailed, InternalTorchDynamoError, TorchRuntimeError))
    except ImportError:  # pragma: no cover - torch without dynamo
        return False


def _as_image_list(images: Any) -> list[torch.Tensor]:
    """Accept a [B,3,H,W] tensor, one [3,H,W] tensor, or a list of images/arrays; return [3,H,W] 0..1 tensors."""
    from .images import to_rgb_tensor

    if isinstance(images, torch.Tensor) and images.ndim == 4:
        items: Iterable[Any] = list(images)
    elif isinstance(images, (list, tuple)):
        items = images
    else:
        items = [images]
    out = [to_rgb_tensor(x) for x in items]
    if not out:
        raise InputError("no images given: pass at least one image")
    return out


class VBridgePipeline:
    """Wan2.2-TI2V-5B DiT + VAE with V-Bridge adapters, ready to restore images.

    Build it from loaded diffusers modules, or with :meth:`from_files` from the model files users
    have. ``prompt_embeds`` / ``negative_prompt_embeds`` override the prompts embedded in LoRAs.
    """

    def __init__(self, transformer: torch.nn.Module, vae: torch.nn.Module, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, prompt_embeds: torch.Tensor | None = None,
                 negative_prompt_embeds: torch.Tensor | None = None, text_encoder: str | Path | None = None,
                 tokenizer: str | Path | None = None, vae_tiling: bool = False, offload: bool = False) -> None:
        self.offload = bool(offload)
        self.compiled: str | None = None
        self.device = resolve_device(device)
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.transformer = transformer
        self.vae = vae
        self.prompt_embeds = prompt_embeds
        self.negative_prompt_embeds = negative_prompt_embeds
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.adapters: dict[str, dict[str, Any]] = {}
        if vae_tiling and hasattr(vae, "enable_tiling"):
            vae.enable_tiling()
        z = vae.config.z_dim
        self._lat_mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32).view(1, z, 1, 1, 1)
        self._lat_std = torch.tensor(vae.config.latents_std, dtype=torch.float32).view(1, z, 1, 1, 1)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_files(cls, model_dir: str | Path | None = None, *, dit: str | Path | None = None,
                   vae: str | Path | None = None, lora: str | Path | None = None, lora_strength: float = 1.0,
                   drift_lora: str | Path | None = None, drift_strength: float = 1.0,
                   device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                   text_encoder: str | Path | None = None, tokenizer: str | Path | None = None,
                   vae_tiling: bool = False, offload: bool = False, accelerator_lora: str | Path | None = None,
                   accelerator_strength: float = 1.0, allow_partial_lora: bool = False) -> "VBridgePipeline":
        """Load the DiT and VAE (single files or a diffusers folder) and the optional LoRAs.

        ``allow_partial_lora=True`` applies the part of a LoRA that fits and logs the rest (see
        :meth:`load_lora`); by default a LoRA with keys that fit nothing is refused.

        ``offload=True`` keeps both models in CPU memory and moves each to ``device`` only while it
        works (the VAE for encode/decode, the DiT for sampling): peak VRAM is one model, not two.
        ``accelerator_lora`` is a step-distilled base as a LoRA (FastWan's ComfyUI LoRA), stacked under
        the V-Bridge LoRAs and active in every pass; a step-distilled full checkpoint loads as ``dit``.
        """
        from .models import load_transformer, load_vae, resolve_model_files

        dev = resolve_device(device)
        dt = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
        dit_path, vae_path = resolve_model_files(model_dir=model_dir, dit=dit, vae=vae)
        t0 = time.perf_counter()
        home = torch.device("cpu") if offload else dev
        transformer = load_transformer(dit_path, dtype=dt, device=home)
        vae_model = load_vae(vae_path, dtype=torch.float32 if dev.type == "cpu" else dt, device=home)
        logger.info("loaded DiT %s and VAE %s in %.1f s", dit_path, vae_path, time.perf_counter() - t0)
        pipe = cls(transformer, vae_model, device=dev, dtype=dt, text_encoder=text_encoder, tokenizer=tokenizer,
                   vae_tiling=vae_tiling, offload=offload)
        if accelerator_lora:
            pipe.load_lora(accelerator_lora, role="accelerator", strength=accelerator_strength)
        if lora:
            pipe.load_lora(lora, role="restoration", strength=lora_strength, allow_partial=allow_partial_lora)
        if drift_lora:
            pipe.load_lora(drift_lora, role="drift_correction", strength=drift_strength, allow_partial=allow_partial_lora)
        return pipe

    def load_lora(self, lora: Any, role: str | None = None, strength: float = 1.0, *, allow_partial: bool = False) -> str:
        """Attach a LoRA (path, peft ``save_pretrained`` folder or :class:`lora.LoraFile`) as the adapter for ``role``.

        ``role`` defaults to the role in the file's metadata. An adapter already loaded for the role
        is replaced. ``allow_partial=True`` applies the layers/tensors that fit this model and lists
        the others in a warning (and in ``self.adapters[role]["skipped"]``) instead of refusing the
        LoRA. Returns the role.
        """
        from .lora import LoraFile, apply_lora, read_lora, remove_lora

        lf = lora if isinstance(lora, LoraFile) else read_lora(lora)
        role = role or lf.role
        if role not in ROLES:
            raise InputError(f"unknown LoRA role {role!r}; use one of {ROLES}")
        stated = lf.metadata.get("vbridge.role")
        if stated is not None and stated != role:
            # e.g. the restoration LoRA given as --drift-lora: it runs, but is almost certainly a mix-up
            logger.warning("%s was trained as a %s LoRA but is loaded as the %s LoRA", lf.path or "LoRA", stated, role)
        if role in self.adapters:
            remove_lora(self.transformer, self.adapters[role]["name"])
        name = f"vbridge_{role}"
        skipped: list[str] = []
        if allow_partial:
            from .lora import check_lora_fits

            missing, shapes = check_lora_fits(self.transformer, lf)
            skipped = missing + shapes
        apply_lora(self.transformer, lf, adapter_name=name, strength=strength, allow_partial=allow_partial)
        self.adapters[role] = {"name": name, "strength": float(strength), "file": lf, "skipped": skipped}
        self._activate(None)
        return role

    def adapter_file(self, role: str) -> Any:
        """The :class:`lora.LoraFile` loaded for ``role`` (``None`` when none is): its metadata may name a
        turbo schedule (``presets.preset("turbo", lora=...)``)."""
        return self.adapters.get(role, {}).get("file")

    def _activate(self, role: str | None) -> None:
        """Make ``role``'s adapter the only active pass adapter (``None``: none); an accelerator LoRA
        stays active under it."""
        if not self.adapters:
            return
        from .lora import set_active_loras

        active = {}
        for r in ("accelerator", role):
            if r is not None and r in self.adapters:
                a = self.adapters[r]
                active[a["name"]] = a["strength"]
        set_active_loras(self.transformer, active)

    # ------------------------------------------------------------------ prompts
    def _prompt_pair(self, role: str, prompt_embeds: torch.Tensor | None, negative_prompt_embeds: torch.Tensor | None,
                     prompt: str | None, negative_prompt: str | None, need_negative: bool):
        """Resolve the prompt embeddings: explicit > pipeline override > text > the adapter's own."""
        lf = self.adapters.get(role, {}).get("file")
        pos = prompt_embeds if prompt_embeds is not None else self.prompt_embeds
        neg = negative_prompt_embeds if negative_prompt_embeds is not None else self.negative_prompt_embeds
        if pos is None and prompt is not None:
            pos = self._encode(prompt)
        if need_negative and neg is None and negative_prompt is not None:
            neg = self._encode(negative_prompt)
        if pos is None and lf is not None:
            pos = lf.prompt_embeds
        if neg is None and lf is not None:
            neg = lf.negative_prompt_embeds
        if pos is None and lf is not None and lf.metadata.get("vbridge.prompt") and self.text_encoder:
            pos = self._encode(lf.metadata["vbridge.prompt"])
        if pos is None and lf is None and any(r in PASS_ROLES for r in self.adapters):
            loaded = ", ".join(sorted(r for r in self.adapters if r in PASS_ROLES))
            raise InputError(f"this step needs the {role.replace('_', '-')} LoRA, but only the {loaded} LoRA is "
                             "loaded: add it (--lora for restoring, --drift-lora for drift correction)")
        if pos is None and lf is None:
            raise InputError(RELEASE_PROMPT_HELP)
        if pos is None:
            raise InputError(
                "no prompt embedding: the LoRA carries none. Pass prompt_embeds, or give a prompt together with a "
                "text encoder (--prompt with --text-encoder; in ComfyUI connect 'conditioning'). " + RELEASE_PROMPT_HELP)
        if need_negative and neg is None:
            raise InputError("guidance > 1 needs a negative prompt: use a LoRA that embeds one, pass "
                             "negative_prompt_embeds, or give --negative-prompt with a text encoder")
        from .runtime import pad_prompt_embeds

        # as the official model sees them, whatever their source (API, LoRA file, conditioning, encoder)
        return pad_prompt_embeds(pos), (pad_prompt_embeds(neg) if neg is not None else None)

    def _encode(self, text: str) -> torch.Tensor:
        if not self.text_encoder:
            raise InputError(f"a prompt ({text[:40]!r}) needs a text encoder: pass text_encoder= (umt5-xxl file "
                             "or the diffusers folder) or use the prompt embedded in the LoRA")
        from .text_encoder import encode_prompt

        return encode_prompt(text, self.text_encoder, tokenizer=self.tokenizer, device=self.device, dtype=self.dtype)

    # ------------------------------------------------------------------ speed
    def compile(self, backend: str | None = None, mode: str | None = None, fullgraph: bool = True) -> None:
        """Regional ``torch.compile`` of the DiT's repeated blocks (diffusers' ``compile_repeated_blocks``).

        The 30 identical transformer blocks compile once and are reused, so compiling takes seconds
        rather than minutes; on an H100 diffusers measured 38.5 ms instead of 63.9 ms per 1024x1024 F=5
        forward (``shared/anchors``). LoRA adapters stay switchable (a switch may trigger one recompile).
        ``backend``/``mode`` go to ``torch.compile`` (default inductor).
        """
        kwargs: dict[str, Any] = {"fullgraph": fullgraph}
        if backend is not None:
            kwargs["backend"] = backend
        if mode is not None:
            kwargs["mode"] = mode
        self.transformer.compile_repeated_blocks(**kwargs)
        self.compiled = backend if isinstance(backend, str) else getattr(backend, "__name__", "custom") \
            if backend is not None else "inductor"
        logger.info("compiled the DiT blocks (backend %s)", self.compiled)

    def maybe_compile(self, compile: bool | None = None, backend: str | None = None) -> bool:
        """Regional compile by policy: ``None`` (auto) compiles on CUDA only, ``True`` always, ``False``
        never. torch.compile works lazily, so a toolchain problem (no Triton, no C++ compiler) shows at
        the first forward; :meth:`run` then logs it and falls back to eager. Returns whether compiled."""
        want = self.device.type == "cuda" if compile is None else bool(compile)
        if want and self.compiled is None:
            try:
                self.compile(backend=backend)
            except Exception as e:  # noqa: BLE001 - any failure to set up compile means: run eager
                logger.warning("torch.compile unavailable (%s: %s); running the DiT eagerly", type(e).__name__, e)
                return False
        return self.compiled is not None

    def uncompile(self) -> None:
        """Drop the compiled block wrappers (``nn.Module.compile`` sets ``_compiled_call_impl``)."""
        for m in self.transformer.modules():
            if getattr(m, "_compiled_call_impl", None) is not None:
                m._compiled_call_impl = None
        self.compiled = None

    # ------------------------------------------------------------------ placement
    @contextlib.contextmanager
    def _on_device(self, module: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """Run a block with ``module`` on the compute device; with offload, move it back afterwards."""
        if self.offload:
            module.to(self.device)
        try:
            yield module
        finally:
            if self.offload:
                module.to("cpu")
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()

    # ------------------------------------------------------------------ VAE
    @torch.no_grad()
    def encode_condition(self, images: torch.Tensor) -> torch.Tensor:
        """VAE latent of the images as a 1-frame video, normalised: ``[B, 48, 1, h, w]``."""
        vae_dtype = next(self.vae.parameters()).dtype
        x = (images * 2 - 1).unsqueeze(2).to(self.device, vae_dtype)
        with self._on_device(self.vae):
            z = self.vae.encode(x).latent_dist.mode().float()
        return (z - self._lat_mean.to(z.device)) / self._lat_std.to(z.device)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode normalised latents to pixel frames ``[B, 3, F, H, W]`` in 0..1 (float32)."""
        vae_dtype = next(self.vae.parameters()).dtype
        z = latents.float() * self._lat_std.to(latents.device) + self._lat_mean.to(latents.device)
        with self._on_device(self.vae):
            video = self.vae.decode(z.to(vae_dtype), return_dict=False)[0]
        return (video.float() / 2 + 0.5).clamp(0, 1)

    # ------------------------------------------------------------------ sampling
    def restore(self, images: Any, **kwargs: Any) -> RestoreResult:
        """Restore degraded images with the restoration adapter; see :meth:`run` for the options."""
        return self.run(images, role="restoration", **kwargs)

    def drift_correct(self, images: Any, **kwargs: Any) -> RestoreResult:
        """Refine base outputs with the drift-correction adapter (a short trajectory, default F=5)."""
        if "drift_correction" not in self.adapters:
            raise InputError("drift correction needs a drift-correction LoRA: load one with --drift-lora / "
                             "load_lora(path, role='drift_correction')")
        return self.run(images, role="drift_correction", **kwargs)

    @torch.no_grad()
    def run(self, images: Any, *, role: str = "restoration", frames: int = 5, steps: int = 50, seed: int = 0,
            shift: float = 5.0, solver: str = "unipc", sigma_grid: str = "diffusers", guidance: float = 1.0,
            guidance_skip_tail: float = 0.0, prompt: str | None = None, negative_prompt: str | None = None,
            prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
            return_trajectory: bool = False, batch_size: int = 1, callback: StepCallback | None = None,
            should_cancel: Callable[[], bool] | None = None, same_seed: bool = False,
            sigmas: Sequence[float] | None = None, start_sigma: float | None = None, batch_cfg: bool = True,
            cache: Any = None, seeds: list[int] | None = None, release_size: bool = False) -> RestoreResult:
        """Sample the pseudo-video for each image and return its last frame.

        Images may have any sizes; they are reflect-padded to multiples of 32 and cropped back.
        ``release_size=True`` (the ``paper`` preset) first applies the release's size rule
        (:func:`images.fit_release_size`): an image larger than 1440x2560 is resized (bicubic,
        antialiased) to an area of at most 2560x1440 with sides floored to multiples of 32, and its
        result has that size; ``info["release_size"]`` lists what was resized.
        Image ``i`` of the call uses seed ``seed + i``, so a result does not depend on how the
        inputs are batched; ``same_seed=True`` gives every image ``seed`` (video frames: the same
        noise for every frame removes much of the frame-to-frame flicker). ``batch_size`` images of one padded size share each DiT call.

        Few-step options (see :mod:`vbridge_core.sampler`): ``sigmas`` an explicit descending sigma
        list in (0, 1] (``steps`` becomes its length), ``start_sigma`` starts latent frames >= 1 from
        the LQ latent noised to that sigma, ``solver="x0_renoise"`` the DMD sampler. ``batch_cfg``
        runs the two guidance passes as one batched DiT call. ``cache``: step caching of the DiT
        (``None``/``"none"``, ``"fbc"``/``"fbc:0.05"`` or a :class:`vbridge_core.cache.CacheSpec`).
        ``info["dit_calls_per_image"]`` counts DiT noise predictions per image (guided steps count 2).
        ``seeds`` (one per image) overrides ``seed``/``same_seed``, so a process restoring its share of a
        larger run gives each image the seed a one-process run would.
        """
        from .cache import dit_cache
        from .images import crop_back, fit_release_size, pad_to_multiple, resize_image

        trajectory.check_frames(frames)
        settings = SamplerSettings(steps=steps, shift=shift, solver=solver, sigma_grid=sigma_grid,
                                   guidance=guidance, guidance_skip_tail=guidance_skip_tail, sigmas=sigmas,
                                   start_sigma=start_sigma, batch_cfg=batch_cfg).validate()
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
        imgs = _as_image_list(images)
        if seeds is not None and len(seeds) != len(imgs):
            raise InputError(f"seeds: one per image needed, got {len(seeds)} for {len(imgs)} image(s)")
        resized: list[dict[str, Any]] = []
        if release_size:
            for i, img in enumerate(imgs):
                h, w = int(img.shape[-2]), int(img.shape[-1])
                th, tw = fit_release_size(h, w)
                if (th, tw) != (h, w):
                    imgs[i] = resize_image(img, (th, tw))
                    resized.append({"image": i, "from": [h, w], "to": [th, tw]})
                    logger.info("image %d: %dx%d resized to %dx%d (release size rule: area <= 2560x1440)",
                                i, w, h, tw, th)
        from .limits import check_image_size

        for i, img in enumerate(imgs):
            check_image_size(int(img.shape[-2]), int(img.shape[-1]), f"image {i}")
        pos, neg = self._prompt_pair(role, prompt_embeds, negative_prompt_embeds, prompt, negative_prompt,
                                     need_negative=settings.guided_steps() > 0)
        self._activate(role if role in self.adapters else None)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        t_start = time.perf_counter()

        # Group images by padded size so each batch is one tensor.
        padded = []
        for i, img in enumerate(imgs):
            x, pad = pad_to_multiple(img.unsqueeze(0), 32)
            padded.append((i, x, pad))
        groups: dict[tuple[int, int], list] = {}
        for item in padded:
            groups.setdefault(tuple(item[1].shape[-2:]), []).append(item)

        finals: list[Optional[torch.Tensor]] = [None] * len(imgs)
        trajs: list[Optional[torch.Tensor]] = [None] * len(imgs)
        n_lat = trajectory.latent_frames(frames)
        done_steps = 0
        n_steps = settings.total_steps()
        total_steps = n_steps * len(imgs)
        calls_per_image = 0
        forward_passes = 0
        planned = settings.plan()
        calibration: list[float] = []
        cache_report: dict[str, Any] = {}

        for items in groups.values():
            for b0 in range(0, len(items), batch_size):
                chunk = items[b0:b0 + batch_size]
                x = torch.cat([c[1] for c in chunk])
                cond = self.encode_condition(x)
                _, c, _, h, w = cond.shape
                # one CPU generator per image: its initial noise, then (x0_renoise) its fresh re-noising draws
                gens = [seeded_generator(seeds[c_[0]] if seeds is not None else seed,
                                         0 if seeds is not None or same_seed else c_[0]) for c_ in chunk]
                noise = torch.cat([torch.randn((1, c, n_lat, h, w), generator=g, dtype=torch.float32)
                                   for g in gens]).to(self.device)

                def step_cb(info, _base=done_steps, _n=len(chunk)):
                    if callback is not None:
                        info.extra.update(image_indices=[c_[0] for c_ in chunk], overall_step=_base + info.step * _n,
                                          overall_total=total_steps)
                        callback(info)

                def run_sampler():
                    st = SampleStats()
                    with self._on_device(self.transformer), dit_cache(self.transformer, cache, n_steps) as cs:
                        out = sample(self.transformer, cond, noise, pos, settings, negative_prompt_embeds=neg,
                                     callback=step_cb, should_cancel=should_cancel,
                                     generator=[torch.Generator("cpu").set_state(g.get_state()) for g in gens],
                                     stats=st)
                    return out, st, cs

                try:
                    lat, stats, cache_state = run_sampler()
                except Exception as e:
                    if self.compiled is None or not _is_compile_failure(e):
                        raise
                    logger.warning("torch.compile of the DiT failed at its first use (%s: %s); falling back to eager "
                                   "for this pipeline", type(e).__name__, str(e).splitlines()[0] if str(e) else "")
                    self.uncompile()
                    lat, stats, cache_state = run_sampler()
                if cache_state is not None:
                    cache_report = cache_state.report()
                    calibration = cache_state.calibration
                calls_per_image = stats.dit_calls_per_image
                forward_passes += stats.forward_passes
                done_steps += n_steps * len(chunk)
                video = self.decode(lat)  # [b, 3, F, H, W]
                for j, (idx, _, pad) in enumerate(chunk):
                    frames_j = crop_back(video[j].permute(1, 0, 2, 3), pad).cpu()  # [F, 3, H, W]
                    finals[idx] = frames_j[-1].clone()
                    if return_trajectory:
                        trajs[idx] = frames_j
        seconds = time.perf_counter() - t_start
        info = dict(role=role, frames=frames, steps=n_steps, seed=seed, same_seed=same_seed, shift=shift, solver=solver,
                    sigma_grid=sigma_grid, guidance=guidance, guidance_skip_tail=guidance_skip_tail,
                    sigmas=[round(x, 6) for x in planned] if planned is not None else None, start_sigma=settings.start_sigma,
                    dit_calls_per_image=calls_per_image, dit_forward_passes=forward_passes, batch_cfg=settings.batch_cfg,
                    cache=cache_report or None,
                    batch_size=batch_size, images=len(imgs), seconds=round(seconds, 3), offload=self.offload,
                    compiled=self.compiled,
                    device=str(self.device), dtype=str(self.dtype).replace("torch.", ""),
                    adapters={r: a["strength"] for r, a in self.adapters.items()})
        if release_size:
            info["release_size"] = {"rule": "area <= 2560x1440, sides floored to multiples of 32, when H > 1440 "
                                            "or W > 2560", "resized": resized}
        skipped = {r: a["skipped"][:10] for r, a in self.adapters.items() if a.get("skipped")}
        if skipped:  # allow_partial: say what of the LoRA was not applied, next to the result
            info["lora_not_applied"] = skipped
        if calibration:
            info["cache_calibration"] = calibration
        if self.device.type == "cuda":
            info["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2)
        return RestoreResult(final=[f for f in finals if f is not None],
                             trajectory=[t for t in trajs if t is not None] if return_trajectory else None, info=info)
