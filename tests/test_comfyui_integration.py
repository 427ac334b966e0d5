"""Opt-in: run every shipped workflow in a real ComfyUI server (CPU, tiny models).

Runs only when ``COMFYUI_PATH`` points at a ComfyUI checkout whose requirements (and ours) are
installed in the Python running pytest (or in ``COMFYUI_PYTHON``)::

    COMFYUI_PATH=~/ComfyUI python -m pytest -q tests/test_comfyui_integration.py

What it does: starts ``main.py --cpu`` on a free loopback port with a temporary base directory
(``--base-directory``: custom_nodes/ holds a link to this pack, input/ the test images, output/
the results) and a temporary ``--extra-model-paths-config`` whose models folder holds tiny
random-weight Wan2.2 files under the real names (DiT in diffusers keys, VAE in the original Wan
keys) plus tiny V-Bridge LoRAs; reads ``/object_info``; converts each workflows/*.json from the UI
format to the API format with those definitions (widgets_values -> named inputs, links ->
``[node_id, slot]``, virtual note nodes dropped); queues it with ``POST /prompt`` (steps lowered to
``VBRIDGE_IT_STEPS``, default 2, to stay fast) and polls ``/history`` until it finishes; then
checks it succeeded and produced images. Nothing is written inside the ComfyUI checkout.

The training workflows (those with ``TrainLoRA``) run adapted, as ComfyUI's CLIPLoader cannot load a
tiny umt5 (its umt5-xxl configuration is fixed): the CLIPLoader and CLIPTextEncode nodes are removed
with the conditioning link, and LoadVBridge gets the tiny restoration LoRA, which embeds a prompt
(the trainer's fallback when no conditioning is connected; drift mode uses it anyway). The pairs are
the pack's sample folder, the curriculum is lowered to ``64:3`` and the settings to one crop per pair,
2-step validation/restore passes and a checkpoint every 2 steps. The test then checks the LoRA file
in ``models/loras/vbridge/`` and that LoadVBridge and core LoraLoader list it.

The release workflow (``restore_paper_release``, preset ``paper``: the full 93-call recipe, whatever
``VBRIDGE_IT_STEPS`` says) runs adapted the same way: its CLIPLoader/CLIPTextEncode nodes are removed and
LoadVBridge gets the tiny restoration LoRA, which embeds a prompt and a negative prompt; its DiT is the tiny
model saved as a sharded diffusers folder ``models/diffusion_models/V-Bridge/``, picked by its first shard.
Bypassed (and muted) nodes are left out as the frontend does.

The video workflow loads ``input/degraded_clip.mp4``, a 6-frame 48x48 H.264 clip written at start-up
with ComfyUI's own PyAV (the degraded sample panning, with noise re-drawn per frame); video savers
(``SaveVideo`` ...) must have written their file.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
STARTUP_TIMEOUT_S = float(os.environ.get("VBRIDGE_IT_STARTUP_S", "240"))
RUN_TIMEOUT_S = float(os.environ.get("VBRIDGE_IT_RUN_S", "600"))
STEPS = int(os.environ.get("VBRIDGE_IT_STEPS", "2"))

pytestmark = pytest.mark.skipif(
    not COMFYUI_PATH or not (Path(COMFYUI_PATH) / "main.py").is_file(),
    reason="set COMFYUI_PATH to a ComfyUI checkout (with its requirements installed) to run workflows in ComfyUI",
)

#: Frontend-only nodes: never sent to the server.
VIRTUAL_NODES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
OUR_NODES = {"LoadVBridge", "RestoreTrajectory", "DriftCorrect", "LoadImagePairs", "ImageQualityMetrics",
             "TrainLoRASettings", "TrainLoRA", "RestoreVideo", "TrainStabilizer", "PerceiveImage", "AutoRestore",
             "TrainPerceiver"}
#: Core nodes that save a video (their UI output lists the files under "images").
VIDEO_SAVERS = {"SaveVideo", "SaveAnimatedWEBP", "SaveAnimatedPNG", "SaveWEBM"}
#: Script run with ComfyUI's Python (it has PyAV): a 6-frame 48x48 H.264 clip of the degraded sample
#: panning 2 px per frame with noise re-drawn every frame (flicker), for LoadVideo.
_CLIP_SCRIPT = """
import sys, av, numpy as np
from PIL import Image
img = np.asarray(Image.open(sys.argv[1]).convert("RGB"), dtype=np.float32)
rng = np.random.default_rng(0)
out = av.open(sys.argv[2], mode="w")
st = out.add_stream("libx264", rate=8)
st.width, st.height, st.pix_fmt = 48, 48, "yuv420p"
for t in range(6):
    f = img[4:52, 2 * t:2 * t + 48] + rng.normal(0, 12, (48, 48, 3))
    for p in st.encode(av.VideoFrame.from_ndarray(np.clip(f, 0, 255).astype(np.uint8), format="rgb24")):
        out.mux(p)
