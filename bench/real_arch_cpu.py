#!/usr/bin/env python
"""Real-shape check on the CPU: the Wan2.2-TI2V-5B DiT with random weights, written as the single
files users have, loaded through our loader, with a rank-32 LoRA, one restore step at 64x64.

Tiny models keep the rules of the architecture but not its sizes; this script runs the code users
run on the real sizes (dim 3072, 24 heads, FFN 14336, 30 layers; the real Wan2.2 VAE) so bugs that
only show at real shapes (a mapping that happens to work on 2 layers, a dtype that only matters on
big tensors, memory blow-ups in loading) surface without downloading anything:

1. random bf16 weights for every tensor of the real config (``vbridge_core/configs/``) are written,
   tensor by tensor (never the whole model in memory), as an **original-layout single file** in
   the storages ComfyUI ships: ``fp16`` (``wan2.2_ti2v_5B_fp16.safetensors``) and ``fp8_scaled``
   (ComfyUI "scaled fp8": 2-D weights in float8_e4m3fn with a per-layer ``scale_weight``, a
   ``scaled_fp8`` marker, ``model.diffusion_model.`` prefix); the VAE as the original-layout
   ``wan2.2_vae.safetensors`` (bf16);
2. each file is loaded with :func:`vbridge_core.models.load_transformer` / ``load_vae`` in bf16 and
   a sample of tensors (all of block 0 and every non-block tensor) is compared with the values
   written (catches name-mapping and dequantisation mistakes);
3. a rank-32 LoRA on all attention and FFN Linears of every block is written with our LoRA writer
   and attached with ``VBridgePipeline.load_lora``;
4. one restore step (F=5, 64x64, random prompt embedding of 512 tokens) runs in bf16 on the CPU.

It prints seconds and the peak resident memory (``ru_maxrss``) after every phase, and the max
difference between the fp16 and the fp8 files' restores. Opt-in, not part of CI: the full model
needs ~25 GB of disk and ~11-22 GB of RAM (the bf16 weights plus the file pages being read).
``--layers N`` writes only N blocks of the real width (``--layers 2``: ~0.4 B parameters) for a
cheaper smoke run; ``--vae tiny`` swaps in the tiny VAE.

    python bench/real_arch_cpu.py --layers 2 --vae tiny          # ~1 GB, seconds
    python bench/real_arch_cpu.py --json real_arch.json          # the real 5B: check `free -g` first
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import platform
import resource
import shutil
import struct
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Iterable

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "bench"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

logger = logging.getLogger("real_arch_cpu")

STORAGES = ("fp16", "fp8_scaled")
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
LORA_RANK = 32
TEXT_LEN = 512
_ST_NAMES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", FP8: "F8_E4M3"}


# ---------------------------------------------------------------------------------------------------
# shapes and names of the real models

def dit_config(layers: int | None) -> dict[str, Any]:
    """The shipped 5B config as ``WanTransformer3DModel`` kwargs, optionally with fewer blocks."""
    from vbridge_core.models import load_transformer_config

    cfg = load_transformer_config()
    if layers is not None:
        cfg["num_layers"] = int(layers)
    return cfg


def meta_shapes(cls: type, cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every persistent tensor of ``cls(**cfg)``, built on the meta device (no memory)."""
    from accelerate import init_empty_weights

    import inspect

    params = inspect.signature(cls.__init__).parameters
    with init_empty_weights(include_buffers=True):
        model = cls(**{k: v for k, v in cfg.items() if k in params})
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# diffusers name fragment -> original Wan name fragment, applied in this order (the inverse of
# diffusers' convert_wan_transformer_to_diffusers rename table for the TI2V-5B keys).
_DIT_TO_ORIGINAL: tuple[tuple[str, str], ...] = (
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("attn1", "self_attn"), ("attn2", "cross_attn"),
    (".to_out.0.", ".o."), (".to_q.", ".q."), (".to_k.", ".k."), (".to_v.", ".v."),
    ("ffn.net.0.proj", "ffn.0"), ("ffn.net.2", "ffn.2"),
    ("norm2", "norm__swap"), ("norm3", "norm2"), ("norm__swap", "norm3"),
    ("proj_out", "head.head"),
)


def dit_original_name(name: str) -> str:
    """The original Wan (ComfyUI) key of a diffusers ``WanTransformer3DModel`` key."""
    if name == "scale_shift_table":
        return "head.modulation"
    out = name
    for new, old in _DIT_TO_ORIGINAL:
        out = out.replace(new, old)
    return out.replace("scale_shift_table", "modulation")


