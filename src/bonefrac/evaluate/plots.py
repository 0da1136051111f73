"""Plots (ROC, precision-recall, confusion matrix, reliability, training curves) and the
curve frames `dvc plots` reads. Figures are drawn without pyplot's global state."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import precision_recall_curve, roc_curve

from bonefrac.evaluate.calibration import expected_calibration_error
from bonefrac.evaluate.metrics import _label_values, _two_classes


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