for p in st.encode():
    out.mux(p)
out.close()
"""
#: Text-encoder nodes removed from the training workflows (a tiny umt5 cannot be loaded by CLIPLoader).
TEXT_ENCODER_NODES = {"CLIPLoader", "CLIPTextEncode"}
TRAIN_STAGES = "64:3"
TRAIN_SETTINGS = dict(crops_per_pair=1, validation_fraction=0.34, validation_steps=2, restore_steps=2,
                      gradient_checkpointing=False, checkpoint_every=2)


# --------------------------------------------------------------------------------------------
# UI format -> API format
# --------------------------------------------------------------------------------------------


def _is_widget(spec: list) -> bool:
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if opts.get("forceInput"):
        return False
    return isinstance(spec[0], list) or spec[0] in WIDGET_TYPES


def _ui_extras(name: str, spec: list) -> int:
    """How many UI-only values the frontend stores after this widget's value."""
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    extra = 0
    if opts.get("control_after_generate") or (spec[0] == "INT" and name in ("seed", "noise_seed")):
        extra += 1
    if any(k.endswith("_upload") and v for k, v in opts.items()):  # image_upload, video_upload, ...
        extra += 1
    return extra


MUTED, BYPASSED = 2, 4


def _source(link: list, links: dict[int, list], nodes: dict[int, dict]) -> tuple[int, int] | None:
    """``(node id, output slot)`` feeding a link, through bypassed nodes as the frontend does (a bypassed
    node passes on its first input of the output's type; without one the input stays unconnected)."""
    _, src, slot, _, _, typ = link[:6]
    n = nodes[src]
    if n.get("mode", 0) == MUTED:
        return None
    if n.get("mode", 0) == BYPASSED:
        for inp in n.get("inputs") or []:
            if inp.get("type") == typ and inp.get("link") is not None:
                return _source(links[inp["link"]], links, nodes)
        return None
    return src, slot


def ui_to_api(workflow: dict[str, Any], object_info: dict[str, Any]) -> dict[str, Any]:
    """Convert a UI-format (0.4) workflow into an API prompt using the server's node definitions.

    Muted and bypassed nodes are left out (never sent, as in the frontend); links through a bypassed
    node are rewired to its same-typed input."""
    links = {l[0]: l for l in workflow["links"]}
    nodes = {n["id"]: n for n in workflow["nodes"]}
    prompt: dict[str, Any] = {}
    for n in workflow["nodes"]:
        if n["type"] in VIRTUAL_NODES or n.get("mode", 0) in (MUTED, BYPASSED):
            continue
        assert n.get("mode", 0) == 0, f"node {n['id']} has mode {n.get('mode')}; the converter knows 0, 2 and 4"
        info = object_info.get(n["type"])
        assert info is not None, f"the server has no node {n['type']!r}"
        order = info.get("input_order") or {sec: list(info["input"].get(sec, {})) for sec in ("required", "optional")}
        values = list(n.get("widgets_values") or [])
        inputs: dict[str, Any] = {}
        i = 0
        for sec in ("required", "optional"):
            for name in order.get(sec, []):
                spec = info["input"][sec][name]
                if not _is_widget(spec):
                    continue
                if i < len(values):
                    inputs[name] = values[i]
                i += 1 + _ui_extras(name, spec)
        for inp in n.get("inputs") or []:
            if inp.get("link") is None:
                continue
            found = _source(links[inp["link"]], links, nodes)
            if found is None:
                continue
            src, src_slot = found
            assert nodes[src]["type"] not in VIRTUAL_NODES, "links from virtual nodes are not supported"
            inputs[inp["name"]] = [str(src), src_slot]
        prompt[str(n["id"])] = {"class_type": n["type"], "inputs": inputs,
                                "_meta": {"title": n.get("title") or n["type"]}}
    return prompt


# --------------------------------------------------------------------------------------------
# Tiny model files
# --------------------------------------------------------------------------------------------


