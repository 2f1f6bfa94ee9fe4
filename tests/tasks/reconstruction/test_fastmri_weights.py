"""fastMRI-compatible VarNet weights: `model.weights` accepts a state dict of the fastMRI
repository's VarNet (PyPI `fastmri`), and with `model.centre_detection=symmetric` podium's VarNet
computes what fastMRI's does on the same mask, including its calibration width."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from podium.engine import registry
from podium.errors import UserError
from podium.tasks.reconstruction.models import varnet as V

SIZES = {"cascades": 2, "chans": 4, "sens_chans": 2, "pools": 2, "sens_pools": 2}


def build(**overrides):
    return registry.build("model", "varnet", OmegaConf.structured(V.VarNetConfig(**{**SIZES, **overrides})))


def snu_like_mask(width=40, acc=4, centre=6):
    """Equispaced lines from (W // 2) % acc plus a centre block that a line touches: the sampled
    run through the centre is 7 columns, fastMRI's symmetric count 6 (as 33 vs 32 on SNU)."""
    mask = torch.zeros(1, 1, 1, width, 1)
    mask[..., (width // 2) % acc::acc, :] = 1
    start = (width - centre + 1) // 2
    mask[..., start:start + centre, :] = 1
    return mask


def test_symmetric_centre_detection_counts_as_fastmri():
    mask = snu_like_mask()
    assert int(V.centre_columns(mask).sum()) == 7  # the whole contiguous run
    symmetric = V.centre_columns(mask, symmetric=True)[0, 0, 0, :, 0]
    assert int(symmetric.sum()) == 6 and symmetric[17:23].all()  # 2 x min(3 left, 3 right), placed centred
    with pytest.raises(UserError, match="model.centre_detection"):
        build(centre_detection="both")


def test_fastmri_varnet_weights_load_and_reconstruct_as_fastmri(tmp_path):
    fastmri_models = pytest.importorskip("fastmri.models")
    torch.manual_seed(0)
    reference = fastmri_models.VarNet(num_cascades=2, sens_chans=2, sens_pools=2, chans=4, pools=2).eval()
    path = tmp_path / "fastmri_varnet.pt"
    torch.save(reference.state_dict(), path)
    ours = build(weights=str(path), centre_detection="symmetric").eval()
    mask = snu_like_mask()
    kspace = torch.randn(1, 3, 32, 40, 2) * mask
    with torch.no_grad():
        expected = reference(kspace, mask.bool())
        assert torch.allclose(ours(kspace, mask), expected, atol=1e-5)
        # the same weights with podium's contiguous run (7 columns) see other calibration data
        contiguous = build(weights=str(path)).eval()
        assert (contiguous(kspace, mask) - expected).abs().max() > 1e-3
        # a given width is used by both
        given = torch.tensor([6])
        assert torch.allclose(contiguous(kspace, mask, given), reference(kspace, mask.bool(), given), atol=1e-5)
    # a Lightning checkpoint of fastMRI's VarNetModule: keys under `varnet.` in `state_dict`
    torch.save({"state_dict": {f"varnet.{k}": v for k, v in reference.state_dict().items()}}, path)
    with torch.no_grad():
        assert torch.allclose(build(weights=str(path), centre_detection="symmetric").eval()(kspace, mask),
                              expected, atol=1e-5)


def test_weights_of_another_architecture_are_a_user_error(tmp_path):
    path = tmp_path / "other.pt"
    torch.save(build(cascades=3).state_dict(), path)
    with pytest.raises(UserError, match="model.weights=.*other.pt"):
        build(weights=str(path))
