"""Train the four ResNet50s (32-64 px, a few epochs, weights=None) on SYNTHETIC data and
evaluate them; everything lands in a real MLflow store in a temp folder."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from bonefrac.evaluate import read_submission

pytestmark = pytest.mark.slow
MODELS = ("body_part", "elbow", "hand", "shoulder")


@pytest.fixture(scope="module")
def trained(pipeline_run):
    """The flow's run: the same stage functions `dvc repro` and `bonefrac train` call."""
    from bonefrac.evaluate.stage import EvaluationSummary
    from bonefrac.train import TrainResult

    project, settings, summary = pipeline_run
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    runs = json.loads((settings.layout.models / "runs.json").read_text())
    results = {
        name: TrainResult(
            name,
            settings.layout.models / name / "model.keras",
            json.loads((settings.layout.models / name / "meta.json").read_text())["history"],
            0,
            0.0,
            0.0,
            run_id=runs[name],
        )
        for name in MODELS
    }
    return settings, results, EvaluationSummary(settings.layout.evaluation, summary["metrics"])


def test_body_part_model_clearly_beats_chance(trained):
    settings, _, summary = trained
    # three distinct synthetic anatomies: chance is 1/3
    assert summary.metrics["body_part_accuracy"] > 0.6
    report = json.loads((settings.layout.evaluation / "metrics.json").read_text())
    assert report["body_part"]["kappa"] > 0.4


def test_fracture_metrics_are_computed_at_both_levels_with_cis(trained):
    settings, _, summary = trained
    report = json.loads((settings.layout.evaluation / "metrics.json").read_text())
    for part in ("elbow", "hand", "shoulder"):
        assert np.isfinite(summary.metrics[f"{part}_study_auroc"])
        for level in ("image", "study"):
            metrics = report[part][level]
            assert {"kappa", "auroc", "sensitivity", "specificity", "f1"} <= metrics.keys()
            # a percentile bootstrap interval need not contain the point estimate; it must be
            # an ordered interval inside the metric's range
            low, high = metrics["ci"]["kappa"]
            assert -1 <= low <= high <= 1 and -1 <= metrics["kappa"] <= 1
            low, high = metrics["ci"]["auroc"]
            assert 0 <= low <= high <= 1
        operating_point = json.loads(
            (settings.layout.evaluation / part / "operating_point.json").read_text()
        )
        assert 0 < operating_point["threshold"] < 1 and operating_point["temperature"] > 0
        # the confident-negative cut-off and the sensitivity the page shows: fitted on val
        assert 0 <= operating_point["negative_cutoff"] <= operating_point["threshold"]
        sensitivity = operating_point["val_sensitivity"]
        assert sensitivity["split"] == "val" and sensitivity["interval"] == "Wilson 95%"
    assert 0 <= report["end_to_end"]["routing_accuracy"] <= 1


def test_submission_matches_the_test_studies(trained):
    settings, _, _ = trained
    index = pd.read_csv(settings.layout.preprocessed / "index.csv")
    covered = index["scope"] == "target"  # MURA's other parts get no fracture finding
    test_studies = set(index.loc[(index["split"] == "test") & covered, "study_path"])
    submission = read_submission(settings.layout.evaluation / "submission.csv")
    assert set(submission) == test_studies
    assert set(submission.values()) <= {0, 1}
    first = (settings.layout.evaluation / "submission.csv").read_text().splitlines()[0]
    assert first.startswith("MURA-v1.1/valid/") and first[-3:] in {"/,0", "/,1"}
    table = (settings.layout.evaluation / "comparison.md").read_text()
    assert "SYNTHETIC" in table and "PCA + logistic regression" in table