def _write_models(models: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from vbridge_core.lora import LoraLayer, write_lora
    from vbridge_core.tiny import build_tiny_transformer, build_tiny_vae, tiny_prompt_embeds
    from vbridge_core.vae_convert import convert_vae22_from_diffusers

    for sub in ("diffusion_models", "vae", "loras/vbridge"):
        (models / sub).mkdir(parents=True, exist_ok=True)
    dit = build_tiny_transformer(0)
    # diffusers keys in one file, named like the real DiT: our loader identifies it by its tensors
    save_file({k: v.contiguous() for k, v in dit.state_dict().items()},
              str(models / "diffusion_models" / "wan2.2_ti2v_5B_fp16.safetensors"))
    # a full fine-tune as released: a diffusers transformer folder in shards (picked by one of its files)
    dit.save_pretrained(models / "diffusion_models" / "V-Bridge", max_shard_size="3MB", safe_serialization=True)
    vae_sd = {k: v.contiguous() for k, v in build_tiny_vae(1).state_dict().items()}
    # the original Wan2.2 VAE key layout, as in Comfy-Org's repackaged wan2.2_vae.safetensors
    save_file({k: v.contiguous() for k, v in convert_vae22_from_diffusers(vae_sd).items()},
              str(models / "vae" / "wan2.2_vae.safetensors"))
    prompt = tiny_prompt_embeds()
    for role, name, seed in (("restoration", "denoise", 1), ("drift_correction", "denoise_drift", 2)):
        g = torch.Generator().manual_seed(seed)
        layers = {}
        for mod_name, mod in dit.named_modules():
            if isinstance(mod, torch.nn.Linear) and mod_name.startswith("blocks.") and ".attn" in mod_name:
                layers[mod_name] = LoraLayer(down=torch.randn(4, mod.in_features, generator=g) * 0.02,
                                             up=torch.randn(mod.out_features, 4, generator=g) * 0.02, alpha=4.0)
        write_lora(models / "loras" / "vbridge" / f"{name}.safetensors", layers, rank=4, alpha=4.0,
                   metadata={"role": role, "frames": 5, "base_model": "vbridge-tiny", "tasks": ["denoise"]},
                   prompt_embeds=prompt, negative_prompt_embeds=tiny_prompt_embeds(3))
    # the accelerator restore_turbo.json names, in FastWan's ComfyUI LoRA key layout (tiny_files.fastwan_style_lora)
    from tiny_files import fastwan_style_lora

    fastwan_style_lora(models / "loras" / "Wan2_2_5B_FastWanFullAttn_lora_rank_128_bf16.safetensors", dit, seed=3)


# --------------------------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, url: str, proc: subprocess.Popen, log: Path, base: Path):
        self.url, self.proc, self.log, self.base = url, proc, log, base

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def get(self, path: str, timeout: float = 30) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read().decode())

    def post(self, path: str, body: dict, timeout: float = 30) -> tuple[int, Any]:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read().decode())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read().decode() or "{}")


def _supported_flags(comfy: Path) -> str:
    try:
        return (comfy / "comfy" / "cli_args.py").read_text(errors="replace")
    except OSError:
        return ""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    comfy = Path(COMFYUI_PATH).resolve()
    base = tmp_path_factory.mktemp("comfy_base")
    models = tmp_path_factory.mktemp("comfy_models")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "ComfyUI-VBridge").symlink_to(ROOT, target_is_directory=True)
    (base / "input").mkdir()
    samples = ROOT / "vbridge_core" / "assets" / "samples" / "denoise"
    shutil.copy(samples / "lq" / "shapes.png", base / "input" / "degraded.png")
    shutil.copy(samples / "hq" / "shapes.png", base / "input" / "reference.png")
    shutil.copy(samples / "lq" / "shapes.png", base / "input" / "mixed_photo.png")  # auto_restore.json (noisy)
    subprocess.run([os.environ.get("COMFYUI_PYTHON", sys.executable), "-c", _CLIP_SCRIPT,
                    str(samples / "lq" / "shapes.png"), str(base / "input" / "degraded_clip.mp4")], check=True)
    _write_models(models)
    yaml = base / "extra_model_paths.yaml"
    yaml.write_text(
        "vbridge_integration_test:\n"
        f"    base_path: {models}\n"
        "    diffusion_models: diffusion_models\n"
        "    vae: vae\n"
        "    loras: loras\n"
    )
    port = _free_port()
    flags = _supported_flags(comfy)
    cmd = [os.environ.get("COMFYUI_PYTHON", sys.executable), "main.py", "--cpu", "--listen", "127.0.0.1",
           "--port", str(port), "--base-directory", str(base), "--extra-model-paths-config", str(yaml)]
    for flag, extra in (("--disable-auto-launch", []), ("--disable-api-nodes", []),
                        ("--database-url", ["sqlite:///:memory:"])):
        if f'"{flag}"' in flags:
            cmd += [flag, *extra]
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    log = base / "comfyui.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=comfy, stdout=out, stderr=subprocess.STDOUT, env=env)
    srv = Server(f"http://127.0.0.1:{port}", proc, log, base)
    srv.models = models
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ComfyUI exited with {proc.returncode} during start:\n{srv.log_tail()}")
            try:
                srv.get("/system_stats", timeout=5)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                if time.monotonic() > deadline:
                    pytest.fail(f"ComfyUI did not answer within {STARTUP_TIMEOUT_S:.0f} s:\n{srv.log_tail()}")
                time.sleep(1.0)
        yield srv
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


