"""The ComfyUI bridge falls back to plain behaviour outside ComfyUI; importing the pack is light."""
import subprocess
import sys
from pathlib import Path

from nodes import comfy_bridge

ROOT = Path(__file__).resolve().parents[1]


def test_fallbacks_outside_comfyui(tmp_path, monkeypatch):
    assert not comfy_bridge.in_comfyui()
    monkeypatch.setenv("VBRIDGE_MODELS_DIR", str(tmp_path))
    (tmp_path / "loras" / "vbridge").mkdir(parents=True)
    (tmp_path / "loras" / "vbridge" / "x.safetensors").write_bytes(b"")
    assert comfy_bridge.filename_list("loras") == ["vbridge/x.safetensors"]
    assert comfy_bridge.filename_list("vae") == []
    assert comfy_bridge.full_path("vae", "wan2.2_vae.safetensors") == tmp_path / "vae" / "wan2.2_vae.safetensors"
    comfy_bridge.throw_if_interrupted()  # no-op
    bar = comfy_bridge.ProgressBar(3)
    bar.update_absolute(2)
    bar.close()


def test_pack_import_is_light():
    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('vbridge_pack', "
            f"{str(ROOT / '__init__.py')!r}, submodule_search_locations=[{str(ROOT)!r}]); "
            "m = importlib.util.module_from_spec(spec); sys.modules['vbridge_pack'] = m; spec.loader.exec_module(m); "
            "assert isinstance(m.NODE_CLASS_MAPPINGS, dict); "
            "heavy = [k for k in ('torch', 'diffusers', 'transformers', 'peft') if k in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(ROOT.parent))
