"""Metrics, calibration, thresholds, plots and reports for the fracture and body-part models.

Pure functions on prediction frames (one row per image: path, split, body_part, patient_id,
study_id, study_path, label, prob); no TensorFlow here. The MURA protocol is followed
throughout: a study's probability is the mean of its images' probabilities, Cohen's kappa is
the headline number, and both image and study level are reported. Confidence intervals
resample patients, the unit the splits keep apart.

- `metrics`: study aggregation, binary and multiclass metrics, threshold, findings;
- `bootstrap`: patient-bootstrap confidence intervals;
- `calibration`: temperature scaling and expected calibration error;
- `binary`: `evaluate_binary`, the fracture model's val-then-test evaluation;
- `plots`: ROC, precision-recall, confusion, reliability and training-curve plots;
- `reports`: MURA submission file, comparison table, model card.
"""

from bonefrac.evaluate.binary import BinaryEvaluation, evaluate_binary
from bonefrac.evaluate.bootstrap import bootstrap_ci
from bonefrac.evaluate.calibration import (
    apply_temperature,
    expected_calibration_error,
    fit_temperature,
)
from bonefrac.evaluate.metrics import (
    CI_METRICS,
    FRACTURE,
    NO_FRACTURE,
    STUDY_COLUMNS,
    UNCERTAIN,
    binary_metrics,
    choose_threshold,
    classification_report_text,
    finding,
    findings,
    multiclass_metrics,
    negative_cutoff,
    operating_point_problem,
    sensitivity_interval,
    study_level,
)
from bonefrac.evaluate.plots import (
    confusion_matrix_plot,
    pr_curve_plot,
    pr_points,
    reliability_plot,
    roc_curve_plot,
    roc_points,
    training_curves_plot,
)
from bonefrac.evaluate.reports import (
    COMPARISON_COLUMNS,
    MODEL_CARD,
    SYNTHETIC_WARNING,
    comparison_table,
    model_card,
    read_submission,
    write_submission,
)

__all__ = [
    "CI_METRICS",
    "COMPARISON_COLUMNS",
    "FRACTURE",
    "MODEL_CARD",
    "NO_FRACTURE",
    "STUDY_COLUMNS",
    "SYNTHETIC_WARNING",
    "UNCERTAIN",
    "BinaryEvaluation",
    "apply_temperature",
    "binary_metrics",
    "bootstrap_ci",
    "choose_threshold",
    "classification_report_text",
    "comparison_table",
    "confusion_matrix_plot",
    "evaluate_binary",
    "expected_calibration_error",
    "finding",
    "findings",
    "fit_temperature",
    "model_card",
    "multiclass_metrics",
    "negative_cutoff",
    "operating_point_problem",
    "sensitivity_interval",
    "pr_curve_plot",
    "pr_points",
    "read_submission",
    "reliability_plot",
    "roc_curve_plot",
    "roc_points",
    "study_level",
    "training_curves_plot",
    "write_submission",
]
