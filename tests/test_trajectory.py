import math

import pytest
import torch

from vbridge_core.errors import InputError
from vbridge_core.trajectory import alpha_schedule, blend_pairs, check_frames, latent_frames, parse_schedule


@pytest.mark.parametrize("f", [5, 9, 13, 17, 81])
def test_valid_frames(f):
    assert check_frames(f) == f
    assert latent_frames(f) == (f - 1) // 4 + 1


@pytest.mark.parametrize("f", [0, 1, 3, 4, 6, 8, 10, 5.0, "5", True])
def test_invalid_frames_have_clear_message(f):
    with pytest.raises(InputError, match="4k\\+1"):
        check_frames(f)


def test_invalid_frames_suggests_neighbours():
    with pytest.raises(InputError, match="5 and 9"):
        check_frames(7)


def test_schedules():
    assert alpha_schedule("linear", 5) == [0, 0.25, 0.5, 0.75, 1.0]
    cos = alpha_schedule("cosine", 9)
    assert cos[0] == 0 and math.isclose(cos[-1], 1.0) and math.isclose(cos[4], 0.5)
    assert all(b >= a for a, b in zip(cos, cos[1:]))
    assert cos[1] < 1 / 8  # slow start
    assert alpha_schedule([0, 0.1, 0.2, 0.6, 1], 5) == [0, 0.1, 0.2, 0.6, 1]
    assert parse_schedule("0, 0.1,0.2,0.6,1") == [0, 0.1, 0.2, 0.6, 1]
    assert parse_schedule(" cosine ") == "cosine"


@pytest.mark.parametrize("bad,match", [([0, 0.5, 1], "one value per frame"), ([0.1, 0.2, 0.3, 0.4, 1], "start at 0"),
                                       ([0, 0.6, 0.5, 0.7, 1], "non-decreasing"), ("sigmoid", "unknown")])
def test_bad_schedules(bad, match):
    with pytest.raises(InputError, match=match):
        alpha_schedule(bad, 5)


def test_blend_pairs():
    lq = torch.rand(2, 3, 8, 8)
    hq = torch.rand(2, 3, 8, 8)
    v = blend_pairs(lq, hq, alpha_schedule("linear", 5))
    assert v.shape == (2, 3, 5, 8, 8)
    torch.testing.assert_close(v[:, :, 0], lq)
    torch.testing.assert_close(v[:, :, -1], hq)
    torch.testing.assert_close(v[:, :, 2], 0.5 * lq + 0.5 * hq)
    with pytest.raises(InputError, match="same shape"):
        blend_pairs(lq, hq[:, :, :4], [0, 0.25, 0.5, 0.75, 1])
