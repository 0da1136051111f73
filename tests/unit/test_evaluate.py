"""Evaluation library: MURA study protocol, patient bootstrap, calibration, thresholds, reports."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy.special import expit, logit
from scipy.stats import binom
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    cohen_kappa_score,
    f1_score,
    log_loss,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

from bonefrac import DISCLAIMER
from bonefrac import evaluate as ev
from bonefrac.config import EvaluateConfig
from bonefrac.errors import DataError
from bonefrac.evaluate.bootstrap import weighted_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _predictions(
    n_patients: int, seed: int = 0, split: str = "test", sharpness: float = 3.0
) -> pd.DataFrame:
    """Image predictions with MURA's columns. True abnormal probability q; the model reports
    sigmoid(sharpness * logit(q)), i.e. over-confident when sharpness > 1."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        patient = f"patient{seed}{p:05d}"
        for s in range(1, rng.integers(1, 3) + 1):
            q = rng.uniform(0.03, 0.97)
            label = int(rng.random() < q)
            study_rel = f"valid/XR_ELBOW/{patient}/study{s}_{'positive' if label else 'negative'}"
            for i in range(1, rng.integers(1, 4) + 1):
                image_q = np.clip(q + rng.normal(0, 0.05), 0.01, 0.99)
                rows.append(
                    {
                        "path": f"MURA-v1.1/{study_rel}/image{i}.png",
                        "split": split,
                        "body_part": "XR_ELBOW",
                        "patient_id": patient,
                        "study_id": study_rel,
                        "study_path": f"MURA-v1.1/{study_rel}/",
                        "label": label,
                        "prob": float(expit(sharpness * logit(image_q))),
                    }
                )
    return pd.DataFrame(rows)


def _frame(patients, studies, labels, probs) -> pd.DataFrame:
    return pd.DataFrame(
        {"patient_id": patients, "study_id": studies, "label": labels, "prob": probs}
    )


# --- study aggregation and point metrics ---------------------------------------------------


def test_study_probability_is_mean_of_its_images_and_kappa_matches_sklearn():
    frame = pd.DataFrame(
        {
            "study_id": ["s2", "s1", "s2", "s3", "s1", "s2"],
            "patient_id": ["b", "a", "b", "c", "a", "b"],
            "study_path": ["MURA-v1.1/valid/XR_HAND/b/s2/"] * 1 + ["x"] * 5,
            "label": [1, 0, 1, 1, 0, 1],
            "prob": [0.9, 0.2, 0.3, 0.4, 0.6, 0.6],
        }
    )
    studies = ev.study_level(frame)
    assert list(studies["study_id"]) == ["s2", "s1", "s3"]  # first-seen order
    assert studies["prob"].tolist() == pytest.approx([0.6, 0.4, 0.4])
    assert studies["n_images"].tolist() == [3, 2, 1]
    assert studies["patient_id"].tolist() == ["b", "a", "c"]

    # hand-aggregated: s2 (1, 0.6), s1 (0, 0.4), s3 (1, 0.4) at threshold 0.5 -> preds 1, 0, 0
    metrics = ev.binary_metrics(studies["label"], studies["prob"], 0.5)
    assert metrics["kappa"] == pytest.approx(cohen_kappa_score([1, 0, 1], [1, 0, 0]))
    assert metrics["accuracy"] == pytest.approx(2 / 3)
    assert metrics["auroc"] == pytest.approx(roc_auc_score([1, 0, 1], [0.6, 0.4, 0.4]))


def test_study_level_rejects_mixed_labels_and_missing_columns():
    with pytest.raises(DataError, match="different labels"):
        ev.study_level(_frame(["a", "a"], ["s", "s"], [0, 1], [0.1, 0.2]))
    with pytest.raises(DataError, match="prob"):
        ev.study_level(pd.DataFrame({"study_id": ["s"], "label": [0]}))


