"""Find and load the Wan2.2-TI2V-5B DiT and VAE from the files users already have.

Accepted forms:

* the ComfyUI single files ``models/diffusion_models/wan2.2_ti2v_5B_fp16.safetensors`` and
  ``models/vae/wan2.2_vae.safetensors`` (original Wan key layout, with or without a
  ``model.diffusion_model.`` prefix, fp32/fp16/bf16 or fp8 including ComfyUI "scaled fp8");
* the original Wan release (``Wan-AI/Wan2.2-TI2V-5B``: DiT shards + index, ``Wan2.2_VAE.pth``);
* a diffusers folder (``Wan-AI/Wan2.2-TI2V-5B-Diffusers``: ``transformer/``, ``vae/``), the
  component folder itself, sharded or not; full fine-tuned 5B transformers load the same way.

The architecture is read from the tensors (so tiny test models take the same path as the real
5B); ``configs/wan22_ti2v_5b_transformer.json`` fills in what tensors cannot tell. Original keys
are renamed with diffusers' own converter, the model is created on the meta device and the weights
are assigned once, tensor by tensor, in the requested dtype, with diffusers' ``_keep_in_fp32_modules``
kept in fp32 exactly as ``from_pretrained`` does. Nothing is downloaded unless
:func:`download_model_files` is called explicitly.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import torch

from .checkpoints import (DIT_PREFIXES, KIND_LORA, KIND_WAN21_VAE, KIND_WAN22_TI2V_DIT, KIND_WAN22_VAE,
                          VAE_PREFIXES, Checkpoint, CheckpointInfo, identify, open_checkpoint)
from .errors import ModelFileError, WrongModelError

if TYPE_CHECKING:  # pragma: no cover
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
TRANSFORMER_CONFIG_FILE = CONFIG_DIR / "wan22_ti2v_5b_transformer.json"
VAE_CONFIG_FILE = CONFIG_DIR / "wan22_vae.json"

DIT_FILE_NAME = "wan2.2_ti2v_5B_fp16.safetensors"
VAE_FILE_NAME = "wan2.2_vae.safetensors"
HF_REPACKAGED_REPO = "Comfy-Org/Wan_2.2_ComfyUI_Repackaged"
HF_DIT_FILE = "split_files/diffusion_models/wan2.2_ti2v_5B_fp16.safetensors"
HF_VAE_FILE = "split_files/vae/wan2.2_vae.safetensors"
HF_DIFFUSERS_REPO = "Wan-AI/Wan2.2-TI2V-5B-Diffusers"

WHERE_DIT = (f"Expected the Wan2.2-TI2V-5B DiT: {DIT_FILE_NAME} in ComfyUI's models/diffusion_models/ "
             f"(Hugging Face repo {HF_REPACKAGED_REPO}, file {HF_DIT_FILE}), or a diffusers folder with "
             f"transformer/ (Hugging Face repo {HF_DIFFUSERS_REPO}).")
WHERE_VAE = (f"Expected the Wan2.2 VAE: {VAE_FILE_NAME} in ComfyUI's models/vae/ "
             f"(Hugging Face repo {HF_REPACKAGED_REPO}, file {HF_VAE_FILE}), or a diffusers folder with "
             f"vae/ (Hugging Face repo {HF_DIFFUSERS_REPO}).")

_INDEX_SUFFIX = ".safetensors.index.json"


# ---------------------------------------------------------------------------------------------------
# locating files

def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(f"{path}: cannot read this JSON file ({e}). Re-download it.") from None
    if not isinstance(data, dict):
        raise ModelFileError(f"{path}: expected a JSON object.")
    return data


def _weight_files_in(folder: Path, what: str) -> list[Path]:
    """The weight files of one model folder: shards from an index json, or its safetensors file(s)."""
    indexes = sorted(folder.glob("*" + _INDEX_SUFFIX))
    if indexes:
        preferred = [p for p in indexes if p.name == "diffusion_pytorch_model" + _INDEX_SUFFIX]
        index = (preferred or indexes)[0]
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelFileError(f"{index}: no weight_map in this index file. Re-download the folder.")
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelFileError(f"{folder}: shard(s) {', '.join(missing)} listed in {index.name} are missing. "
                                 "The download is incomplete; download the whole folder again.")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelFileError(f"{folder}: no .safetensors weights in this folder. {what}")
    if len(files) > 1:
        plain = [f for f in files if f.name == "diffusion_pytorch_model.safetensors"]
        if plain:
            return plain
        raise ModelFileError(f"{folder} holds several .safetensors files ({', '.join(f.name for f in files[:5])}) "
                             "and no index json: pass the one file to load instead of the folder.")
    return files


def _component_files(path: Path, sub: str, what: str) -> tuple[list[Path], dict[str, Any] | None]:
    """Weight files and diffusers config (if any) for a file, a component folder or a model root."""
    if not path.exists():
        raise ModelFileError(f"{path}: not found. {what}")
    if path.is_file():
        if path.name.endswith(_INDEX_SUFFIX):
            return _component_files(path.parent, sub, what)
        # One shard of a sharded folder (e.g. a full fine-tune picked from ComfyUI's file list): load the
        # whole set its index names, with the folder's config.
        for index in sorted(path.parent.glob("*" + _INDEX_SUFFIX)):
            weight_map = _read_json(index).get("weight_map")
            if isinstance(weight_map, dict) and path.name in set(weight_map.values()):
                logger.info("%s is one shard of %s: loading all of its shards", path.name, index.name)
                return _component_files(path.parent, sub, what)
        return [path], None
    if (path / sub).is_dir():
        path = path / sub
    cfg_path = path / "config.json"
    config = _read_json(cfg_path) if cfg_path.is_file() else None
    return _weight_files_in(path, what), config


def _first_existing(candidates: list[Path]) -> Path | None:
    for c in candidates:
        if c.exists():
            return c
    return None


def _dit_candidates(d: Path) -> list[Path]:
    return [d / "transformer", d / ("diffusion_pytorch_model" + _INDEX_SUFFIX), d / "diffusion_models" / DIT_FILE_NAME,
            d / "models" / "diffusion_models" / DIT_FILE_NAME, d / "split_files" / "diffusion_models" / DIT_FILE_NAME,
            d / DIT_FILE_NAME]


def _vae_candidates(d: Path) -> list[Path]:
    out = [d / "vae" / "config.json", d / "vae" / VAE_FILE_NAME, d / "models" / "vae" / VAE_FILE_NAME,
           d / "split_files" / "vae" / VAE_FILE_NAME, d / VAE_FILE_NAME, d / "Wan2.2_VAE.pth"]
    return out


def resolve_model_files(model_dir: str | os.PathLike | None = None, dit: str | os.PathLike | None = None,
                        vae: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """Find the DiT and VAE to load, without reading them.

    ``model_dir`` may be a diffusers model root (``transformer/``, ``vae/``), the original Wan
    release folder, a ComfyUI ``models/`` folder or ComfyUI root, or a folder holding the two
    single files (as :func:`download_model_files` writes them). ``dit`` / ``vae`` override the
    search. Raises :class:`ModelFileError` naming the expected file and where to get it.
    """
    def explicit(p: str | os.PathLike, what: str, name: str) -> Path:
        path = Path(p).expanduser()
        if not path.exists():
            raise ModelFileError(f"{path}: not found. {what}")
        if path.is_dir() and (path / name).is_file():
            return path / name
        return path

    root = Path(model_dir).expanduser() if model_dir is not None else None
    if root is not None and not root.is_dir():
        raise ModelFileError(f"model folder {root} not found. {WHERE_DIT} {WHERE_VAE}")

    if dit is not None:
        dit_path = explicit(dit, WHERE_DIT, DIT_FILE_NAME)
    elif root is not None:
        found = _first_existing(_dit_candidates(root))
        if found is None:
            if (root / "config.json").is_file() and any(root.glob("*.safetensors")):
                found = root
            else:
                tried = ", ".join(str(c) for c in _dit_candidates(root))
                raise ModelFileError(f"no Wan2.2-TI2V-5B DiT found in {root} (looked for {tried}). {WHERE_DIT}")
        dit_path = found.parent if found.name.endswith(_INDEX_SUFFIX) else found
    else:
        raise ModelFileError(f"no model given: pass a model folder or the DiT file. {WHERE_DIT}")

    if vae is not None:
        vae_path = explicit(vae, WHERE_VAE, VAE_FILE_NAME)
    else:
        search = [root] if root is not None else []
        if dit_path.is_file():  # ComfyUI: models/diffusion_models/x -> models/vae/
            search += [dit_path.parent, dit_path.parent.parent]
        found = None
        for d in search:
            found = _first_existing(_vae_candidates(d))
            if found is not None:
                break
        if found is None:
            where = ", ".join(str(d) for d in search) or "(no folder given)"
            raise ModelFileError(f"no Wan2.2 VAE found next to the DiT (searched {where}). {WHERE_VAE}")
        vae_path = found.parent if found.name == "config.json" else found
    logger.info("model files: DiT %s, VAE %s", dit_path, vae_path)
    return dit_path, vae_path


# ---------------------------------------------------------------------------------------------------
# configs and errors

def _wrong_model(path: Path, info: CheckpointInfo, expected: str, where: str, role: str) -> WrongModelError:
    msg = f"{path} holds {info.description}, but {expected} was expected."
    if info.note:
        msg += f" ({info.note}.)"
    if info.kind == KIND_LORA:
        msg += " Load it as a LoRA, not as the base model."
    elif role == "dit" and "vae" in info.kind:
        msg += " It is a VAE: pass it as the VAE (ComfyUI models/vae/), and the DiT as the diffusion model."
    elif role == "vae" and info.is_wan_dit:
        msg += " It is a diffusion model (DiT): pass it as the DiT, and the VAE file as the VAE."
    elif role == "vae" and info.kind == KIND_WAN21_VAE:
        msg += " The TI2V-5B uses the new Wan2.2 VAE (48 latent channels, 16x compression)."
    return WrongModelError(f"{msg} {where}")


def load_transformer_config(arch: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``WanTransformer3DModel`` kwargs: the shipped 5B config with sizes read from the tensors."""
    cfg = {k: v for k, v in _read_json(TRANSFORMER_CONFIG_FILE).items() if not k.startswith("_")}
    if arch:
        dim = arch["dim"]
        if arch.get("num_heads") is None:
            raise ModelFileError(f"unsupported DiT width {dim}: Wan DiTs use heads of 128 channels.")
        for key, value in (("num_layers", arch["num_layers"]), ("num_attention_heads", arch["num_heads"]),
                           ("attention_head_dim", 128), ("in_channels", arch["in_channels"]),
                           ("out_channels", arch["out_channels"]), ("patch_size", list(arch["patch_size"])),
                           ("ffn_dim", arch["ffn_dim"]), ("text_dim", arch["text_dim"]),
                           ("freq_dim", arch["freq_dim"]), ("cross_attn_norm", arch["cross_attn_norm"])):
            if value is not None:
                cfg[key] = value
        if not arch.get("qk_norm"):
            cfg["qk_norm"] = None
    return cfg


