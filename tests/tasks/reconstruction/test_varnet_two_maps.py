"""The two-map (soft-SENSE) VarNet, `model.map_sets: 2` (issue 26): one set stays exactly
E2E-VarNet; two sets give jointly normalised maps (B, 2, coils, H, W, 2), set images
(B, 2, H, W, 2) in the cascades, the same data consistency and the coil-RSS output; the weights
and config keys fail as user errors naming model.map_sets.

    .venv/bin/python -m pytest -q -p no:cacheprovider tests/tasks/reconstruction/test_varnet_two_maps.py
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from podium.config import CONF_DIR, compose
from podium.engine import registry
from podium.errors import UserError
from podium.tasks.reconstruction.fft import complex_abs_sq, ifft2c, rss_complex
from podium.tasks.reconstruction.models import varnet as V

TINY = V.VarNetConfig(cascades=2, chans=4, sens_chans=2, pools=2, sens_pools=2)


def build(**overrides):
    return registry.build("model", "varnet", OmegaConf.structured(dataclasses.replace(TINY, **overrides)))


def inputs(batch=2, coils=3, height=32, width=24, seed=0):
    """Equispaced columns plus a 4-column centre block (its neighbours unsampled)."""
    mask = torch.zeros(width)
    mask[::3] = 1
    start = (width - 4 + 1) // 2
    mask[start - 1], mask[start + 4] = 0, 0
    mask[start:start + 4] = 1
    mask = mask.reshape(1, 1, 1, width, 1).repeat(batch, 1, 1, 1, 1)
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, coils, height, width, 2, generator=generator) * 1e-3 * mask, mask


def inner(a, b):
    """Complex inner product sum(a * conj(b)) of (..., 2) tensors."""
    a, b = torch.view_as_complex(a.contiguous()), torch.view_as_complex(b.contiguous())
    return (a * b.conj()).sum()


def orthonormal_set_maps(batch=1, sets=2, coils=4, height=8, width=6, seed=0):
    """Maps (B, S, C, H, W, 2) whose S set vectors are orthonormal over coils at every pixel:
    the Q of a QR decomposition of a random complex (coils x sets) matrix per pixel."""
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, height, width, coils, sets, 2, generator=generator, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.view_as_complex(z))  # (B, H, W, C, S), orthonormal columns
    return torch.view_as_real(q.permute(0, 4, 3, 1, 2).contiguous())


# -------------------------------------------------------------------------- one set = today


def test_one_map_set_is_todays_varnet_bit_for_bit():
    # Figures of the code before map_sets existed (commit 9cb7306), same seeds, float32 CPU.
    torch.manual_seed(0)
    model = V.VarNet(num_cascades=2, chans=4, pools=2, sens_chans=2, sens_pools=2, map_sets=1).eval()
    mask = torch.zeros(1, 1, 1, 24, 1)
    mask[..., ::3, :] = 1
    mask[..., 10:14, :] = 1
    kspace = torch.randn(1, 3, 32, 24, 2, generator=torch.Generator().manual_seed(1)) * mask
    with torch.no_grad():
        out = model(kspace, mask)
    assert sum(p.numel() for p in model.parameters()) == 16_552
    expected = torch.tensor([1300.9693603515625, 2391.612060546875, 2.2031140327453613, 1.3910540342330933,
                             3.206270933151245])
    got = torch.stack([out.sum(), out.square().sum(), out[0, 5, 7], out[0, 16, 12], out.max()])
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)  # exact here; rtol for other BLAS builds
    # the default, the registry default and map_sets=1 are one model: same names, shapes, values
    torch.manual_seed(0)
    default = V.VarNet(num_cascades=2, chans=4, pools=2, sens_chans=2, sens_pools=2).eval()
    assert default.map_sets == 1 and V.VarNetConfig().map_sets == 1
    with torch.no_grad():
        assert torch.equal(default(kspace, mask), out)
    assert {k: v.shape for k, v in build().state_dict().items()} == \
        {k: v.shape for k, v in build(map_sets=1).state_dict().items()}


def test_two_map_sets_add_only_the_extra_input_and_output_channels():
    def count(sets, cascades=12, chans=18, sens_chans=8):
        model = V.VarNet(num_cascades=cascades, chans=chans, pools=4, sens_chans=sens_chans, sens_pools=4,
                         map_sets=sets)
        return sum(p.numel() for p in model.parameters())

    assert count(1) == 29_936_966  # the reference E2E-VarNet 12/18/8
    # sensitivity head: 2 more outputs (weights + bias); every cascade: 2 more input channels of
    # the first 3x3 conv and 2 more outputs of the 1x1 head
    assert count(2) - count(1) == (2 * 8 + 2) + 12 * (2 * 18 * 9 + 2 * 18 + 2) == 4_362


# -------------------------------------------------------------------------- operators


def test_sens_reduce_inverts_sens_expand_for_maps_orthonormal_across_sets():
    maps = orthonormal_set_maps()
    image = torch.randn(1, 2, 8, 6, 2, dtype=torch.float64)  # one complex image per set
    kspace = V.sens_expand(image, maps)
    assert kspace.shape == (1, 4, 8, 6, 2)
    torch.testing.assert_close(V.sens_reduce(kspace, maps), image)
    # and the image is explained exactly: its coil-RSS is the RSS over the set images
    torch.testing.assert_close(rss_complex(ifft2c(kspace), dim=1), rss_complex(image, dim=1))


def test_two_set_sens_reduce_is_the_adjoint_of_sens_expand():
    kspace, mask = inputs(batch=1)
    maps = V.SensitivityModel(2, 2, map_sets=2)(kspace, mask).detach()
    image = torch.randn(1, 2, 32, 24, 2)
    other = torch.randn_like(kspace)
    torch.testing.assert_close(inner(V.sens_expand(image, maps), other), inner(image, V.sens_reduce(other, maps)),
                               atol=1e-3, rtol=1e-4)


def test_sensitivity_model_normalises_the_two_sets_jointly():
    kspace, mask = inputs()
    model = V.SensitivityModel(2, 2, map_sets=2)
    with torch.no_grad():
        maps = model(kspace, mask)
    assert maps.shape == (2, 2, 3, 32, 24, 2)  # (B, sets, coils, H, W, re/im)
    energy = complex_abs_sq(maps).sum(dim=(1, 2))
    torch.testing.assert_close(energy, torch.ones(2, 32, 24), atol=1e-4, rtol=0)
    # the second set is a different map, not a copy of the first
    assert (maps[:, 0] - maps[:, 1]).abs().max() > 1e-3


class Zero(nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


def test_two_set_cascade_without_regulariser_is_pure_data_consistency():
    kspace, mask = inputs(batch=1)
    maps = V.SensitivityModel(2, 2, map_sets=2)(kspace, mask)
    block = V.VarNetBlock(Zero())
    current = torch.randn_like(kspace)
    out = block(current, kspace, mask, maps)
    sampled = mask[0, 0, 0, :, 0].bool()
    torch.testing.assert_close(out[..., sampled, :], kspace[..., sampled, :])
    torch.testing.assert_close(out[..., ~sampled, :], current[..., ~sampled, :])


def test_two_set_regulariser_sees_the_set_images_as_channels():
    model = build(map_sets=2)
    seen = []
    model.cascades[0].regularizer.register_forward_hook(lambda module, args, out: seen.append(args[0].shape))
    kspace, mask = inputs()
    model(kspace, mask)
    assert seen == [torch.Size([2, 2, 32, 24, 2])]
    assert model.cascades[0].regularizer.unet.down[0][0].in_channels == 4  # re/im of 2 sets


# -------------------------------------------------------------------------- the model


def test_two_map_varnet_forward_backward_and_zero_cascades():
    model = build(map_sets=2, lska_kernel=7)
    kspace, mask = inputs()
    out = model(kspace, mask)
    assert out.shape == (2, 32, 24) and torch.isfinite(out).all()
    assert model.sens_maps(kspace, mask).shape == (2, 2, 3, 32, 24, 2)
    assert model.predicted_kspace(kspace, mask).shape == kspace.shape
    out.mean().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    # without cascades the output is still the zero-filled coil RSS
    bare = V.VarNet(num_cascades=0, sens_chans=2, sens_pools=2, map_sets=2)
    torch.testing.assert_close(bare(kspace, mask), rss_complex(ifft2c(kspace), dim=1))


def test_two_map_grad_checkpointing_changes_nothing_but_memory():
    torch.manual_seed(0)
    model = build(map_sets=2).train()
    kspace, mask = inputs(batch=1)
    results = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        out = model(kspace, mask)
        (out * 1e3).square().mean().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (out_plain, grads_plain), (out_ckpt, grads_ckpt) = results
    torch.testing.assert_close(out_ckpt, out_plain, atol=1e-5, rtol=1e-5)
    for name in grads_plain:
        torch.testing.assert_close(grads_ckpt[name], grads_plain[name], atol=1e-5, rtol=1e-5)


def test_real_slice_shape_forward_backward_smoke():
    # the real ESPIRiT slice: 320 x 256, 8 coils (tiny widths; the time is in the report, not asserted)
    model = build(map_sets=2)
    mask = torch.zeros(1, 1, 1, 256, 1)
    mask[..., (256 // 2) % 4::4, :] = 1
    mask[..., 118:138, :] = 1
    kspace = torch.randn(1, 8, 320, 256, 2, generator=torch.Generator().manual_seed(0)) * mask
    out = model(kspace, mask)
    assert out.shape == (1, 320, 256)
    out.mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


# -------------------------------------------------------------------------- config and weights


@pytest.mark.parametrize("value", [0, 3, -1, True, "two"])
def test_bad_map_sets_are_user_errors_naming_the_key(value):
    with pytest.raises(UserError, match="model.map_sets"):
        V.VarNet(num_cascades=1, chans=4, pools=2, sens_chans=2, sens_pools=2, map_sets=value)
    cfg = OmegaConf.create({**dataclasses.asdict(TINY), "map_sets": value})
    with pytest.raises(UserError, match="model.map_sets"):
        registry.build("model", "varnet", cfg)


def test_fastmri_weights_load_with_one_set_and_are_refused_with_two(tmp_path):
    fastmri_models = pytest.importorskip("fastmri.models")
    torch.manual_seed(0)
    reference = fastmri_models.VarNet(num_cascades=2, sens_chans=2, sens_pools=2, chans=4, pools=2).eval()
    path = tmp_path / "fastmri_varnet.pt"
    torch.save(reference.state_dict(), path)
    ours = build(weights=str(path), centre_detection="symmetric", map_sets=1).eval()
    kspace, mask = inputs(batch=1, width=40)
    with torch.no_grad():
        torch.testing.assert_close(ours(kspace, mask), reference(kspace, mask.bool()), atol=1e-5, rtol=1e-5)
    with pytest.raises(UserError, match=r"model.map_sets = 2.*fastMRI.*1 coil-map set"):
        build(weights=str(path), map_sets=2)


def test_weights_of_the_other_set_count_are_refused_naming_map_sets(tmp_path):
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    torch.save(build().state_dict(), one)
    torch.save(build(map_sets=2).state_dict(), two)
    with pytest.raises(UserError, match=r"model.map_sets = 2.*one.pt have 1"):
        build(weights=str(one), map_sets=2)
    with pytest.raises(UserError, match=r"model.map_sets = 1.*two.pt have 2"):
        build(weights=str(two))
    loaded = build(weights=str(two), map_sets=2)  # its own kind loads
    kspace, mask = inputs()
    reference = build(map_sets=2)
    reference.load_state_dict(torch.load(two, weights_only=True))
    with torch.no_grad():
        assert torch.equal(loaded(kspace, mask), reference(kspace, mask))


def test_shipped_configs_default_to_one_set_and_the_two_map_experiment_differs_only_there():
    for path in sorted((CONF_DIR / "model").glob("varnet*.yaml")):
        assert OmegaConf.load(path).map_sets == 1, path.name
    one = OmegaConf.to_container(compose(["experiment=varnet_sim2real"]))
    two = OmegaConf.to_container(compose(["experiment=varnet_sim2real_two_maps"]))
    assert two["model"].pop("map_sets") == 2 and one["model"].pop("map_sets") == 1
    assert two.pop("name") == "varnet_sim2real_two_maps"
    one.pop("name")
    assert two == one
