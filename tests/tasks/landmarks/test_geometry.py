"""Letterbox geometry: exact forward/inverse, batched helpers, and where image content lands."""

import numpy as np
import pytest
import torch

from podium.tasks.landmarks.geometry import (
    Letterbox,
    letterbox,
    points_to_input,
    points_to_original,
)

LETTERBOXES = [
    Letterbox.fit(1935, 2400, 208, 256),  # ISBI 2015 to the default input
    Letterbox.fit(200, 300, 64, 64),
    Letterbox.fit(30, 40, 90, 100),  # upscaling
    Letterbox(0.37, 3.0, 11.5, 97, 61, 48, 40),  # a centred-style letterbox with pads
]


def dot_image(h, w, x0, y0, sigma):
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    img = 250 * np.exp(-((xs - x0) ** 2 + (ys - y0) ** 2) / (2 * sigma**2))
    return np.round(img).astype(np.uint8)


def centroid(arr):
    a = arr.astype(np.float64)
    ys, xs = np.mgrid[0 : a.shape[0], 0 : a.shape[1]]
    return np.array([(a * xs).sum() / a.sum(), (a * ys).sum() / a.sum()])


@pytest.mark.parametrize("lb", LETTERBOXES)
def test_forward_inverse_round_trip_numpy_and_torch(lb):
    rng = np.random.default_rng(0)
    pts = rng.uniform(-0.5, [lb.orig_w - 0.5, lb.orig_h - 0.5], size=(19, 2))
    np.testing.assert_allclose(lb.inverse(lb.forward(pts)), pts, rtol=0, atol=1e-9)
    back = lb.inverse(lb.forward(torch.from_numpy(pts)))
    assert isinstance(back, torch.Tensor) and back.dtype == torch.float64
    np.testing.assert_allclose(back.numpy(), pts, rtol=0, atol=1e-9)
    # float32 stays float32; integers become float64
    assert lb.forward(torch.zeros(3, 2)).dtype == torch.float32
    assert lb.forward(np.zeros((3, 2), dtype=np.int64)).dtype == np.float64


def test_forward_formula_pixel_centres():
    lb = Letterbox(0.5, 2.0, 1.0, 10, 8, 8, 6)
    # x_in = (x + 0.5) * scale - 0.5 + pad: the first pixel's centre (0) maps to -0.25 + pad
    np.testing.assert_allclose(lb.forward(np.array([[0.0, 0.0]])), [[1.75, 0.75]])
    # the image's outer edge (-0.5) maps to the input's content edge (-0.5 + pad)
    np.testing.assert_allclose(lb.forward(np.array([[-0.5, -0.5]])), [[1.5, 0.5]])
    with pytest.raises(ValueError):
        lb.forward(np.zeros((3, 3)))


def test_as_tensor_from_tensor_round_trip():
    lb = LETTERBOXES[3]
    t = lb.as_tensor()
    assert t.dtype == torch.float64 and t.shape == (5,)
    assert Letterbox.from_tensor(t, lb.out_w, lb.out_h) == lb


def test_batched_helpers_match_per_sample():
    rng = np.random.default_rng(1)
    pts = torch.from_numpy(rng.uniform(0, 200, size=(len(LETTERBOXES), 7, 2))).float()
    lbs = torch.stack([lb.as_tensor() for lb in LETTERBOXES])
    orig = points_to_original(pts, lbs)
    assert orig.shape == pts.shape and orig.dtype == torch.float64
    for i, lb in enumerate(LETTERBOXES):
        np.testing.assert_allclose(orig[i].numpy(), lb.inverse(pts[i].double().numpy()), atol=1e-9)
    np.testing.assert_allclose(points_to_input(orig, lbs).numpy(), pts.double().numpy(), atol=1e-4)
    # a single (5,) letterbox broadcasts
    one = points_to_original(pts[:1], lbs[0])
    np.testing.assert_allclose(one.numpy(), orig[:1].numpy())


