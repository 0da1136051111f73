"""Metrics, calibration, thresholds, plots and reports for the fracture and body-part models.

Pure functions on prediction frames (one row per image: path, split, body_part, patient_id,
study_id, study_path, label, prob); no TensorFlow here. The MURA protocol is followed
throughout: a study's probability is the mean of its images' probabilities, Cohen's kappa is
the headline number, and both image and study level are reported. Confidence intervals
resample patients, the unit the splits keep apart.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from scipy.optimize import minimize_scalar
from scipy.special import expit, logit
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    classification_report,
    cohen_kappa_score,
    confusion_matrix,
    f1_score,
    precision_recall_curve,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

from bonefrac import DISCLAIMER
from bonefrac.config import EvaluateConfig
from bonefrac.errors import DataError

FRACTURE, NO_FRACTURE, UNCERTAIN = "fracture", "no_fracture", "uncertain"
# fmt: off
CI_METRICS = ("accuracy", "precision", "recall", "sensitivity", "specificity", "f1", "kappa",
              "auroc", "auprc")
# fmt: on
STUDY_COLUMNS = ("study_path", "patient_id", "body_part", "split")  # carried when present
_EPS = 1e-7  # keeps logit() finite for probabilities saturated at 0 or 1


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


# --- bootstrap confidence intervals ----------------------------------------------------------


def _weighted_metrics(
    labels: np.ndarray, probs: np.ndarray, threshold: float, weights: np.ndarray
) -> dict[str, np.ndarray]:
    """CI_METRICS for many resamples at once; weights (n_resamples, n_rows) are draw counts.

    Integer weights equal duplicating rows, so each value matches the sklearn metric with
    sample_weight (the unit tests check this). Hand-vectorised because calling sklearn per
    resample costs ~18 ms, i.e. 18 s for 1000 resamples.
    """
    positive = labels == 1
    predicted = probs >= threshold
    tp = weights @ (positive & predicted)
    fp = weights @ (~positive & predicted)
    fn = weights @ (positive & ~predicted)
    tn = weights @ (~positive & ~predicted)
    n = tp + fp + fn + tn

    # Ranking metrics: rows by descending probability; tied probabilities form one step.
    order = np.argsort(-probs, kind="stable")
    step_ends = np.r_[np.diff(probs[order]) != 0, True]
    cum_tp = np.cumsum(weights[:, order] * positive[order], axis=1)[:, step_ends]
    cum_fp = np.cumsum(weights[:, order] * ~positive[order], axis=1)[:, step_ends]
    zeros = np.zeros((len(weights), 1))
    with np.errstate(divide="ignore", invalid="ignore"):
        accuracy = (tp + tn) / n
        chance = ((tp + fp) * (tp + fn) + (tn + fn) * (tn + fp)) / n**2
        recall = tp / (tp + fn)
        tpr = np.hstack([zeros, cum_tp / cum_tp[:, -1:]])
        fpr = np.hstack([zeros, cum_fp / cum_fp[:, -1:]])
        step_precision = cum_tp / (cum_tp + cum_fp)
        recall_gain = np.diff(tpr, axis=1)
        auprc = np.where(recall_gain > 0, recall_gain * step_precision, 0.0).sum(axis=1)
        one_class = (cum_tp[:, -1] == 0) | (cum_fp[:, -1] == 0)
        return {
            "accuracy": accuracy,
            "precision": tp / (tp + fp),
            "recall": recall,
            "sensitivity": recall,
            "specificity": tn / (tn + fp),
            "f1": 2 * tp / (2 * tp + fp + fn),
            "kappa": (accuracy - chance) / (1 - chance),
            "auroc": np.where(one_class, np.nan, np.trapezoid(tpr, fpr, axis=1)),
            "auprc": np.where(one_class, np.nan, auprc),
        }


def bootstrap_ci(
    frame: pd.DataFrame,
    threshold: float,
    n_samples: int = 1000,
    seed: int = 42,
    group_col: str = "patient_id",
    level: Literal["image", "study"] = "image",
    prob_col: str = "prob",
    confidence: float = 0.95,
) -> dict[str, tuple[float, float] | None]:
    """Percentile confidence intervals that resample patients (group_col) with replacement.

    A drawn patient brings all its rows; a patient drawn twice counts twice. At study level
    the studies are aggregated first: a study belongs to one patient, so that equals
    aggregating after resampling. None where a metric is undefined in every resample.
    """
    if level == "study":
        frame = study_level(frame, prob_col)
        prob_col = "prob"
    elif level != "image":
        raise ValueError(f"level must be 'image' or 'study', not {level!r}")
    if frame.empty:
        return dict.fromkeys(CI_METRICS)
    labels = frame["label"].to_numpy(dtype=int)
    probs = frame[prob_col].to_numpy(dtype=float)
    groups, uniques = pd.factorize(frame[group_col])
    n_groups = len(uniques)
    rng = np.random.default_rng(seed)
    chunk = max(1, 2_000_000 // len(frame))  # bounds memory at ~16 MB of weights per chunk
    samples: dict[str, list[np.ndarray]] = {name: [] for name in CI_METRICS}
    for start in range(0, n_samples, chunk):
        size = min(chunk, n_samples - start)
        draws = rng.integers(0, n_groups, size=(size, n_groups))
        offsets = (np.arange(size) * n_groups)[:, None]
        counts = np.bincount((draws + offsets).ravel(), minlength=size * n_groups)
        weights = counts.reshape(size, n_groups)[:, groups].astype(float)  # (size, rows)
        for name, values in _weighted_metrics(labels, probs, threshold, weights).items():
            samples[name].append(values)
    tail = (1 - confidence) / 2 * 100
    intervals: dict[str, tuple[float, float] | None] = {}
    for name, parts in samples.items():
        values = np.concatenate(parts)
        values = values[~np.isnan(values)]
        if len(values) == 0:
            intervals[name] = None
        else:
            low, high = np.percentile(values, [tail, 100 - tail])
            intervals[name] = (float(low), float(high))
    return intervals


# --- calibration -----------------------------------------------------------------------------


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


def apply_temperature(probs: Sequence[float], temperature: float) -> np.ndarray:
    return expit(_logits(probs) / temperature)


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


# --- threshold and findings ------------------------------------------------------------------


def choose_threshold(
    labels: Sequence[int],
    probs: Sequence[float],
    method: Literal["youden", "sensitivity"] = "youden",
    target_sensitivity: float = 0.9,
) -> float:
    """Operating point from the ROC curve: 'youden' maximises tpr - fpr, 'sensitivity' is the
    highest threshold whose sensitivity reaches the target. 0.5 if labels hold one class."""
    labels = np.asarray(labels, dtype=int)
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
    return float(min(thresholds[best], 1.0))  # thresholds[0] is inf: "nothing positive"


def finding(prob: float, threshold: float, band: float) -> str:
    """'uncertain' within band of the threshold, else 'fracture' / 'no_fracture'."""
    if abs(prob - threshold) < band:
        return UNCERTAIN
    return FRACTURE if prob >= threshold else NO_FRACTURE


def findings(probs: Sequence[float], threshold: float, band: float) -> np.ndarray:
    """finding() for many probabilities at once."""
    probs = np.asarray(probs, dtype=float)
    decided = np.where(probs >= threshold, FRACTURE, NO_FRACTURE)
    return np.where(np.abs(probs - threshold) < band, UNCERTAIN, decided)


# --- the binary evaluation -------------------------------------------------------------------


def _format_ci(value: float | None, ci: Sequence[float] | None, digits: int = 2) -> str:
    if value is None:
        return "—"
    text = f"{value:.{digits}f}"
    return text + (f" ({ci[0]:.{digits}f}–{ci[1]:.{digits}f})" if ci else "")


@dataclass(frozen=True)
class BinaryEvaluation:
    """A fracture model on the test split, at the threshold and temperature chosen on val."""

    threshold: float
    temperature: float
    threshold_method: str
    uncertain_band: float
    uncertain_share: float  # share of test studies within uncertain_band of the threshold
    image: dict  # binary_metrics at image level (calibrated probabilities)
    study: dict  # binary_metrics at study level (mean of calibrated image probabilities)
    image_ci: dict
    study_ci: dict
    calibration: dict  # ECE before/after temperature scaling on test
    val_study: dict  # val study-level metrics at the chosen threshold
    test_studies: pd.DataFrame = field(repr=False, compare=False)

    def to_dict(self) -> dict:
        """Nested JSON for metrics.json: settings, calibration, and metrics with CIs per level."""
        return {
            "threshold": self.threshold,
            "threshold_method": self.threshold_method,
            "temperature": self.temperature,
            "uncertain_band": self.uncertain_band,
            "uncertain_share": self.uncertain_share,
            "calibration": dict(self.calibration),
            "val_study": dict(self.val_study),
            "image": {**self.image, "ci": {k: _ci_list(v) for k, v in self.image_ci.items()}},
            "study": {**self.study, "ci": {k: _ci_list(v) for k, v in self.study_ci.items()}},
        }

    def flat_metrics(self) -> dict[str, float]:
        """Numeric `level_metric[_ci_low|_ci_high]` keys for mlflow.log_metrics (None dropped)."""
        flat: dict[str, float] = {
            "threshold": self.threshold,
            "temperature": self.temperature,
            "uncertain_share": self.uncertain_share,
            **self.calibration,
        }
        for level, metrics, cis in (
            ("image", self.image, self.image_ci),
            ("study", self.study, self.study_ci),
        ):
            flat |= {f"{level}_{k}": v for k, v in metrics.items()}
            for name, ci in cis.items():
                if ci is not None:
                    flat[f"{level}_{name}_ci_low"], flat[f"{level}_{name}_ci_high"] = ci
        return {k: float(v) for k, v in flat.items() if v is not None}

    def comparison_row(self, model: str, **extra: Any) -> dict:
        """A row for comparison_table(); pass body_part_accuracy(_ci) from the two-stage run."""
        return {
            "model": model,
            "study_kappa": self.study["kappa"],
            "study_kappa_ci": self.study_ci.get("kappa"),
            "study_auroc": self.study["auroc"],
            "study_auroc_ci": self.study_ci.get("auroc"),
            **extra,
        }


def _ci_list(ci: tuple[float, float] | None) -> list[float] | None:
    return None if ci is None else [ci[0], ci[1]]


def evaluate_binary(
    val_frame: pd.DataFrame, test_frame: pd.DataFrame, cfg: EvaluateConfig
) -> BinaryEvaluation:
    """Calibrate and pick the operating point on val, then measure on test (MURA protocol).

    1. temperature fitted on val images; 2. threshold from val studies' calibrated mean
    probabilities; 3. test metrics at image and study level with patient-bootstrap CIs;
    4. ECE on test before/after calibration; 5. share of test studies in the uncertain band.
    """
    for name, frame in (("val", val_frame), ("test", test_frame)):
        if frame.empty:
            raise DataError(f"no {name} predictions to evaluate: check the manifest's splits")
    temperature = fit_temperature(val_frame["prob"], val_frame["label"])
    val = val_frame.assign(prob=apply_temperature(val_frame["prob"], temperature))
    val_studies = study_level(val)
    threshold = choose_threshold(
        val_studies["label"], val_studies["prob"], cfg.threshold_method, cfg.target_sensitivity
    )

    test = test_frame.assign(
        prob_uncalibrated=test_frame["prob"],
        prob=apply_temperature(test_frame["prob"], temperature),
    )
    studies = study_level(test)
    studies["prob_uncalibrated"] = study_level(test, "prob_uncalibrated")["prob"].to_numpy()
    studies["prediction"] = (studies["prob"] >= threshold).astype(int)
    studies["finding"] = findings(studies["prob"], threshold, cfg.uncertain_band)

    def ci(level: Literal["image", "study"]) -> dict:
        return bootstrap_ci(test, threshold, cfg.bootstrap_samples, cfg.seed, level=level)

    def ece(frame: pd.DataFrame, column: str) -> float:
        return expected_calibration_error(frame["label"], frame[column])

    return BinaryEvaluation(
        threshold=threshold,
        temperature=temperature,
        threshold_method=cfg.threshold_method,
        uncertain_band=cfg.uncertain_band,
        uncertain_share=float((studies["finding"] == UNCERTAIN).mean()),
        image=binary_metrics(test["label"], test["prob"], threshold),
        study=binary_metrics(studies["label"], studies["prob"], threshold),
        image_ci=ci("image"),
        study_ci=ci("study"),
        calibration={
            "image_ece_before": ece(test, "prob_uncalibrated"),
            "image_ece_after": ece(test, "prob"),
            "study_ece_before": ece(studies, "prob_uncalibrated"),
            "study_ece_after": ece(studies, "prob"),
        },
        val_study=binary_metrics(val_studies["label"], val_studies["prob"], threshold),
        test_studies=studies,
    )


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


# --- plots and plot data ---------------------------------------------------------------------


def _figure(width: float = 5, height: float = 4):
    """A Figure on the Agg canvas, without pyplot's global state (safe in servers/threads)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def _one_class_note(ax, title: str) -> None:
    ax.text(0.5, 0.5, "undefined: labels hold one class", ha="center", va="center")
    ax.set(title=title)