def test_binary_metrics_match_sklearn():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 200)
    probs = np.clip(labels * 0.3 + rng.random(200) * 0.7, 0, 1)
    pred = (probs >= 0.45).astype(int)
    metrics = ev.binary_metrics(labels, probs, 0.45)
    assert metrics["accuracy"] == pytest.approx(accuracy_score(labels, pred))
    assert metrics["precision"] == pytest.approx(precision_score(labels, pred))
    assert metrics["sensitivity"] == metrics["recall"] == pytest.approx(recall_score(labels, pred))
    assert metrics["specificity"] == pytest.approx(recall_score(labels, pred, pos_label=0))
    assert metrics["f1"] == pytest.approx(f1_score(labels, pred))
    assert metrics["kappa"] == pytest.approx(cohen_kappa_score(labels, pred))
    assert metrics["auprc"] == pytest.approx(average_precision_score(labels, probs))
    assert metrics["n"] == 200 and metrics["n_positive"] == labels.sum()
    assert metrics["tp"] + metrics["fn"] == metrics["n_positive"]
    json.dumps(metrics, allow_nan=False)


@pytest.mark.parametrize("labels", [[0, 0, 0], [1, 1, 1]])
def test_binary_metrics_one_class_gives_none_not_crash(labels):
    metrics = ev.binary_metrics(labels, [0.2, 0.6, 0.9], 0.5)
    assert metrics["auroc"] is None and metrics["auprc"] is None
    assert metrics["accuracy"] == pytest.approx(1 / 3 if labels[0] == 0 else 2 / 3)
    json.dumps(metrics, allow_nan=False)
    assert ev.binary_metrics([], [], 0.5)["n"] == 0


# --- bootstrap -------------------------------------------------------------------------------


def test_vectorised_resample_metrics_equal_sklearn_with_weights():
    """The hand-vectorised bootstrap metrics equal sklearn's with integer sample weights."""
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 60)
    probs = np.round(np.clip(labels * 0.3 + rng.random(60) * 0.7, 0, 1), 1)  # many ties
    weights = rng.integers(0, 3, (5, 60)).astype(float)
    got = weighted_metrics(labels, probs, 0.5, weights)
    pred = (probs >= 0.5).astype(int)
    for b, w in enumerate(weights):
        expected = {
            "accuracy": accuracy_score(labels, pred, sample_weight=w),
            "precision": precision_score(labels, pred, sample_weight=w),
            "recall": recall_score(labels, pred, sample_weight=w),
            "specificity": recall_score(labels, pred, pos_label=0, sample_weight=w),
            "f1": f1_score(labels, pred, sample_weight=w),
            "kappa": cohen_kappa_score(labels, pred, sample_weight=w),
            "auroc": roc_auc_score(labels, probs, sample_weight=w),
            "auprc": average_precision_score(labels, probs, sample_weight=w),
        }
        for name, value in expected.items():
            assert got[name][b] == pytest.approx(value), name


def test_bootstrap_percentiles_follow_the_binomial_distribution_of_accuracy():
    # One image per patient, 80 of 100 right: resampling patients makes the resampled
    # accuracy Binomial(100, 0.8) / 100, so the percentile interval has known ends.
    labels = [1] * 50 + [0] * 50
    probs = [0.9] * 40 + [0.1] * 10 + [0.1] * 40 + [0.9] * 10
    patients = [f"p{i}" for i in range(100)]
    frame = _frame(patients, patients, labels, probs)
    low, high = ev.bootstrap_ci(frame, 0.5, n_samples=4000, seed=7)["accuracy"]
    assert low == pytest.approx(binom.ppf(0.025, 100, 0.8) / 100, abs=0.011)
    assert high == pytest.approx(binom.ppf(0.975, 100, 0.8) / 100, abs=0.011)
    ci = ev.bootstrap_ci(frame, 0.5, n_samples=300, seed=7)
    assert ev.bootstrap_ci(frame, 0.5, n_samples=300, seed=7) == ci
    assert ev.bootstrap_ci(frame, 0.5, n_samples=300, seed=8) != ci


def test_bootstrap_kappa_interval_covers_the_true_kappa_about_95_percent_of_the_time():
    """Coverage: many test sets drawn from one known population; the percentile interval
    should contain the population's kappa in roughly 95% of them (small samples under-cover
    a little, so the band is wide; a broken bootstrap lands far outside it)."""
    rng = np.random.default_rng(11)

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = (rng.random(n) < 0.4).astype(int)
        probs = expit(1.2 * (2 * labels - 1) + rng.normal(0, 1.5, n))
        return labels, probs

    population = draw(1_000_000)
    true_kappa = cohen_kappa_score(population[0], (population[1] >= 0.5).astype(int))
    covered = []
    for _ in range(200):
        labels, probs = draw(80)
        patients = [f"p{i}" for i in range(80)]
        low, high = ev.bootstrap_ci(_frame(patients, patients, labels, probs), 0.5, 400, 0)["kappa"]
        covered.append(low <= true_kappa <= high)
    assert 0.88 <= np.mean(covered) <= 0.99