def dit_original_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Original-layout key -> shape for the DiT of ``cfg``, checked against our loader's own mapping."""
    from diffusers import WanTransformer3DModel

    from vbridge_core.models import _original_to_diffusers_names

    shapes = meta_shapes(WanTransformer3DModel, cfg)
    original = {dit_original_name(k): k for k in shapes}
    back = _original_to_diffusers_names(list(original))
    wrong = {o: (d, back.get(d)) for o, d in original.items() if back.get(d) != o}
    if len(original) != len(shapes) or wrong:
        raise RuntimeError(f"the inverse DiT key mapping is not the loader's inverse: {list(wrong.items())[:3]}")
    return {o: shapes[d] for o, d in original.items()}


def vae_original_shapes(tiny: bool) -> tuple[dict[str, tuple[int, ...]], dict[str, Any]]:
    """Original-layout key -> shape of the Wan2.2 VAE (real config, or the tiny one), and its config."""
    from diffusers import AutoencoderKLWan

    from vbridge_core.models import VAE_CONFIG_FILE
    from vbridge_core.tiny import TINY_VAE_CONFIG
    from vbridge_core.vae_convert import convert_vae22_from_diffusers

    cfg = dict(TINY_VAE_CONFIG) if tiny else {k: v for k, v in json.loads(VAE_CONFIG_FILE.read_text()).items()
                                              if not k.startswith("_")}
    shapes = meta_shapes(AutoencoderKLWan, cfg)
    fake = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    return {k: tuple(v.shape) for k, v in convert_vae22_from_diffusers(fake).items()}, cfg


# ---------------------------------------------------------------------------------------------------
# random values, reproducible per tensor name

_POOL_SIZE = (1 << 24) + 7  # 16 M values: a period that does not divide the rows of any Wan tensor
_POOLS: dict[int, torch.Tensor] = {}


def _pool(seed: int) -> torch.Tensor:
    """One seeded pool of N(0, 1) values that every tensor is cut from (drawing 5 B fresh normals
    on a shared 2-core machine takes many minutes; cutting them from a pool costs a copy)."""
    if seed not in _POOLS:
        _POOLS.clear()
        _POOLS[seed] = torch.randn(_POOL_SIZE, generator=torch.Generator().manual_seed(seed))
    return _POOLS[seed]