def _init_kwargs(cls: type, config: Mapping[str, Any]) -> dict[str, Any]:
    params = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in config.items() if k in params and k != "self"}


def _check_config_matches(path: Path, cfg: Mapping[str, Any], arch: Mapping[str, Any]) -> None:
    """A diffusers config.json must describe the weights beside it (else the download is mixed up)."""
    dim = cfg.get("num_attention_heads", 0) * cfg.get("attention_head_dim", 0)
    pairs = [("num_layers", arch["num_layers"]), ("in_channels", arch["in_channels"]),
             ("ffn_dim", arch["ffn_dim"]), ("text_dim", arch["text_dim"]), ("freq_dim", arch["freq_dim"])]
    bad = [f"{k}: config {cfg.get(k)} vs weights {v}" for k, v in pairs if v is not None and cfg.get(k) != v]
    if dim != arch["dim"]:
        bad.append(f"width: config {dim} vs weights {arch['dim']}")
    if bad:
        raise ModelFileError(f"{path}: config.json does not match the weights beside it ({'; '.join(bad)}). "
                             "Re-download the folder.")


@contextlib.contextmanager
def _empty_weights() -> Iterator[None]:
    """Create parameters on the meta device (buffers stay real), so big models are not initialised."""
    try:
        from accelerate import init_empty_weights
    except ImportError:  # pragma: no cover - accelerate is a dependency of the pack
        logger.info("accelerate not installed: models are initialised before loading (slower)")
        yield
        return
    with init_empty_weights():
        yield