def roc_curve_plot(
    labels: Sequence[int], probs: Sequence[float], path: Path, title: str = "ROC"
) -> Path:
    from sklearn.metrics import RocCurveDisplay

    fig = _figure()
    ax = fig.add_subplot()
    if _two_classes(np.asarray(labels)):
        RocCurveDisplay.from_predictions(labels, probs, ax=ax, plot_chance_level=True)
        ax.set(title=title)
    else:
        _one_class_note(ax, title)
    return _save(fig, path)


def pr_curve_plot(
    labels: Sequence[int], probs: Sequence[float], path: Path, title: str = "Precision-recall"
) -> Path:
    from sklearn.metrics import PrecisionRecallDisplay

    fig = _figure()
    ax = fig.add_subplot()
    if _two_classes(np.asarray(labels)):
        PrecisionRecallDisplay.from_predictions(labels, probs, ax=ax, plot_chance_level=True)
        ax.set(title=title)
    else:
        _one_class_note(ax, title)
    return _save(fig, path)


def confusion_matrix_plot(
    true_labels: Sequence,
    pred_labels: Sequence,
    class_names: Sequence[str],
    path: Path,
    title: str = "Confusion matrix",
) -> Path:
    from sklearn.metrics import ConfusionMatrixDisplay

    fig = _figure()
    ax = fig.add_subplot()
    ConfusionMatrixDisplay.from_predictions(
        true_labels,
        pred_labels,
        ax=ax,
        colorbar=False,
        labels=_label_values(true_labels, pred_labels, class_names),
        display_labels=class_names,
    )
    ax.set(title=title)
    return _save(fig, path)


