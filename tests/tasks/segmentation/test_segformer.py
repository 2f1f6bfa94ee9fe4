"""SegFormer (smp MiT encoders): shapes at the input size, gradients, gradient checkpointing,
local encoder weights, the encoder / rest parameter split of both segmentation models, the
licence in `podium list models`, and a one-step training run."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf
from typer.testing import CliRunner

from podium.cli import app
from podium.engine import registry
from podium.errors import UserError
from podium.tasks.segmentation.models import SegFormerConfig, SegUNetConfig


def _segformer(**kw):
    cfg = OmegaConf.merge(OmegaConf.structured(SegFormerConfig), {"decoder_channels": 32, **kw})
    return registry.build("model", "segformer", cfg, num_classes=11, in_chans=3)


def _unet():
    cfg = OmegaConf.merge(OmegaConf.structured(SegUNetConfig), {"encoder": "resnet10t", "recon_head": True,
                                                                "decoder_channels": [32, 16, 16, 8, 8]})
    return registry.build("model", "seg_unet", cfg, num_classes=3, in_chans=3)


def test_logits_at_the_input_size_and_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = _segformer(encoder="mit_b0")
    x = torch.randn(2, 3, 64, 96)
    logits = model(x)["logits"]
    assert logits.shape == (2, 11, 64, 96) and model.divisor == 32
    logits.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    encoder, rest = model.param_groups_split()
    assert any(p.grad.abs().sum() > 0 for p in encoder) and any(p.grad.abs().sum() > 0 for p in rest)


def test_input_not_divisible_is_refused():
    with pytest.raises(ValueError, match="divisible by 32"):
        _segformer()(torch.randn(1, 3, 48, 64))


def test_grad_checkpointing_recomputes_blocks_and_changes_nothing():
    model = _segformer().train()
    x = torch.randn(1, 3, 64, 64)
    calls = []
    model.net.encoder.block1[0].register_forward_pre_hook(lambda *_: calls.append(1))

    def grads(enable):
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        calls.clear()
        torch.manual_seed(0)  # the same stochastic-depth draws in both passes
        out = model(x)["logits"]
        out.sum().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()], len(calls)

    plain, plain_grads, plain_calls = grads(False)
    ckpt, ckpt_grads, ckpt_calls = grads(True)
    assert (plain_calls, ckpt_calls) == (1, 2)  # the block ran again in the backward pass
    torch.testing.assert_close(ckpt, plain)
    for a, b in zip(ckpt_grads, plain_grads):
        torch.testing.assert_close(a, b)


def test_local_encoder_weights_load(tmp_path):
    source = _segformer()
    path = tmp_path / "mit_b0.pt"
    torch.save(source.net.encoder.state_dict(), path)
    loaded = _segformer(encoder_weights=str(path))
    for key, value in source.net.encoder.state_dict().items():
        torch.testing.assert_close(loaded.net.encoder.state_dict()[key], value, msg=key)
    torch.save(source.state_dict(), tmp_path / "whole.pt")  # a whole podium SegFormer: "net.encoder." keys
    from_whole = _segformer(encoder_weights=str(tmp_path / "whole.pt"))
    torch.testing.assert_close(from_whole.net.encoder.state_dict(), source.net.encoder.state_dict())
    torch.save({"something.else": torch.zeros(3)}, tmp_path / "foreign.pt")
    with pytest.raises(UserError, match="model.encoder_weights=.*no tensor matches"):
        _segformer(encoder_weights=str(tmp_path / "foreign.pt"))


@pytest.mark.parametrize("overrides,expected", [({"encoder": "resnet18"}, "mit_b0, mit_b1"),
                                                ({"decoder_channels": 0}, "model.decoder_channels"),
                                                ({"drop_path_rate": 1.5}, "model.drop_path_rate")])
def test_bad_config_names_the_key(overrides, expected):
    with pytest.raises(UserError, match=expected):
        _segformer(**overrides)


@pytest.mark.parametrize("build,encoder_of", [(_segformer, lambda m: m.net.encoder),
                                              (_unet, lambda m: m.unet.encoder)])
def test_param_groups_split_covers_every_parameter_once(build, encoder_of):
    model = build()
    encoder, rest = model.param_groups_split()
    ids = [id(p) for p in encoder + rest]
    assert len(ids) == len(set(ids))  # nothing twice
    assert set(ids) == {id(p) for p in model.parameters()}  # nothing left out
    assert {id(p) for p in encoder} == {id(p) for p in encoder_of(model).parameters()}
    assert rest  # decoder and head


def test_list_models_shows_the_licence():
    result = CliRunner().invoke(app, ["list", "models", "seg*"], terminal_width=200)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "segformer" in text and "non-commercial" in text and "NVIDIA Source Code License" in text


def test_one_training_step(segformer_run):
    config = OmegaConf.load(segformer_run / "config.yaml")
    assert config.model.name == "segformer" and config.model.encoder == "mit_b0"
    metrics = json.loads((segformer_run / "metrics.json").read_text())
    assert 0.0 <= metrics["test/dice"] <= 1.0 and 0.0 <= metrics["val/auc_roc"] <= 1.0
    assert (segformer_run / "checkpoints" / "best.pt").is_file()