def test_bootstrap_resamples_patients_not_images():
    # Patient a: 10 images all right; patient b: 10 images all wrong. Resampling patients
    # gives accuracy 0, 0.5 or 1 only; resampling images would give a narrow CI around 0.5.
    frame = _frame(
        ["a"] * 10 + ["b"] * 10, ["a1"] * 10 + ["b1"] * 10, [1] * 20, [0.9] * 10 + [0.1] * 10
    )
    assert ev.bootstrap_ci(frame, 0.5, n_samples=500, seed=0)["accuracy"] == (0.0, 1.0)

    # Copying each patient's row five times must not shrink the CI; five times the patients does.
    base = _predictions(30, seed=4).groupby("patient_id").head(1)
    copies = pd.concat([base] * 5)
    more = pd.concat([base.assign(patient_id=base["patient_id"] + f"-{k}") for k in range(5)])

    def width(frame: pd.DataFrame) -> float:
        low, high = ev.bootstrap_ci(frame, 0.5, n_samples=400, seed=0)["accuracy"]
        return high - low

    assert width(copies) == pytest.approx(width(base), rel=0.25)
    assert width(copies) > 1.6 * width(more)


def test_bootstrap_study_level_aggregates_studies():
    # Each study's images straddle the threshold, but every study mean is right.
    frame = _frame(
        ["a", "a", "b", "b", "c", "c"],
        ["s1", "s1", "s2", "s2", "s3", "s3"],
        [1, 1, 0, 0, 1, 1],
        [0.9, 0.3, 0.1, 0.7, 0.8, 0.4],
    )
    assert ev.bootstrap_ci(frame, 0.5, 200, 0, level="study")["accuracy"] == (1.0, 1.0)
    assert ev.bootstrap_ci(frame, 0.5, 200, 0, level="image")["accuracy"][1] < 1.0
    with pytest.raises(ValueError, match="level"):
        ev.bootstrap_ci(frame, 0.5, 10, 0, level="patient")


def test_bootstrap_one_class_does_not_crash():
    frame = _frame(["a", "b", "c"], ["s1", "s2", "s3"], [0, 0, 0], [0.2, 0.7, 0.1])
    ci = ev.bootstrap_ci(frame, 0.5, 50, 0)
    assert ci["auroc"] is None and ci["recall"] is None
    assert ci["specificity"] is not None


# --- calibration -----------------------------------------------------------------------------


def test_temperature_scaling_fixes_overconfident_probabilities():
    rng = np.random.default_rng(6)
    true_prob = rng.uniform(0.05, 0.95, 4000)
    labels = (rng.random(4000) < true_prob).astype(int)
    overconfident = expit(3 * logit(true_prob))
    temperature = ev.fit_temperature(overconfident, labels)
    assert temperature == pytest.approx(3.0, rel=0.15)
    calibrated = ev.apply_temperature(overconfident, temperature)
    assert log_loss(labels, calibrated) < log_loss(labels, overconfident)
    before = ev.expected_calibration_error(labels, overconfident)
    after = ev.expected_calibration_error(labels, calibrated)
    assert after < before / 2
    assert ev.apply_temperature([0.0, 0.3, 1.0], 1.0) == pytest.approx([0.0, 0.3, 1.0], abs=1e-6)
    assert ev.fit_temperature([0.1, 0.9], [1, 1]) == 1.0  # one class: leave unchanged


def test_expected_calibration_error_hand_examples():
    assert ev.expected_calibration_error([0, 1], [0.2, 0.8]) == pytest.approx(0.2)
    assert ev.expected_calibration_error([0, 1, 0, 1], [0.55] * 4) == pytest.approx(0.05)
    assert ev.expected_calibration_error([0, 1], [0.5, 0.5]) == pytest.approx(0.0)


# --- threshold and findings ------------------------------------------------------------------


def test_youden_threshold_separates_a_separable_example():
    labels = [0, 0, 0, 1, 1, 1]
    probs = [0.1, 0.2, 0.35, 0.6, 0.8, 0.9]
    threshold = ev.choose_threshold(labels, probs, "youden")
    assert 0.35 < threshold <= 0.6
    assert ev.binary_metrics(labels, probs, threshold)["accuracy"] == 1.0


