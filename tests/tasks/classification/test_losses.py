"""Classification losses against values computed by hand on tiny examples.

The expected values are written out step by step with plain math / numpy, independently of the
torch code under test, on 2-3 samples and 3 classes.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from podium.engine import registry
from podium.errors import UserError
from podium.tasks.classification import losses

# Three samples, three classes.
LOGITS = [
    [2.0, 1.0, 0.1],
    [0.5, 2.5, -1.0],
    [0.0, 0.3, 1.2],
]
TARGET = [0, 2, 2]


def make_loss(name: str, *, num_classes: int = 3, class_counts=None, **fields):
    """Build a loss the way the engine does: a structured config validated by its schema."""
    entry = registry._REGISTRY["loss"][name]  # direct look-up: no import of the other families
    cfg = OmegaConf.structured(entry.schema(**fields))
    return entry.factory(cfg, num_classes=num_classes, class_counts=class_counts)


def run(loss, logits=LOGITS, target=TARGET) -> float:
    return loss(torch.tensor(logits, dtype=torch.float32), torch.tensor(target)).item()


def log_softmax_row(row):
    """log p_c = x_c - log(sum_k exp(x_k)), by hand."""
    log_z = math.log(sum(math.exp(x) for x in row))
    return [x - log_z for x in row]


# --------------------------------------------------------------------------------------------
# Registration and schemas
# --------------------------------------------------------------------------------------------


def test_all_losses_registered_with_schema():
    for name in ("cross_entropy", "weighted_ce", "focal", "asymmetric"):
        entry = registry._REGISTRY["loss"][name]
        assert entry.schema is not None
        defaults = entry.schema()
        assert defaults.name == name
        assert defaults.ignore_index == -100


def test_schema_defaults():
    assert losses.FocalConfig().gamma == 2.0 and losses.FocalConfig().alpha is None
    asl = losses.AsymmetricConfig()
    assert (asl.gamma_pos, asl.gamma_neg, asl.eps) == (0.0, 4.0, 0.1)
    assert losses.WeightedCEConfig().weighting == "inverse"
    assert losses.CrossEntropyConfig().label_smoothing == 0.0


# --------------------------------------------------------------------------------------------
# cross_entropy
# --------------------------------------------------------------------------------------------


def test_cross_entropy_hand_value():
    # Sample 0: logits [2, 1, 0.1], target 0.
    #   Z = e^2 + e^1 + e^0.1 = 7.389056 + 2.718282 + 1.105171 = 11.212509
    #   -log p_0 = log Z - 2 = 2.417030 - 2 = 0.417030
    z0 = math.exp(2.0) + math.exp(1.0) + math.exp(0.1)
    nll0 = math.log(z0) - 2.0
    assert nll0 == pytest.approx(0.417030, abs=1e-6)
    # Sample 1: logits [0.5, 2.5, -1], target 2: -log p_2 = log Z + 1.
    nll1 = math.log(math.exp(0.5) + math.exp(2.5) + math.exp(-1.0)) + 1.0
    # Sample 2: logits [0, 0.3, 1.2], target 2: -log p_2 = log Z - 1.2.
    nll2 = math.log(math.exp(0.0) + math.exp(0.3) + math.exp(1.2)) - 1.2
    expected = (nll0 + nll1 + nll2) / 3
    assert run(make_loss("cross_entropy")) == pytest.approx(expected, rel=1e-6)


def test_cross_entropy_label_smoothing_hand_value():
    # PyTorch's convention: smoothed target = (1 - eps) * one_hot + eps / C, so
    # loss_i = (1 - eps) * (-log p_t) + (eps / C) * sum_c (-log p_c).
    eps, num_classes = 0.2, 3
    expected = 0.0
    for row, t in zip(LOGITS, TARGET):
        log_p = log_softmax_row(row)
        expected += (1 - eps) * -log_p[t] + eps / num_classes * sum(-lp for lp in log_p)
    expected /= len(TARGET)
    assert run(make_loss("cross_entropy", label_smoothing=eps)) == pytest.approx(expected, rel=1e-6)


# --------------------------------------------------------------------------------------------
# weighted_ce
# --------------------------------------------------------------------------------------------


def test_inverse_weights_hand_value():
    # N = 10, C = 3: w_c = N / (C * count_c) = 10/18, 10/9, 10/3.
    w = losses.class_weights([6, 3, 1], "inverse")
    np.testing.assert_allclose(w.numpy(), [10 / 18, 10 / 9, 10 / 3], rtol=1e-6)
    # scikit-learn's "balanced" heuristic: the average weight over the samples is 1.
    assert (w.numpy() * np.array([6, 3, 1])).sum() / 10 == pytest.approx(1.0)


def test_effective_weights_hand_value():
    beta = 0.999
    counts = [100, 10, 1]
    # Effective number E_c = (1 - beta^n_c) / (1 - beta); weight 1 / E_c, rescaled to sum C.
    effective = [(1 - beta**n) / (1 - beta) for n in counts]
    assert effective[2] == pytest.approx(1.0)  # one sample is one effective sample
    raw = [1 / e for e in effective]
    expected = [3 * r / sum(raw) for r in raw]
    w = losses.class_weights(counts, "effective", beta)
    np.testing.assert_allclose(w.numpy(), expected, rtol=1e-6)
    assert w.mean().item() == pytest.approx(1.0)


@pytest.mark.parametrize("weighting", ["inverse", "effective"])
def test_zero_count_class_gets_the_largest_finite_weight(weighting):
    w = losses.class_weights([4, 0, 1], weighting)
    assert torch.isfinite(w).all()
    assert w[1] == pytest.approx(w.max().item())
    assert w[1] == pytest.approx(w[2].item())  # as rare as the rarest seen class
    loss = make_loss(
        "weighted_ce", class_counts=[4, 0, 1], weighting=weighting, label_smoothing=0.1
    )
    assert math.isfinite(run(loss))


def test_weighted_ce_hand_value():
    # counts [6, 3, 1] -> inverse weights w = [10/18, 10/9, 10/3].
    # PyTorch's weighted mean: sum_i w[y_i] * nll_i / sum_i w[y_i].
    w = [10 / 18, 10 / 9, 10 / 3]
    nll = [-log_softmax_row(row)[t] for row, t in zip(LOGITS, TARGET)]
    expected = sum(w[t] * n for t, n in zip(TARGET, nll)) / sum(w[t] for t in TARGET)
    loss = make_loss("weighted_ce", class_counts=[6, 3, 1])
    assert run(loss) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("weighting", ["inverse", "effective"])
def test_weighted_ce_matches_torch_with_smoothing(weighting):
    torch.manual_seed(0)
    logits, target = torch.randn(16, 3), torch.randint(0, 3, (16,))
    counts = [50, 20, 5]
    loss = make_loss("weighted_ce", class_counts=counts, weighting=weighting, label_smoothing=0.1)
    w = losses.class_weights(counts, weighting)
    expected = F.cross_entropy(logits, target, weight=w, label_smoothing=0.1)
    assert loss(logits, target).item() == pytest.approx(expected.item(), rel=1e-5)


def test_weighted_ce_without_counts_is_a_user_error():
    with pytest.raises(UserError, match="training labels"):
        make_loss("weighted_ce", class_counts=None)


def test_weighted_ce_bad_inputs():
    with pytest.raises(UserError, match="3 classes"):
        make_loss("weighted_ce", class_counts=[1, 2])
    with pytest.raises(UserError, match="weighting"):
        make_loss("weighted_ce", class_counts=[1, 2, 3], weighting="sqrt")
    with pytest.raises(UserError, match=">= 0"):
        losses.class_weights([1, -2, 3])
    with pytest.raises(UserError, match="empty"):
        losses.class_weights([0, 0, 0])


# --------------------------------------------------------------------------------------------
# focal
# --------------------------------------------------------------------------------------------


def test_focal_hand_value():
    # FL_i = -alpha[y_i] * (1 - p_t)^gamma * log p_t, mean over samples.
    gamma, alpha = 2.0, [0.25, 0.5, 0.25]
    # Sample 0 spelled out: p_0 = e^2 / Z = 7.389056 / 11.212509 = 0.659001
    p0 = math.exp(2.0) / (math.exp(2.0) + math.exp(1.0) + math.exp(0.1))
    assert p0 == pytest.approx(0.659001, abs=1e-6)
    fl0 = -0.25 * (1 - p0) ** 2 * math.log(p0)  # = 0.25 * 0.116280 * 0.417030 = 0.012123
    assert fl0 == pytest.approx(0.012123, abs=1e-6)
    terms = []
    for row, t in zip(LOGITS, TARGET):
        p_t = math.exp(log_softmax_row(row)[t])
        terms.append(-alpha[t] * (1 - p_t) ** gamma * math.log(p_t))
    assert terms[0] == pytest.approx(fl0)
    expected = sum(terms) / 3
    assert run(make_loss("focal", gamma=gamma, alpha=alpha)) == pytest.approx(expected, rel=1e-5)


def test_focal_without_alpha_hand_value():
    terms = []
    for row, t in zip(LOGITS, TARGET):
        p_t = math.exp(log_softmax_row(row)[t])
        terms.append(-((1 - p_t) ** 2) * math.log(p_t))
    assert run(make_loss("focal")) == pytest.approx(sum(terms) / 3, rel=1e-5)


def test_focal_gamma_zero_is_cross_entropy():
    torch.manual_seed(1)
    logits, target = torch.randn(32, 5) * 3, torch.randint(0, 5, (32,))
    focal = make_loss("focal", num_classes=5, gamma=0.0)
    assert focal(logits, target).item() == pytest.approx(
        F.cross_entropy(logits, target).item(), rel=1e-6
    )


def test_focal_down_weights_easy_examples():
    ce = make_loss("cross_entropy")
    focal = make_loss("focal", gamma=2.0)
    assert 0 < run(focal) < run(ce)


def test_focal_invalid_args():
    with pytest.raises(UserError, match="gamma"):
        make_loss("focal", gamma=-1.0)
    with pytest.raises(UserError, match="one weight per class"):
        make_loss("focal", alpha=[0.5, 0.5])
    with pytest.raises(UserError, match="alpha"):
        make_loss("focal", alpha=[0.5, -0.5, 0.5])


# --------------------------------------------------------------------------------------------
# asymmetric
# --------------------------------------------------------------------------------------------


def asl_by_hand(logits, target, gamma_pos, gamma_neg, eps):
    """ASLSingleLabel with numpy: weight (1-p)^gamma_pos on the target, p^gamma_neg elsewhere."""
    logits = np.asarray(logits, dtype=np.float64)
    num_classes = logits.shape[1]
    total = 0.0
    for row, t in zip(logits, target):
        log_p = row - np.log(np.exp(row).sum())
        p = np.exp(log_p)
        one_hot = np.eye(num_classes)[t]
        weight = np.where(one_hot == 1, (1 - p) ** gamma_pos, p**gamma_neg)
        smoothed = (1 - eps) * one_hot + eps / num_classes
        total += -(smoothed * weight * log_p).sum()
    return total / len(target)


def test_asymmetric_hand_value_sample_spelled_out():
    # Sample 0 alone, defaults gamma_pos=0, gamma_neg=4, eps=0.1, C=3:
    #   p = [0.659001, 0.242433, 0.098566]
    #   smoothed targets = [0.9 + 0.1/3, 0.1/3, 0.1/3] = [0.933333, 0.033333, 0.033333]
    #   weights = [(1-p0)^0, p1^4, p2^4] = [1, 0.003454, 0.0000944]
    #   loss = -(0.933333*1*log p0 + 0.033333*p1^4*log p1 + 0.033333*p2^4*log p2)
    z = math.exp(2.0) + math.exp(1.0) + math.exp(0.1)
    p = [math.exp(2.0) / z, math.exp(1.0) / z, math.exp(0.1) / z]
    expected = -(
        (0.9 + 0.1 / 3) * 1.0 * math.log(p[0])
        + (0.1 / 3) * p[1] ** 4 * math.log(p[1])
        + (0.1 / 3) * p[2] ** 4 * math.log(p[2])
    )
    loss = make_loss("asymmetric")
    assert run(loss, [LOGITS[0]], [0]) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    "gamma_pos,gamma_neg,eps", [(0.0, 4.0, 0.1), (1.0, 2.0, 0.2), (0.5, 3.0, 0.0)]
)
def test_asymmetric_hand_value(gamma_pos, gamma_neg, eps):
    loss = make_loss("asymmetric", gamma_pos=gamma_pos, gamma_neg=gamma_neg, eps=eps)
    expected = asl_by_hand(LOGITS, TARGET, gamma_pos, gamma_neg, eps)
    assert run(loss) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_asymmetric_without_focusing_is_smoothed_cross_entropy(eps):
    # Both conventions give eps / C to every class, the target included.
    torch.manual_seed(2)
    logits, target = torch.randn(32, 4) * 2, torch.randint(0, 4, (32,))
    asl = make_loss("asymmetric", num_classes=4, gamma_pos=0.0, gamma_neg=0.0, eps=eps)
    expected = F.cross_entropy(logits, target, label_smoothing=eps)
    assert asl(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)


def test_asymmetric_invalid_args():
    with pytest.raises(UserError, match="gamma_neg"):
        make_loss("asymmetric", gamma_neg=-1.0)
    with pytest.raises(UserError, match="gamma_pos"):
        make_loss("asymmetric", gamma_pos=-0.5)
    with pytest.raises(UserError, match="eps"):
        make_loss("asymmetric", eps=1.5)


def test_cross_entropy_invalid_smoothing():
    with pytest.raises(UserError, match="label_smoothing"):
        make_loss("cross_entropy", label_smoothing=-0.1)


# --------------------------------------------------------------------------------------------
# Shared behaviour: ignore_index, gradients, shapes
# --------------------------------------------------------------------------------------------

ALL_LOSSES = [
    ("cross_entropy", {"label_smoothing": 0.1}),
    ("weighted_ce", {"label_smoothing": 0.1}),
    ("focal", {"alpha": [0.2, 0.3, 0.5]}),
    ("asymmetric", {}),
]
COUNTS = [6, 3, 1]


@pytest.mark.parametrize("name,fields", ALL_LOSSES)
@pytest.mark.parametrize("ignore_index", [-100, 255])
def test_ignored_targets_do_not_count(name, fields, ignore_index):
    loss = make_loss(name, class_counts=COUNTS, ignore_index=ignore_index, **fields)
    # Samples 1 and 3 are ignored: the loss equals the loss on samples 0 and 2 alone.
    logits = LOGITS + [[3.0, -2.0, 0.0]]
    with_ignored = run(loss, logits, [0, ignore_index, 2, ignore_index])
    only_valid = run(loss, [logits[0], logits[2]], [0, 2])
    assert with_ignored == pytest.approx(only_valid, rel=1e-6)


@pytest.mark.parametrize("name,fields", ALL_LOSSES)
def test_all_ignored_batch_gives_zero_not_nan(name, fields):
    loss = make_loss(name, class_counts=COUNTS, **fields)
    logits = torch.tensor(LOGITS, requires_grad=True)
    value = loss(logits, torch.full((3,), -100))
    value.backward()
    assert value.item() == 0.0
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize(
    "name,fields",
    ALL_LOSSES
    + [
        ("focal", {"gamma": 0.5}),  # fractional gamma: (1 - p)^0.5 has infinite slope at p = 1
        ("asymmetric", {"gamma_pos": 0.5, "gamma_neg": 0.5}),
        ("weighted_ce", {"weighting": "effective"}),
    ],
)
def test_gradients_are_finite_even_for_saturated_logits(name, fields):
    loss = make_loss(name, class_counts=COUNTS, **fields)
    # Row 0 is certain and right (p_t rounds to 1), row 1 certain and wrong, row 2 moderate.
    logits = torch.tensor(
        [[200.0, -200.0, 0.0], [-150.0, 150.0, 0.0], [0.1, 0.2, 0.3]], requires_grad=True
    )
    value = loss(logits, torch.tensor([0, 2, 1]))
    value.backward()
    assert torch.isfinite(value)
    assert torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0


@pytest.mark.parametrize("name,fields", ALL_LOSSES)
def test_output_is_scalar_and_shapes_checked(name, fields):
    loss = make_loss(name, class_counts=COUNTS, **fields)
    out = loss(torch.randn(5, 3), torch.randint(0, 3, (5,)))
    assert out.ndim == 0
    with pytest.raises(ValueError, match="shape"):
        loss(torch.randn(5, 4), torch.randint(0, 3, (5,)))
