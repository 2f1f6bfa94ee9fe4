"""DACS / MIC batch operations: ClassMix masks and mixing, pseudo-labels and their per-image
weight, mixed targets, strong colour augmentation, MIC block masks, colour transfer, EMA warm-up."""

import math

import pytest
import torch

from podium.tasks.segmentation.mixing import (
    blur_kernel,
    classmix_masks,
    colour_transfer,
    mic_mask,
    mix,
    mixed_targets,
    pseudo_labels,
    strong_colour,
)

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def normalise(x):
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def unit(x):
    return x * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)


# ---- ClassMix ------------------------------------------------------------------------------


def source_labels():
    lab = torch.zeros(3, 8, 8, dtype=torch.int64)
    lab[0, :, :2], lab[0, :, 2:4], lab[0, :, 4:6], lab[0, :, 6:] = 0, 1, 2, 255  # 3 classes + ignore
    lab[1] = torch.arange(8).repeat(8, 1) % 4  # 4 classes
    lab[2] = 255  # nothing labelled
    lab[2, 0, 0] = 5  # one class
    return lab


def test_classmix_picks_half_of_the_present_classes_rounded_up():
    lab = source_labels()
    for seed in range(20):
        m = classmix_masks(lab, gen(seed))
        assert m.dtype == torch.bool and m.shape == lab.shape
        for i, expected in enumerate((2, 2, 1)):  # (3+1)//2, 4//2, (1+1)//2
            chosen = lab[i][m[i]].unique()
            assert chosen.numel() == expected and 255 not in chosen.tolist()
            # the mask holds every pixel of a chosen class, none of the others
            assert torch.equal(m[i], torch.isin(lab[i], chosen))
    empty = torch.full((1, 4, 4), 255)
    assert not classmix_masks(empty, gen()).any()


def test_classmix_is_reproducible_and_varies_with_the_seed():
    lab = source_labels()
    assert torch.equal(classmix_masks(lab, gen(3)), classmix_masks(lab, gen(3)))
    assert any(not torch.equal(classmix_masks(lab, gen(0)), classmix_masks(lab, gen(s))) for s in range(1, 10))


def test_mixed_images_and_labels_follow_the_same_pixels():
    lab = source_labels()
    m = classmix_masks(lab, gen(1))
    src, tgt = torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8)
    pseudo = torch.randint(0, 4, (3, 8, 8))
    img = mix(m, src, tgt)
    labels, _ = mixed_targets(m, lab, pseudo, torch.ones(3), None)
    m4 = m.unsqueeze(1).expand_as(src)
    assert torch.equal(img[m4], src[m4]) and torch.equal(img[~m4], tgt[~m4])
    assert torch.equal(labels[m], lab[m]) and torch.equal(labels[~m], pseudo[~m])


# ---- pseudo-labels -------------------------------------------------------------------------


def logits_with_confidence(conf):
    """(1, 2, H, W) logits whose softmax max is `conf` (class 0) at each pixel."""
    conf = torch.as_tensor(conf, dtype=torch.float64)
    return torch.stack([torch.log(conf), torch.log1p(-conf)])[None].float()


def test_pseudo_label_weight_is_the_share_of_confident_valid_pixels():
    conf = torch.tensor([[0.99, 0.99, 0.55, 0.99], [0.6, 0.99, 0.99, 0.7]])
    valid = torch.tensor([[True, True, True, False], [True, True, False, False]])
    logits = torch.cat([logits_with_confidence(conf), logits_with_confidence(conf.flip(0))])
    labels, confidence, weight = pseudo_labels(logits, torch.stack([valid, valid]), threshold=0.968)
    # image 0: valid confidences 0.99, 0.99, 0.55, 0.6, 0.99 -> 3 / 5 (the invalid 0.99 does not count)
    # image 1 (rows swapped): valid 0.6, 0.99, 0.99, 0.99, 0.99 -> 4 / 5 (0.7 and 0.55 are invalid)
    assert weight.tolist() == pytest.approx([3 / 5, 4 / 5])
    assert torch.allclose(confidence[0], conf, atol=1e-5)
    assert (labels[:, ~valid] == 255).all() and (labels[:, valid] == 0).all()
    none_valid = pseudo_labels(logits, torch.zeros(2, 2, 4, dtype=torch.bool))[2]
    assert none_valid.tolist() == [0.0, 0.0]
    assert pseudo_labels(logits, None)[2].tolist() == pytest.approx([5 / 8, 5 / 8])


def test_pseudo_label_threshold_is_strict():
    logits = torch.zeros(1, 4, 2, 2)  # uniform softmax: confidence exactly 0.25
    _, confidence, weight = pseudo_labels(logits, None, threshold=0.25)
    assert torch.all(confidence == 0.25) and weight.item() == 0.0
    assert pseudo_labels(logits, None, threshold=0.2499)[2].item() == 1.0


