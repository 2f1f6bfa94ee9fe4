"""Ensemble weights fitted on out-of-fold predictions (`podium ensemble RUNS --search oof`).

    from podium.toolkit.weights import search_log_loss, greedy_selection
    w = search_log_loss([p_a, p_b], labels)                            # class_probs (N, C) each
    w, trace = greedy_selection(3, lambda w: dice_of(w), mode="max")   # any metric

Two searches, chosen by the kind of prediction:
- class_probs: minimise the log-loss of the weighted mean of probabilities over the simplex
  (non-negative weights summing to 1) with scipy's SLSQP, from the equal weights and a few
  Dirichlet restarts. The log-loss of a mixture is smooth and convex in the weights and uses
  every sample's probability; macro-F1 is a step function of the weights that a search bends to
  a handful of borderline samples (overfits). The main metric is reported beside it.
- mask_probs, points, image, volume: greedy ensemble selection with replacement on the task's
  main metric (Caruana, Niculescu-Mizil, Crew & Ksikes, "Ensemble Selection from Libraries of
  Models", ICML 2004): start from the best member, repeatedly add the member (again, possibly)
  that scores best, keep the best prefix. It needs no gradient (Dice, MRE, SSIM are not smooth
  in the weights), and its weights are counts / steps, coarse by design, which limits overfitting.

Weights fitted on OOF predictions are then applied, unchanged, to the other splits: a test
split never takes part in the search.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from scipy.optimize import minimize

EPS = 1e-12


def true_class_probs(probs: list[np.ndarray], labels: np.ndarray) -> np.ndarray:
    """(N, M): each member's probability of the true class, all the log-loss of a mix needs."""
    labels = np.asarray(labels, dtype=np.int64)
    return np.stack([np.asarray(p, dtype=np.float64)[np.arange(len(labels)), labels] for p in probs], axis=1)


def log_loss(true_probs: np.ndarray, w: np.ndarray) -> float:
    """Mean negative log-likelihood of the weighted mean of the members' probabilities."""
    return float(-np.mean(np.log(np.clip(true_probs @ np.asarray(w, dtype=np.float64), EPS, None))))


def search_log_loss(probs: list[np.ndarray], labels: np.ndarray, restarts: int = 5, seed: int = 0) -> np.ndarray:
    """Non-negative weights summing to 1 minimising the log-loss of the weighted mean."""
    P = true_class_probs(probs, labels)
    m = P.shape[1]

    def loss(w):
        return log_loss(P, w)

    def grad(w):
        return -np.mean(P / np.clip(P @ w, EPS, None)[:, None], axis=0)

    rng = np.random.default_rng(seed)
    starts = [np.full(m, 1.0 / m), *rng.dirichlet(np.ones(m), size=restarts)]
    best_w, best = starts[0], loss(starts[0])
    for w0 in starts:
        res = minimize(loss, w0, jac=grad, method="SLSQP", bounds=[(0.0, 1.0)] * m,
                       constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: np.ones(m)}],
                       options={"maxiter": 200, "ftol": 1e-10})
        w = np.clip(res.x, 0.0, None)
        w = w / w.sum() if w.sum() > 0 else np.full(m, 1.0 / m)
        if loss(w) < best - 1e-12:
            best_w, best = w, loss(w)
    return best_w


def greedy_selection(n_members: int, score: Callable[[np.ndarray], float], mode: str = "max",
                     steps: int = 20) -> tuple[np.ndarray, list[float]]:
    """Caruana's selection with replacement: (weights = counts / their sum at the best step,
    the best score after each step). `score(weights)` scores the ensemble with those weights."""
    better = (lambda a, b: a > b) if mode == "max" else (lambda a, b: a < b)
    counts = np.zeros(n_members)
    best_counts, best_score, trace = None, None, []
    for _ in range(steps):
        step_best, step_member = None, None
        for m in range(n_members):
            trial = counts.copy()
            trial[m] += 1
            value = float(score(trial / trial.sum()))
            if step_best is None or better(value, step_best):
                step_best, step_member = value, m
        counts[step_member] += 1
        trace.append(step_best)
        if best_score is None or better(step_best, best_score):
            best_score, best_counts = step_best, counts.copy()
    return best_counts / best_counts.sum(), trace
