"""Calibration: fitting the temperature, and the expected calibration error. Applying it is
the inference core's `apply_temperature`, the function serving uses."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import logit

from bonefrac.evaluate.metrics import _two_classes
from bonefrac.inference import apply_temperature as apply_temperature  # as served: one definition

_EPS = 1e-7  # keeps logit() finite for probabilities saturated at 0 or 1


def _logits(probs: Sequence[float]) -> np.ndarray:
    return logit(np.clip(np.asarray(probs, dtype=float), _EPS, 1 - _EPS))


def fit_temperature(
    probs: Sequence[float], labels: Sequence[int], bounds: tuple[float, float] = (0.05, 20.0)
) -> float:
    """Temperature T minimising the NLL of sigmoid(logit(p) / T); T > 1 softens over-confident
    outputs. Returns 1.0 (no change) when labels hold a single class."""
    logits = _logits(probs)
    labels = np.asarray(labels, dtype=float)
    if not _two_classes(labels):
        return 1.0

    def nll(log_temperature: float) -> float:
        z = logits / np.exp(log_temperature)
        return float(np.mean(np.logaddexp(0.0, z) - labels * z))  # -log likelihood, stable

    result = minimize_scalar(nll, bounds=np.log(bounds), method="bounded")
    return float(np.exp(result.x))


def expected_calibration_error(
    labels: Sequence[int], probs: Sequence[float], n_bins: int = 10
) -> float:
    """Share-weighted |observed abnormal rate - mean probability| over equal-width bins
    (the bins of sklearn's calibration_curve, so the number matches the reliability plot)."""
    labels = np.asarray(labels, dtype=float)
    probs = np.asarray(probs, dtype=float)
    if len(probs) == 0:
        raise ValueError("expected_calibration_error needs at least one prediction")
    bins = np.searchsorted(np.linspace(0.0, 1.0, n_bins + 1)[1:-1], probs)
    prob_sum = np.bincount(bins, weights=probs, minlength=n_bins)
    label_sum = np.bincount(bins, weights=labels, minlength=n_bins)
    # sum_b (n_b/N) * |label_sum_b/n_b - prob_sum_b/n_b| = sum_b |label_sum_b - prob_sum_b| / N
    return float(np.abs(label_sum - prob_sum).sum() / len(probs))