def test_mixed_target_weights():
    mask = torch.tensor([[[True, False, False, True]], [[False, False, True, False]]])
    src = torch.tensor([[[1, 1, 1, 2]], [[3, 3, 3, 3]]])
    pseudo = torch.tensor([[[0, 0, 255, 0]], [[0, 1, 0, 255]]])
    valid = torch.tensor([[[True, True, False, False]], [[True, True, False, False]]])
    labels, weight = mixed_targets(mask, src, pseudo, torch.tensor([0.25, 0.5]), valid)
    assert labels.tolist() == [[[1, 0, 255, 2]], [[0, 1, 3, 255]]]
    # pasted -> 1 (also outside the circle), unpasted inside -> image weight, unpasted outside -> 0
    assert weight.tolist() == [[[1.0, 0.25, 0.0, 1.0]], [[0.5, 0.5, 1.0, 0.0]]]
    assert weight.dtype == torch.float32


# ---- strong colour augmentation ------------------------------------------------------------


def test_strong_colour_identity_when_nothing_applies():
    x = normalise(torch.rand(2, 3, 16, 16) * 1.4 - 0.2)  # out-of-range values (colour transfer) kept too
    y = strong_colour(x, MEAN, STD, gen(), jitter_p=0.0, blur_p=0.0)
    assert torch.allclose(y, x, atol=1e-5)


def test_strong_colour_changes_values_keeps_shape_dtype_range_and_is_seeded():
    x = normalise(torch.rand(3, 3, 20, 24))
    y = strong_colour(x, MEAN, STD, gen(4), jitter_p=1.0, blur_p=1.0)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert (y - x).abs().amax(dim=(1, 2, 3)).min() > 1e-3  # every sample changed
    u = unit(y)
    assert u.min() >= -1e-5 and u.max() <= 1 + 1e-5
    assert torch.equal(y, strong_colour(x, MEAN, STD, gen(4), jitter_p=1.0, blur_p=1.0))
    assert not torch.equal(y, strong_colour(x, MEAN, STD, gen(5), jitter_p=1.0, blur_p=1.0))


def test_strong_colour_blur_only_smooths_and_grey_images_work():
    x = normalise(torch.rand(1, 3, 40, 40))
    y = strong_colour(x, MEAN, STD, gen(), jitter_p=0.0, blur_p=1.0)
    assert unit(y).std() < unit(x).std()  # blur of noise lowers its variance
    grey = torch.rand(2, 1, 16, 16)
    out = strong_colour(grey, [0.0], [1.0], gen(), jitter_p=1.0, blur_p=0.0)
    assert out.shape == grey.shape and not torch.equal(out, grey)
    assert [blur_kernel(n) for n in (5, 10, 11, 20, 30, 512)] == [1, 1, 1, 1, 3, 51]


# ---- MIC, colour transfer, EMA -------------------------------------------------------------


def test_mic_mask_ratio_values_and_blocks():
    m = mic_mask((1, 3, 256, 512), block=32, ratio=0.7, generator=gen(0))  # 8 x 16 blocks
    assert m.shape == (1, 1, 256, 512) and m.dtype == torch.float32
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    blocks = m.reshape(8, 32, 16, 32)
    assert torch.all(blocks == blocks[:, :1, :, :1])  # block-constant
    big = mic_mask((64, 3, 256, 256), block=32, ratio=0.7, generator=gen(1))  # 4,096 blocks
    assert 1 - big.mean().item() == pytest.approx(0.7, abs=0.05)
    odd = mic_mask((2, 3, 70, 100), block=64, generator=gen(2))
    assert odd.shape == (2, 1, 70, 100)  # ceil(70/64) x ceil(100/64) blocks, cropped
    assert torch.equal(odd, mic_mask((2, 3, 70, 100), block=64, generator=gen(2)))


def fisheye(n, size=32):
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    c = (size - 1) / 2
    valid = ((yy - c) ** 2 + (xx - c) ** 2) <= (size / 2 - 2) ** 2
    return valid.expand(n, size, size).clone()


def test_colour_transfer_matches_the_target_statistics_over_valid_pixels():
    torch.manual_seed(0)
    src = torch.rand(3, 3, 24, 24) * 0.5 + 0.2
    tgt = torch.rand(2, 3, 32, 32) * torch.tensor([0.3, 0.6, 0.9]).view(1, 3, 1, 1)
    valid = fisheye(2)
    tgt = tgt * valid[:, None]  # black outside the circle
    out = unit(colour_transfer(normalise(src), normalise(tgt), valid, MEAN, STD, p=1.0, generator=gen(0)))
    for i in range(3):
        matched = []
        for j in range(2):
            pix = tgt[j][:, valid[j]]
            ok = torch.allclose(out[i].mean((1, 2)), pix.mean(1), atol=1e-4) and torch.allclose(
                out[i].std((1, 2), unbiased=False), pix.std(1, unbiased=False), atol=1e-4)
            matched.append(ok)
        assert any(matched)
        # whole-image statistics (black included) would be darker: they are not what we match
        assert not torch.allclose(out[i].mean((1, 2)), tgt[0].mean((1, 2)), atol=1e-2)
    same = colour_transfer(normalise(src), normalise(tgt), valid, MEAN, STD, p=0.0, generator=gen(0))
    assert torch.allclose(same, normalise(src), atol=1e-5)
