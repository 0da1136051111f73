"""The evaluate stage: every trained model on the test split (MURA valid), and end to end.

The end-to-end numbers, the study probabilities and the MURA submission come from the
inference core the service runs (`evaluate.end_to_end`), over the test split, with the OOD
gate the bundle will carry. Writes `evaluation/` (reports, plots, submission, operating
points and the OOD gate for serving),
`metrics/evaluate.json` for `dvc metrics show`, ROC points for `dvc plots`, and logs all of
it to the training runs in MLflow (each model's nested run, the pipeline's parent run).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from bonefrac.bundle import OOD_GATE_FILE
from bonefrac.bundle import OPERATING_POINT_FILE as OPERATING_POINT
from bonefrac.cache import Cache, load_cache
from bonefrac.config import OTHER, Settings, body_part_class, body_part_classes
from bonefrac.data.mura import body_part_name
from bonefrac.evaluate import (
    classification_report_text,
    comparison_table,
    confusion_matrix_plot,
    evaluate_binary,
    model_card,
    multiclass_metrics,
    pr_curve_plot,
    reliability_plot,
    roc_curve_plot,
    roc_points,
    write_submission,
)
from bonefrac.evaluate.end_to_end import CachedForward, evaluate_end_to_end, ood_scores
from bonefrac.inference import OperatingPoint, TwoStage
from bonefrac.models import BODY_PART_MODEL
from bonefrac.privacy import project_key, pseudonymise_frame

PREDICT_BATCH = 32


def predict(model, images: np.ndarray, batch: int = PREDICT_BATCH) -> np.ndarray:
    """Model outputs for (N, S, S) uint8 cache rows, through one compiled forward function
    (Keras' `predict` adds per-call overhead; eager calls are slower still). Its signature
    leaves the batch open, so the short last batch reuses the one trace per image size."""
    import tensorflow as tf

    height, width = images.shape[1:3]
    name = f"_bonefrac_forward_{height}x{width}"
    forward = getattr(model, name, None)
    if forward is None:
        spec = tf.TensorSpec((None, height, width, 3), tf.float32)
        forward = tf.function(lambda x: model(x, training=False), input_signature=[spec])
        setattr(model, name, forward)
    outputs = []
    for start in range(0, len(images), batch):
        block = np.asarray(images[start : start + batch])
        x = np.repeat(block[..., np.newaxis], 3, axis=-1).astype(np.float32)
        outputs.append(np.asarray(forward(tf.constant(x))))
    return np.concatenate(outputs) if outputs else np.empty((0, 1), dtype=np.float32)


def _load(models_dir: Path, name: str):
    from bonefrac.models import load_trained

    return load_trained(models_dir / name / "model.keras")


def _frame(cache: Cache, rows: np.ndarray, probs: np.ndarray) -> pd.DataFrame:
    columns = ["path", "split", "body_part", "patient_id", "study_id", "study_path", "label"]
    frame = cache.index.iloc[rows][columns].reset_index(drop=True)
    frame["prob"] = probs.astype(float)
    return frame


@dataclass(frozen=True)
class EvaluationSummary:
    out_dir: Path
    metrics: dict


def run_evaluate_stage(settings: Settings) -> EvaluationSummary:
    from bonefrac import tracking
    from bonefrac.tracking import read_runs

    layout = settings.layout
    cfg = settings.evaluate
    cache = load_cache(layout.preprocessed)
    runs = read_runs(layout.models)
    parts = [body_part_name(p) for p in settings.data.parts]
    classes = body_part_classes(settings.data)  # the body-part model's: "other" last
    other = OTHER in classes  # MURA's other parts: the body-part model and end to end only
    synthetic = _is_synthetic(settings)
    staging = layout.evaluation.parent / f".{layout.evaluation.name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    eval_rows = np.concatenate(
        [cache.rows(split="val", other=other), cache.rows(split="test", other=other)]
    )
    test_mask = cache.index["split"].to_numpy()[eval_rows] == "test"

    # 1. body part: which fracture model each image goes to (outputs are computed once per
    #    model and image, and shared with the end-to-end run in step 3)
    forward = {
        name: CachedForward(partial(predict, _load(layout.models, name)), cache.images)
        for name in (BODY_PART_MODEL, *parts)
    }
    body_probs = forward[BODY_PART_MODEL](eval_rows)
    predicted_part = np.array(classes)[body_probs.argmax(axis=1)]
    true_part = cache.index["body_part"].to_numpy()[eval_rows]
    true_class = np.array([body_part_class(p, classes) for p in true_part])
    body_dir = staging / BODY_PART_MODEL
    body_dir.mkdir()
    truth, guess = true_class[test_mask], predicted_part[test_mask]
    body_metrics = multiclass_metrics(truth, guess, classes)
    confusion_matrix_plot(truth, guess, classes, body_dir / "confusion_matrix.png")
    (body_dir / "classification_report.txt").write_text(
        classification_report_text(truth, guess, classes)
    )
    results: dict[str, dict] = {BODY_PART_MODEL: body_metrics}

    # 2. each fracture model on its own part (val picks threshold/temperature, test measures)
    evaluations = {}
    for part in parts:
        own = true_part == part
        probs = np.full(len(eval_rows), np.nan)
        probs[own] = forward[part](eval_rows[own])[:, 0]
        own_val, own_test = own & ~test_mask, own & test_mask
        evaluation = evaluate_binary(
            _frame(cache, eval_rows[own_val], probs[own_val]),
            _frame(cache, eval_rows[own_test], probs[own_test]),
            cfg,
        )
        evaluations[part] = evaluation
        results[part] = evaluation.to_dict()
        _fracture_reports(part, evaluation, staging / part, layout.plots, settings, synthetic)

    # 3. two-stage end to end on test, by the service's inference core: routing errors, the
    #    uncertain band, unsure body parts and the OOD gate included, as users get it
    from bonefrac.pca import PcaModel

    gate = PcaModel.load(layout.pca / "pca.joblib").ood_gate()
    gate.save(staging / OOD_GATE_FILE)  # packaging puts exactly this gate in the bundle
    test_rows = cache.rows(split="test", other=other)
    served = TwoStage(
        classes=tuple(classes),
        body_part=forward[BODY_PART_MODEL],
        fracture={p: forward[p] for p in parts},
        points={
            p: OperatingPoint(e.threshold, e.temperature, e.uncertain_band, e.negative_cutoff)
            for p, e in evaluations.items()
        },
    )
    e2e = evaluate_end_to_end(
        served,
        test_rows,  # row indices: CachedForward looks the images up
        cache.index.iloc[test_rows],
        ood_scores(gate, cache.images[test_rows]),
        cfg,
        ood_gate=True,  # the service's default (serve.ood_gate); off, "refused" reads "uncertain"
    )
    end_to_end = e2e.metrics
    results["end_to_end"] = end_to_end
    # Logged to MLflow: patient ids pseudonymised (privacy.py); the submission keeps MURA's
    # format and study paths, which the MURA challenge needs.
    key = project_key(settings.paths.artifacts)
    pseudonymise_frame(e2e.studies, key).to_csv(staging / "study_probabilities.csv", index=False)
    write_submission(e2e.studies, staging / "submission.csv", e2e.studies["threshold"].to_numpy())

    # 4. comparison with the PCA + logistic-regression baseline (the paper's Table V)
    rows = [
        {
            "model": "ResNet50, two-stage (end to end)",
            "body_part_accuracy": body_metrics["accuracy"],
            "study_kappa": end_to_end["study"]["kappa"],
            "study_kappa_ci": end_to_end["study_ci"].get("kappa"),
            "study_auroc": end_to_end["study"]["auroc"],
            "study_auroc_ci": end_to_end["study_ci"].get("auroc"),
            "study_abstained": end_to_end["study_abstained"],
            "study_submission_kappa": end_to_end["study_submission"]["kappa"],
        }
    ]
    rows += [evaluations[p].comparison_row(f"ResNet50 fracture, {p}") for p in parts]
    baseline = _baseline_row(layout.pca / "baseline_predictions.csv", parts, cfg)
    if baseline:
        rows.append(baseline)
    table = comparison_table(rows)
    if synthetic:
        table = "**SYNTHETIC data: these numbers say nothing about real X-rays.**\n\n" + table
    (staging / "comparison.md").write_text(table + "\n")
    results["comparison"] = rows

    results["test_set"] = test_set_id(cache.index.iloc[cache.rows(split="test")])
    metrics = _headline(results, parts, synthetic)
    (staging / "metrics.json").write_text(json.dumps(results, indent=2, default=_json) + "\n")
    layout.metrics.mkdir(parents=True, exist_ok=True)
    (layout.metrics / "evaluate.json").write_text(json.dumps(metrics, indent=2) + "\n")
    if layout.evaluation.exists():
        shutil.rmtree(layout.evaluation)
    os.replace(staging, layout.evaluation)
    _log_to_mlflow(settings, runs, results, parts, tracking)
    return EvaluationSummary(layout.evaluation, metrics)


def test_set_id(frame: pd.DataFrame) -> str:
    """Identity of a test set: its studies and labels (same id = same test set). The registry
    compares champions on metrics recorded with the same id."""
    studies = frame.drop_duplicates("study_id").sort_values("study_id")
    payload = "\n".join(
        f"{s},{label}" for s, label in zip(studies["study_id"], studies["label"], strict=True)
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _json(value):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, (tuple, np.ndarray)):
        return list(value)
    raise TypeError(type(value))


def _is_synthetic(settings: Settings) -> bool:
    from bonefrac.data.synthetic import is_synthetic

    return is_synthetic(settings.paths.data)


def _fracture_reports(part, evaluation, folder: Path, plots_dir: Path, settings, synthetic):
    folder.mkdir(parents=True)
    studies = evaluation.test_studies
    labels, probs = studies["label"], studies["prob"]
    roc_curve_plot(labels, probs, folder / "roc.png", title=f"{part}: study-level ROC (test)")
    pr_curve_plot(labels, probs, folder / "pr.png", title=f"{part}: study-level PR (test)")
    reliability_plot(labels, studies["prob_uncalibrated"], probs, folder / "reliability.png")
    predicted = (probs >= evaluation.threshold).astype(int)
    confusion_matrix_plot(
        labels, predicted, ["normal", "abnormal"], folder / "confusion_matrix.png"
    )
    (folder / "classification_report.txt").write_text(
        classification_report_text(labels, predicted, ["normal", "abnormal"])
    )
    operating_point = {
        "threshold": evaluation.threshold,
        "temperature": evaluation.temperature,
        "uncertain_band": evaluation.uncertain_band,
        "threshold_method": evaluation.threshold_method,
        "negative_cutoff": evaluation.negative_cutoff,
        "val_sensitivity": evaluation.val_sensitivity,
    }
    (folder / OPERATING_POINT).write_text(json.dumps(operating_point, indent=2) + "\n")
    plots_dir.mkdir(parents=True, exist_ok=True)
    roc_points(labels, probs).to_csv(plots_dir / f"roc_{part}.csv", index=False)
    card = model_card(
        f"bonefrac-fracture-{part}",
        evaluation.to_dict(),
        settings.flat(),
        data_version="synthetic" if synthetic else "see MLflow tag",
        synthetic=synthetic,
    )
    (folder / "model_card.md").write_text(card)


def _baseline_row(path: Path, parts: list[str], cfg) -> dict | None:
    """Score the PCA baseline with exactly the protocol used for ResNet50, pooled over parts."""
    if not path.is_file():
        return None
    frame = pd.read_csv(path, dtype={"patient_id": str, "study_id": str})
    frame = frame.dropna(subset=["fracture_prob"]).rename(columns={"fracture_prob": "prob"})
    val, test = frame[frame["split"] == "val"], frame[frame["split"] == "test"]
    if val.empty or test.empty or test["label"].nunique() < 2:
        return None
    evaluation = evaluate_binary(val, test, cfg)
    accuracy = float((test["body_part_pred"] == test["body_part"]).mean())
    return evaluation.comparison_row(
        "PCA + logistic regression (baseline)", body_part_accuracy=accuracy
    )


def _headline(results: dict, parts: list[str], synthetic: bool) -> dict:
    """Small numbers for `dvc metrics show`."""
    headline = {
        "synthetic_data": synthetic,
        "body_part_accuracy": results[BODY_PART_MODEL]["accuracy"],
        "body_part_kappa": results[BODY_PART_MODEL]["kappa"],
        "end_to_end_study_kappa": results["end_to_end"]["study"]["kappa"],
        "end_to_end_study_auroc": results["end_to_end"]["study"]["auroc"],
        "end_to_end_study_decided_kappa": results["end_to_end"]["study_decided"]["kappa"],
        "end_to_end_study_coverage": results["end_to_end"]["study_decided"]["coverage"],
        "end_to_end_study_uncertain_share": results["end_to_end"]["study_answers"]["uncertain"],
        "end_to_end_study_refused_share": results["end_to_end"]["study_answers"]["refused"],
        "routing_accuracy": results["end_to_end"]["routing_accuracy"],
        # target-part studies the body-part model sent to "other": no finding (abstained)
        "end_to_end_study_abstained": results["end_to_end"]["study_abstained"],
        "end_to_end_study_submission_kappa": results["end_to_end"]["study_submission"]["kappa"],
        # MURA's other parts recognised as out of scope (None: no other parts in the data)
        "other_parts_study_recognised": results["end_to_end"]["other_parts"]["study_recognised"],
    }
    for part in parts:
        headline[f"{part}_study_kappa"] = results[part]["study"]["kappa"]
        headline[f"{part}_study_auroc"] = results[part]["study"]["auroc"]
    return headline


def _log_to_mlflow(
    settings: Settings, runs: dict, results: dict, parts: list[str], tracking
) -> None:
    import mlflow

    tracking.configure(settings)
    folder = settings.layout.evaluation
    body = results[BODY_PART_MODEL]
    with mlflow.start_run(run_id=runs[BODY_PART_MODEL]):
        mlflow.log_metrics({"test_accuracy": body["accuracy"], "test_kappa": body["kappa"]})
        mlflow.log_artifacts(str(folder / BODY_PART_MODEL), artifact_path="evaluation")
    for part in parts:
        with mlflow.start_run(run_id=runs[part]):
            flat = _flatten(results[part])
            mlflow.log_metrics({f"test_{k}": v for k, v in flat.items()})
            mlflow.log_artifacts(str(folder / part), artifact_path="evaluation")
    with mlflow.start_run(run_id=runs["parent"]):
        tracking.log_data_input(settings, "evaluation")  # the end-to-end test numbers' data
        mlflow.log_metrics(
            {f"end_to_end_{k}": v for k, v in _flatten(results["end_to_end"]).items()}
        )
        for name in ("comparison.md", "submission.csv", "study_probabilities.csv", "metrics.json"):
            mlflow.log_artifact(str(folder / name), artifact_path="evaluation")


def _flatten(values: dict, prefix: str = "") -> dict[str, float]:
    flat: dict[str, float] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= _flatten(value, f"{name}_")
        elif (
            isinstance(value, (list, tuple))
            and len(value) == 2
            and all(isinstance(v, (int, float)) for v in value)
        ):
            flat[f"{name}_low"], flat[f"{name}_high"] = float(value[0]), float(value[1])
        elif (
            isinstance(value, (int, float, np.number))
            and not isinstance(value, bool)
            and np.isfinite(value)
        ):
            flat[name] = float(value)
    return flat