def _keep_fp32(name: str, modules: list[str] | None) -> bool:
    """diffusers' ``from_pretrained`` rule: a parameter whose dotted path names a listed module."""
    return bool(modules) and any(m in name.split(".") for m in modules)


def _assign_weights(model: torch.nn.Module, ckpt: "Checkpoint | _DictCheckpoint", mapping: Mapping[str, str], dtype: torch.dtype,
                    device: torch.device | str, path: Path, ignore_unexpected: tuple[str, ...] = ()) -> None:
    """Load ``ckpt`` tensors (renamed by ``mapping``: model name -> checkpoint name) into ``model``."""
    expected = set(model.state_dict().keys())
    unexpected = sorted(k for k in mapping if k not in expected and not any(p in k for p in ignore_unexpected))
    missing = sorted(expected - set(mapping))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:4])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:4])})")
        raise ModelFileError(f"{path}: the weights do not fit the model: {'; '.join(parts)}. The file is "
                             "incomplete or a modified variant; re-download it.")
    fp32_modules = getattr(model, "_keep_in_fp32_modules", None)
    state: dict[str, torch.Tensor] = {}
    for name in sorted(expected):
        want = torch.float32 if _keep_fp32(name, fp32_modules) else dtype
        state[name] = ckpt.get(mapping[name], dtype=want, device=device)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise ModelFileError(f"{path}: the weights do not fit the model ({e}). Re-download it.") from None
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise ModelFileError(f"{path}: no weights for {', '.join(still_meta[:4])}.")
    model.to(device)


