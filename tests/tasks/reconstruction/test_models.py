"""Reconstruction models on tiny inputs: every registered model (shapes, gradients, LSKA, grad
checkpointing, odd sizes, centre detection), the reference parameter counts, data-consistency
properties, the normalised U-Net and LSKA."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from podium.engine import registry
from podium.errors import UserError
from podium.tasks.reconstruction.fft import ifft2c, rss_complex
from podium.tasks.reconstruction.models import fivarnet as FI
from podium.tasks.reconstruction.models import lska as L
from podium.tasks.reconstruction.models import unet as U
from podium.tasks.reconstruction.models import varnet as V

TINY = {
    "varnet": V.VarNetConfig(cascades=2, chans=4, sens_chans=2, pools=2, sens_pools=2),
    "fivarnet": FI.FIVarNetConfig(
        feature_cascades=2, image_cascades=1, feature_dim=4, unet_chans=4, sens_chans=2,
        pools=2, sens_pools=2,
    ),
}


def build(name, **overrides):
    cfg = OmegaConf.structured(dataclasses.replace(TINY[name], **overrides))
    return registry.build("model", name, cfg)


def column_mask(width, centre=4, every=3, batch=1):
    """Equispaced columns plus a centre block at the fastMRI placement, with the columns next
    to the block left unsampled so the block is unambiguous."""
    mask = torch.zeros(width)
    mask[::every] = 1
    start = (width - centre + 1) // 2
    mask[start - 1], mask[start + centre] = 0, 0
    mask[start : start + centre] = 1
    return mask.reshape(1, 1, 1, width, 1).repeat(batch, 1, 1, 1, 1)


def inputs(batch=2, coils=3, height=32, width=24, seed=0):
    generator = torch.Generator().manual_seed(seed)
    mask = column_mask(width, batch=batch)
    kspace = torch.randn(batch, coils, height, width, 2, generator=generator) * 1e-3
    return kspace * mask, mask


def test_every_reconstruction_model_has_a_tiny_config():
    modules = (V.__name__, FI.__name__)
    ours = {e.name for e in registry.entries("model") if e.factory.__module__ in modules}
    assert ours == set(TINY)


@pytest.mark.parametrize("lska_kernel", [0, 7])
@pytest.mark.parametrize("name", sorted(TINY))
def test_forward_and_backward(name, lska_kernel):
    model = build(name, lska_kernel=lska_kernel, lska_levels="all")
    assert any(isinstance(m, L.LSKABlock) for m in model.modules()) == (lska_kernel > 0)
    kspace, mask = inputs()
    out = model(kspace, mask)
    assert out.shape == (2, 32, 24)
    assert torch.isfinite(out).all()
    out.mean().backward()
    for param_name, param in model.named_parameters():
        assert param.grad is not None, param_name
        assert torch.isfinite(param.grad).all(), param_name


@pytest.mark.parametrize("name", sorted(TINY))
def test_odd_sizes_and_bool_masks(name):
    model = build(name)
    kspace, mask = inputs(batch=1, height=27, width=19)
    out = model(kspace, mask.bool())
    assert out.shape == (1, 27, 19)
    torch.testing.assert_close(out, model(kspace, mask))


@pytest.mark.parametrize("name", sorted(TINY))
def test_grad_checkpointing_changes_nothing_but_memory(name):
    torch.manual_seed(0)
    model = build(name, lska_kernel=7).train()
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
    for n in grads_plain:
        torch.testing.assert_close(grads_ckpt[n], grads_plain[n], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(TINY))
def test_detected_centre_equals_the_given_width(name):
    model = build(name).eval()
    kspace, mask = inputs()
    with torch.no_grad():
        given = model.sens_maps(kspace, mask, torch.tensor([4, 4]))
        detected = model.sens_maps(kspace, mask, None)
        zero_means_detect = model.sens_maps(kspace, mask, torch.tensor([0, 0]))
        torch.testing.assert_close(detected, given)
        torch.testing.assert_close(zero_means_detect, given)
        torch.testing.assert_close(model(kspace, mask, 4), model(kspace, mask, None))
        # sensitivities have unit RSS over coils
        torch.testing.assert_close(rss_complex(given), torch.ones(2, 32, 24), atol=1e-4, rtol=0)


@pytest.mark.parametrize("width,centre", [(24, 4), (24, 5), (19, 4), (19, 3)])
def test_centre_columns(width, centre):
    mask = column_mask(width, centre=centre)
    start = (width - centre + 1) // 2
    expected = torch.zeros(width)
    expected[start : start + centre] = 1
    assert torch.equal(V.centre_columns(mask)[0, 0, 0, :, 0].float(), expected)
    assert torch.equal(V.centre_columns(mask, centre)[0, 0, 0, :, 0].float(), expected)


def test_centre_columns_per_batch_item():
    masks = torch.cat([column_mask(24, centre=4), column_mask(24, centre=8)])
    widths = V.centre_columns(masks)[:, 0, 0, :, 0].sum(dim=1)
    assert widths.tolist() == [4, 8]
    widths = V.centre_columns(masks, torch.tensor([6, 0]))[:, 0, 0, :, 0].sum(dim=1)
    assert widths.tolist() == [6, 8]  # 0 means: find it in the mask


def test_varnet_parameter_counts_match_the_reference():
    def count(cascades):
        model = V.VarNet(num_cascades=cascades, chans=18, pools=4, sens_chans=8, sens_pools=4)
        return sum(p.numel() for p in model.parameters())

    assert count(12) == 29_936_966
    assert count(20) == 49_571_678


class Zero(nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


def test_varnet_cascade_without_regulariser_is_pure_data_consistency():
    kspace, mask = inputs(batch=1)
    sens = V.SensitivityModel(2, 2)(kspace, mask)
    block = V.VarNetBlock(Zero())
    current = torch.randn_like(kspace)
    # dc_weight 1 and every column sampled: the measured data replace the estimate
    full = torch.ones_like(mask)
    torch.testing.assert_close(block(current, kspace, full, sens), kspace)
    # a partial mask: measured columns replaced, the others untouched
    out = block(current, kspace, mask, sens)
    sampled = mask[0, 0, 0, :, 0].bool()
    torch.testing.assert_close(out[..., sampled, :], kspace[..., sampled, :])
    torch.testing.assert_close(out[..., ~sampled, :], current[..., ~sampled, :])


def test_sens_reduce_is_the_adjoint_of_sens_expand():
    # <A x, k> = <x, A^H k> for A = F S; with unit-RSS maps A^H A is the identity as well
    kspace, mask = inputs(batch=1)
    sens = V.SensitivityModel(2, 2)(kspace, mask).detach()
    image = torch.randn(1, 1, 32, 24, 2)
    other = torch.randn_like(kspace)

    def inner(a, b):  # complex inner product sum(a * conj(b))
        a, b = torch.view_as_complex(a.contiguous()), torch.view_as_complex(b.contiguous())
        return (a * b.conj()).sum()

    forward = inner(V.sens_expand(image, sens), other)
    adjoint = inner(image, V.sens_reduce(other, sens))
    torch.testing.assert_close(forward, adjoint, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(
        V.sens_reduce(V.sens_expand(image, sens), sens), image, atol=1e-4, rtol=0
    )


def test_varnet_without_cascades_is_the_zero_filled_rss():
    kspace, mask = inputs()
    out = V.VarNet(num_cascades=0, sens_chans=2, sens_pools=2)(kspace, mask)
    torch.testing.assert_close(out, rss_complex(ifft2c(kspace), dim=1))


def test_feature_cascade_leaves_data_consistent_features_alone():
    torch.manual_seed(0)
    kspace, mask = inputs(batch=1)
    sens = V.SensitivityModel(2, 2)(kspace, mask)
    encoder, decoder = FI.FeatureEncoder(4), FI.FeatureDecoder(4)
    cascade = FI.FeatureCascade(encoder, decoder, Zero())
    mean, std = FI.image_statistics(V.sens_reduce(kspace, sens))
    features = torch.randn(1, 4, 32, 24)
    consistent = V.sens_expand(decoder(features, mean, std), sens)
    torch.testing.assert_close(
        cascade(features, consistent, mask, sens, mean, std), features, atol=1e-5, rtol=0
    )
    # ... and moves features that disagree with the data
    moved = cascade(features, consistent + 0.1 * mask, mask, sens, mean, std)
    assert (moved - features).abs().max() > 1e-3


def test_fivarnet_sharing_the_encoder_decoder_saves_their_parameters():
    def count(share):
        model = build("fivarnet", share_encoder_decoder=share)
        return sum(p.numel() for p in model.parameters())

    pair = (2 * 4 * 25 + 4) + (4 * 2 * 25 + 2)  # 5x5 encoder 2->4 and decoder 4->2, biases
    assert count(False) - count(True) == TINY["fivarnet"].feature_cascades * pair


@pytest.mark.parametrize(
    "name,key,value,match",
    [
        ("varnet", "lska_kernel", 9, "lska_kernel"),
        ("fivarnet", "lska_kernel", -1, "lska_kernel"),
        ("varnet", "lska_levels", "middle", "lska_levels"),
        ("varnet", "chans", 0, "chans"),
        ("fivarnet", "feature_cascades", -2, "feature_cascades"),
    ],
)
def test_bad_config_values_are_user_errors(name, key, value, match):
    with pytest.raises(UserError, match=match):
        build(name, **{key: value})


# --------------------------------------------------------------------------------------------
# normalised U-Net
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("height,width", [(32, 24), (21, 13)])
def test_norm_unet_is_scale_equivariant_and_keeps_its_size(height, width):
    # the normalisation is undone on the way out, so scaling the input scales the output
    torch.manual_seed(0)
    net = U.NormUnet(chans=4, num_pools=2, in_chans=4, out_chans=4).eval()
    x = torch.randn(2, 2, height, width, 2)
    out = net(x)
    assert out.shape == x.shape
    torch.testing.assert_close(net(1e-4 * x), 1e-4 * out, atol=1e-9, rtol=1e-4)


@pytest.mark.parametrize("levels,blocks", [("bottleneck", 1), ("all", 2 * 3 + 1)])
def test_unet_attention_placement(levels, blocks):
    net = U.Unet(2, 2, chans=4, num_pools=3, attention=lambda c: L.LSKABlock(c, 7),
                 attention_levels=levels)
    assert sum(isinstance(m, L.LSKABlock) for m in net.modules()) == blocks
    assert net(torch.randn(1, 2, 16, 16)).shape == (1, 2, 16, 16)


# --------------------------------------------------------------------------------------------
# LSKA
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", sorted(L.LSKA_KERNELS))
def test_lska_parameters_and_receptive_field(kernel):
    gate = L.LSKA(channels=3, kernel=kernel)
    assert sum(p.numel() for p in gate.parameters()) == L.lska_parameter_count(3, kernel)
    k0, _, dilation = L.LSKA_KERNELS[kernel]
    assert k0 == 2 * dilation - 1
    # Positive depthwise weights, no biases, identity 1x1: the impulse response of the
    # attention branch covers exactly kernel x kernel pixels.
    with torch.no_grad():
        for conv in gate.attention:
            conv.bias.zero_()
            if conv.groups > 1:
                conv.weight.fill_(1.0)
            else:
                conv.weight.copy_(torch.eye(3)[..., None, None])
    impulse = torch.zeros(1, 3, 71, 71)
    impulse[..., 35, 35] = 1
    support = gate.attention(impulse)[0, 0] != 0
    rows, cols = support.any(dim=1).nonzero(), support.any(dim=0).nonzero()
    assert rows.max() - rows.min() + 1 == kernel
    assert cols.max() - cols.min() + 1 == kernel


def test_lska_cost_is_linear_in_the_kernel_size():
    channels = 16
    counts = [L.lska_parameter_count(channels, k) for k in (23, 35, 41, 53)]
    # with the dilation fixed at 3, every 3 extra kernel taps cost 2 * channels parameters
    kernels = (23, 35, 41, 53)
    steps = [
        (b - a) / (kb - ka) for a, b, ka, kb in zip(counts, counts[1:], kernels, kernels[1:])
    ]
    assert steps == [2 * channels / 3] * 3


def test_lska_is_a_gate_and_the_block_keeps_the_shape():
    torch.manual_seed(0)
    gate = L.LSKA(channels=4, kernel=23)
    zeros = torch.zeros(1, 4, 16, 16)
    assert gate.attention(zeros).abs().sum() > 0  # the biases make a non-zero attention map...
    assert torch.equal(gate(zeros), zeros)  # ...but the product with the input is zero
    x = torch.randn(2, 4, 16, 12)
    assert L.LSKABlock(4, 11)(x).shape == x.shape


def test_unknown_lska_kernel_is_a_user_error():
    with pytest.raises(UserError, match="7, 11, 23, 35, 41, 53"):
        L.LSKA(4, kernel=21)
