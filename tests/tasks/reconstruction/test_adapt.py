"""Zero-shot self-supervised adaptation (adapt.py): the k-space splits are disjoint and keep the
calibration block, the loss sees only its points, the caller's model is never changed, the
held-out loss never ends worse than the pretrained one, and adapting a poor network to a scan
improves its image without any reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from podium.errors import UserError
from podium.tasks.reconstruction.adapt import (
    AdaptConfig,
    adapt_to_scan,
    kspace_loss,
    split_points,
)
from podium.tasks.reconstruction.fft import fft2c_np
from podium.tasks.reconstruction.metrics import ssim_fastmri
from podium.tasks.reconstruction.models.varnet import VarNet


def phantom_kspace(c=4, h=48, w=40, seed=0):
    """A textured ellipse seen by c smooth coils, equispaced 4x columns + a 6-column centre."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:h, :w]
    obj = (((y - h / 2) / 18) ** 2 + ((x - w / 2) / 15) ** 2 < 1) * (1 + 0.5 * np.sin(x / 2.0) * np.cos(y / 3.0))
    obj = obj + 0.6 * (((y - 20) / 5) ** 2 + ((x - 16) / 4) ** 2 < 1)
    maps = np.stack([np.exp(-((x - w * k / (c - 1)) ** 2) / (2 * 30.0**2)) * np.exp(1j * 0.1 * k * y) for k in range(c)])
    full = fft2c_np(maps * obj).astype(np.complex64)
    full += (rng.standard_normal(full.shape) + 1j * rng.standard_normal(full.shape)).astype(np.complex64) * 0.01
    mask = np.zeros(w, bool)
    mask[::4] = True
    mask[17:23] = True
    return full, mask


def batch_of(full, mask):
    masked = torch.view_as_real(torch.from_numpy(full * mask))[None]
    return masked, torch.from_numpy(mask.astype(np.float32)).view(1, 1, 1, -1, 1), torch.tensor([6])


def test_split_points_is_a_disjoint_partition_that_keeps_protected_points():
    acquired = torch.rand(30, 20, generator=torch.Generator().manual_seed(1)) < 0.5
    protected = torch.zeros(30, 20, dtype=torch.bool)
    protected[:, 8:12] = True
    chosen, rest = split_points(acquired, protected, 0.3, torch.Generator().manual_seed(0))
    assert not (chosen & rest).any() and torch.equal(chosen | rest, acquired)
    assert not (chosen & protected).any()
    candidates = int((acquired & ~protected).sum())
    assert int(chosen.sum()) == round(0.3 * candidates)
    again, _ = split_points(acquired, protected, 0.3, torch.Generator().manual_seed(0))
    assert torch.equal(chosen, again)  # seeded
    with pytest.raises(UserError, match="too few"):
        split_points(torch.zeros(4, 4, dtype=torch.bool), protected[:4, :4], 0.5, torch.Generator())


def test_kspace_loss_sees_only_its_points():
    measured = torch.randn(1, 2, 6, 5, 2)
    points = torch.zeros(6, 5, dtype=torch.bool)
    points[1, 2] = points[4, 0] = True
    pred = measured.clone()
    pred[:, :, ~points] += 100.0  # errors elsewhere are invisible
    assert float(kspace_loss(pred, measured, points)) == pytest.approx(0.0, abs=1e-7)
    assert float(kspace_loss(torch.zeros_like(measured), measured, points)) == pytest.approx(2.0)


def test_predicted_kspace_is_what_forward_combines():
    from podium.tasks.reconstruction.fft import ifft2c, rss_complex

    full, mask = phantom_kspace()
    masked, m, nlf = batch_of(full, mask)
    torch.manual_seed(0)
    model = VarNet(num_cascades=2, chans=4, pools=2, sens_chans=2, sens_pools=2).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(masked, m, nlf), rss_complex(ifft2c(model.predicted_kspace(masked, m, nlf)), dim=1))


def test_adaptation_improves_a_poor_network_without_a_reference():
    full, mask = phantom_kspace()
    masked, m, nlf = batch_of(full, mask)
    reference = np.sqrt((np.abs(np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(full, axes=(-2, -1)), axes=(-2, -1), norm="ortho"),
                                                axes=(-2, -1))) ** 2).sum(0))
    torch.manual_seed(0)
    model = VarNet(num_cascades=2, chans=8, pools=2, sens_chans=4, sens_pools=2).eval()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    result = adapt_to_scan(model, masked, m, nlf, AdaptConfig(steps=60, lr=3e-3, val_every=5, patience=100))

    def ssim(net):
        with torch.no_grad():
            image = net(masked, m, nlf)[0].numpy().astype(np.float64)
        return ssim_fastmri(reference[None], image[None], maxval=reference.max())

    vals = [h["val_loss"] for h in result.history if "val_loss" in h]
    assert min(vals) < vals[0] and result.best_step > 0
    before, after = ssim(model), ssim(result.model)
    print(f"SSIM before {before:.4f} after {after:.4f}")
    assert after > before + 0.01
    # the caller's network is untouched
    assert all(torch.equal(original[k], v) for k, v in model.state_dict().items())
    assert not any(p.requires_grad for p in result.model.parameters())


def test_adaptation_keeps_the_pretrained_weights_when_nothing_improves():
    full, mask = phantom_kspace()
    masked, m, nlf = batch_of(full, mask)
    torch.manual_seed(0)
    model = VarNet(num_cascades=1, chans=4, pools=2, sens_chans=2, sens_pools=2).eval()
    # a learning rate this large only makes things worse: the step-0 weights are kept
    result = adapt_to_scan(model, masked, m, nlf, AdaptConfig(steps=6, lr=10.0, val_every=2, patience=2))
    if result.best_step == 0:
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), result.model.state_dict().values()))
    vals = [h["val_loss"] for h in result.history if "val_loss" in h]
    best = min(vals)
    assert vals[[h["step"] for h in result.history if "val_loss" in h].index(result.best_step)] == best


@pytest.mark.parametrize("key, value", [("val_fraction", 0.0), ("loss_fraction", 1.0), ("steps", -1), ("lr", 0.0)])
def test_bad_settings_name_the_key(key, value):
    full, mask = phantom_kspace()
    masked, m, nlf = batch_of(full, mask)
    model = VarNet(num_cascades=1, chans=4, pools=2, sens_chans=2, sens_pools=2)
    with pytest.raises(UserError, match=f"task.adapt.{key}"):
        adapt_to_scan(model, masked, m, nlf, AdaptConfig(**{key: value}))


def test_a_model_without_kspace_output_is_refused():
    full, mask = phantom_kspace()
    masked, m, nlf = batch_of(full, mask)
    with pytest.raises(UserError, match="predicted_kspace"):
        adapt_to_scan(torch.nn.Linear(2, 2), masked, m, nlf, AdaptConfig(steps=1))
