"""The fracture model's evaluation: calibrate and pick the threshold on val, then measure on
test at image and study level with patient-bootstrap CIs (BinaryEvaluation)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import pandas as pd

from bonefrac.config import EvaluateConfig
from bonefrac.errors import DataError
from bonefrac.evaluate.bootstrap import bootstrap_ci
from bonefrac.evaluate.calibration import (
    apply_temperature,
    expected_calibration_error,
    fit_temperature,
)
from bonefrac.evaluate.metrics import (
    UNCERTAIN,
    binary_metrics,
    choose_threshold,
    findings,
    negative_cutoff,
    operating_point_problem,
    sensitivity_interval,
    study_level,
)


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
    operating_point_problem: str | None  # why the threshold is unusable on val; None = usable
    # a "no abnormality" below negative_cutoff is a confident one; both fitted on val studies
    negative_cutoff: float
    val_sensitivity: dict  # see val_sensitivity()
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
            "operating_point_problem": self.operating_point_problem,
            "negative_cutoff": self.negative_cutoff,
            "val_sensitivity": self.val_sensitivity,
            "image": {**self.image, "ci": {k: _ci_list(v) for k, v in self.image_ci.items()}},
            "study": {**self.study, "ci": {k: _ci_list(v) for k, v in self.study_ci.items()}},
        }

    def flat_metrics(self) -> dict[str, float]:
        """Numeric `level_metric[_ci_low|_ci_high]` keys for mlflow.log_metrics (None dropped)."""
        flat: dict[str, float] = {
            "threshold": self.threshold,
            "temperature": self.temperature,
            "uncertain_share": self.uncertain_share,
            "negative_cutoff": self.negative_cutoff,
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
    cutoff = negative_cutoff(
        val_studies["label"], val_studies["prob"], threshold, cfg.negative_sensitivity
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
        operating_point_problem=operating_point_problem(
            val_studies["label"], val_studies["prob"], threshold
        ),
        negative_cutoff=cutoff,
        val_sensitivity=val_sensitivity(val_studies, threshold, cutoff, cfg.negative_sensitivity),
        test_studies=studies,
    )


def val_sensitivity(studies: pd.DataFrame, threshold: float, cutoff: float, target: float) -> dict:
    """What the service shows next to a finding: the model's study-level sensitivity on val
    (never test) with Wilson 95% intervals, at the decision threshold and at the confident-
    negative cut-off (chosen to reach `target`)."""
    labels, probs = studies["label"], studies["prob"]
    return {
        "split": "val",
        "level": "study",
        "interval": "Wilson 95%",
        "target": target,
        "at_threshold": sensitivity_interval(labels, probs, threshold),
        "at_negative_cutoff": sensitivity_interval(labels, probs, cutoff),
    }