def test_sensitivity_threshold_meets_target_and_is_the_highest_such():
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 2, 300)
    probs = np.clip(labels * 0.25 + rng.random(300) * 0.75, 0, 1)
    threshold = ev.choose_threshold(labels, probs, "sensitivity", target_sensitivity=0.9)
    assert ev.binary_metrics(labels, probs, threshold)["sensitivity"] >= 0.9
    next_score = probs[probs > threshold].min()  # the cut sits below the score that decides
    assert ev.binary_metrics(labels, probs, next_score + 1e-12)["sensitivity"] < 0.9
    with pytest.raises(ValueError, match="threshold method"):
        ev.choose_threshold(labels, probs, "median")
    with pytest.warns(UserWarning, match="both classes"):
        assert ev.choose_threshold([1, 1], [0.2, 0.9]) == 0.5


def test_threshold_sits_between_val_scores_so_a_seventh_decimal_cannot_cross_it():
    # the int8 gate once failed an exact fp32 copy: the Youden cut equalled one val study's
    # score, and the copy's 2e-7 lower score moved that study to the other side
    rng = np.random.default_rng(11)
    labels = rng.integers(0, 2, 60)
    probs = np.clip(0.3 + 0.3 * labels + rng.normal(0, 0.15, 60), 0.01, 0.99)
    fpr, tpr, cuts = roc_curve(labels, probs, drop_intermediate=False)
    roc_cuts = {"youden": cuts[np.argmax(tpr - fpr)], "sensitivity": cuts[np.argmax(tpr >= 0.9)]}
    for method, roc_cut in roc_cuts.items():
        threshold = ev.choose_threshold(labels, probs, method, target_sensitivity=0.9)
        assert not np.isclose(probs, threshold, rtol=0, atol=1e-9).any()
        cut = (probs >= threshold).astype(int)
        for nudge in (-2e-7, 2e-7):
            assert ((probs + nudge) >= threshold).astype(int).tolist() == cut.tolist()
        # the same studies as the ROC curve's own cut (a val score)
        assert roc_cut in probs
        assert cut.tolist() == (probs >= roc_cut).astype(int).tolist()
    # two val scores one float step apart: no number between them, so the cut stays a score
    # (the midpoint would round onto the lower one and call its study abnormal too)
    a = 0.3
    b = np.nextafter(a, 0)
    threshold = ev.choose_threshold([0, 0, 1], [0.1, b, a], "youden")
    assert threshold == a and [p >= threshold for p in (0.1, b, a)] == [False, False, True]


def test_finding_bands():
    assert ev.finding(0.55, 0.5, 0.1) == ev.UNCERTAIN
    assert ev.finding(0.45, 0.5, 0.1) == ev.UNCERTAIN
    assert ev.finding(0.75, 0.5, 0.1) == ev.FRACTURE
    assert ev.finding(0.2, 0.5, 0.1) == ev.NO_FRACTURE
    assert ev.finding(0.5, 0.5, 0.0) == ev.FRACTURE  # no band: threshold itself is positive
    probs = [0.05, 0.45, 0.55, 0.75, 0.5]
    assert list(ev.findings(probs, 0.5, 0.1)) == [ev.finding(p, 0.5, 0.1) for p in probs]


# --- the binary evaluation -------------------------------------------------------------------


def test_evaluate_binary_calibrates_on_val_and_reports_test():
    val, test = _predictions(60, seed=10, split="val"), _predictions(60, seed=11)
    cfg = EvaluateConfig(
        threshold_method="sensitivity", target_sensitivity=0.85, bootstrap_samples=200
    )
    result = ev.evaluate_binary(val, test, cfg)

    assert result.temperature > 1.5  # the model is over-confident by design
    assert result.val_study["sensitivity"] >= 0.85  # the target is met where it was chosen
    studies = result.test_studies
    assert len(studies) == test["study_id"].nunique()
    assert {"prob", "prob_uncalibrated", "prediction", "finding"} <= set(studies.columns)
    calibrated = test.assign(prob=ev.apply_temperature(test["prob"], result.temperature))
    expected = ev.binary_metrics(
        ev.study_level(calibrated)["label"], ev.study_level(calibrated)["prob"], result.threshold
    )
    assert result.study == expected
    assert result.uncertain_share == pytest.approx((studies["finding"] == ev.UNCERTAIN).mean())
    assert result.calibration["image_ece_after"] < result.calibration["image_ece_before"]
    # the study CIs are the patient bootstrap of the calibrated test studies at the chosen
    # threshold, with the configured resamples and seed
    assert result.study_ci == ev.bootstrap_ci(
        calibrated, result.threshold, cfg.bootstrap_samples, cfg.seed, level="study"
    )
    low, high = result.study_ci["kappa"]

    as_dict = result.to_dict()
    json.dumps(as_dict, allow_nan=False)
    assert as_dict["study"]["ci"]["kappa"] == [low, high]
    flat = result.flat_metrics()
    assert flat["study_kappa_ci_low"] == low
    assert all(isinstance(v, float) for v in flat.values())