def reliability_plot(
    labels: Sequence[int],
    probs_before: Sequence[float],
    probs_after: Sequence[float],
    path: Path,
    n_bins: int = 10,
) -> Path:
    """Reliability diagram before/after temperature scaling, ECE in the legend."""
    from sklearn.calibration import calibration_curve

    fig = _figure(5, 5)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], "k:", label="perfectly calibrated")
    for name, probs in (("before", probs_before), ("after", probs_after)):
        observed, predicted = calibration_curve(labels, probs, n_bins=n_bins)
        ece = expected_calibration_error(labels, probs, n_bins)
        ax.plot(predicted, observed, "o-", label=f"{name} calibration (ECE {ece:.3f})")
    ax.set(
        xlabel="mean predicted probability",
        ylabel="observed abnormal rate",
        xlim=(0, 1),
        ylim=(0, 1),
        title="Reliability",
    )
    ax.legend(loc="upper left")
    return _save(fig, path)


def training_curves_plot(
    history: dict[str, list[float]], path: Path, phase_boundary: int | None = None
) -> Path:
    """Accuracy and loss per epoch, train vs val (the paper's Fig. 8/9), plus any other metric
    logged for both. phase_boundary: first fine-tuning epoch, drawn as a dashed line."""
    bases = [m for m in ("accuracy", "loss") if m in history]
    bases += sorted(k for k in history if f"val_{k}" in history and k not in bases)
    if not bases:
        raise ValueError(f"history has no accuracy or loss curves (keys: {sorted(history)})")
    fig = _figure(5 * len(bases), 4)
    for i, base in enumerate(bases, start=1):
        ax = fig.add_subplot(1, len(bases), i)
        for key, label in ((base, "train"), (f"val_{base}", "val")):
            if history.get(key):
                ax.plot(range(1, len(history[key]) + 1), history[key], "o-", label=label)
        if phase_boundary is not None:
            ax.axvline(phase_boundary, color="grey", ls="--", label="fine-tuning starts")
        ax.set(xlabel="epoch", ylabel=base, title=base)
        ax.legend()
    return _save(fig, path)


