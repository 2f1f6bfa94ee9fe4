"""Every registered landmark model on tiny inputs: shapes, backward, gradient checkpointing,
learnable sigma, local weights, bad names; `crop_patches`."""

from __future__ import annotations

import pytest
import timm
import torch
from omegaconf import OmegaConf
from timm.models import adapt_input_conv

from podium.engine import registry
from podium.errors import UserError
from podium.tasks.landmarks import models as M

K = 3
CONFIGS = {
    "heatmap_unet": M.HeatmapUNetConfig(encoder="resnet10t", decoder_channels=[32, 16, 16, 8, 8]),
    "coord_regressor": M.CoordRegressorConfig(arch="resnet10t"),
    "patch_refiner": M.PatchRefinerConfig(encoder="resnet10t", patch_size=32),
}


def build(name, in_chans=1, **overrides):
    cfg = OmegaConf.structured(type(CONFIGS[name])(**{**CONFIGS[name].__dict__, **overrides}))
    return registry.build("model", name, cfg, num_landmarks=K, in_chans=in_chans)


def tiny_input(name, in_chans=1):
    if name == "patch_refiner":
        return torch.randn(2 * K, in_chans, 32, 32)  # B = 2 images x K patches
    return torch.randn(2, in_chans, 64, 48)


def output_of(name, out):
    return out["points"] if name == "coord_regressor" else out["heatmaps"]


def test_every_model_of_this_family_has_a_tiny_config():
    ours = {e.name for e in registry.entries("model") if e.factory.__module__ == M.__name__}
    assert ours == set(CONFIGS)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("in_chans", [1, 3])
def test_forward_and_backward(name, in_chans):
    torch.manual_seed(0)
    model = build(name, in_chans)
    out = model(tiny_input(name, in_chans))
    expected = {"heatmap_unet": (2, K, 64, 48), "coord_regressor": (2, K, 2), "patch_refiner": (2 * K, 1, 32, 32)}
    assert output_of(name, out).shape == expected[name]
    assert model.output_stride == 1 and model.sigma is None
    output_of(name, out).square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_regressor_points_lie_in_the_image_extent():
    points = build("coord_regressor")(torch.randn(2, 1, 64, 48))["points"]
    assert (points[..., 0] > -0.5).all() and (points[..., 0] < 47.5).all()
    assert (points[..., 1] > -0.5).all() and (points[..., 1] < 63.5).all()


@pytest.mark.parametrize("stride", [2, 4])
def test_heatmap_unet_output_stride(stride):
    model = build("heatmap_unet", output_stride=stride)
    assert model.output_stride == stride
    assert model(torch.randn(1, 1, 64, 48))["heatmaps"].shape == (1, K, 64 // stride, 48 // stride)
    with pytest.raises(UserError, match="output_stride"):
        build("heatmap_unet", output_stride=3)


def eval_mode_with_checkpointing(model):
    model.train()  # training=True is what enables checkpointing; BN keeps eval behaviour
    for m in model.modules():
        if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.Dropout)):
            m.eval()


@pytest.mark.parametrize("name", sorted(CONFIGS) + ["decoder_fallback"])
def test_gradient_checkpointing_gives_the_same_gradients(name):
    torch.manual_seed(0)
    model = build("heatmap_unet" if name == "decoder_fallback" else name)
    model.eval()
    x = tiny_input("heatmap_unet" if name == "decoder_fallback" else name)
    output_of(name, model(x)).square().sum().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    if name == "decoder_fallback":  # an encoder without timm checkpointing: decoder segment
        model.net._checkpoint_decoder = True
    else:
        model.set_grad_checkpointing(True)
    eval_mode_with_checkpointing(model)
    output_of(name, model(x)).square().sum().backward()
    for a, b in zip(plain, [p.grad for p in model.parameters()]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["heatmap_unet", "patch_refiner"])
def test_learnable_sigma_is_a_trained_parameter(name):
    model = build(name, learnable_sigma=True, init_sigma=3.0)
    assert isinstance(model.sigma, torch.nn.Module)
    assert any(p is model.sigma.log_excess for p in model.parameters())
    assert any(k.startswith("sigma.") for k in model.state_dict())
    out = model(tiny_input(name))
    torch.testing.assert_close(out["sigma"], torch.full((K,), 3.0))
    out["sigma"].sum().backward()
    assert model.sigma.log_excess.grad is not None


