"""Every registered classification model on tiny inputs: shapes, backward, gradient
checkpointing, local weights, bad names."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from podium.engine import registry
from podium.errors import UserError
from podium.tasks.classification.models import SmallCNNConfig, TimmConfig

CONFIGS = {
    "small_cnn": OmegaConf.structured(SmallCNNConfig(width=4, blocks=2)),
    "timm": OmegaConf.structured(TimmConfig(arch="resnet10t")),
}


def test_every_registered_classification_model_has_a_tiny_config():
    mine = {e.name for e in registry.entries("model") if e.factory.__module__.startswith("podium.tasks.classification")}
    assert mine <= set(CONFIGS)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("in_chans", [1, 3])
def test_forward_and_backward(name, in_chans):
    torch.manual_seed(0)
    model = registry.build("model", name, CONFIGS[name], num_classes=5, in_chans=in_chans)
    x = torch.randn(2, in_chans, 32, 32)
    logits = model(x)
    assert logits.shape == (2, 5)
    logits.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_gradient_checkpointing_gives_the_same_gradients(name):
    torch.manual_seed(0)
    model = registry.build("model", name, CONFIGS[name], num_classes=3, in_chans=3)
    model.eval()  # no dropout / batch-statistics noise between the two passes
    x = torch.randn(2, 3, 32, 32)
    model(x).square().sum().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model.train()
    for m in model.modules():  # keep eval-mode behaviour while training=True enables checkpointing
        if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.Dropout)):
            m.eval()
    model(x).square().sum().backward()
    for a, b in zip(plain, [p.grad for p in model.parameters()]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_timm_unknown_arch_names_close_matches():
    cfg = OmegaConf.structured(TimmConfig(arch="resnet181"))
    with pytest.raises(UserError, match="resnet18"):
        registry.build("model", "timm", cfg, num_classes=3, in_chans=3)


def test_timm_loads_a_local_weights_file_and_keeps_a_new_head(tmp_path):
    torch.manual_seed(0)
    source = registry.build("model", "timm", CONFIGS["timm"], num_classes=10, in_chans=3)
    path = tmp_path / "weights.pt"
    torch.save(source.state_dict(), path)
    cfg = OmegaConf.structured(TimmConfig(arch="resnet10t", weights=str(path)))
    target = registry.build("model", "timm", cfg, num_classes=4, in_chans=3)
    s, t = source.state_dict(), target.state_dict()
    assert torch.equal(s["conv1.0.weight"], t["conv1.0.weight"])
    assert t["fc.weight"].shape == (4, s["fc.weight"].shape[1])  # head re-initialised for 4 classes


def test_timm_weights_of_another_architecture_are_refused(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"something.else": torch.zeros(3)}, path)
    cfg = OmegaConf.structured(TimmConfig(arch="resnet10t", weights=str(path)))
    with pytest.raises(UserError, match="no tensor matches"):
        registry.build("model", "timm", cfg, num_classes=4, in_chans=3)


def test_small_cnn_rejects_an_unknown_norm():
    cfg = OmegaConf.structured(SmallCNNConfig(norm="layer"))
    with pytest.raises(UserError, match="model.norm"):
        registry.build("model", "small_cnn", cfg, num_classes=3, in_chans=3)