def roc_points(labels: Sequence[int], probs: Sequence[float]) -> pd.DataFrame:
    """ROC curve as a frame for `dvc plots` (sklearn's leading inf threshold shown as 1.0)."""
    if not _two_classes(np.asarray(labels)):
        return pd.DataFrame(columns=["fpr", "tpr", "threshold"])
    fpr, tpr, thresholds = roc_curve(labels, probs)
    return pd.DataFrame({"fpr": fpr, "tpr": tpr, "threshold": np.minimum(thresholds, 1.0)})


def pr_points(labels: Sequence[int], probs: Sequence[float]) -> pd.DataFrame:
    """Precision-recall curve as a frame for `dvc plots`."""
    if not _two_classes(np.asarray(labels)):
        return pd.DataFrame(columns=["recall", "precision", "threshold"])
    precision, recall, thresholds = precision_recall_curve(labels, probs)
    return pd.DataFrame(
        {"recall": recall[:-1], "precision": precision[:-1], "threshold": thresholds}
    )


# --- submission, tables, model card ----------------------------------------------------------


def write_submission(study_frame: pd.DataFrame, path: Path, threshold: float) -> Path:
    """The official MURA submission: `study path/,0|1` a line, no header, order as given."""
    paths = study_frame["study_path"].astype(str)
    paths = paths.where(paths.str.endswith("/"), paths + "/")
    predictions = (study_frame["prob"].to_numpy(dtype=float) >= threshold).astype(int)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{p},{y}\n" for p, y in zip(paths, predictions, strict=True)))
    return path


