"""Segmentation models: shapes, backward, the reconstruction head, local encoder weights."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from podium.engine import registry
from podium.errors import UserError
from podium.tasks.segmentation.models import SegmentationUNet, SegUNetConfig


def _cfg(**kw):
    return OmegaConf.merge(OmegaConf.structured(SegUNetConfig), {"encoder": "resnet10t",
                                                                  "decoder_channels": [32, 16, 16, 8, 8], **kw})


@pytest.mark.parametrize("recon", [False, True])
@pytest.mark.parametrize("in_chans,classes", [(3, 2), (1, 4)])
def test_shapes_and_backward(recon, in_chans, classes):
    torch.manual_seed(0)
    model = registry.build("model", "seg_unet", _cfg(recon_head=recon, recon_channels=16),
                           num_classes=classes, in_chans=in_chans)
    x = torch.randn(2, in_chans, 64, 96)
    out = model(x)
    assert out["logits"].shape == (2, classes, 64, 96)
    assert ("recon" in out) == recon
    loss = out["logits"].mean() + (out["recon"].mean() if recon else 0)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    if recon:
        assert out["recon"].shape == x.shape


def test_recon_head_sees_only_the_deepest_feature():
    """The reconstruction decoder must not get skip connections (it would copy the input)."""
    model = SegmentationUNet(3, 2, "resnet10t", None, [32, 16, 16, 8, 8], 5, True, 16).eval()
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 64)
    features = model.unet.encoder(x)
    assert torch.allclose(model(x)["recon"], model.recon(features[-1]))


def test_input_not_divisible_is_refused():
    model = SegmentationUNet(3, 2, "resnet10t", None, [32, 16, 16, 8, 8], 5)
    with pytest.raises(ValueError, match="divisible by 32"):
        model(torch.randn(1, 3, 48, 64))


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = SegmentationUNet(3, 2, "resnet10t", None, [32, 16, 16, 8, 8], 5)
    x = torch.randn(2, 3, 64, 64)

    def grads():
        model.zero_grad()
        model(x)["logits"].square().mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.set_grad_checkpointing(True)
    checkpointed = grads()
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, checkpointed))


def test_encoder_weights_round_trip(tmp_path):
    torch.manual_seed(1)
    source = SegmentationUNet(3, 2, "resnet10t", None, [32, 16, 16, 8, 8], 5)
    path = tmp_path / "encoder.pt"
    torch.save(source.encoder_state_dict(), path)
    target = registry.build("model", "seg_unet", _cfg(encoder_weights=str(path)), num_classes=3, in_chans=3)
    for key, value in source.encoder_state_dict().items():
        assert torch.equal(target.encoder_state_dict()[key], value), key


def test_bad_config_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not a timm model"):
        registry.build("model", "seg_unet", _cfg(encoder="resnet_nope"), num_classes=2, in_chans=3)
    with pytest.raises(UserError, match="does not exist"):
        registry.build("model", "seg_unet", _cfg(encoder_weights=str(tmp_path / "none.pt")), num_classes=2, in_chans=3)
    with pytest.raises(UserError, match="decoder_channels"):
        registry.build("model", "seg_unet", _cfg(decoder_channels=[8, 8]), num_classes=2, in_chans=3)
