"""The coarse-to-fine model: shapes in training and inference, the patch targets line up with
the truth, and a refiner that finds its patch centre returns the crop centres exactly."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from podium.engine import registry
from podium.errors import UserError
from podium.tasks.landmarks.refine import CoarseToFineConfig


def tiny_cfg(**kw):
    cfg = OmegaConf.structured(CoarseToFineConfig())
    cfg.stage1.encoder = "resnet10t"
    cfg.refiner.patch_size = 16
    cfg.coarse_factor = 2
    for key, value in kw.items():
        OmegaConf.update(cfg, key, value)
    return cfg


def build(**kw):
    torch.manual_seed(0)
    return registry.build("model", "coarse_to_fine", tiny_cfg(**kw), num_landmarks=3, in_chans=1)


def test_training_outputs_carry_patch_targets():
    model = build(train_landmarks_per_image=2, train_jitter=3.0)
    x = torch.randn(2, 1, 64, 64)
    points = torch.tensor([[[10.0, 12.0], [30.0, 40.0], [50.0, 20.0]]] * 2)
    visible = torch.ones(2, 3, dtype=torch.bool)
    out = model(x, points, visible)
    assert out["heatmaps"].shape == (2, 3, 32, 32) and out["heatmap_stride"] == 2
    assert out["patch_heatmaps"].shape == (4, 1, 16, 16)
    assert out["patch_points"].shape == (4, 1, 2) and out["patch_visible"].shape == (4, 1)
    # the jitter keeps the truth inside its patch
    assert ((out["patch_points"] >= 0) & (out["patch_points"] <= 15)).all()
    sum(v.float().sum() for k, v in out.items() if k.endswith("heatmaps")).backward()


def test_training_crops_from_first_stage_estimates(monkeypatch):
    """train_from_estimates=1: every training crop is centred on the first stage's own estimate
    (+- estimate_jitter); a crop whose truth falls outside it is marked invisible for the loss."""
    model = build(train_landmarks_per_image=0, train_from_estimates=1.0, estimate_jitter=0.0)
    x = torch.randn(2, 1, 64, 64)
    points = torch.tensor([[[10.0, 12.0], [30.0, 36.0], [50.0, 20.0]]] * 2)
    visible = torch.ones(2, 3, dtype=torch.bool)
    # a first stage that always answers (31, 31): near landmark 1, far from 0 and 2
    estimate = torch.tensor([[[31.0, 31.0]] * 3] * 2)
    monkeypatch.setattr(model, "_decode_coarse", lambda coarse: estimate)
    out = model(x, points, visible)
    offsets = torch.floor(estimate + 0.5) - 8
    torch.testing.assert_close(out["patch_points"].reshape(2, 3, 2), points - offsets)
    assert out["patch_visible"].reshape(-1).tolist() == [False, True, False] * 2
    # the invisible crops contribute nothing: the refiner's loss equals the one on crops 1 and 4
    from podium.tasks.landmarks.losses import SpatialSoftmaxNLL

    nll = SpatialSoftmaxNLL(1)
    total = nll(out["patch_heatmaps"], out["patch_points"], out["patch_visible"])
    keep = torch.tensor([1, 4])
    alone = nll(out["patch_heatmaps"][keep], out["patch_points"][keep], out["patch_visible"][keep])
    torch.testing.assert_close(total, alone)


def test_train_from_estimates_is_a_share():
    with pytest.raises(UserError, match="train_from_estimates"):
        build(train_from_estimates=1.5)


def test_inference_maps_patch_peaks_back_to_input_pixels(monkeypatch):
    model = build().eval()
    x = torch.randn(1, 1, 64, 64)

    def peak_at_patch_centre(patches, landmark_index=None):
        heat = torch.full((patches.shape[0], 1, 16, 16), -30.0)
        heat[:, :, 8, 8] = 30.0
        return {"heatmaps": heat}

    monkeypatch.setattr(model.refiner, "forward", peak_at_patch_centre)
    with torch.no_grad():
        out = model(x)
    assert out["points"].shape == (1, 3, 2)
    # a refiner that answers "the centre" returns the rounded coarse estimates
    torch.testing.assert_close(out["points"], torch.floor(out["coarse_points"] + 0.5), atol=1e-4, rtol=0)


def test_gradient_checkpointing_switch_reaches_both_stages():
    model = build()
    model.set_grad_checkpointing(True)
    x = torch.randn(2, 1, 64, 64, requires_grad=True)  # 2 images: BatchNorm needs more than one value
    out = model(x, torch.full((2, 3, 2), 20.0), torch.ones(2, 3, dtype=torch.bool))
    out["heatmaps"].sum().backward()
    assert x.grad is not None


def test_patch_size_must_fit_the_refiner_depth():
    with pytest.raises(UserError, match="patch_size"):
        build(**{"refiner.patch_size": 20})


def test_shift_and_scale_tta_map_predictions_back():
    """A model that finds a bright dot exactly: every TTA view, mapped back, agrees with it."""
    from podium.tasks.landmarks.task import LandmarkTask

    class DotFinder(torch.nn.Module):
        def forward(self, x):  # intensity centroid of the image, as (1, 1, 2) points in its pixels
            h, w = x.shape[-2:]
            weights = x[:, 0].clamp(min=0)
            ys, xs = torch.meshgrid(torch.arange(h, dtype=x.dtype), torch.arange(w, dtype=x.dtype), indexing="ij")
            total = weights.sum((1, 2))
            return {"points": torch.stack([(weights * xs).sum((1, 2)) / total,
                                           (weights * ys).sum((1, 2)) / total], -1)[:, None]}

    cfg = OmegaConf.create({"task": {"decode": "local_soft_argmax", "decode_window": 11,
                                     "tta_shifts": [-2, 3], "tta_scales": [0.5, 2.0]}})
    task = LandmarkTask.__new__(LandmarkTask)
    task.cfg = cfg
    image = torch.zeros(1, 1, 32, 32)
    image[0, 0, 10:14, 18:22] = 1.0  # centroid (19.5, 11.5)
    points = task.predict_points(DotFinder(), image)
    torch.testing.assert_close(points, torch.tensor([[[19.5, 11.5]]]), atol=0.05, rtol=0)


def test_prior_prefers_the_peak_near_the_first_stage_estimate(monkeypatch):
    """Two equal peaks in a patch: the prior around the coarse estimate (patch centre) decides."""
    def two_peaks(patches, landmark_index=None):
        heat = torch.full((patches.shape[0], 1, 16, 16), -30.0)
        heat[:, :, 1, 1] = 30.0   # far from the centre, found first by argmax
        heat[:, :, 9, 9] = 30.0   # next to the centre (8, 8)
        return {"heatmaps": heat}

    x = torch.randn(1, 1, 64, 64)
    with_prior, without = build(prior_sigma=4.0).eval(), build(prior_sigma=0.0).eval()
    for model in (with_prior, without):
        monkeypatch.setattr(model.refiner, "forward", two_peaks)
    with torch.no_grad():
        near = with_prior(x)
        far = without(x)
    centre = torch.floor(near["coarse_points"] + 0.5)
    assert ((near["points"] - centre - 1).abs() < 0.6).all()  # the (9, 9) peak, one pixel off centre
    assert ((far["points"] - centre + 7).abs() < 0.6).all()  # argmax picked (1, 1) without the prior


def test_gpu_recipe_composes_and_trains_its_learnable_sigma():
    """experiment=isbi2015_full: coarse-to-fine with a learnable first-stage sigma that reaches
    the loss (and gets a gradient) through the two-stage model."""
    from podium.config import compose
    from podium.tasks.landmarks.losses import SpatialSoftmaxNLL

    cfg = compose(["experiment=isbi2015_full"])
    assert cfg.model.name == "coarse_to_fine" and cfg.model.stage1.learnable_sigma
    torch.manual_seed(0)
    model = registry.build("model", "coarse_to_fine", cfg.model, num_landmarks=3, in_chans=1)
    x = torch.randn(2, 1, 256, 192)
    points = torch.tensor([[[40.0, 60.0], [100.0, 120.0], [150.0, 200.0]]] * 2)
    out = model(x, points, torch.ones(2, 3, dtype=torch.bool))
    assert out["sigma"].shape == (3,) and out["patch_heatmaps"].shape[-1] == 96
    from podium.tasks.landmarks.heatmaps import points_to_heatmap

    target = points_to_heatmap(points, out["heatmap_stride"])
    SpatialSoftmaxNLL(3)(out["heatmaps"], target, torch.ones(2, 3, dtype=torch.bool), out["sigma"]).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.stage1.sigma.parameters())


# ---- the optional middle stage (model.mid_factor)

def build_mid(**kw):
    return build(coarse_factor=4, mid_factor=2, **{"mid.patch_size": 16}, **kw)


def _peak_at(row: int, col: int, size: int = 16):
    def refiner(patches, landmark_index=None):
        heat = torch.full((patches.shape[0], 1, size, size), -30.0)
        heat[:, :, row, col] = 30.0
        return {"heatmaps": heat}
    return refiner


def test_middle_stage_trains_on_its_own_scale():
    model = build_mid(train_landmarks_per_image=0, train_jitter=2.0)
    x = torch.randn(2, 1, 64, 64)
    points = torch.tensor([[[10.0, 12.0], [30.0, 40.0], [50.0, 20.0]]] * 2)
    out = model(x, points, torch.ones(2, 3, dtype=torch.bool))
    assert out["heatmaps"].shape == (2, 3, 16, 16) and out["heatmap_stride"] == 4
    assert out["mid_patch_heatmaps"].shape == (6, 1, 16, 16) and out["patch_heatmaps"].shape == (6, 1, 16, 16)
    # targets in the half-size image's pixels (pixel-centre convention), inside the crop
    local = out["mid_patch_points"].reshape(2, 3, 2)
    assert ((local >= 0) & (local <= 15)).all() and out["mid_patch_visible"].all()
    offsets = (points + 0.5) / 2 - 0.5 - local
    torch.testing.assert_close(offsets, torch.round(offsets))  # whole pixels of the small image
    sum(v.float().sum() for k, v in out.items() if k.endswith("heatmaps")).backward()
    assert all(p.grad is not None for p in model.mid.parameters() if p.requires_grad)


def test_refiner_crops_start_from_the_middle_stage(monkeypatch):
    """train_from_estimates=1, no jitter: the middle stage's crops sit on the first-stage
    estimates and the refiner's on the middle stage's decoded answers."""
    model = build_mid(train_landmarks_per_image=0, train_from_estimates=1.0, estimate_jitter=0.0, mid_prior_sigma=0.0)
    x = torch.randn(2, 1, 64, 64)
    points = torch.tensor([[[10.0, 12.0], [30.0, 36.0], [50.0, 20.0]]] * 2)
    monkeypatch.setattr(model, "_decode_coarse", lambda coarse: torch.full((2, 3, 2), 31.0))
    monkeypatch.setattr(model.mid, "forward", _peak_at(10, 12))  # answers patch pixel (x 12, y 10)
    out = model(x, points, torch.ones(2, 3, dtype=torch.bool))
    # middle crop centre: input 31 -> small (31.5 / 2 - 0.5) = 15.25 -> pixel 15, offset 15 - 8 = 7
    torch.testing.assert_close(out["mid_patch_points"].reshape(2, 3, 2), (points + 0.5) / 2 - 0.5 - 7)
    # its answer: small (7 + 12, 7 + 10) = (19, 17) -> input (19.5 * 2 - 0.5, 17.5 * 2 - 0.5)
    answer = torch.tensor([38.5, 34.5])
    offsets = torch.floor(answer + 0.5) - 8
    torch.testing.assert_close(out["patch_points"].reshape(2, 3, 2), points - offsets)


def test_inference_goes_through_the_middle_stage(monkeypatch):
    model = build_mid().eval()
    monkeypatch.setattr(model, "_decode_coarse", lambda coarse: torch.full((1, 3, 2), 31.0))
    monkeypatch.setattr(model.mid, "forward", _peak_at(10, 12))
    monkeypatch.setattr(model.refiner, "forward", _peak_at(8, 8))  # "the centre is right"
    with torch.no_grad():
        out = model(torch.randn(1, 1, 64, 64))
    # the middle stage moves (31, 31) to (38.5, 34.5) (the prior around its centre is too wide to
    # matter against a peak of 60 logits); the refiner keeps its crop centre, the rounded answer
    torch.testing.assert_close(out["mid_points"], torch.tensor([[[38.5, 34.5]] * 3]), atol=1e-3, rtol=0)
    torch.testing.assert_close(out["points"], torch.tensor([[[39.0, 35.0]] * 3]), atol=1e-3, rtol=0)


def test_middle_stage_factor_and_patch_are_checked():
    with pytest.raises(UserError, match="model.mid_factor=4: expected 0"):
        build(coarse_factor=4, mid_factor=4)
    with pytest.raises(UserError, match="model.mid.patch_size=20"):
        build(coarse_factor=4, mid_factor=2, **{"mid.patch_size": 20})


def test_task_adds_the_middle_stage_loss():
    from types import SimpleNamespace

    from podium.tasks.landmarks.losses import SpatialSoftmaxNLL
    from podium.tasks.landmarks.task import LandmarkTask

    task = LandmarkTask.__new__(LandmarkTask)
    task.cfg = OmegaConf.create({"task": {"sigma": 2.0, "refine_loss_weight": 1.0}})
    task.loss_fn, task.patch_loss_fn = SpatialSoftmaxNLL(3), SpatialSoftmaxNLL(1)
    model = build_mid(train_landmarks_per_image=0, train_jitter=2.0)
    batch = {"image": torch.randn(2, 1, 64, 64), "visible": torch.ones(2, 3, dtype=torch.bool),
             "points": torch.tensor([[[10.0, 12.0], [30.0, 40.0], [50.0, 20.0]]] * 2)}
    torch.manual_seed(1)
    logs = task.training_step(model, batch, SimpleNamespace())
    assert {"coarse_loss", "refine_loss", "mid_refine_loss"} <= set(logs)
    torch.testing.assert_close(logs["loss"].detach(), logs["coarse_loss"] + logs["refine_loss"] + logs["mid_refine_loss"])