def test_other_parts_train_only_the_body_part_model_and_are_reported(trained):
    """MURA's other parts (synthetic wrist, finger, forearm, humerus) are the body-part model's
    fourth class; the fracture models and the PCA baseline never see them; the end-to-end
    evaluation reports how many of their test studies were recognised as out of scope."""
    settings, _, _ = trained
    index = pd.read_csv(settings.layout.preprocessed / "index.csv")
    other = index["scope"] == "other"
    assert set(index.loc[other, "body_part"]) == {"wrist", "finger", "forearm", "humerus"}
    meta = {
        name: json.loads((settings.layout.models / name / "meta.json").read_text())
        for name in MODELS
    }
    assert meta["body_part"]["classes"] == ["elbow", "hand", "shoulder", "other"]
    assert meta["body_part"]["n_train"] == int((index["split"] == "train").sum())
    for part in ("elbow", "hand", "shoulder"):
        own = (index["split"] == "train") & (index["body_part"] == part)
        assert meta[part]["n_train"] == int(own.sum())
    baseline = pd.read_csv(settings.layout.pca / "baseline_predictions.csv")
    assert set(baseline["body_part"]) == {"elbow", "hand", "shoulder"}
    report = json.loads((settings.layout.evaluation / "metrics.json").read_text())
    other_test = index[other & (index["split"] == "test")]
    reported = report["end_to_end"]["other_parts"]
    assert reported["n_images"] == len(other_test) > 0
    assert reported["n_studies"] == other_test["study_id"].nunique()
    assert 0 <= reported["study_recognised"] <= 1
    target_test = index[~other & (index["split"] == "test")]
    assert (
        report["end_to_end"]["study"]["n"]
        + round(report["end_to_end"]["study_abstained"] * target_test["study_id"].nunique())
        == target_test["study_id"].nunique()
    )
    text = (settings.layout.evaluation / "body_part" / "classification_report.txt").read_text()
    assert "other" in text


def test_mlflow_holds_params_metrics_and_artifacts(trained):
    settings, results, _ = trained
    client = MlflowClient()
    runs = json.loads((settings.layout.models / "runs.json").read_text())
    parent = client.get_run(runs["parent"])
    assert parent.data.tags["bonefrac.git_commit"] != "unknown"
    assert "bonefrac.data_version" in parent.data.tags
    assert "end_to_end_study_kappa" in parent.data.metrics
    parent_artifacts = {a.path for a in client.list_artifacts(runs["parent"], "evaluation")}
    assert "evaluation/submission.csv" in parent_artifacts
    assert "evaluation/comparison.md" in parent_artifacts

    flat = settings.flat()
    for name in MODELS:
        run = client.get_run(runs[name])
        assert run.data.tags["mlflow.parentRunId"] == runs["parent"]
        assert run.data.tags["bonefrac.model"] == name
        assert run.info.status == "FINISHED"
        # every flattened setting is a param
        assert {k for k in flat} <= set(run.data.params)
        assert run.data.params["train.weights"] == "none"
        # the values this model trained with: the body-part model's own (train.body_part)
        used = settings.train.for_model(name)
        assert run.data.params["train.finetune_epochs"] == str(used.finetune_epochs)
        assert run.data.params["train.patience"] == str(used.patience)
        assert len(results[name].history["loss"]) <= used.finetune_epochs
        # what each phase trained (quick profile: no head phase, every layer from scratch)
        meta = json.loads((settings.layout.models / name / "meta.json").read_text())
        assert [p["phase"] for p in meta["phases"]] == ["finetune"]
        finetune = meta["phases"][0]
        assert run.data.params["trainable_weights_finetune"] == str(finetune["trainable_weights"])
        assert run.data.params["epochs_finetune"] == str(len(results[name].history["loss"]))
        assert "trainable_weights_head" not in run.data.params
        # per-epoch curves
        epochs = results[name].history["loss"]
        assert len(client.get_metric_history(runs[name], "loss")) == len(epochs)
        assert len(client.get_metric_history(runs[name], "val_auc")) == len(epochs)
        top = {a.path for a in client.list_artifacts(runs[name])}
        assert {"training_curves.png", "meta.json"} <= top
        evaluation = {
            a.path.split("/")[-1] for a in client.list_artifacts(runs[name], "evaluation")
        }
        assert {"confusion_matrix.png", "classification_report.txt"} <= evaluation
        if name != "body_part":
            assert {
                "roc.png",
                "pr.png",
                "reliability.png",
                "model_card.md",
                "operating_point.json",
            } <= evaluation
            assert "test_study_kappa" in run.data.metrics
    body = client.get_run(runs["body_part"])
    assert "test_accuracy" in body.data.metrics


def test_logged_model_round_trips_with_identical_outputs(trained):
    import keras

    settings, _, _ = trained
    runs = json.loads((settings.layout.models / "runs.json").read_text())
    logged = mlflow.keras.load_model(runs["model_uris"]["elbow"])
    local = keras.models.load_model(settings.layout.models / "elbow" / "model.keras")
    x = np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(logged(x)), np.asarray(local(x)), rtol=1e-5)
    requirements = mlflow.pyfunc.get_model_dependencies(runs["model_uris"]["elbow"])
    text = Path(requirements).read_text()
    assert "keras==" in text and "tensorflow" in text
