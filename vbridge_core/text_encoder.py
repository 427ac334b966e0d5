"""umt5-xxl prompt embeddings, loaded only when a prompt must be encoded, and cached on disk.

Why: the Wan2.2 text encoder (umt5-xxl, 5.7 B parameters, ~11 GB in bf16) is needed only to turn a
prompt into a ``[1, 512, 4096]`` embedding. V-Bridge LoRA files embed the prompt embedding they were
trained with, and every other prompt is encoded once and then read back from a small safetensors
file, so the encoder is normally never resident while the DiT runs. When it is loaded it is freed
right after encoding.

The embedding is computed exactly as diffusers' ``WanPipeline._get_t5_prompt_embeds``: clean the
prompt (ftfy if installed, double HTML unescape, collapse whitespace), tokenize with padding to
``max_length`` and truncation, run ``UMT5EncoderModel`` with the attention mask, cast to ``dtype``
and zero every position past the real token count.

Accepted encoders:

* a diffusers model root (``text_encoder/`` + ``tokenizer/``, e.g. Wan-AI/Wan2.2-TI2V-5B-Diffusers);
* a ``text_encoder/`` folder (tokenizer in ``tokenizer/`` inside it or beside it);
* a ComfyUI single file (``models/text_encoders/umt5_xxl_fp16.safetensors`` or
  ``umt5_xxl_fp8_e4m3fn_scaled.safetensors``). ComfyUI stores umt5 under the same module names as
  transformers (``shared``, ``encoder.block.N.layer.0.SelfAttention.q``, ...), optionally behind a
  prefix; fp8 weights are dequantized with their per-layer scale (``scaled_fp8`` marker +
  ``*.scale_weight``, or the newer ``*.weight_scale`` spelling). The tokenizer comes from the
  ``tokenizer`` argument, a ``tokenizer/`` folder beside the file, or a ``spiece_model`` tensor
  inside the file (ComfyUI's way of shipping the sentencepiece model with the weights).
"""
from __future__ import annotations

import gc
import hashlib
import html
import json
import logging
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .errors import ModelFileError, VBridgeError, WrongModelError
from .fileio import save_safetensors_atomic

logger = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 512
#: Bumped whenever the way embeddings are computed changes, so old cache files stop matching.
CACHE_FORMAT = 1
TOKENIZER_HELP = (
    "Provide the google/umt5-xxl tokenizer files (spiece.model, tokenizer.json, tokenizer_config.json, "
    "special_tokens_map.json), e.g. the tokenizer/ folder of the Hugging Face repo "
    "Wan-AI/Wan2.2-TI2V-5B-Diffusers"
)

_MEMO_SIZE = 32
_memo: "OrderedDict[str, torch.Tensor]" = OrderedDict()
_memo_lock = threading.Lock()
_warned_no_ftfy = False


# --------------------------------------------------------------------------------------------
# prompt cleaning (same steps as diffusers' pipeline_wan prompt_clean)
# --------------------------------------------------------------------------------------------
def clean_prompt(text: str) -> str:
    """diffusers' Wan ``prompt_clean``: ftfy.fix_text (when installed), HTML unescape twice, collapse
    whitespace. Without ftfy only mojibake repair is skipped; ordinary prompts are unchanged by it."""
    global _warned_no_ftfy
    try:
        import ftfy  # optional, as in diffusers
        text = ftfy.fix_text(text)
    except ImportError:
        if not _warned_no_ftfy:
            logger.info("ftfy is not installed: prompts are cleaned without mojibake repair (pip install ftfy)")
            _warned_no_ftfy = True
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


# --------------------------------------------------------------------------------------------
# locating the encoder and its tokenizer
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EncoderSource:
    """Where the encoder weights are: ``kind`` is ``"folder"`` (transformers/diffusers
    ``text_encoder/``) or ``"single_file"`` (ComfyUI safetensors)."""

    kind: str
    weights: Path
    tokenizer_candidates: tuple[Path, ...]


def _is_tokenizer_dir(p: Path) -> bool:
    return p.is_dir() and any((p / n).is_file() for n in ("tokenizer.json", "spiece.model", "tokenizer_config.json"))