@pytest.fixture(scope="module")
def object_info(server) -> dict[str, Any]:
    return server.get("/object_info", timeout=120)


def test_pack_loads_in_comfyui(server, object_info):
    missing = OUR_NODES - set(object_info)
    assert not missing, f"nodes missing from /object_info: {sorted(missing)}\n{server.log_tail()}"
    failed = [l for l in server.log.read_text(errors="replace").splitlines() if "IMPORT FAILED" in l and "ComfyUI-VBridge" in l]
    assert not failed, f"{failed}\n{server.log_tail()}"
    loader = object_info["LoadVBridge"]["input"]["required"]
    assert "wan2.2_ti2v_5B_fp16.safetensors" in loader["dit"][0], "the extra model paths' DiT must be listed"
    assert "vbridge/denoise.safetensors" in loader["restoration_lora"][0]


def test_converter_maps_widgets_by_name(object_info):
    wf = json.loads((ROOT / "workflows" / "restore_image.json").read_text())
    api = ui_to_api(wf, object_info)
    restore = next(v for v in api.values() if v["class_type"] == "RestoreTrajectory")
    assert restore["inputs"]["seed"] == 0 and restore["inputs"]["shift"] == 5.0 and restore["inputs"]["solver"] == "unipc"
    load = next(v for v in api.values() if v["class_type"] == "LoadImage")
    assert load["inputs"] == {"image": "degraded.png"}
    assert all(v["class_type"] != "MarkdownNote" for v in api.values())


