"""Training building blocks without a model: curriculum parsing, validation split, crops, LR schedule, plots."""
from __future__ import annotations

import math

import pytest
import torch

from vbridge_core.errors import InputError
from vbridge_core.training.config import TrainConfig
from vbridge_core.training.curriculum import Stage, parse_stages, stage_at, total_steps
from vbridge_core.training.dataset import TrainingPairs, random_view, split_validation
from vbridge_core.training.loop import lr_factor
from vbridge_core.training.plots import loss_curve_image, validation_grid


def test_parse_stages():
    st = parse_stages("512:400, 720:300,960:300")
    assert st == [Stage(512, 400), Stage(704, 300), Stage(960, 300)]
    assert total_steps(st) == 1000
    assert stage_at(st, 0) == (0, st[0]) and stage_at(st, 400) == (1, st[1]) and stage_at(st, 999) == (2, st[2])
    assert parse_stages([(64, 3), "32:2"]) == [Stage(64, 3), Stage(32, 2)]
    for bad, needle in [("16:3", ">= 32"), ("512", "resolution:steps"), ("512:0", "positive"), ("", "no curriculum")]:
        with pytest.raises(InputError, match=needle):
            parse_stages(bad)


def test_config_validation():
    assert TrainConfig(stages="64:2").validate().curriculum() == [Stage(64, 2)]
    assert TrainConfig(resolution=96, steps=7).curriculum() == [Stage(96, 7)]
    for kw, needle in [(dict(frames=6), "4k\\+1"), (dict(optimizer="sgd"), "optimizer"), (dict(grad_accum=0), "grad_accum"),
                       (dict(role="x"), "role"), (dict(validation_fraction=1.0), "validation_fraction")]:
        with pytest.raises(InputError, match=needle):
            TrainConfig(**kw).validate()


def _set(tasks: dict[str, int]) -> TrainingPairs:
    from vbridge_core.training.dataset import _Entry

    z = torch.zeros(3, 8, 8)
    return TrainingPairs([_Entry(f"{t}/{i}", t, z, z) for t, n in tasks.items() for i in range(n)])


def test_split_validation_is_stratified_and_seeded():
    pairs = _set({"noise": 50, "blur": 20, "rare": 3, "pair": 2})
    train, val = split_validation(pairs, 0.1, seed=1)
    # 10% rounded down, but at least one of a task of >= 3 pairs (the 3 shipped samples get a validation pair)
    assert len(val) == 5 + 2 + 1 and len(train) == 75 - 8
    assert {e.task for e in val.entries} == {"noise", "blur", "rare"}
    assert not set(train.names) & set(val.names)
    assert split_validation(pairs, 0.1, seed=1)[1].names == val.names
    assert split_validation(pairs, 0.1, seed=2)[1].names != val.names
    assert len(split_validation(pairs, 0.0, 0)[1]) == 0


def test_random_view_same_crop_and_flip_for_both():
    g = torch.Generator().manual_seed(0)
    hq = 0.25 + 0.5 * torch.rand(3, 80, 120, generator=g)  # no bicubic overshoot clamping
    lq = hq * 0.5
    for mode in ("resize", "crop"):
        a, b = random_view(lq, hq, 64, mode, True, torch.Generator().manual_seed(3))
        assert a.shape == b.shape == (3, 64, 64)
        torch.testing.assert_close(a, b * 0.5, atol=2e-6, rtol=0)
    # a small image is upscaled to fit the crop
    a, _ = random_view(lq[:, :40, :40], hq[:, :40, :40], 64, "crop", False, torch.Generator())
    assert a.shape == (3, 64, 64)


def test_tensor_pairs_errors():
    with pytest.raises(InputError, match="no training pairs"):
        TrainingPairs.from_any([])
    with pytest.raises(InputError, match="same size"):
        TrainingPairs.from_any([(torch.zeros(3, 8, 8), torch.zeros(3, 8, 9))]).check()
    with pytest.raises(InputError, match=r"\[3, H, W\]"):
        TrainingPairs.from_any([(torch.zeros(8, 8), torch.zeros(8, 8))])


def test_lr_schedule():
    assert [lr_factor(s, 10, 2, "constant") for s in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]
    assert lr_factor(2, 10, 2, "cosine") == pytest.approx(1.0) and lr_factor(10, 10, 2, "cosine") == pytest.approx(0.0)
    assert lr_factor(6, 10, 2, "linear") == pytest.approx(0.5)


def test_plots():
    img = loss_curve_image([1.0, 0.8, float("nan"), 0.5] * 10, stage_starts=[20])
    assert img.shape == (3, 320, 640) and 0 <= img.min() and img.max() <= 1 and img.min() < 0.5
    assert loss_curve_image([]).shape == (3, 320, 640)
    grid = validation_grid([[torch.zeros(3, 16, 16)] * 4, [torch.ones(3, 16, 16)] * 4])
    assert grid.shape == (3, 16 * 2 + 4, 16 * 4 + 12)
    assert math.isclose(float(grid[:, 0, 0].mean()), 0.0)
