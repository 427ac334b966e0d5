"""The example workflows (workflows/*.json) against the node definitions.

Every graph must load in ComfyUI as shipped: node types are ComfyUI core nodes or ours, each
node's ``widgets_values`` has the count, order and kinds of values its inputs define (including
the UI-only extras: ``control_after_generate`` after a seed, LoadImage's upload button), combo
values are allowed ones (file-name combos excepted: the files are the user's), links agree with
the output and input types on both ends, required inputs are connected, and every workflow has its
thumbnail. Our node definitions come from ``nodes.NODE_CLASS_MAPPINGS``; the core ones are
restated below from ComfyUI's source (``nodes.py``, ``comfy_extras/nodes_preview_any.py``,
``comfy_extras/nodes_video.py``, ``comfy_extras/nodes_images.py`` and the frontend's virtual note nodes,
ComfyUI v0.3.64). Every graph also fits a 1600x1000 canvas at its saved zoom (``extra.ds``).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW_DIR = ROOT / "workflows"
WORKFLOWS = sorted(WORKFLOW_DIR.glob("*.json"))

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
#: Combo values that name the user's own files need not be in the (install-dependent) list.
FILE_VALUE = re.compile(r"\.(safetensors|sft|ckpt|pt|pth|bin|gguf|png|jpe?g|webp|bmp|tiff?|mp4|webm|mov|mkv|gif)$",
                        re.IGNORECASE)
ANY = "*"

#: ComfyUI core nodes the workflows may use: (socket inputs, widget inputs, outputs), as in
#: INPUT_TYPES/RETURN_TYPES. Socket inputs: (name, type, required). Widget inputs: (name, spec)
#: with spec as in INPUT_TYPES ("STRING", [choices] or None for a file-name combo). UI-only widget
#: values (LoadImage's "upload") are listed with the kind "UI".
CORE_NODES: dict[str, dict[str, Any]] = {
    # nodes.py LoadImage: {"image": (sorted(files), {"image_upload": True})} -> IMAGE, MASK
    "LoadImage": {"sockets": [], "widgets": [("image", None), ("upload", "UI")],
                  "outputs": [("IMAGE", "IMAGE"), ("MASK", "MASK")]},
    # nodes.py SaveImage: images IMAGE, filename_prefix STRING (default "ComfyUI"); output node
    "SaveImage": {"sockets": [("images", "IMAGE", True)], "widgets": [("filename_prefix", "STRING")], "outputs": []},
    # nodes.py PreviewImage(SaveImage): images IMAGE only
    "PreviewImage": {"sockets": [("images", "IMAGE", True)], "widgets": [], "outputs": []},
    # comfy_extras/nodes_preview_any.py: source (IO.ANY); the frontend adds display-only widgets
    "PreviewAny": {"sockets": [("source", ANY, True)], "widgets": None, "outputs": []},
    # nodes.py CLIPLoader: clip_name (text_encoders files), type (combo), optional device (combo) -> CLIP
    "CLIPLoader": {"sockets": [], "widgets": [
        ("clip_name", None),
        ("type", (["stable_diffusion", "stable_cascade", "sd3", "stable_audio", "mochi", "ltxv", "pixart", "cosmos",
                   "lumina2", "wan", "hidream", "chroma", "ace", "omnigen2", "qwen_image", "hunyuan_image"],)),
        ("device", (["default", "cpu"],))], "outputs": [("CLIP", "CLIP")]},
    # nodes.py CLIPTextEncode: text STRING (multiline), clip CLIP -> CONDITIONING
    "CLIPTextEncode": {"sockets": [("clip", "CLIP", True)], "widgets": [("text", "STRING")],
                       "outputs": [("CONDITIONING", "CONDITIONING")]},
    # comfy_extras/nodes_video.py LoadVideo: file (combo of input videos, upload=video) -> VIDEO
    "LoadVideo": {"sockets": [], "widgets": [("file", None), ("upload", "UI")], "outputs": [("VIDEO", "VIDEO")]},
    # comfy_extras/nodes_video.py GetVideoComponents: video VIDEO -> images IMAGE, audio AUDIO, fps FLOAT
    "GetVideoComponents": {"sockets": [("video", "VIDEO", True)], "widgets": [],
                           "outputs": [("images", "IMAGE"), ("audio", "AUDIO"), ("fps", "FLOAT")]},
    # comfy_extras/nodes_video.py CreateVideo: images IMAGE, fps FLOAT (30, 1..120), optional audio AUDIO -> VIDEO
    "CreateVideo": {"sockets": [("images", "IMAGE", True), ("audio", "AUDIO", False)],
                    "widgets": [("fps", ("FLOAT", {"default": 30.0, "min": 1.0, "max": 120.0}))],
                    "outputs": [("VIDEO", "VIDEO")]},
    # comfy_extras/nodes_video.py SaveVideo: video VIDEO, filename_prefix STRING, format/codec combos; output node
    "SaveVideo": {"sockets": [("video", "VIDEO", True)], "widgets": [
        ("filename_prefix", "STRING"), ("format", (["auto", "mp4"],)), ("codec", (["auto", "h264"],))], "outputs": []},
    # comfy_extras/nodes_images.py ImageStitch: image1 IMAGE, direction, match_image_size, spacing_width,
    # spacing_color, optional image2 IMAGE -> IMAGE
    "ImageStitch": {"sockets": [("image1", "IMAGE", True), ("image2", "IMAGE", False)], "widgets": [
        ("direction", (["right", "down", "left", "up"],)), ("match_image_size", ("BOOLEAN",)),
        ("spacing_width", ("INT", {"default": 0, "min": 0, "max": 1024, "step": 2})),
        ("spacing_color", (["white", "black", "red", "green", "blue"],))], "outputs": [("IMAGE", "IMAGE")]},
    # frontend virtual nodes (never sent to the server): one text widget
    "Note": {"sockets": [], "widgets": [("text", "STRING")], "outputs": [], "virtual": True},
    "MarkdownNote": {"sockets": [], "widgets": [("text", "STRING")], "outputs": [], "virtual": True},
}


# --------------------------------------------------------------------------------------------
# Node definitions
# --------------------------------------------------------------------------------------------


def _our_mappings() -> dict[str, type]:
    from nodes import NODE_CLASS_MAPPINGS

    return dict(NODE_CLASS_MAPPINGS)


def _is_widget(spec: tuple) -> bool:
    kind = spec[0]
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if opts.get("forceInput"):
        return False
    return isinstance(kind, (list, tuple)) or kind in WIDGET_TYPES


def _our_definition(cls: type) -> dict[str, Any]:
    """Sockets, widgets (with the UI extras the frontend stores) and outputs of one of our nodes."""
    types = cls.INPUT_TYPES()
    sockets, widgets = [], []
    for section in ("required", "optional"):
        for name, spec in (types.get(section) or {}).items():
            spec = tuple(spec) if isinstance(spec, (list, tuple)) else (spec,)
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if _is_widget(spec):
                widgets.append((name, spec))
                if opts.get("control_after_generate") or (spec[0] == "INT" and name in ("seed", "noise_seed")):
                    widgets.append((f"{name}:control_after_generate", "CONTROL"))
                if opts.get("image_upload"):
                    widgets.append((f"{name}:upload", "UI"))
            else:
                sockets.append((name, spec[0], section == "required"))
    names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
    outputs = list(zip(names, cls.RETURN_TYPES))
    return {"sockets": sockets, "widgets": widgets, "outputs": outputs}


def definition(node_type: str) -> dict[str, Any]:
    if node_type in CORE_NODES:
        return CORE_NODES[node_type]
    ours = _our_mappings()
    assert node_type in ours, f"{node_type} is neither a ComfyUI core node used here nor one of ours ({sorted(ours)})"
    return _our_definition(ours[node_type])


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _check_widget_value(where: str, name: str, spec: Any, value: Any) -> None:
    if spec == "UI":
        return
    if spec == "CONTROL":
        assert value in CONTROL_VALUES, f"{where}: {name} must be one of {sorted(CONTROL_VALUES)}, got {value!r}"
        return
    if spec is None:  # a core file-name combo
        assert isinstance(value, str) and value, f"{where}: {name} must be a file name, got {value!r}"
        return
    if spec == "STRING":
        assert isinstance(value, str), f"{where}: {name} must be a string, got {value!r}"
        return
    kind = spec[0]
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if kind == "COMBO":
        kind = opts.get("options", [])
    if isinstance(kind, (list, tuple)):
        assert isinstance(value, str), f"{where}: {name} must be a combo string, got {value!r}"
        if not FILE_VALUE.search(value):
            assert value in kind, f"{where}: {name}={value!r} is not one of {list(kind)}"
        return
    if kind == "INT":
        assert isinstance(value, int) and not isinstance(value, bool), f"{where}: {name} must be an int, got {value!r}"
    elif kind == "FLOAT":
        assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{where}: {name} must be a number, got {value!r}"
    elif kind == "STRING":
        assert isinstance(value, str), f"{where}: {name} must be a string, got {value!r}"
    elif kind == "BOOLEAN":
        assert isinstance(value, bool), f"{where}: {name} must be a boolean, got {value!r}"
    if kind in ("INT", "FLOAT"):
        if "min" in opts:
            assert value >= opts["min"], f"{where}: {name}={value} below min {opts['min']}"
        if "max" in opts:
            assert value <= opts["max"], f"{where}: {name}={value} above max {opts['max']}"


def _types_compatible(output_type: str, input_type: str) -> bool:
    if ANY in (output_type, input_type):
        return True
    return set(output_type.split(",")) & set(input_type.split(",")) != set()


@pytest.fixture(params=WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def workflow(request) -> tuple[str, dict[str, Any]]:
    return request.param.stem, _load(request.param)


def test_there_are_example_workflows():
    assert {p.stem for p in WORKFLOWS} >= {"restore_image", "restore_drift_correct", "restore_and_compare",
                                           "train_restoration_lora", "train_drift_correction_lora",
                                           "restore_video_stabilized", "restore_paper_release", "restore_turbo"}


#: The canvas every workflow must fit at its saved zoom (a laptop-sized ComfyUI window), and the
#: height of a node's title bar, drawn above ``pos``.
CANVAS = (1600, 1000)
TITLE_H = 30


def test_fits_the_canvas_at_its_saved_zoom(workflow):
    """screen = (pos + offset) * scale (LiteGraph's DragAndScale): every node, title bar included, lies
    inside a 1600x1000 canvas, so no output (or its preview) is cut off when the workflow opens."""
    name, wf = workflow
    ds = wf["extra"]["ds"]
    s, (ox, oy) = ds["scale"], ds["offset"]
    assert 0.5 <= s <= 1.0, f"{name}: zoom {s} (keep text readable)"
    for n in wf["nodes"]:
        x0, y0 = (n["pos"][0] + ox) * s, (n["pos"][1] - TITLE_H + oy) * s
        x1, y1 = (n["pos"][0] + n["size"][0] + ox) * s, (n["pos"][1] + n["size"][1] + oy) * s
        assert x0 >= 0 and y0 >= 0 and x1 <= CANVAS[0] and y1 <= CANVAS[1], \
            f"{name}: node {n['id']} ({n['type']}) spans x {x0:.0f}..{x1:.0f}, y {y0:.0f}..{y1:.0f} on a {CANVAS} canvas"


def test_no_node_overlaps_another(workflow):
    """Boxes (title bar included) do not overlap, so a node that grows (a loaded video) has room below it."""
    name, wf = workflow
    boxes = [(n["id"], n["pos"][0], n["pos"][1] - TITLE_H, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
             for n in wf["nodes"]]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert a[3] <= b[1] or b[3] <= a[1] or a[4] <= b[2] or b[4] <= a[2], f"{name}: nodes {a[0]} and {b[0]} overlap"


def test_top_level_structure(workflow):
    name, wf = workflow
    for key in ("last_node_id", "last_link_id", "nodes", "links", "groups", "config", "extra", "version"):
        assert key in wf, f"{name}: missing top-level {key!r}"
    assert wf["version"] == 0.4
    assert "ds" in wf["extra"] and {"scale", "offset"} <= set(wf["extra"]["ds"])
    ids = [n["id"] for n in wf["nodes"]]
    assert len(ids) == len(set(ids)), f"{name}: duplicate node ids"
    link_ids = [l[0] for l in wf["links"]]
    assert len(link_ids) == len(set(link_ids)), f"{name}: duplicate link ids"
    assert wf["last_node_id"] >= max(ids)
    assert wf["last_link_id"] >= max(link_ids, default=0)
    orders = sorted(n["order"] for n in wf["nodes"])
    assert orders == list(range(len(ids))), f"{name}: node orders must be 0..N-1"
    for n in wf["nodes"]:
        for key in ("id", "type", "pos", "size", "flags", "order", "mode", "properties", "widgets_values"):
            assert key in n, f"{name}: node {n.get('id')} lacks {key!r}"
        assert len(n["pos"]) == 2 and len(n["size"]) == 2
        if n["mode"] == 4 and n["type"] in ("CLIPLoader", "CLIPTextEncode"):
            # an optional prompt source shipped bypassed; the note must say how to turn it on
            notes = " ".join(m["widgets_values"][0] for m in wf["nodes"] if m["type"] in ("MarkdownNote", "Note"))
            assert "Ctrl+B" in notes, f"{name}: bypassed node {n['id']} without a note on enabling it"
            continue
        assert n["mode"] == 0, f"{name}: node {n['id']} ({n['type']}) is muted or bypassed"


def test_node_types_and_properties(workflow):
    name, wf = workflow
    for n in wf["nodes"]:
        d = definition(n["type"])
        if not d.get("virtual"):
            assert n["properties"].get("Node name for S&R") == n["type"], f"{name}: node {n['id']}"


def test_widgets_values_match_inputs(workflow):
    name, wf = workflow
    for n in wf["nodes"]:
        d = definition(n["type"])
        where = f"{name}: node {n['id']} ({n['type']})"
        if d["widgets"] is None:  # display-only widgets
            continue
        values = n["widgets_values"]
        assert isinstance(values, list), f"{where}: widgets_values must be a list"
        expected = [w for w, _ in d["widgets"]]
        assert len(values) == len(expected), f"{where}: {len(values)} widgets_values for widgets {expected}"
        for (wname, spec), value in zip(d["widgets"], values):
            _check_widget_value(where, wname, spec, value)


def test_sockets_and_outputs_match_definitions(workflow):
    name, wf = workflow
    for n in wf["nodes"]:
        d = definition(n["type"])
        where = f"{name}: node {n['id']} ({n['type']})"
        sockets = {s[0]: s for s in d["sockets"]}
        widget_names = {w for w, _ in d["widgets"] or []}
        seen = set()
        for inp in n.get("inputs") or []:
            if "widget" in inp:  # a widget turned into a socket
                assert inp["widget"]["name"] in widget_names, f"{where}: unknown widget input {inp['name']}"
                continue
            assert inp["name"] in sockets, f"{where}: unknown input {inp['name']!r} (has {sorted(sockets)})"
            assert _types_compatible(sockets[inp["name"]][1], inp["type"]) or inp["type"] == sockets[inp["name"]][1], \
                f"{where}: input {inp['name']} is {inp['type']}, defined as {sockets[inp['name']][1]}"
            seen.add(inp["name"])
        for sname, stype, required in d["sockets"]:
            if required:
                assert sname in seen, f"{where}: required input {sname} ({stype}) missing"
                slot = next(i for i in n["inputs"] if i.get("name") == sname and "widget" not in i)
                assert slot["link"] is not None, f"{where}: required input {sname} ({stype}) is not connected"
        outs = n.get("outputs") or []
        assert [(o["name"], o["type"]) for o in outs] == [tuple(o) for o in d["outputs"]], \
            f"{where}: outputs {[(o['name'], o['type']) for o in outs]} != definition {d['outputs']}"


def test_links_are_consistent(workflow):
    name, wf = workflow
    nodes = {n["id"]: n for n in wf["nodes"]}
    links = {l[0]: l for l in wf["links"]}
    for lid, src, src_slot, dst, dst_slot, ltype in (l[:6] for l in wf["links"]):
        where = f"{name}: link {lid}"
        assert src in nodes and dst in nodes, f"{where}: unknown node"
        s, t = nodes[src], nodes[dst]
        assert src_slot < len(s["outputs"]) and dst_slot < len(t["inputs"]), f"{where}: slot out of range"
        out, inp = s["outputs"][src_slot], t["inputs"][dst_slot]
        assert lid in (out.get("links") or []), f"{where}: not listed by node {src} output {out['name']}"
        assert inp.get("link") == lid, f"{where}: node {dst} input {inp['name']} has link {inp.get('link')}"
        assert out["type"] == ltype, f"{where}: type {ltype} but output {out['name']} is {out['type']}"
        # against the definitions, not only the JSON's own copies of the types
        sd, td = definition(s["type"]), definition(t["type"])
        assert sd["outputs"][src_slot][1] == ltype, f"{where}: {s['type']} output {src_slot} is {sd['outputs'][src_slot][1]}"
        in_type = next((x[1] for x in td["sockets"] if x[0] == inp["name"]), None)
        if "widget" in inp:
            in_type = inp["type"]
        assert in_type is not None and _types_compatible(ltype, in_type), \
            f"{where}: {ltype} into {t['type']}.{inp['name']} ({in_type})"
    referenced = set()
    for n in wf["nodes"]:
        for inp in n.get("inputs") or []:
            if inp.get("link") is not None:
                assert inp["link"] in links, f"{name}: node {n['id']} input {inp['name']} uses missing link {inp['link']}"
                referenced.add(inp["link"])
        for out in n.get("outputs") or []:
            for lid in out.get("links") or []:
                assert lid in links, f"{name}: node {n['id']} output {out['name']} lists missing link {lid}"
                referenced.add(lid)
    assert referenced == set(links), f"{name}: links not used by any node: {sorted(set(links) - referenced)}"


def test_graph_is_acyclic_and_order_follows_links(workflow):
    name, wf = workflow
    order = {n["id"]: n["order"] for n in wf["nodes"]}
    for l in wf["links"]:
        assert order[l[1]] < order[l[3]], f"{name}: link {l[0]} goes against the execution order (a cycle?)"


def test_every_workflow_saves_or_previews_something(workflow):
    name, wf = workflow
    types = {n["type"] for n in wf["nodes"]}
    assert types & {"SaveImage", "PreviewImage"}, f"{name}: no output node"


def test_model_loader_lists_its_files(workflow):
    name, wf = workflow
    loaders = [n for n in wf["nodes"] if n["type"] == "LoadVBridge"]
    assert loaders, f"{name}: no LoadVBridge"
    for n in loaders:
        models = {m["name"]: m for m in n["properties"].get("models", [])}
        dit, vae = n["widgets_values"][0], n["widgets_values"][1]
        if "/" in dit:
            # a released full fine-tune: a folder of shards from a hub repo (any one file loads the folder),
            # whose file names are the repo's; the workflow's note must say where to get the folder
            notes = " ".join(m["widgets_values"][0] for m in wf["nodes"] if m["type"] in ("MarkdownNote", "Note"))
            assert f"models/diffusion_models/{dit.split('/')[0]}/" in notes and "huggingface.co/" in notes, \
                f"{name}: the note must say where {dit.split('/')[0]}/ comes from"
        else:
            assert dit in models and models[dit]["directory"] == "diffusion_models", \
                f"{name}: properties.models must list {dit}"
        assert vae in models and models[vae]["directory"] == "vae", f"{name}: properties.models must list {vae}"
        for m in models.values():
            assert m["url"].startswith("https://huggingface.co/") and m["url"].endswith("/" + m["name"]), m


def test_text_encoder_loader_lists_its_file(workflow):
    name, wf = workflow
    for n in wf["nodes"]:
        if n["type"] != "CLIPLoader":
            continue
        models = {m["name"]: m for m in n["properties"].get("models", [])}
        clip, kind = n["widgets_values"][0], n["widgets_values"][1]
        assert kind == "wan", f"{name}: Wan2.2 needs CLIPLoader type 'wan' (umt5-xxl), got {kind!r}"
        assert clip in models and models[clip]["directory"] == "text_encoders", \
            f"{name}: properties.models must list {clip} (directory text_encoders)"
        assert models[clip]["url"].startswith("https://huggingface.co/") and models[clip]["url"].endswith("/" + clip)


def test_training_workflows_use_the_release_prompt_and_sane_settings(workflow):
    name, wf = workflow
    trainers = [n for n in wf["nodes"] if n["type"] == "TrainLoRA"]
    if not trainers:
        return
    from vbridge_core.presets import PAPER_PROMPT
    from vbridge_core.train_runtime import DEFAULT_SETTINGS

    for n in trainers:
        mode, output_name, stages, seed, control, resume = n["widgets_values"]
        assert control == "fixed", f"{name}: a training seed must stay fixed (resume needs the same settings)"
        assert resume is True and output_name and "/" not in output_name
        from vbridge_core.training.curriculum import parse_stages

        assert parse_stages(stages)
    for n in wf["nodes"]:
        if n["type"] == "CLIPTextEncode":
            assert n["widgets_values"][0] == PAPER_PROMPT, f"{name}: train with the V-Bridge release prompt"
        if n["type"] == "TrainLoRASettings":
            assert n["widgets_values"] == list(DEFAULT_SETTINGS.values()), f"{name}: settings node not at defaults"


def test_only_core_and_our_nodes(workflow):
    name, wf = workflow
    ours = set(_our_mappings())
    for n in wf["nodes"]:
        assert n["type"] in CORE_NODES or n["type"] in ours, f"{name}: node type {n['type']}"


# --------------------------------------------------------------------------------------------
# Thumbnails
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_thumbnail_exists(path):
    from PIL import Image

    jpg = path.with_suffix(".jpg")
    assert jpg.is_file(), f"missing thumbnail {jpg.name} (run python workflows/make_thumbnails.py)"
    assert jpg.stat().st_size < 60_000
    with Image.open(jpg) as im:
        assert im.format == "JPEG" and im.size == (512, 288)


def test_thumbnail_script_is_deterministic(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_thumbnails", WORKFLOW_DIR / "make_thumbnails.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    src = tmp_path / "w.json"
    src.write_text(WORKFLOWS[0].read_text(encoding="utf-8"), encoding="utf-8")
    first = mod.make_thumbnail(src).read_bytes()
    second = mod.make_thumbnail(src).read_bytes()
    assert first == second and len(first) < 60_000