def test_refiner_unshared_has_one_network_per_landmark():
    torch.manual_seed(0)
    model = build("patch_refiner", shared=False)
    assert len(model.nets) == K
    model.eval()
    x = tiny_input("patch_refiner")
    out = model(x)["heatmaps"]
    # patch n belongs to landmark n % K and goes through that landmark's own network
    torch.testing.assert_close(out[4:5], model.nets[1](x[4:5]))
    reordered = model(x[[4]], landmark_index=torch.tensor([1]))["heatmaps"]
    torch.testing.assert_close(reordered, out[4:5])


def test_refiner_shared_uses_the_landmark_identity():
    model = build("patch_refiner").eval()
    x = tiny_input("patch_refiner")[:1]
    a = model(x, landmark_index=torch.tensor([0]))["heatmaps"]
    b = model(x, landmark_index=torch.tensor([2]))["heatmaps"]
    assert not torch.allclose(a, b)


# --------------------------------------------------------------------------------------------
# Local weights and bad names
# --------------------------------------------------------------------------------------------


def test_local_encoder_weights_load_and_adapt_to_grayscale(tmp_path):
    torch.manual_seed(1)
    source = timm.create_model("resnet10t", pretrained=False)  # 3 input channels, 1000 classes
    path = tmp_path / "resnet10t.pth"
    torch.save(source.state_dict(), path)

    model = build("heatmap_unet", encoder_weights=str(path))
    encoder = model.net.unet.encoder.model
    torch.testing.assert_close(encoder.layer2[0].conv1.weight, source.layer2[0].conv1.weight)
    torch.testing.assert_close(encoder.conv1[0].weight, adapt_input_conv(1, source.conv1[0].weight))

    refiner = build("patch_refiner", encoder_weights=str(path))  # 1 image + K identity channels
    first = refiner.nets[0].unet.encoder.model.conv1[0].weight
    torch.testing.assert_close(first[:, :1], adapt_input_conv(1, source.conv1[0].weight))
    assert (first[:, 1:] == 0).all()

    with pytest.warns(UserWarning, match="random init"):  # the 1000-class fc does not fit
        regressor = build("coord_regressor", weights=str(path))
    torch.testing.assert_close(regressor.backbone.layer1[0].conv1.weight, source.layer1[0].conv1.weight)


def test_bad_weights_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        build("heatmap_unet", encoder_weights=str(tmp_path / "missing.pth"))
    path = tmp_path / "other.pth"
    torch.save({"foo.weight": torch.zeros(3)}, path)
    with pytest.raises(UserError, match="no tensor matches"):
        build("heatmap_unet", encoder_weights=str(path))


@pytest.mark.parametrize("name,key", [("heatmap_unet", "encoder"), ("patch_refiner", "encoder"),
                                      ("coord_regressor", "arch")])
def test_bad_encoder_name_lists_close_timm_names(name, key):
    with pytest.raises(UserError, match="resnet18"):
        build(name, **{key: "resnet181"})


# --------------------------------------------------------------------------------------------
# crop_patches
# --------------------------------------------------------------------------------------------


def test_crop_patches_puts_a_dot_in_the_right_place():
    images = torch.zeros(2, 2, 40, 30)
    images[1, :, 17, 12] = torch.tensor([1.0, 2.0])  # the dot: x = 12, y = 17 in image 1
    centers = torch.tensor([[[5.0, 5.0], [0.0, 0.0]], [[10.4, 20.6], [28.0, 1.0]]])
    patches, offsets = M.crop_patches(images, centers, 8)
    assert patches.shape == (4, 2, 8, 8) and offsets.shape == (2, 2, 2)
    # image 1, landmark 0 -> patch 2; centre rounds to (10, 21) -> offset (6, 17)
    assert offsets[1, 0].tolist() == [6.0, 17.0]
    ys, xs = torch.nonzero(patches[2, 0], as_tuple=True)
    assert (xs.item() + offsets[1, 0, 0].item(), ys.item() + offsets[1, 0, 1].item()) == (12, 17)
    assert patches[2, :, 0, 6].tolist() == [1.0, 2.0]
    assert patches[[0, 1, 3]].abs().sum() == 0


def test_crop_patches_zero_pads_outside_the_image():
    images = torch.ones(1, 1, 10, 10, requires_grad=True)
    patches, offsets = M.crop_patches(images, torch.tensor([[[0.0, 9.0]]]), 6)
    assert offsets[0, 0].tolist() == [-3.0, 6.0]
    expected = torch.zeros(6, 6)
    expected[:4, 3:] = 1.0  # rows 6..9 and columns 0..2 of the image are inside
    torch.testing.assert_close(patches[0, 0], expected)
    patches.sum().backward()
    assert images.grad.sum() == 12
