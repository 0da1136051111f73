"""Point metrics on prediction frames: study aggregation, binary metrics at a threshold, the
operating threshold and findings, and the body-part (multiclass) metrics.

The MURA protocol: a study's probability is the mean of its images' probabilities, and every
metric is JSON-ready (numpy scalars become Python, NaN becomes None).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    classification_report,
    cohen_kappa_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

from bonefrac.errors import DataError

# Findings are the inference core's, re-exported: one definition, the one the service uses.
from bonefrac.inference import FRACTURE, NO_FRACTURE, UNCERTAIN, finding, findings  # noqa: F401

# fmt: off
CI_METRICS = ("accuracy", "precision", "recall", "sensitivity", "specificity", "f1", "kappa",
              "auroc", "auprc")
# fmt: on
STUDY_COLUMNS = ("study_path", "patient_id", "body_part", "split")  # carried when present


def _clean(value: Any) -> Any:
    """numpy scalars -> Python, NaN -> None: metrics must be JSON for metrics.json / MLflow."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _two_classes(labels: np.ndarray) -> bool:
    return len(np.unique(labels)) == 2


# --- study aggregation and point metrics ---------------------------------------------------


def study_level(frame: pd.DataFrame, prob_col: str = "prob") -> pd.DataFrame:
    """One row per study_id (first-seen order): label, mean image probability, n_images and the
    study's path, patient, body part and split where the frame has them."""
    missing = [c for c in ("study_id", "label", prob_col) if c not in frame.columns]
    if missing:
        raise DataError(f"prediction frame lacks column(s) {missing}: add them before evaluating")
    mixed = frame.groupby("study_id", sort=False)["label"].nunique().gt(1)
    if mixed.any():
        raise DataError(f"study {mixed.idxmax()!r} has images with different labels")
    carried = {c: (c, "first") for c in STUDY_COLUMNS if c in frame.columns}
    studies = frame.groupby("study_id", sort=False).agg(
        **carried,
        label=("label", "first"),
        prob=(prob_col, "mean"),
        n_images=(prob_col, "size"),
    )
    return studies.reset_index()