def test_evaluate_binary_survives_one_class_test_split_and_rejects_empty():
    val = _predictions(30, seed=12, split="val")
    test = _predictions(30, seed=13).assign(label=0)
    test["study_id"] = test["study_id"].str.replace("positive", "negative")
    result = ev.evaluate_binary(val, test, EvaluateConfig(bootstrap_samples=20))
    assert result.study["auroc"] is None and result.study_ci["auroc"] is None
    json.dumps(result.to_dict(), allow_nan=False)
    with pytest.raises(DataError, match="no test predictions"):
        ev.evaluate_binary(val, test.iloc[:0], EvaluateConfig())


# --- body part -------------------------------------------------------------------------------


def test_multiclass_metrics_report_and_kappa():
    names = ["XR_ELBOW", "XR_HAND", "XR_SHOULDER"]
    true = ["XR_ELBOW", "XR_HAND", "XR_SHOULDER", "XR_HAND", "XR_ELBOW", "XR_SHOULDER"]
    pred = ["XR_ELBOW", "XR_HAND", "XR_HAND", "XR_HAND", "XR_ELBOW", "XR_SHOULDER"]
    metrics = ev.multiclass_metrics(true, pred, names)
    assert metrics["accuracy"] == pytest.approx(5 / 6)
    assert metrics["kappa"] == pytest.approx(cohen_kappa_score(true, pred))
    assert metrics["report"]["XR_HAND"]["precision"] == pytest.approx(2 / 3)
    assert metrics["report"]["XR_SHOULDER"]["support"] == 2
    assert {"macro avg", "weighted avg"} <= set(metrics["report"])
    assert metrics["confusion_matrix"][2] == [0, 1, 1]
    json.dumps(metrics, allow_nan=False)

    as_indices = ev.multiclass_metrics(
        [names.index(t) for t in true], [names.index(p) for p in pred], names
    )
    assert as_indices["report"]["XR_HAND"] == metrics["report"]["XR_HAND"]
    text = ev.classification_report_text(true, pred, names)
    assert "XR_SHOULDER" in text and "macro avg" in text


# --- plots and plot data ---------------------------------------------------------------------


def test_plots_are_written_and_non_empty(tmp_path):
    frame = _predictions(20, seed=14)
    labels, probs = frame["label"], frame["prob"]
    names = ["normal", "abnormal"]
    paths = [
        ev.roc_curve_plot(labels, probs, tmp_path / "roc.png"),
        ev.pr_curve_plot(labels, probs, tmp_path / "pr.png"),
        ev.confusion_matrix_plot(labels, (probs >= 0.5).astype(int), names, tmp_path / "cm.png"),
        ev.reliability_plot(labels, probs, ev.apply_temperature(probs, 2.0), tmp_path / "rel.png"),
        ev.training_curves_plot(
            {
                "accuracy": [0.5, 0.7, 0.8],
                "val_accuracy": [0.5, 0.6, 0.7],
                "loss": [0.9, 0.6, 0.4],
                "val_loss": [1.0, 0.8, 0.7],
                "learning_rate": [1e-3] * 3,
            },
            tmp_path / "nested" / "curves.png",
            phase_boundary=2,
        ),
        ev.roc_curve_plot([0, 0], [0.1, 0.7], tmp_path / "roc_one_class.png"),
        ev.pr_curve_plot([1, 1], [0.1, 0.7], tmp_path / "pr_one_class.png"),
    ]
    for path in paths:
        assert path.read_bytes().startswith(PNG_MAGIC), path
        assert path.stat().st_size > 2000, path
    with pytest.raises(ValueError, match="accuracy or loss"):
        ev.training_curves_plot({}, tmp_path / "none.png")