def resolve_encoder(encoder: str | os.PathLike) -> EncoderSource:
    """Classify ``encoder`` (diffusers root, ``text_encoder/`` folder or single file) and list where
    its tokenizer may be. Raises :class:`ModelFileError` if nothing usable is there."""
    p = Path(encoder).expanduser()
    if p.is_file():
        if p.suffix not in (".safetensors", ".sft"):
            raise ModelFileError(f"text encoder {p} is not a .safetensors file; use umt5_xxl_fp16.safetensors, "
                                 "umt5_xxl_fp8_e4m3fn_scaled.safetensors or a diffusers text_encoder/ folder.")
        return EncoderSource("single_file", p.resolve(), (p.parent / "tokenizer",))
    if p.is_dir():
        if (p / "text_encoder").is_dir():
            return EncoderSource("folder", (p / "text_encoder").resolve(), (p / "tokenizer", p / "text_encoder" / "tokenizer"))
        if (p / "config.json").is_file():
            return EncoderSource("folder", p.resolve(), (p / "tokenizer", p.parent / "tokenizer"))
        raise ModelFileError(f"{p} is neither a diffusers model folder (with text_encoder/) nor a text_encoder/ "
                             "folder (with config.json and weights).")
    raise ModelFileError(f"text encoder {p} does not exist. Put umt5_xxl_fp16.safetensors in "
                         "models/text_encoders/ or pass a diffusers folder with text_encoder/ and tokenizer/.")


def _weight_files(folder: Path) -> list[Path]:
    files = sorted(f for f in folder.iterdir() if f.is_file() and (f.suffix in (".safetensors", ".bin") or f.name == "config.json"))
    return files


def encoder_identity(src: EncoderSource) -> str:
    """A string naming the exact encoder weights: resolved path + size + mtime of each weight file.

    Replacing or editing the weights changes it, so cached embeddings of other weights never match.
    """
    files = [src.weights] if src.kind == "single_file" else _weight_files(src.weights)
    parts = []
    for f in files:
        try:
            st = f.stat()
        except OSError as e:
            raise ModelFileError(f"cannot read text encoder file {f}: {e.strerror}") from None
        parts.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    return json.dumps(parts)