def binary_metrics(labels: Sequence[int], probs: Sequence[float], threshold: float) -> dict:
    """Threshold metrics (prob >= threshold is abnormal) plus AUROC/AUPRC, JSON-ready.

    A metric that is undefined on this data (AUROC with one class, precision with no positive
    prediction) is None rather than an error, so a tiny or one-sided split still reports.
    """
    labels = np.asarray(labels, dtype=int)
    probs = np.asarray(probs, dtype=float)
    out: dict[str, Any] = {"n": len(labels), "n_positive": int(labels.sum())}
    if len(labels) == 0:
        return out | dict.fromkeys((*CI_METRICS, "tp", "fp", "tn", "fn"))
    predictions = (probs >= threshold).astype(int)
    tn, fp, fn, tp = confusion_matrix(labels, predictions, labels=[0, 1]).ravel()
    both = _two_classes(labels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # kappa 0/0 on one-class data -> NaN
        out |= {
            "accuracy": accuracy_score(labels, predictions),
            "precision": precision_score(labels, predictions, zero_division=np.nan),
            "recall": recall_score(labels, predictions, zero_division=np.nan),
            "specificity": recall_score(labels, predictions, pos_label=0, zero_division=np.nan),
            "f1": f1_score(labels, predictions, zero_division=np.nan),
            "kappa": cohen_kappa_score(labels, predictions),
            "auroc": roc_auc_score(labels, probs) if both else None,
            "auprc": average_precision_score(labels, probs) if both else None,
            "tp": tp,
            "fp": fp,
            "tn": tn,
            "fn": fn,
        }
    out["sensitivity"] = out["recall"]
    return {key: _clean(value) for key, value in out.items()}


# --- threshold and findings ------------------------------------------------------------------


def choose_threshold(
    labels: Sequence[int],
    probs: Sequence[float],
    method: Literal["youden", "sensitivity"] = "youden",
    target_sensitivity: float = 0.9,
) -> float:
    """Operating point from the ROC curve: 'youden' maximises tpr - fpr, 'sensitivity' is the
    highest ROC cut whose sensitivity reaches the target. 0.5 if labels hold one class.

    The ROC curve cuts at a val score; the threshold returned lies midway between that score and
    the next lower distinct one (or half-way to 0 below the lowest). The same val studies are
    called abnormal, but no val study sits exactly on the threshold, so a score that differs in
    the seventh decimal (another runtime, another summation order) cannot cross it unless two
    val scores are that close: the int8 gate once failed an exact fp32 copy of a model because
    the threshold was a val score. Always strictly inside (0, 1): a cut at a saturated score
    (1.0) or above every score moves below 1 the same way. Whether the point is usable on val
    is `operating_point_problem`'s question."""
    labels = np.asarray(labels, dtype=int)
    probs = np.asarray(probs, dtype=float)
    if not _two_classes(labels):
        warnings.warn("threshold needs both classes; using 0.5", stacklevel=2)
        return 0.5
    fpr, tpr, thresholds = roc_curve(labels, probs, drop_intermediate=False)  # every cut
    if method == "youden":
        best = int(np.argmax(tpr - fpr))
    elif method == "sensitivity":
        best = int(np.argmax(tpr >= target_sensitivity))  # thresholds fall as tpr rises
    else:
        raise ValueError(f"threshold method must be 'youden' or 'sensitivity', not {method!r}")
    cut = min(float(thresholds[best]), 1.0)  # thresholds[0] is inf: "nothing positive"
    scores = np.unique(np.clip(probs, 0.0, 1.0))
    if cut <= 0.0:  # cut at 0: everything positive
        above = scores[scores > 0.0]
        return float(above.min() / 2) if above.size else 0.5
    below = scores[scores < cut]
    low = below.max() if below.size else 0.0
    middle = (cut + low) / 2
    # two scores one float step apart have no number between them: keep the cut itself
    return float(middle if low < middle < cut else cut)


def operating_point_problem(labels: Sequence[int], probs: Sequence[float], threshold: float):
    """Why a threshold is unusable on the studies it was fitted on, or None when usable:
    it must lie strictly inside (0, 1), val must hold both classes, and both findings must be
    reached on val (a model that calls every study the same cannot be operated)."""
    labels = np.asarray(labels, dtype=int)
    probs = np.asarray(probs, dtype=float)
    if not (math.isfinite(threshold) and 0.0 < threshold < 1.0):
        return f"threshold {threshold} is not strictly between 0 and 1"
    if not _two_classes(labels):
        return "val holds one class only, so no operating point could be fitted"
    positive = probs >= threshold
    if positive.all() or not positive.any():
        called = "abnormal" if positive.all() else "normal"
        return f"at threshold {threshold:.3g} every val study is called {called}"
    return None


def negative_cutoff(
    labels: Sequence[int], probs: Sequence[float], threshold: float, target_sensitivity: float
) -> float:
    """The probability below which a negative counts as a confident one, fitted on val studies.

    The highest ROC cut (placed between val scores, as `choose_threshold` places it) whose
    sensitivity (abnormal studies at or above it) still reaches the target: a "no abnormality"
    below it is one the model rarely gets wrong for abnormal studies (prevalence-independent,
    unlike the NPV). Never above the decision threshold. With no
    abnormal val study the sensitivity cannot be measured: 0.0, so no negative is confident."""
    labels = np.asarray(labels, dtype=int)
    probs = np.asarray(probs, dtype=float)
    if not labels.any() or not _two_classes(labels):
        return 0.0
    cut = choose_threshold(labels, probs, "sensitivity", target_sensitivity)
    return float(min(cut, threshold))


def sensitivity_interval(
    labels: Sequence[int], probs: Sequence[float], cut: float, confidence: float = 0.95
) -> dict:
    """Sensitivity of `prob >= cut` with its Wilson score interval (scipy), JSON-ready:
    {value, ci: [low, high], detected, n_positive}; value and ci are None with no positives."""
    from scipy.stats import binomtest

    labels = np.asarray(labels, dtype=int)
    positive = labels == 1
    n = int(positive.sum())
    detected = int((np.asarray(probs, dtype=float)[positive] >= cut).sum())
    if n == 0:
        return {"value": None, "ci": None, "detected": 0, "n_positive": 0}
    ci = binomtest(detected, n).proportion_ci(confidence_level=confidence, method="wilson")
    return {
        "value": detected / n,
        "ci": [float(ci.low), float(ci.high)],
        "detected": detected,
        "n_positive": n,
    }


# --- body part (multiclass) ------------------------------------------------------------------


def _label_values(true: Iterable, pred: Iterable, class_names: Sequence[str]) -> list:
    """Labels as given: the class names themselves, or indices 0..k-1 into class_names."""
    seen = set(true) | set(pred)
    return list(class_names) if seen <= set(class_names) else list(range(len(class_names)))


def multiclass_metrics(
    true_labels: Sequence, pred_labels: Sequence, class_names: Sequence[str]
) -> dict:
    """Accuracy, kappa, confusion matrix and sklearn's per-class report (the paper's Table II)."""
    true_labels, pred_labels = list(true_labels), list(pred_labels)
    labels = _label_values(true_labels, pred_labels, class_names)
    report = classification_report(
        true_labels,
        pred_labels,
        labels=labels,
        target_names=list(class_names),
        output_dict=True,
        zero_division=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        kappa = cohen_kappa_score(true_labels, pred_labels, labels=labels)
    return {
        "accuracy": _clean(accuracy_score(true_labels, pred_labels)),
        "kappa": _clean(kappa),
        "n": len(true_labels),
        "confusion_matrix": confusion_matrix(true_labels, pred_labels, labels=labels).tolist(),
        "report": report,
    }


def classification_report_text(
    true_labels: Sequence, pred_labels: Sequence, class_names: Sequence[str]
) -> str:
    labels = _label_values(true_labels, pred_labels, class_names)
    return classification_report(
        true_labels,
        pred_labels,
        labels=labels,
        target_names=list(class_names),
        digits=3,
        zero_division=0,
    )