def test_roc_and_pr_points_for_dvc_plots():
    labels, probs = [0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]
    roc = ev.roc_points(labels, probs)
    assert list(roc.columns) == ["fpr", "tpr", "threshold"]
    assert roc["threshold"].max() <= 1.0 and np.isfinite(roc["threshold"]).all()
    assert roc[["fpr", "tpr"]].iloc[-1].tolist() == [1.0, 1.0]
    pr = ev.pr_points(labels, probs)
    assert list(pr.columns) == ["recall", "precision", "threshold"]
    assert ev.roc_points([1, 1], [0.2, 0.3]).empty


# --- submission, tables, model card ----------------------------------------------------------


def test_submission_round_trips_in_study_order_without_header(tmp_path):
    studies = ev.study_level(_predictions(10, seed=15))
    path = ev.write_submission(studies, tmp_path / "out" / "predictions.csv", threshold=0.5)
    lines = path.read_text().splitlines()
    assert len(lines) == len(studies)
    assert lines[0].startswith("MURA-v1.1/valid/")  # no header
    assert all(line.split(",")[0].endswith("/") and line[-1] in "01" for line in lines)
    read = ev.read_submission(path)
    assert list(read) == list(studies["study_path"])
    assert list(read.values()) == (studies["prob"] >= 0.5).astype(int).tolist()

    no_slash = pd.DataFrame(
        {"study_path": ["MURA-v1.1/valid/XR_HAND/p1/study1_negative"], "prob": [0.2]}
    )
    ev.write_submission(no_slash, tmp_path / "p.csv", 0.5)
    assert ev.read_submission(tmp_path / "p.csv") == {
        "MURA-v1.1/valid/XR_HAND/p1/study1_negative/": 0
    }


def test_submission_uses_each_studys_threshold_and_writes_0_for_an_abstention(tmp_path):
    """Per-part thresholds (not 0.5); a study routed out of scope (NaN probability, NaN
    threshold) is 0: MURA's format has no abstention, the evaluation reports it instead."""
    studies = pd.DataFrame(
        {
            "study_path": [f"MURA-v1.1/valid/XR_HAND/p{i}/study1/" for i in range(4)],
            "prob": [0.35, 0.35, float("nan"), 0.9],
        }
    )
    thresholds = np.array([0.3, 0.4, float("nan"), 0.95])
    ev.write_submission(studies, tmp_path / "s.csv", thresholds)
    assert list(ev.read_submission(tmp_path / "s.csv").values()) == [1, 0, 0, 0]


def test_comparison_table_formats_cis():
    table = ev.comparison_table(
        [
            {
                "model": "ResNet50",
                "body_part_accuracy": 0.981,
                "study_kappa": 0.8123,
                "study_kappa_ci": (0.751, 0.862),
                "study_auroc": 0.9,
                "study_abstained": 0.05,
                "study_submission_kappa": 0.7666,
            },
            {"model": "PCA + logistic regression", "study_kappa": None},
        ]
    )
    lines = table.splitlines()
    assert lines[0] == (
        "| Model | Body-part accuracy | Study kappa | Study AUROC | Studies abstained "
        "| Kappa, abstained as normal |"
    )
    assert lines[2] == "| ResNet50 | 0.98 | 0.81 (0.75–0.86) | 0.90 | 0.05 | 0.77 |"
    assert lines[3] == "| PCA + logistic regression | — | — | — | — | — |"


def test_model_card_has_disclaimer_metrics_and_limitations():
    val, test = _predictions(25, seed=16, split="val"), _predictions(25, seed=17)
    result = ev.evaluate_binary(val, test, EvaluateConfig(bootstrap_samples=50))
    metrics = result.to_dict()
    card = ev.model_card(
        "fracture_XR_ELBOW", metrics, {"train.batch_size": 32}, "synthetic-abc123", notes="demo"
    )
    assert DISCLAIMER in card
    kappa, (low, high) = metrics["study"]["kappa"], metrics["study"]["ci"]["kappa"]
    assert f"| kappa | {kappa:.3f} ({low:.3f}–{high:.3f}) |" in card
    assert "abnormal" in card and "not only" in card
    assert "SYNTHETIC" in card and "synthetic-abc123" in card
    assert "train.batch_size" in card and "demo" in card
    assert f"{result.threshold:.3f}" in card and "uncertain" in card

    real = ev.model_card("fracture_XR_ELBOW", metrics, {"data.synthetic": False}, "md5:1f2e")
    assert "SYNTHETIC" not in real and "Synthetic data" not in real
