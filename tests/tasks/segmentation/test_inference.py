"""Sliding-window inference with Gaussian blending and flip TTA."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from podium.errors import UserError
from podium.tasks.segmentation import inference


class PixelwiseModel(nn.Module):
    """A 1x1 convolution: its output at a pixel does not depend on the window around it, so any
    window layout, blending and flip must reproduce the whole-image prediction exactly."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return {"logits": self.conv(x)}


@pytest.mark.parametrize("window,overlap", [((32, 32), 0.5), ((64, 32), 0.25), ((128, 128), 0.5)])
@pytest.mark.parametrize("blend", ["gaussian", "constant"])
def test_windows_reproduce_the_whole_image_for_a_pixelwise_model(window, overlap, blend):
    model = PixelwiseModel().eval()
    images = torch.randn(2, 3, 70, 90)  # not a multiple of the window: edge windows and padding
    expected = torch.softmax(model(images)["logits"], 1)
    probs = inference.predict_probabilities(model, images, window, overlap, flips=["h", "v", "hv"],
                                            batch_size=3, blend=blend)
    assert probs.shape == expected.shape
    torch.testing.assert_close(probs, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(probs.sum(1), torch.ones(2, 70, 90), atol=1e-5, rtol=0)


class PositionModel(nn.Module):
    """Logit of class 1 = row coordinate inside the window: it depends on the window layout."""

    def forward(self, x):
        rows = torch.arange(x.shape[2], dtype=x.dtype).view(1, 1, -1, 1).expand(x.shape[0], 1, -1, x.shape[3])
        return {"logits": torch.cat([torch.zeros_like(rows), rows / 10], 1)}


def test_gaussian_blending_weights_window_centres():
    images = torch.zeros(1, 3, 64, 32)
    constant = inference.predict_probabilities(PositionModel(), images, (32, 32), 0.5, blend="constant")
    gaussian = inference.predict_probabilities(PositionModel(), images, (32, 32), 0.5, blend="gaussian")
    # row 24 is at the bottom edge of window 0-31 (row 24) and near the centre of 16-47 (row 8):
    # Gaussian blending trusts the centred window more, so its value is closer to the centred one.
    centred = torch.softmax(torch.tensor([0.0, 0.8]), 0)[1]
    assert (gaussian[0, 1, 24, 16] - centred).abs() < (constant[0, 1, 24, 16] - centred).abs()


def test_flip_tta_maps_predictions_back():
    images = torch.zeros(1, 3, 32, 32)
    probs = inference.predict_probabilities(PositionModel(), images, (32, 32), 0.0, flips=["v"])
    # identity says row r -> r / 10; the flipped copy, flipped back, says (31 - r) / 10: averaged
    # probabilities are symmetric top to bottom
    torch.testing.assert_close(probs, probs.flip(2))


def test_bad_settings_are_user_errors():
    with pytest.raises(UserError, match="multiples of 32"):
        inference.check_window([100, 96], 32)
    with pytest.raises(UserError, match="task.tta_flips"):
        inference.check_flips(["h", "diag"])
    with pytest.raises(UserError, match="overlap"):
        inference.predict_probabilities(PixelwiseModel(), torch.zeros(1, 3, 32, 32), (32, 32), overlap=1.0)
    with pytest.raises(UserError, match="blend"):
        inference.predict_probabilities(PixelwiseModel(), torch.zeros(1, 3, 32, 32), (32, 32), blend="max")