def random_value(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A bf16 tensor of pseudo-random values, reproducible from ``name`` and ``seed``.

    The values are a stretch of a seeded N(0, 1) pool starting at an offset derived from the name
    (wrapping around), so each tensor differs from the others and can be drawn again to check what
    the loader read. Matrices are scaled by fan-in (activations stay O(1) through 30 blocks), norm
    gains are near 1, everything else small: the recipe of ``vbridge_core.tiny``.
    """
    pool = _pool(seed)
    n = math.prod(shape)
    start = zlib.crc32(name.encode()) % _POOL_SIZE
    flat = torch.cat([pool[start:], pool[:start]]) if n > _POOL_SIZE - start else pool[start:start + n]
    while flat.numel() < n:
        flat = torch.cat([flat, pool[: min(_POOL_SIZE, n - flat.numel())]])
    t = flat[:n].reshape(shape)
    if len(shape) >= 2:
        t = t / math.sqrt(math.prod(shape[1:]))
    elif name.endswith("gamma") or ("norm" in name and name.endswith("weight")):
        t = 1.0 + 0.1 * t
    else:
        t = 0.02 * t
    return t.to(torch.bfloat16)


def stored_tensors(name: str, value: torch.Tensor, storage: str) -> list[tuple[str, torch.Tensor]]:
    """The tensors a file of ``storage`` holds for one model tensor (fp8: weight, scale_weight, scale_input)."""
    if storage == "fp8_scaled" and value.ndim == 2 and name.endswith(".weight"):
        scale = (value.float().abs().max().clamp_min(1e-12) / FP8_MAX).reshape(())
        module = name[: -len(".weight")]
        return [(name, (value.float() / scale).to(FP8)), (module + ".scale_weight", scale),
                (module + ".scale_input", torch.ones(()))]
    if storage == "bf16":
        return [(name, value)]
    return [(name, value.to(torch.float16))]


def expected_loaded(name: str, value: torch.Tensor, storage: str, dtype: torch.dtype) -> torch.Tensor:
    """What the loader must produce for ``value`` written with ``storage`` and read as ``dtype``."""
    parts = dict(stored_tensors(name, value, storage))
    w = parts[name]
    if name.endswith(".weight") and name[: -len(".weight")] + ".scale_weight" in parts:
        return (w.float() * parts[name[: -len(".weight")] + ".scale_weight"].float()).to(dtype)
    return w.to(dtype)


# ---------------------------------------------------------------------------------------------------
# streaming safetensors writer

def _byte_size(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def write_safetensors_streaming(path: Path, entries: list[tuple[str, tuple[int, ...], torch.dtype]],
                                produce: Callable[[], Iterable[tuple[str, torch.Tensor]]],
                                metadata: dict[str, str] | None = None) -> Path:
    """Write a safetensors file whose tensors come one at a time from ``produce()``.

    ``entries`` lists ``(name, shape, dtype)`` in the order ``produce`` yields them; the header is
    written first from it, then each tensor's bytes as they come, so memory holds one tensor at a
    time. The file is written under a temporary name and renamed when complete.
    """
    header: dict[str, Any] = {}
    offset = 0
    for name, shape, dtype in entries:
        n = _byte_size(shape, dtype)
        header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_name(path.name + ".partial")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            expected = iter(entries)
            for name, t in produce():
                want_name, shape, dtype = next(expected)
                if name != want_name or tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                    raise RuntimeError(f"streamed tensor {name} {tuple(t.shape)} {t.dtype} does not match the "
                                       f"header entry {want_name} {shape} {dtype}")
                f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            if next(expected, None) is not None:
                raise RuntimeError("fewer tensors were produced than the header lists")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_model_file(path: Path, shapes: dict[str, tuple[int, ...]], storage: str, seed: int,
                     prefix: str = "") -> Path:
    """Random-weight model file in ``storage`` (original layout), streamed tensor by tensor."""
    names = sorted(shapes)
    entries: list[tuple[str, tuple[int, ...], torch.dtype]] = []
    if storage == "fp8_scaled":
        entries.append((prefix + "scaled_fp8", (0,), FP8))
    for name in names:
        for part, (shape, dtype) in _stored_meta(name, shapes[name], storage):
            entries.append((prefix + part, shape, dtype))

    def produce():
        if storage == "fp8_scaled":
            yield prefix + "scaled_fp8", torch.zeros(0, dtype=FP8)
        for name in names:
            for part, t in stored_tensors(name, random_value(name, shapes[name], seed), storage):
                yield prefix + part, t

    return write_safetensors_streaming(path, entries, produce, metadata={"format": "pt"})


def _stored_meta(name: str, shape: tuple[int, ...], storage: str) -> list[tuple[str, tuple[tuple[int, ...], torch.dtype]]]:
    """(name, (shape, dtype)) of what :func:`stored_tensors` writes for one tensor, without values."""
    if storage == "fp8_scaled" and len(shape) == 2 and name.endswith(".weight"):
        module = name[: -len(".weight")]
        return [(name, (shape, FP8)), (module + ".scale_weight", ((), torch.float32)),
                (module + ".scale_input", ((), torch.float32))]
    return [(name, (shape, torch.bfloat16 if storage == "bf16" else torch.float16))]


# ---------------------------------------------------------------------------------------------------
# LoRA, memory, the run

def write_rank32_lora(path: Path, cfg: dict[str, Any], seed: int) -> tuple[Path, int]:
    """A rank-32 LoRA on every attention and FFN Linear of every block (our writer, ComfyUI keys).

    Returns the path and its number of LoRA parameters. It carries a random 512-token prompt
    embedding, as trained V-Bridge LoRAs carry theirs.
    """
    from vbridge_core.lora import LoraLayer, write_lora
    from vbridge_core.training.config import DEFAULT_TARGET_MODULES

    dim = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    ffn = cfg["ffn_dim"]
    g = torch.Generator().manual_seed(seed)
    weights: dict[str, LoraLayer] = {}
    n = 0
    for i in range(cfg["num_layers"]):
        for target in DEFAULT_TARGET_MODULES:
            mods = [f"blocks.{i}.{target}"] if target.startswith("ffn") else \
                [f"blocks.{i}.attn1.{target}", f"blocks.{i}.attn2.{target}"]
            for m in mods:
                in_f, out_f = (dim, ffn) if target == "ffn.net.0.proj" else (ffn, dim) if target == "ffn.net.2" \
                    else (dim, dim)
                weights[m] = LoraLayer(0.01 * torch.randn(LORA_RANK, in_f, generator=g),
                                       0.01 * torch.randn(out_f, LORA_RANK, generator=g), float(LORA_RANK))
                n += LORA_RANK * (in_f + out_f)
    prompt = 0.1 * torch.randn(1, TEXT_LEN, cfg["text_dim"], generator=g)
    write_lora(path, weights, rank=LORA_RANK, alpha=LORA_RANK, metadata={"role": "restoration", "frames": 5},
               prompt_embeds=prompt, dtype=torch.bfloat16)
    return path, n


def peak_rss_gb() -> float:
    """Peak resident set size of this process so far (``ru_maxrss``), GiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def current_rss_gb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except OSError:  # not Linux
        return float("nan")


class Phases:
    """Wall and CPU seconds (all threads), current and peak RSS after each named phase."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        row = dict(phase=name, seconds=round(time.perf_counter() - t0, 2), cpu_s=round(time.process_time() - c0, 2),
                   rss_gb=round(current_rss_gb(), 2),
                   peak_rss_gb=round(peak_rss_gb(), 2))
        self.rows.append(row)
        logger.info("%-34s %7.2f s (CPU %7.2f s)   RSS %6.2f GiB   peak %6.2f GiB", name, row["seconds"],
                    row["cpu_s"], row["rss_gb"], row["peak_rss_gb"])
        return out


def check_loaded(model: torch.nn.Module, original_shapes: dict[str, tuple[int, ...]], storage: str,
                 seed: int) -> tuple[int, float]:
    """Compare block 0 and every non-block tensor of the loaded DiT with the values written.

    Returns (tensors checked, max abs difference); raises if a tensor differs.
    """
    state = model.state_dict()
    to_diffusers = {dit_original_name(k): k for k in state}
    checked, worst = 0, 0.0
    for orig, shape in original_shapes.items():
        if orig.startswith("blocks.") and not orig.startswith("blocks.0."):
            continue
        got = state[to_diffusers[orig]]
        want = expected_loaded(orig, random_value(orig, shape, seed), storage, got.dtype)
        diff = (got.float() - want.float()).abs().max().item() if got.numel() else 0.0
        if diff > 0:
            raise RuntimeError(f"{storage} file: loaded {orig} differs from the written values by {diff:g}")
        worst = max(worst, diff)
        checked += 1
    return checked, worst


def run_storage(storage: str, work: Path, dit_shapes: dict[str, tuple[int, ...]], vae_file: Path,
                lora_file: Path, image: torch.Tensor, args: argparse.Namespace, phases: Phases) -> dict[str, Any]:
    """Write, load, check, attach the LoRA and restore one step, for one DiT storage."""
    from vbridge_core.models import load_transformer, load_vae
    from vbridge_core.pipeline import VBridgePipeline

    prefix = "model.diffusion_model." if storage == "fp8_scaled" else ""
    dit_file = work / f"wan2.2_ti2v_5B_{storage}.safetensors"
    phases.run(f"{storage}: write DiT file", lambda: write_model_file(dit_file, dit_shapes, storage, args.seed, prefix))
    size_gb = dit_file.stat().st_size / 2**30
    dit = phases.run(f"{storage}: load DiT (bf16)", lambda: load_transformer(dit_file, dtype=torch.bfloat16))
    checked, _ = phases.run(f"{storage}: check loaded values", lambda: check_loaded(dit, dit_shapes, storage, args.seed))
    vae = phases.run(f"{storage}: load VAE (bf16)", lambda: load_vae(vae_file, dtype=torch.bfloat16))
    pipe = VBridgePipeline(dit, vae, device="cpu", dtype=torch.bfloat16)
    phases.run(f"{storage}: attach rank-{LORA_RANK} LoRA", lambda: pipe.load_lora(lora_file))
    res = phases.run(f"{storage}: restore 1 step {args.size}x{args.size}",
                     lambda: pipe.restore(image, frames=5, steps=1, seed=args.seed))
    final = res.final[0].float()
    if tuple(final.shape) != tuple(image.shape) or not torch.isfinite(final).all():
        raise RuntimeError(f"{storage}: the restore returned {tuple(final.shape)} with non-finite values "
                           f"({(~torch.isfinite(final)).sum().item()})")
    n_params = sum(p.numel() for p in dit.parameters())
    del pipe, dit, vae, res
    gc.collect()
    if not args.keep:
        dit_file.unlink()
    return dict(storage=storage, file_gb=round(size_gb, 3), dit_params=n_params, tensors_checked=checked,
                final=final)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=None, help="DiT blocks of the real width (default: all 30)")
    p.add_argument("--storage", choices=STORAGES + ("both",), default="both", help="DiT file storage (default both)")
    p.add_argument("--vae", choices=("real", "tiny"), default="real", help="the real Wan2.2 VAE (default) or the tiny one")
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="where to write the files (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the written files")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", default=None, help="write the report here")
    p.add_argument("-q", "--quiet", action="store_true")
    a = p.parse_args(argv)
    if a.layers is not None and a.layers < 1:
        p.error("--layers must be at least 1")
    if a.size < 32 or a.size % 32:
        p.error("--size must be a positive multiple of 32")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s", stream=sys.stderr)
    for mod in ("diffusers", "transformers", "vbridge_core"):
        logging.getLogger(mod).setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    from bench_restore import _quiet_libraries

    _quiet_libraries()
    storages = STORAGES if args.storage == "both" else (args.storage,)
    cfg = dit_config(args.layers)
    t_start = time.perf_counter()
    phases = Phases()
    dit_shapes = phases.run("DiT shapes (meta) + key mapping", lambda: dit_original_shapes(cfg))
    vae_shapes, _ = vae_original_shapes(tiny=args.vae == "tiny")
    n_written = sum(math.prod(s) for s in dit_shapes.values())
    logger.info("DiT: %d layers, dim %d, %.4f B parameters; VAE: %s (%.1f M parameters)", cfg["num_layers"],
                cfg["num_attention_heads"] * cfg["attention_head_dim"], n_written / 1e9, args.vae,
                sum(math.prod(s) for s in vae_shapes.values()) / 1e6)
    own_tmp = args.workdir is None
    work = Path(tempfile.mkdtemp(prefix="vbridge_real_arch_")) if own_tmp else Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    need_gb = n_written * 2 / 2**30 * 1.05
    free_gb = shutil.disk_usage(work).free / 2**30
    if free_gb < need_gb:
        print(f"error: {work} has {free_gb:.1f} GiB free, the DiT file needs {need_gb:.1f} GiB; use --workdir "
              "or --layers", file=sys.stderr)
        return 2
    g = torch.Generator().manual_seed(args.seed)
    image = torch.rand(3, args.size, args.size, generator=g)
    results = []
    try:
        vae_file = phases.run("write VAE file (bf16)", lambda: write_model_file(
            work / "wan2.2_vae.safetensors", vae_shapes, "bf16", args.seed + 1))
        lora_file, lora_params = phases.run(f"write rank-{LORA_RANK} LoRA", lambda: write_rank32_lora(
            work / "lora_r32.safetensors", cfg, args.seed + 2))
        for storage in storages:
            results.append(run_storage(storage, work, dit_shapes, vae_file, lora_file, image, args, phases))
    finally:
        if own_tmp and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    report: dict[str, Any] = dict(
        config=dict(layers=cfg["num_layers"], dim=cfg["num_attention_heads"] * cfg["attention_head_dim"],
                    ffn_dim=cfg["ffn_dim"], dit_params=n_written, vae=args.vae, lora_rank=LORA_RANK,
                    lora_params=lora_params, size=args.size, frames=5, steps=1, dtype="bfloat16",
                    threads=torch.get_num_threads()),
        environment=dict(machine=platform.machine(), cpus=os.cpu_count(), torch=torch.__version__,
                         diffusers=__import__("diffusers").__version__),
        phases=phases.rows, storages=[{k: v for k, v in r.items() if k != "final"} for r in results],
        peak_rss_gb=round(peak_rss_gb(), 2), seconds=round(time.perf_counter() - t_start, 1))
    if len(results) == 2:
        report["max_abs_diff_fp16_vs_fp8"] = (results[0]["final"] - results[1]["final"]).abs().max().item()
    print(f"real_arch_cpu: {cfg['num_layers']} x dim {report['config']['dim']} DiT ({n_written / 1e9:.4f} B params), "
          f"{args.vae} VAE, rank-{LORA_RANK} LoRA, 1 step at {args.size}x{args.size}, bf16 on CPU "
          f"({torch.get_num_threads()} threads)")
    print("| phase | seconds | CPU seconds | RSS GiB | peak RSS GiB |")
    print("|---|---|---|---|---|")
    for r in phases.rows:
        print(f"| {r['phase']} | {r['seconds']:.2f} | {r['cpu_s']:.2f} | {r['rss_gb']:.2f} | {r['peak_rss_gb']:.2f} |")
    for r in report["storages"]:
        print(f"{r['storage']}: file {r['file_gb']:.2f} GiB, {r['tensors_checked']} tensors checked equal to the "
              "written values, restore finite")
    if "max_abs_diff_fp16_vs_fp8" in report:
        print(f"max abs diff of the restored image, fp16 file vs fp8 file: {report['max_abs_diff_fp16_vs_fp8']:.4g}")
    print(f"peak RSS {report['peak_rss_gb']:.2f} GiB, total {report['seconds']:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
