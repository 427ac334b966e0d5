"""bench/train_builtin_perceiver.py: the shipped perceiver's recipe as one command (two train-perceiver runs side by
side, merged), run here on small photo folders with a small budget through the same subprocesses users run, and
the shipped file's metadata checked against the recipe."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from vbridge_core.images import save_png  # noqa: E402
from vbridge_core.perceive.features import FEATURE_NAMES  # noqa: E402
from vbridge_core.perceive.model import Perceiver  # noqa: E402

QUICK = ["--samples", "200", "--epochs", "1", "--probe-epochs", "1", "--sky-share", "0.05"]


@pytest.fixture(scope="module")
def recipe_photos(tmp_path_factory) -> Path:
    """The folder layout perceiver_photos.py --train-groups writes, one 136 x 160 crop of a bundled photo each."""
    from vbridge_core.perceive.synth import clean_photos

    src = [x for _, x in clean_photos("held_out")]
    root = tmp_path_factory.mktemp("recipe-photos")
    for k, sub in enumerate(("tid2013", "debian", "train/lom-train", "train/ubu-train")):
        x = src[k % len(src)]
        save_png(x[:, :136, :160].contiguous(), root / sub / f"p{k}.png")
    return root


def test_recipe_trains_both_parts_side_by_side_and_merges_them(recipe_photos, tmp_path, caplog):
    """Part a is the plain recipe with the nine photos (its snow probe is the file's), part b adds the train groups
    with --haze-offset 3 and no probe; the merged file holds both ensembles and both parts' info. Part a, trained in
    a subprocess by the script, equals train_builtin run here with the same options: the recipe is the CLI's."""
    import train_builtin_perceiver as tbp
    from vbridge_core.perceive.train import MEMBERS, train_builtin

    out = tmp_path / "perceiver.safetensors"
    caplog.set_level("INFO")
    assert tbp.main(["--out", str(out), "--photos", str(recipe_photos), "--keep-parts", "--", *QUICK]) == 0
    assert "the two parts side by side" in caplog.text
    assert "differ from the shipped perceiver.safetensors" in caplog.text
    m = Perceiver.load(out)
    a, b = m.info["merged"]
    assert len(m.net.members) == 2 * MEMBERS and m.probe is not None
    assert a["extra_photos"] == ["p0.png", "p1.png"] and b["extra_photos"] == ["p0.png", "p1.png", "p2.png", "p3.png"]
    assert (a["snow_probe_epochs"], b["snow_probe_epochs"]) == (1, 0)
    assert (a["haze_logit_offset"], b["haze_logit_offset"]) == (0.0, 3.0) and b["snow_probe_sky_crops"] == 0
    part_a = Perceiver.load(tmp_path / "perceiver.part-a.safetensors")
    part_b = Perceiver.load(tmp_path / "perceiver.part-b.safetensors")
    assert (tmp_path / "perceiver.part-b.log").read_text().count("built-in perceiver") == 1
    f = torch.randn(5, len(FEATURE_NAMES)) * 2 + part_a.net.feat_mean
    with torch.no_grad():
        want = (part_a.net(f)[0] + part_b.net(f)[0]) / 2
        assert torch.allclose(m.net(f)[0], want, atol=1e-5)
        for x, y in zip(m.probe.state_dict().values(), part_a.probe.state_dict().values()):
            assert torch.equal(x, y)
    direct, _ = train_builtin(tmp_path / "direct.safetensors", count=200, epochs=1, probe_epochs=1, sky_share=0.05,
                              threads=1, extra=[recipe_photos / "tid2013", recipe_photos / "debian"])
    for x, y in zip(direct.net.state_dict().values(), part_a.net.state_dict().values()):
        assert torch.equal(x, y)


def test_a_failing_part_is_an_error_with_its_log_and_stops_the_other(recipe_photos, tmp_path, caplog):
    """Part b fails at once on a photo too small for a training crop; part a, still sampling, is stopped rather than
    left to finish half a recipe; no output is written."""
    import shutil

    import train_builtin_perceiver as tbp

    photos = tmp_path / "photos"
    shutil.copytree(recipe_photos, photos)
    save_png(torch.rand(3, 100, 100), photos / "train" / "ubu-train" / "small.png")
    out = tmp_path / "p.safetensors"
    assert tbp.main(["--out", str(out), "--photos", str(photos), "--", *QUICK]) == 2
    assert "train-perceiver failed for part b:" in caplog.text and "small.png is 100x100 px" in caplog.text
    assert "stopped part a" in caplog.text and not out.exists()
    assert tbp.main(["--out", str(out), "--photos", str(recipe_photos), "--", "--samples", "10"]) == 2
    assert "must be at least 200" in caplog.text and not out.exists()


def test_missing_photos_are_built_or_a_clear_error(tmp_path, caplog):
    """Without the recipe's photos the script builds them with perceiver_photos.py; a --debs folder lacking the
    packages stops it with perceiver_photos' message and what to pass instead, before any training."""
    import importlib.util

    if importlib.util.find_spec("pyiqa") is None:  # perceiver_photos copies pyiqa's TID2013 photos first
        pytest.skip("needs pyiqa's TID2013 photos (pip install --no-deps pyiqa==0.1.16, as .ci/run does)")
    import train_builtin_perceiver as tbp

    (tmp_path / "debs").mkdir()
    assert tbp.main(["--out", str(tmp_path / "p.safetensors"), "--photos", str(tmp_path / "photos"),
                     "--debs", str(tmp_path / "debs")]) == 2
    assert "no mate-backgrounds_*.deb" in caplog.text and "--photos DIR with a folder it wrote before" in caplog.text
    assert not (tmp_path / "p.safetensors").exists()


def test_part_commands_are_the_documented_recipe(tmp_path):
    import train_builtin_perceiver as tbp

    a = tbp.part_command("a", tmp_path, tmp_path / "a.safetensors")
    b = tbp.part_command("b", tmp_path, tmp_path / "b.safetensors", ["--samples", "400"])
    assert a[1:] == ["-m", "vbridge_core", "train-perceiver", "--threads", "1", "--extra-photos",
                     str(tmp_path / "tid2013"), str(tmp_path / "debian"), "--out", str(tmp_path / "a.safetensors")]
    assert b[b.index("--samples"):] == ["--samples", "400", "--extra-photos", str(tmp_path / "tid2013"),
                                        str(tmp_path / "debian"), str(tmp_path / "train/lom-train"),
                                        str(tmp_path / "train/ubu-train"), "--sky-share", "0", "--probe-epochs", "0",
                                        "--haze-offset", "3", "--out", str(tmp_path / "b.safetensors")]


def test_same_weights_compares_tensors_not_metadata(tmp_path):
    """The recipe's runs record their timings in the metadata, so a retrain is judged by its tensors."""
    from safetensors.torch import save_file

    import train_builtin_perceiver as tbp

    t = {"w": torch.arange(6.0).view(2, 3), "b": torch.zeros(3)}
    save_file(t, str(tmp_path / "a.safetensors"), metadata={"info": '{"seconds_fit": 1.0}'})
    save_file(t, str(tmp_path / "b.safetensors"), metadata={"info": '{"seconds_fit": 2.5}'})
    save_file(dict(t, b=torch.tensor([0.0, 0.0, 1e-7])), str(tmp_path / "c.safetensors"))
    save_file({"w": t["w"]}, str(tmp_path / "d.safetensors"))
    assert tbp.same_weights(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    assert not tbp.same_weights(tmp_path / "a.safetensors", tmp_path / "c.safetensors")
    assert not tbp.same_weights(tmp_path / "a.safetensors", tmp_path / "d.safetensors")
