"""Blend: mixup-style blending with an earlier image of the stream, label kept."""

import pytest
import torch
from torchvision import tv_tensors

from podium.common.augment import build_augmentations
from podium.common.blend import Blend


def test_first_image_passes_and_later_ones_are_blended_with_the_given_weight():
    blend = Blend(p=1.0, alpha=(0.25, 0.25))
    zeros = torch.zeros(3, 8, 8, dtype=torch.uint8)
    assert torch.equal(blend(zeros), zeros)  # nothing to blend with yet
    out = blend(torch.full((3, 8, 8), 200, dtype=torch.uint8))
    assert out.dtype == torch.uint8
    assert torch.all(out == 150)  # 0.75 * 200 + 0.25 * 0


def test_tv_image_type_and_float_dtype_are_kept():
    blend = Blend(p=1.0, alpha=0.2)
    blend(tv_tensors.Image(torch.ones(1, 5, 7)))
    out = blend(tv_tensors.Image(torch.zeros(1, 5, 7)))
    assert isinstance(out, tv_tensors.Image) and out.dtype == torch.float32
    assert torch.allclose(out, torch.full((1, 5, 7), 0.2))


def test_a_second_image_of_another_size_or_channel_count_is_fitted_to_the_first():
    blend = Blend(p=1.0, alpha=0.3)
    blend(torch.ones(3, 16, 16))
    out = blend(torch.zeros(1, 8, 8))
    assert out.shape == (1, 8, 8)
    assert torch.allclose(out, torch.full((1, 8, 8), 0.3))


def test_p_zero_never_blends_and_the_draws_follow_the_seeded_global_rng():
    never = Blend(p=0.0)
    never(torch.zeros(1, 4, 4))
    assert torch.equal(never(torch.ones(1, 4, 4)), torch.ones(1, 4, 4))

    def stream(seed):
        torch.manual_seed(seed)
        t = Blend(p=0.7, alpha=(0.1, 0.4), pool_size=4)
        return [t(torch.full((1, 4, 4), float(i) / 10)) for i in range(10)]

    assert all(torch.equal(a, b) for a, b in zip(stream(3), stream(3)))
    assert not all(torch.equal(a, b) for a, b in zip(stream(3), stream(4)))


def test_reservoir_stays_bounded():
    t = Blend(p=0.5, pool_size=3)
    for i in range(50):
        t(torch.full((1, 2, 2), float(i)))
    assert len(t._pool) == 3


@pytest.mark.parametrize("kwargs", [{"alpha": [0.2, 0.6]}, {"alpha": [0.3, 0.1]}, {"p": 1.5}, {"pool_size": 0}])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        Blend(**kwargs)


def test_a_mask_is_refused_because_blending_would_need_two():
    t = Blend(p=1.0)
    with pytest.raises(TypeError, match="Mask"):
        t(torch.zeros(1, 4, 4), tv_tensors.Mask(torch.zeros(4, 4, dtype=torch.uint8)))


def test_blend_is_available_in_data_augment():
    steps = build_augmentations([{"name": "Blend", "p": 0.4, "alpha": [0.1, 0.3]}], 3, 32)
    assert any(isinstance(s, Blend) for s in steps)