def prompt_cache_key(prompt: str, max_length: int, identity: str, dtype: torch.dtype) -> str:
    """sha256 over everything that determines the embedding (prompt, length, encoder weights, dtype)."""
    payload = json.dumps({"prompt": prompt, "max_length": int(max_length), "encoder": identity,
                          "dtype": str(dtype).replace("torch.", ""), "format": CACHE_FORMAT}, sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def default_cache_dir() -> Path:
    """``$VBRIDGE_CACHE_DIR/prompt_embeds`` if set, else ``~/.cache/vbridge/prompt_embeds``
    (``$XDG_CACHE_HOME`` respected). ``VBRIDGE_CACHE_DIR`` names the V-Bridge cache root."""
    root = os.environ.get("VBRIDGE_CACHE_DIR")
    if root:
        return Path(root).expanduser() / "prompt_embeds"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vbridge" / "prompt_embeds"


# --------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------
class _SentencePieceT5Tokenizer:
    """Minimal T5-style tokenizer over a raw sentencepiece model (ComfyUI's ``spiece_model`` tensor):
    text pieces + ``</s>``, truncated to ``max_length``, padded with ``<pad>`` = 0. Used only when the
    single file carries its own sentencepiece model and no tokenizer folder is given."""

    def __init__(self, model_proto: bytes) -> None:
        import sentencepiece

        self.sp = sentencepiece.SentencePieceProcessor(model_proto=model_proto)
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else 1
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else 0

    def __call__(self, texts: Sequence[str], max_length: int, **_: Any) -> dict[str, torch.Tensor]:
        ids = torch.full((len(texts), max_length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(texts), max_length), dtype=torch.long)
        for i, t in enumerate(texts):
            seq = self.sp.encode(t)[: max_length - 1] + [self.eos_id]
            ids[i, : len(seq)] = torch.tensor(seq)
            mask[i, : len(seq)] = 1
        return {"input_ids": ids, "attention_mask": mask}


def _load_tokenizer(src: EncoderSource, tokenizer: str | os.PathLike | None) -> Callable[..., Any]:
    from transformers import AutoTokenizer

    if tokenizer is not None:
        tp = Path(tokenizer).expanduser()
        if not tp.is_dir():
            raise ModelFileError(f"tokenizer folder {tp} does not exist. {TOKENIZER_HELP}.")
        candidates: tuple[Path, ...] = (tp,)
    else:
        candidates = src.tokenizer_candidates
    for c in candidates:
        if _is_tokenizer_dir(c):
            logger.info("tokenizer: %s", c)
            try:
                return AutoTokenizer.from_pretrained(str(c))
            except Exception as e:  # a broken folder: say which and how to fix it
                raise ModelFileError(f"cannot load the tokenizer in {c}: {e}. {TOKENIZER_HELP}.") from None
        if tokenizer is not None:
            raise ModelFileError(f"{c} holds no tokenizer files. {TOKENIZER_HELP}.")
    if src.kind == "single_file":
        from safetensors import safe_open

        with safe_open(str(src.weights), framework="pt") as f:
            key = next((k for k in f.keys() if k == "spiece_model" or k.endswith(".spiece_model")), None)
            if key is not None:
                logger.info("tokenizer: sentencepiece model embedded in %s", src.weights.name)
                return _SentencePieceT5Tokenizer(f.get_tensor(key).numpy().tobytes())
        where = src.weights.parent / "tokenizer"
    else:
        where = src.tokenizer_candidates[0]
    raise ModelFileError(
        f"no tokenizer for the text encoder {src.weights}: looked in {', '.join(str(c) for c in candidates)}. "
        f"{TOKENIZER_HELP}, into the folder {where} (or pass tokenizer=<folder> / --tokenizer).")


def _tokenize(tok: Callable[..., Any], texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    out = tok(texts, padding="max_length", max_length=max_length, truncation=True, add_special_tokens=True,
              return_attention_mask=True, return_tensors="pt")
    return out["input_ids"], out["attention_mask"]


# --------------------------------------------------------------------------------------------
# encoder weights
# --------------------------------------------------------------------------------------------
_FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
                    if hasattr(torch, n))
_QUANT_AUX_SUFFIXES = (".scale_weight", ".weight_scale", ".scale_input", ".input_scale", ".comfy_quant")


def _find_prefix(keys: Sequence[str]) -> str:
    for k in keys:
        if k.endswith("encoder.final_layer_norm.weight"):
            return k[: -len("encoder.final_layer_norm.weight")]
    raise WrongModelError("this file holds no T5/umt5 encoder (no 'encoder.final_layer_norm.weight'); "
                          "Wan2.2 needs umt5_xxl_fp16.safetensors or umt5_xxl_fp8_e4m3fn_scaled.safetensors.")


def read_umt5_single_file(path: str | os.PathLike, dtype: torch.dtype = torch.bfloat16) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a ComfyUI umt5 file into transformers ``UMT5EncoderModel`` keys (dequantized to ``dtype``)
    and the ``UMT5Config`` keyword arguments read from its tensor shapes."""
    from safetensors import safe_open

    path = Path(path)
    try:
        f = safe_open(str(path), framework="pt")
    except Exception as e:
        raise ModelFileError(f"cannot read {path}: {e}. The file is damaged or not a safetensors file; "
                             "download it again.") from None
    with f:
        keys = list(f.keys())
        prefix = _find_prefix(keys)
        metadata = f.metadata() or {}
        layer_formats: dict[str, str] = {}
        if "_quantization_metadata" in metadata:
            try:
                for layer, conf in json.loads(metadata["_quantization_metadata"]).get("layers", {}).items():
                    layer_formats[layer] = str(conf.get("format", ""))
            except (ValueError, AttributeError):
                pass
        for k in keys:
            if k.endswith(".comfy_quant"):
                try:
                    conf = json.loads(bytes(f.get_tensor(k).tolist()).decode("utf-8"))
                    layer_formats[k[: -len(".comfy_quant")]] = str(conf.get("format", ""))
                except (ValueError, UnicodeDecodeError):
                    pass
        bad = {l: fmt for l, fmt in layer_formats.items() if fmt and not fmt.startswith("float8")}
        if bad:
            layer, fmt = next(iter(bad.items()))
            raise ModelFileError(f"{path.name} uses the quantization format {fmt!r} (layer {layer}), which this loader "
                                 "cannot read; use umt5_xxl_fp16.safetensors or umt5_xxl_fp8_e4m3fn_scaled.safetensors.")

        sd: dict[str, torch.Tensor] = {}
        n_fp8 = 0
        ignored = []
        for k in keys:
            if not k.startswith(prefix):
                continue
            name = k[len(prefix):]
            if name == "scaled_fp8" or name == "spiece_model" or name.endswith(_QUANT_AUX_SUFFIXES):
                continue
            if not (name == "shared.weight" or name.startswith("encoder.")):
                ignored.append(name)  # e.g. a T5 decoder or lm_head: not needed for prompt embeddings
                continue
            t = f.get_tensor(k)
            if t.dtype in _FP8_DTYPES:
                layer = k[: -len(".weight")] if k.endswith(".weight") else k
                scale = None
                for s in (".scale_weight", ".weight_scale"):
                    if layer + s in keys:
                        scale = f.get_tensor(layer + s).float()
                t = t.float()
                if scale is not None and scale.numel() > 0:
                    if scale.numel() > 1 and t.ndim == 2 and scale.numel() == t.shape[0]:
                        scale = scale.reshape(-1, 1)
                    t = t * scale
                n_fp8 += 1
            sd[name] = t.to(dtype)
        if ignored:
            logger.info("text encoder: ignored %d tensors not used by the encoder (e.g. %s)", len(ignored), ignored[0])
        if n_fp8:
            logger.info("text encoder: dequantized %d fp8 tensors to %s", n_fp8, dtype)

    if "shared.weight" not in sd and "encoder.embed_tokens.weight" in sd:
        sd["shared.weight"] = sd["encoder.embed_tokens.weight"]
    sd.pop("encoder.embed_tokens.weight", None)  # tied to shared.weight in UMT5EncoderModel
    if "shared.weight" not in sd:
        raise WrongModelError(f"{path.name} has no token embedding ('shared.weight'); it is not a umt5 encoder.")
    rel = "encoder.block.{}.layer.0.SelfAttention.relative_attention_bias.weight"
    if rel.format(1) not in sd and "encoder.block.1.layer.0.SelfAttention.q.weight" in sd:
        raise WrongModelError(f"{path.name} is a T5 encoder (one shared position bias), not umt5 (one per layer); "
                              "Wan2.2 needs umt5_xxl (e.g. umt5_xxl_fp16.safetensors), not t5xxl.")
    num_layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"encoder\.block\.(\d+)\.", k)))
    vocab, d_model = sd["shared.weight"].shape
    buckets, heads = sd[rel.format(0)].shape
    inner = sd["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0]
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in sd
    d_ff = sd["encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight"].shape[0]
    config = dict(vocab_size=int(vocab), d_model=int(d_model), d_kv=int(inner // heads), d_ff=int(d_ff),
                  num_layers=int(num_layers), num_heads=int(heads), relative_attention_num_buckets=int(buckets),
                  relative_attention_max_distance=128, layer_norm_epsilon=1e-6,
                  feed_forward_proj="gated-gelu" if gated else "relu", is_encoder_decoder=False,
                  tie_word_embeddings=False, dropout_rate=0.0, pad_token_id=0, eos_token_id=1)
    return sd, config


def load_text_encoder(src: EncoderSource, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16):
    """Load ``UMT5EncoderModel`` from ``src`` in ``dtype`` on ``device`` (eval mode)."""
    from transformers import UMT5Config, UMT5EncoderModel

    logger.info("loading text encoder %s (%s)", src.weights, src.kind)
    if src.kind == "folder":
        try:
            model = UMT5EncoderModel.from_pretrained(str(src.weights), dtype=dtype)
        except (OSError, ValueError) as e:
            raise ModelFileError(f"cannot load the text encoder in {src.weights}: {e}") from None
    else:
        sd, cfg = read_umt5_single_file(src.weights, dtype)
        with torch.device("meta"):
            model = UMT5EncoderModel(UMT5Config(**cfg))
        sd["encoder.embed_tokens.weight"] = sd["shared.weight"]
        result = model.load_state_dict(sd, strict=False, assign=True)
        missing = [k for k in result.missing_keys]
        if missing or result.unexpected_keys:
            raise WrongModelError(f"{src.weights.name} does not fit a umt5 encoder: missing {missing[:3]}, "
                                  f"unexpected {result.unexpected_keys[:3]}")
        model.tie_weights()
        del sd
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def _free(model: Any) -> None:
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------
# cache
# --------------------------------------------------------------------------------------------
def _cache_file(cache_dir: Path, key: str) -> Path:
    return cache_dir / f"{key}.safetensors"


def _read_cache(path: Path, prompt: str, max_length: int) -> torch.Tensor | None:
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("prompt") != prompt or int(meta.get("max_length", -1)) != max_length:
                return None
            emb = f.get_tensor("prompt_embeds")
    except Exception as e:  # a damaged cache file is recomputed, never fatal
        logger.warning("ignoring unreadable prompt cache %s: %s", path, e)
        return None
    # stored trimmed to the real tokens; the padding positions are zeros by definition
    out = emb.new_zeros(1, max_length, emb.shape[-1])
    out[:, : emb.shape[1]] = emb
    return out


def _write_cache(path: Path, emb: torch.Tensor, seq_len: int, prompt: str, max_length: int, identity: str) -> None:
    meta = {"prompt": prompt, "max_length": str(max_length), "seq_len": str(seq_len), "encoder": identity,
            "format": str(CACHE_FORMAT), "kind": "vbridge_prompt_embeds"}
    try:
        save_safetensors_atomic({"prompt_embeds": emb[:, :seq_len].contiguous()}, path, metadata=meta)
    except (VBridgeError, OSError) as e:
        logger.warning("could not write the prompt cache %s (%s); the embedding is still returned", path, e)


def clear_memo() -> None:
    """Forget the in-process embeddings (the disk cache is kept)."""
    with _memo_lock:
        _memo.clear()


def _memo_get(key: str) -> torch.Tensor | None:
    with _memo_lock:
        t = _memo.get(key)
        if t is not None:
            _memo.move_to_end(key)
        return t


def _memo_put(key: str, t: torch.Tensor) -> None:
    with _memo_lock:
        _memo[key] = t
        _memo.move_to_end(key)
        while len(_memo) > _MEMO_SIZE:
            _memo.popitem(last=False)


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------
def encode_prompts(prompts: Sequence[str], encoder: str | os.PathLike, tokenizer: str | os.PathLike | None = None,
                   cache_dir: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.bfloat16, max_length: int = DEFAULT_MAX_LENGTH,
                   use_cache: bool = True) -> list[torch.Tensor]:
    """Embeddings ``[1, max_length, d_model]`` for several prompts, loading the encoder at most once.

    Each prompt is looked up in the in-process memo, then in the disk cache; only the rest are
    encoded, in one batch, and the encoder is freed before returning. ``use_cache=False`` skips
    both caches (and writes none).
    """
    if max_length < 1:
        raise ValueError("max_length must be >= 1")
    src = resolve_encoder(encoder)
    identity = encoder_identity(src)
    cdir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    results: list[torch.Tensor | None] = [None] * len(prompts)
    keys = [prompt_cache_key(p, max_length, identity, dtype) for p in prompts]
    todo: dict[str, list[int]] = {}
    for i, (p, key) in enumerate(zip(prompts, keys)):
        hit = _memo_get(key) if use_cache else None
        if hit is None and use_cache:
            hit = _read_cache(_cache_file(cdir, key), p, max_length)
            if hit is not None:
                logger.info("prompt embedding read from cache %s", _cache_file(cdir, key).name)
                _memo_put(key, hit)
        if hit is not None:
            results[i] = hit
        else:
            todo.setdefault(key, []).append(i)

    if todo:
        order = list(todo)
        texts = [clean_prompt(prompts[todo[k][0]]) for k in order]
        tok = _load_tokenizer(src, tokenizer)
        ids, mask = _tokenize(tok, texts, max_length)
        seq_lens = mask.gt(0).sum(dim=1).long()
        model = load_text_encoder(src, device=device, dtype=dtype)
        try:
            with torch.no_grad():
                hidden = model(ids.to(model.device), mask.to(model.device)).last_hidden_state
            hidden = hidden.to(dtype=dtype, device="cpu")
        finally:
            _free(model)
            model = None
        for row, key in enumerate(order):
            n = int(seq_lens[row])
            emb = torch.zeros(1, max_length, hidden.shape[-1], dtype=dtype)
            emb[0, :n] = hidden[row, :n]
            p = prompts[todo[key][0]]
            if use_cache:
                _write_cache(_cache_file(cdir, key), emb, n, p, max_length, identity)
                _memo_put(key, emb)
            for i in todo[key]:
                results[i] = emb
    return [r.clone().to(device) for r in results]  # type: ignore[union-attr]


def encode_prompt(prompt: str, encoder: str | os.PathLike, tokenizer: str | os.PathLike | None = None,
                  cache_dir: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.bfloat16, max_length: int = DEFAULT_MAX_LENGTH) -> torch.Tensor:
    """The umt5 embedding ``[1, max_length, d_model]`` of ``prompt`` (d_model is 4096 for umt5-xxl),
    as diffusers' WanPipeline computes it; from the memo or disk cache when this prompt was encoded
    before with the same encoder weights, otherwise by loading the encoder once and freeing it."""
    return encode_prompts([prompt], encoder, tokenizer=tokenizer, cache_dir=cache_dir, device=device,
                          dtype=dtype, max_length=max_length)[0]