def _original_to_diffusers_names(keys: list[str]) -> dict[str, str]:
    """diffusers name -> original name, using diffusers' own Wan converter on the key names only."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    converted = convert_wan_transformer_to_diffusers({k: k for k in keys})
    return {new: old for new, old in converted.items()}


# ---------------------------------------------------------------------------------------------------
# loaders

def load_transformer(path: str | os.PathLike, dtype: torch.dtype = torch.bfloat16,
                     device: torch.device | str = "cpu") -> "WanTransformer3DModel":
    """Load the Wan2.2-TI2V-5B DiT (or a fine-tune / tiny model of the same family) as diffusers' model.

    ``path``: a single ``.safetensors`` file in the original layout (any prefix, fp32/fp16/bf16/fp8)
    or diffusers layout, a diffusers ``transformer/`` folder (sharded or not), a model root holding
    ``transformer/``, or the original release folder (shards + index). Weights are cast to ``dtype``
    except diffusers' ``_keep_in_fp32_modules`` (time embedder, norms, modulation tables), which stay
    fp32 as in ``from_pretrained``. Raises :class:`ModelFileError` for missing/broken files and
    :class:`WrongModelError` when the file holds another model.
    """
    from diffusers import WanTransformer3DModel

    p = Path(path).expanduser()
    files, config = _component_files(p, "transformer", WHERE_DIT)
    with open_checkpoint(files, DIT_PREFIXES) as ckpt:
        info = identify(ckpt)
        if info.kind != KIND_WAN22_TI2V_DIT:
            raise _wrong_model(p, info, "the Wan2.2-TI2V-5B DiT", WHERE_DIT, "dit")
        arch = info.arch
        if config is not None and config.get("_class_name") == "WanTransformer3DModel":
            cfg = _init_kwargs(WanTransformer3DModel, config)
            _check_config_matches(p, cfg, arch)
        else:
            cfg = _init_kwargs(WanTransformer3DModel, load_transformer_config(arch))
        if info.layout == "original":
            mapping = _original_to_diffusers_names(ckpt.keys())
        else:
            mapping = {k: k for k in ckpt.keys()}
        logger.info("loading %s from %s (%s layout, %s) as %s on %s", info.description, p, info.layout,
                    ckpt.describe_storage(), dtype, device)
        with _empty_weights():
            model = WanTransformer3DModel.from_config(cfg)
        _assign_weights(model, ckpt, mapping, dtype, device, p,
                        ignore_unexpected=tuple(WanTransformer3DModel._keys_to_ignore_on_load_unexpected or ()))
    return model.eval()


def load_vae(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
             device: torch.device | str = "cpu") -> "AutoencoderKLWan":
    """Load the Wan2.2 VAE as diffusers' ``AutoencoderKLWan``.

    ``path``: the single file in the original Wan2.2 layout (``wan2.2_vae.safetensors``, optionally
    prefixed, or the release's ``Wan2.2_VAE.pth``), a diffusers ``vae/`` folder, or a model root
    holding ``vae/``. Original keys are converted and the sizes read from the tensors by
    :mod:`vbridge_core.vae_convert`; the latent mean/std (not stored in checkpoints) come from the
    folder's ``config.json`` or else the shipped real Wan2.2 values.
    """
    from diffusers import AutoencoderKLWan

    p = Path(path).expanduser()
    files, config = _component_files(p, "vae", WHERE_VAE)
    with open_checkpoint(files, VAE_PREFIXES) as ckpt:
        info = identify(ckpt)
        if info.kind != KIND_WAN22_VAE:
            raise _wrong_model(p, info, "the Wan2.2 VAE", WHERE_VAE, "vae")
        logger.info("loading %s from %s (%s layout, %s) as %s on %s", info.description, p, info.layout,
                    ckpt.describe_storage(), dtype, device)
        if info.layout == "diffusers" and config is not None and config.get("_class_name") == "AutoencoderKLWan":
            cfg = config
            loader: Any = ckpt
            mapping = {k: k for k in ckpt.keys()}
        else:  # single file (original or diffusers layout): sizes from the tensors, stats from the shipped config
            from .vae_convert import convert_vae22_to_diffusers, vae22_config_from_state_dict

            weights = ckpt.state_dict(dtype=dtype)
            cfg = vae22_config_from_state_dict(weights)
            converted = convert_vae22_to_diffusers(weights)
            del weights
            loader = _DictCheckpoint(converted)
            mapping = {k: k for k in converted}
        with _empty_weights():
            model = AutoencoderKLWan.from_config(_init_kwargs(AutoencoderKLWan, cfg))
        _assign_weights(model, loader, mapping, dtype, device, p)
    return model.eval()


class _DictCheckpoint:
    """In-memory stand-in for :class:`Checkpoint` (already converted tensors)."""

    def __init__(self, sd: dict[str, torch.Tensor]):
        self._sd = sd

    def get(self, key: str, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> torch.Tensor:
        t = self._sd.pop(key)
        return t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)


def download_model_files(dest_dir: str | os.PathLike, diffusers_folder: bool = False) -> tuple[Path, Path]:
    """Download the DiT and VAE from Hugging Face into ``dest_dir`` (only when the user asks).

    Default: ``Comfy-Org/Wan_2.2_ComfyUI_Repackaged`` files ``split_files/diffusion_models/
    wan2.2_ti2v_5B_fp16.safetensors`` and ``split_files/vae/wan2.2_vae.safetensors`` (kept under
    those sub-paths of ``dest_dir``). With ``diffusers_folder=True``: the ``transformer/`` and
    ``vae/`` folders of ``Wan-AI/Wan2.2-TI2V-5B-Diffusers``. Returns ``(dit_path, vae_path)``,
    which :func:`resolve_model_files` (``model_dir=dest_dir``) also finds.
    """
    try:
        from huggingface_hub import hf_hub_download, snapshot_download
    except ImportError:  # pragma: no cover
        raise ModelFileError("downloading needs huggingface_hub: pip install huggingface_hub") from None
    dest = Path(dest_dir).expanduser()
    dest.mkdir(parents=True, exist_ok=True)
    if diffusers_folder:
        logger.info("downloading %s (transformer/, vae/) to %s", HF_DIFFUSERS_REPO, dest)
        root = Path(snapshot_download(repo_id=HF_DIFFUSERS_REPO, local_dir=dest,
                                      allow_patterns=["transformer/*", "vae/*", "model_index.json"]))
        return root / "transformer", root / "vae"
    logger.info("downloading %s/%s and %s to %s", HF_REPACKAGED_REPO, HF_DIT_FILE, HF_VAE_FILE, dest)
    dit = Path(hf_hub_download(repo_id=HF_REPACKAGED_REPO, filename=HF_DIT_FILE, local_dir=dest))
    vae = Path(hf_hub_download(repo_id=HF_REPACKAGED_REPO, filename=HF_VAE_FILE, local_dir=dest))
    return dit, vae