def read_submission(path: Path) -> dict[str, int]:
    """Study path -> 0/1 from a submission (or MURA *_labeled_studies.csv) file, in file order."""
    frame = pd.read_csv(path, header=None, names=["study_path", "label"], dtype={"study_path": str})
    return dict(zip(frame["study_path"], frame["label"].astype(int), strict=True))


COMPARISON_COLUMNS = (
    ("body_part_accuracy", "Body-part accuracy"),
    ("study_kappa", "Study kappa"),
    ("study_auroc", "Study AUROC"),
)


def comparison_table(
    rows: list[dict], columns: Sequence[tuple[str, str]] = COMPARISON_COLUMNS
) -> str:
    """Markdown table like the paper's Table V; a `<key>_ci` entry adds "(low–high)"."""
    lines = [
        "| Model | " + " | ".join(header for _, header in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for row in rows:
        cells = [_format_ci(row.get(key), row.get(f"{key}_ci")) for key, _ in columns]
        lines.append(f"| {row.get('model', '?')} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


MODEL_CARD = """# Model card: {name}
{synthetic_warning}
## Intended use
{disclaimer} The model flags elbow, hand and shoulder radiographs (MURA) as abnormal or
normal to help prioritise review; it is not for use without a clinician.

## Training data
MURA v1.1 train split, with a patient-disjoint validation split carved out of it.
Data version: `{data_version}`.

## Evaluation protocol
Splits are patient-disjoint; MURA `valid` is the test set and picks nothing. A study's
probability is the mean of its images' probabilities (MURA protocol) and Cohen's kappa is the
headline metric. Temperature and threshold are chosen on val; 95% CIs come from a bootstrap
that resamples patients.

## Metrics (test)
{metrics}
## Calibration
Temperature scaling on val images, T = {temperature}.
{calibration}
## Threshold & uncertain band
Threshold {threshold} ({threshold_method}, chosen on val studies). Probabilities within
{uncertain_band} of it are reported as "uncertain" ({uncertain_share} of test studies).

## Limitations
- MURA labels mean abnormal (fracture, hardware, degenerative disease, other), not only
  fracture: a "fracture" finding means "abnormal study".
- Only elbow, hand and shoulder radiographs; other images are out of distribution.
- Single-source data (Stanford); performance elsewhere is unverified.{synthetic_limitation}

## Parameters
{params}
## Notes
{notes}
"""
SYNTHETIC_WARNING = """
> **Warning: trained and evaluated on SYNTHETIC data.** These numbers say nothing about
> performance on real radiographs.
"""


def _metrics_markdown(metrics: dict) -> str:
    """Study and image tables with CIs, then any other top-level scalar as a bullet."""
    text = ""
    for level in ("study", "image"):
        values = metrics.get(level)
        if not isinstance(values, dict):
            continue
        cis = values.get("ci") or {}
        text += f"\n### {level.capitalize()} level\n\n| metric | value (95% CI) |\n|---|---|\n"
        for name in ("kappa", "auroc", "auprc", "accuracy", "sensitivity", "specificity", "f1"):
            if name in values:
                text += f"| {name} | {_format_ci(values[name], cis.get(name), digits=3)} |\n"
    skip = {
        "study",
        "image",
        "calibration",
        "val_study",
        "threshold",
        "threshold_method",
        "temperature",
        "uncertain_band",
        "uncertain_share",
    }
    other = [f"- {k}: {v}" for k, v in metrics.items() if k not in skip]
    return text + ("\n" + "\n".join(other) + "\n" if other else "")


def model_card(
    name: str,
    metrics: dict,
    params: dict,
    data_version: str,
    notes: str = "",
    synthetic: bool | None = None,
) -> str:
    """Markdown model card. `metrics` is BinaryEvaluation.to_dict() (other top-level keys are
    listed as they come); synthetic=None infers it from data_version and params."""
    if synthetic is None:
        synthetic = "synthetic" in data_version.lower() or any(
            value is True for key, value in params.items() if "synthetic" in str(key).lower()
        )

    def number(key: str) -> str:
        value = metrics.get(key)
        return (
            f"{value:.3f}" if isinstance(value, float) else str(value if value is not None else "—")
        )

    calibration = metrics.get("calibration") or {}
    return MODEL_CARD.format(
        name=name,
        synthetic_warning=SYNTHETIC_WARNING if synthetic else "",
        disclaimer=DISCLAIMER,
        data_version=data_version,
        metrics=_metrics_markdown(metrics),
        temperature=number("temperature"),
        calibration="".join(f"- {k}: {_format_ci(v, None, 3)}\n" for k, v in calibration.items()),
        threshold=number("threshold"),
        threshold_method=metrics.get("threshold_method", "—"),
        uncertain_band=number("uncertain_band"),
        uncertain_share=number("uncertain_share"),
        synthetic_limitation=(
            "\n- Synthetic data: the metrics above are a pipeline check, not evidence."
            if synthetic
            else ""
        ),
        params="".join(f"- `{k}`: {v}\n" for k, v in params.items()) or "—\n",
        notes=notes or "—",
    )