def _run(server: Server, prompt: dict[str, Any]) -> dict[str, Any]:
    status, body = server.post("/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})
    assert status == 200 and body.get("prompt_id"), f"/prompt refused the workflow ({status}): {json.dumps(body)[:3000]}"
    assert not body.get("node_errors"), body["node_errors"]
    pid = body["prompt_id"]
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            pytest.fail(f"ComfyUI died while running:\n{server.log_tail()}")
        hist = server.get(f"/history/{pid}")
        entry = hist.get(pid)
        if entry and entry.get("status", {}).get("completed") is not None and (
                entry["status"].get("completed") or entry["status"].get("status_str") == "error"):
            return entry
        time.sleep(1.0)
    pytest.fail(f"workflow did not finish within {RUN_TIMEOUT_S:.0f} s:\n{server.log_tail()}")


def _adapt_training(prompt: dict[str, Any]) -> list[str]:
    """Make a training workflow run on the tiny models (see the module docstring); returns the LoRA names."""
    dropped = {nid for nid, n in prompt.items() if n["class_type"] in TEXT_ENCODER_NODES}
    for nid in dropped:
        del prompt[nid]
    names = []
    for node in prompt.values():
        inputs = node["inputs"]
        for k in [k for k, v in inputs.items() if isinstance(v, list) and len(v) == 2 and v[0] in dropped]:
            del inputs[k]
        if node["class_type"] == "LoadVBridge":
            inputs["restoration_lora"] = "vbridge/denoise.safetensors"
        elif node["class_type"] == "LoadImagePairs":
            inputs["folder"] = str(ROOT / "vbridge_core" / "assets" / "samples" / "denoise")
        elif node["class_type"] == "TrainLoRASettings":
            inputs.update(TRAIN_SETTINGS)
        elif node["class_type"] == "TrainLoRA":
            inputs["stages"] = TRAIN_STAGES
            names.append(inputs["output_name"])
    return names


def _adapt_release(prompt: dict[str, Any], models_dir: Path) -> None:
    """The release workflow on the tiny models: CLIPLoader cannot load a tiny umt5, so the text-encoder nodes
    go (as for training) and the tiny restoration LoRA supplies the prompt pair (it embeds both); the DiT is
    the tiny model saved as a sharded diffusers folder, picked by its first shard as users pick the release."""
    dropped = {nid for nid, n in prompt.items() if n["class_type"] in TEXT_ENCODER_NODES}
    for nid in dropped:
        del prompt[nid]
    shard = sorted((models_dir / "diffusion_models" / "V-Bridge").glob("*-00001-of-*.safetensors"))[0]
    for node in prompt.values():
        inputs = node["inputs"]
        for k in [k for k, v in inputs.items() if isinstance(v, list) and len(v) == 2 and v[0] in dropped]:
            del inputs[k]
        if node["class_type"] == "LoadVBridge":
            inputs["dit"] = f"V-Bridge/{shard.name}"
            inputs["restoration_lora"] = "vbridge/denoise.safetensors"


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_runs_in_comfyui(server, object_info, path):
    wf = json.loads(path.read_text(encoding="utf-8"))
    prompt = ui_to_api(wf, object_info)
    for node in prompt.values():
        if node["class_type"] in OUR_NODES and "steps" in node["inputs"]:
            node["inputs"]["steps"] = min(node["inputs"]["steps"], STEPS)
    trained = _adapt_training(prompt) if any(n["class_type"] == "TrainLoRA" for n in prompt.values()) else []
    if path.stem == "restore_paper_release":
        _adapt_release(prompt, server.models)
    entry = _run(server, prompt)
    status = entry["status"]
    assert status.get("status_str") == "success" and status.get("completed"), \
        f"{path.name} failed: {json.dumps(status.get('messages'))[:4000]}\n{server.log_tail()}"
    outputs = entry.get("outputs", {})
    image_nodes = [nid for nid, n in prompt.items() if n["class_type"] in ("SaveImage", "PreviewImage")]
    assert image_nodes
    for nid in image_nodes:
        images = outputs.get(nid, {}).get("images", [])
        assert images, f"{path.name}: node {nid} ({prompt[nid]['_meta']['title']}) produced no image"
        for im in images:
            folder = {"output": "output", "temp": "temp"}[im["type"]]
            f = server.base / folder / im.get("subfolder", "") / im["filename"]
            assert f.is_file() and f.stat().st_size > 0, f
    for nid, n in prompt.items():
        if n["class_type"] in VIDEO_SAVERS:
            saved = outputs.get(nid, {}).get("images", [])
            assert saved, f"{path.name}: node {nid} ({n['class_type']}) saved no video"
            for v in saved:
                f = server.base / "output" / v.get("subfolder", "") / v["filename"]
                assert f.is_file() and f.stat().st_size > 0, f
        if n["class_type"] == "PreviewAny":
            text = outputs.get(nid, {}).get("text", [])
            assert text and text[0] and text[0] != "None", f"{path.name}: node {nid} shows no text"
    for name in trained:
        lora = server.base / "models" / "loras" / "vbridge" / f"{name}.safetensors"
        assert lora.is_file() and lora.stat().st_size > 0, f"{path.name}: no LoRA at {lora}\n{server.log_tail()}"
        texts = [t for nid, n in prompt.items() if n["class_type"] == "PreviewAny"
                 for t in outputs.get(nid, {}).get("text", [])]
        assert any(str(lora) in t for t in texts), texts
        from vbridge_core.training.checkpoint import checkpoint_dir

        assert not list(checkpoint_dir(lora).glob("state-step*.safetensors")), "finished runs keep no state"
        listed = server.get("/object_info/LoadVBridge")["LoadVBridge"]["input"]["required"]["restoration_lora"][0]
        assert f"vbridge/{name}.safetensors" in listed, "LoadVBridge must list the new LoRA after a refresh"
        core = server.get("/object_info/LoraLoader")["LoraLoader"]["input"]["required"]["lora_name"][0]
        assert f"vbridge/{name}.safetensors" in core, "ComfyUI's LoraLoader must list the new LoRA"
        for lst in (listed, core):  # intermediate checkpoint LoRAs are not offered as LoRAs
            assert not [n for n in lst if ".checkpoints/" in n], lst