@pytest.mark.parametrize(
    "shape, out",
    [((60, 90), (32, 32)), ((60, 90, 3), (40, 20)), ((50, 20, 2), (25, 30)), ((10, 10), (16, 24))],
)
def test_letterbox_shapes_and_padding(shape, out):
    img = np.full(shape, 200, dtype=np.uint8)
    res, lb = letterbox(img, *out)
    assert res.shape == out + shape[2:] and res.dtype == np.uint8
    cw, ch = lb.content_size
    assert lb.pad_x == lb.pad_y == 0
    assert (res[:ch, :cw] > 150).all()  # content at the top-left
    assert (res[ch:] == 0).all() and (res[:, cw:] == 0).all()  # zero padding right / bottom
    assert cw == out[1] or ch == out[0]  # one side fills the input


@pytest.mark.parametrize(
    "orig, out",
    [
        ((2400, 1935), (256, 208)),  # ISBI: the width is the non-limiting axis (206.4 -> 206)
        ((300, 200), (64, 64)),
        ((50, 120), (64, 48)),
        ((40, 30), (100, 90)),  # upscaling
        ((97, 61), (33, 29)),
    ],
)
def test_dot_lands_where_forward_says(orig, out):
    """The intensity centroid of a dot in the resized image is where `forward` maps the dot's
    centre. 0.1 px, not just 0.5: forgetting the half-pixel terms (x_in = x * scale) errs by
    (1 - scale) / 2, i.e. up to ~0.45 px when shrinking."""
    (h, w), (oh, ow) = orig, out
    rng = np.random.default_rng(h + w)
    sigma = max(1.5, 1.5 / min(ow / w, oh / h))  # >= 1.5 input pixels after resizing
    margin = 4 * sigma
    positions = [rng.uniform(margin, [w - 1 - margin, h - 1 - margin]) for _ in range(3)]
    positions.append(np.array([w - 1 - margin, h - 1 - margin]))  # far corner: exact scale on both axes
    for x0, y0 in positions:
        resized, lb = letterbox(dot_image(h, w, x0, y0, sigma), oh, ow)
        expected = lb.forward(np.array([[x0, y0]]))[0]
        assert np.abs(centroid(resized) - expected).max() < 0.1, (x0, y0)
    # the naive mapping would fail by much more when shrinking
    if lb.scale < 0.5:
        naive = np.array([x0, y0]) * lb.scale
        assert np.abs(centroid(resized) - naive).max() > 0.2


def test_letterbox_rejects_bad_input():
    with pytest.raises(ValueError):
        letterbox(np.zeros((4, 4), dtype=np.float32), 8, 8)
    with pytest.raises(ValueError):
        Letterbox.fit(0, 10, 8, 8)


def test_predictions_in_the_padding_are_clipped_onto_the_image():
    from podium.tasks.landmarks.geometry import Letterbox, clip_to_original

    box = Letterbox.fit(orig_w=100, orig_h=50, out_w=64, out_h=64)  # content 64 x 32, padding below
    # a point in the bottom padding maps below the image; one inside stays where it is
    inside, padded = np.array([10.0, 20.0]), np.array([30.0, 60.0])
    below = box.inverse(padded)
    assert below[1] > 49.5
    clipped = box.clip(np.stack([box.inverse(inside), below]))
    np.testing.assert_allclose(clipped[0], box.inverse(inside))
    assert clipped[1, 1] == 49.5 and clipped[1, 0] == below[0]
    assert box.clip(np.array([-3.0, -7.0])).tolist() == [-0.5, -0.5]
    batched = clip_to_original(torch.tensor([[[200.0, 20.0], [-9.0, 60.0]]], dtype=torch.float64),
                               torch.tensor([box.as_tensor().tolist()], dtype=torch.float64))
    assert batched.tolist() == [[[99.5, 20.0], [-0.5, 49.5]]]
    torch.testing.assert_close(box.clip(torch.tensor([[200.0, 20.0]])), torch.tensor([[99.5, 20.0]]))
