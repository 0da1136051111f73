"""The evaluate stage's end-to-end numbers are what the running service's code answers.

On the flow's own run (the `pipeline_run` fixture, shared with the other integration tests):
the bundle the flow packaged into the BentoML store is loaded by the service's Predictor, every
test study is sent to `predict_study` as its image files, and the answers are scored here with
scikit-learn. The evaluate stage's study kappa, its decided-only kappa, its answer shares, its
abstentions, its count of MURA's other parts recognised as out of scope and its MURA submission
must equal what the service says."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import cohen_kappa_score

from bonefrac.evaluate import read_submission

pytestmark = pytest.mark.slow


def _packaged_bundle(project: Path, summary: dict) -> Path:
    """The bundle this flow run packaged (its BentoML model tag, from the run's summary).

    Not "a bundle holding this run's models": BentoML fixes its home when first used, so
    later in-process reruns in other tests (which keep these champions) package into the
    same store, and those bundles hold the same runs."""
    name, version = str(summary["model_tag"]).split(":")
    bundle = project.parent / "bentoml" / "models" / name / version
    assert (bundle / "bundle.json").is_file(), f"no bundle {summary['model_tag']} in {bundle}"
    return bundle


@pytest.fixture(scope="module")
def served(pipeline_run):
    """Every test study as the service answers it (allow_ood, so a study the OOD gate would
    refuse still shows its probability; `accepted` says whether the gate would let it in).
    `scope` is the study's part in the manifest: "target" (elbow, hand, shoulder) or "other";
    `judged` whether a fracture model answered (false: routed out of scope, no probability)."""
    from bonefrac.cache import load_cache
    from bonefrac.data.mura import find_mura_root
    from bonefrac.serving.predictor import Predictor

    project, settings, summary = pipeline_run
    runs = json.loads((settings.layout.models / "runs.json").read_text())
    bundle = _packaged_bundle(project, summary)
    models = json.loads((bundle / "bundle.json").read_text())["models"]
    assert {name: models[name]["run_id"] for name in models} == {n: runs[n] for n in models}
    # the evaluate stage measured the Keras fp32 models: the service on that runtime must agree
    predictor = Predictor.from_bundle(bundle, warm_up=False, runtime="tensorflow")
    cache = load_cache(settings.layout.preprocessed)
    test = cache.index[cache.index["split"] == "test"]
    data_dir = find_mura_root(settings.paths.data).parent
    rows = []
    for _, images in test.groupby("study_id", sort=False):
        files = [(data_dir / path).read_bytes() for path in images["path"]]
        result = predictor.predict_study(files, allow_ood=True)
        fracture = result["fracture"]
        judged = fracture["probability"] is not None
        assert judged == result["body_part"]["covered"]
        assert judged or fracture["finding"] == "out_of_scope"
        rows.append(
            {
                "study_path": images["study_path"].iloc[0],
                "scope": images["scope"].iloc[0],
                "label": int(images["label"].iloc[0]),
                "judged": judged,
                # the MURA submission says 0 for a study no fracture model judged
                "prediction": int(judged and fracture["probability"] >= fracture["threshold"]),
                "answer": fracture["finding"] if result["quality"]["accepted"] else "refused",
            }
        )
    return settings, predictor, cache, pd.DataFrame(rows)


def test_evaluated_study_kappa_is_the_services_kappa_over_every_test_study(served):
    settings, _, _, served_studies = served
    report = json.loads((settings.layout.evaluation / "metrics.json").read_text())["end_to_end"]
    studies = served_studies[served_studies["scope"] == "target"]
    judged = studies[studies["judged"]]
    assert report["study"]["n"] == len(judged) > 0
    assert report["study_abstained"] == pytest.approx(1 - len(judged) / len(studies))
    # every target study as the MURA submission scores it (abstained: 0)
    assert report["study_submission"]["n"] == len(studies)
    submitted = cohen_kappa_score(studies["label"], studies["prediction"])
    if not np.isnan(submitted):
        assert report["study_submission"]["kappa"] == pytest.approx(submitted, abs=1e-12)
    kappa = cohen_kappa_score(judged["label"], judged["prediction"])
    if np.isnan(kappa):
        assert report["study"]["kappa"] is None
    else:
        assert report["study"]["kappa"] == pytest.approx(kappa, abs=1e-12)

    decided = studies[studies["answer"].isin(["fracture", "no_fracture"])]
    assert report["study_decided"]["n"] == len(decided)
    assert report["study_decided"]["coverage"] == pytest.approx(len(decided) / len(studies))
    if len(decided) and decided["label"].nunique() == 2:
        said_fracture = (decided["answer"] == "fracture").astype(int)
        expected = cohen_kappa_score(decided["label"], said_fracture)
        assert report["study_decided"]["kappa"] == pytest.approx(expected, abs=1e-12)
    shares = studies["answer"].value_counts(normalize=True)
    for answer in ("fracture", "no_fracture", "uncertain", "out_of_scope", "refused"):
        assert report["study_answers"][answer] == pytest.approx(shares.get(answer, 0.0))

    other = served_studies[served_studies["scope"] == "other"]
    assert report["other_parts"]["n_studies"] == len(other) > 0
    # recognised = sent to no fracture model (refused by the OOD gate or not)
    assert report["other_parts"]["study_recognised"] == pytest.approx((~other["judged"]).mean())


def test_submission_says_what_the_service_says_study_by_study(served):
    settings, _, _, served_studies = served
    studies = served_studies[served_studies["scope"] == "target"]  # MURA's other parts: none
    submission = read_submission(settings.layout.evaluation / "submission.csv")
    paths = studies["study_path"].where(
        studies["study_path"].str.endswith("/"), studies["study_path"] + "/"
    )
    assert submission == dict(zip(paths, studies["prediction"], strict=True))
    for path, answer in zip(paths, studies["answer"], strict=True):
        if answer in ("fracture", "no_fracture"):
            assert submission[path] == int(answer == "fracture")


def test_bundle_re_evaluated_with_its_serving_runtime_gives_the_recorded_numbers(served):
    from bonefrac.evaluate.end_to_end import evaluate_bundle

    settings, predictor, cache, _ = served
    report = json.loads((settings.layout.evaluation / "metrics.json").read_text())["end_to_end"]
    again = evaluate_bundle(
        predictor.core, predictor.gate, cache, settings.evaluate, runtime="bundle keras-fp32"
    )
    assert report["runtime"] == "keras-fp32"
    for level in ("image", "study"):
        for key in ("kappa", "accuracy", "n", "tp", "fp"):
            assert again.metrics[level][key] == pytest.approx(report[level][key], abs=1e-9)
        assert again.metrics[f"{level}_answers"] == pytest.approx(report[f"{level}_answers"])


def test_bundle_records_what_its_default_runtime_answers_on_the_test_split(pipeline_run, served):
    """Packaging evaluated the bundle through the runtime the service picks by default
    (int8 where it passed the gate): re-running that runtime gives the recorded numbers."""
    from bonefrac.evaluate.end_to_end import evaluate_bundle
    from bonefrac.serving.predictor import Predictor

    project, settings, summary = pipeline_run
    _, _, cache, _ = served
    runs = json.loads((settings.layout.models / "runs.json").read_text())
    bundle = _packaged_bundle(project, summary)
    manifest = json.loads((bundle / "bundle.json").read_text())
    recorded = manifest["served_evaluation"]
    predictor = Predictor.from_bundle(bundle, warm_up=False)  # serve.runtime: auto
    assert predictor.runtime_info == recorded["runtime"]
    assert "openvino" in manifest and manifest["openvino"]["models"].keys() == set(runs) - {
        "parent",
        "model_uris",
    }
    # an exact fp32 export differs from Keras by ~1e-7: it must pass its gate (it once failed,
    # its study at the val-fitted threshold flipping, so every model was served by TensorFlow)
    for name, entry in manifest["openvino"]["models"].items():
        assert entry["fp32"]["passed"], (name, entry["fp32"]["reason"])
        assert entry["fp32"]["metrics"]["max_delta_p"] < 1e-4, name
    again = evaluate_bundle(
        predictor.core, predictor.gate, cache, settings.evaluate, predictor.runtime_info["name"]
    )
    for level in ("image", "study"):
        for key in ("kappa", "auroc", "n"):
            assert again.metrics[level][key] == pytest.approx(recorded[level][key], abs=1e-9)
        assert recorded[level]["abstained"] == pytest.approx(again.metrics[f"{level}_abstained"])


def test_a_kept_champion_with_older_preprocessing_is_evaluated_and_served_its_own_way(
    pipeline_run, served, tmp_path
):
    """After a preprocessing change the gate may keep a champion trained the old way: the
    bundle records its preprocessing, packaging skips the OpenVINO export it cannot calibrate
    (the cache is the new preprocessing) but still records the served evaluation, and both
    that evaluation and the service feed it test images preprocessed its way, freshly from the
    files; the other models and the OOD gate keep the cache's."""
    import shutil

    import keras

    from bonefrac.bundle import BUNDLE_FILE
    from bonefrac.bundle_integrity import write_manifest
    from bonefrac.config import PreprocessConfig
    from bonefrac.data.mura import find_mura_root
    from bonefrac.imaging import preprocess_file
    from bonefrac.packaging import add_openvino
    from bonefrac.serving.predictor import Predictor

    project, settings, summary = pipeline_run
    _, _, cache, _ = served
    bundle = tmp_path / "bundle"
    shutil.copytree(_packaged_bundle(project, summary), bundle)
    manifest = json.loads((bundle / BUNDLE_FILE).read_text())
    assert manifest["preprocess"]["gaussian_kernel"] > 0
    older = {**manifest["preprocess"], "gaussian_kernel": 0}  # before the filter was on
    manifest["models"]["hand"]["preprocess"] = older
    manifest["format"] = 3  # a mixed bundle: older bonefrac must refuse it
    for key in ("openvino", "served_evaluation"):
        manifest.pop(key, None)
    (bundle / BUNDLE_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    write_manifest(bundle)

    section = add_openvino(bundle, settings, {}, None, {})  # no champions: nothing to tag
    assert "hand" in section["skipped"] and "elbow" not in section["skipped"]
    recorded = json.loads((bundle / BUNDLE_FILE).read_text())["served_evaluation"]
    assert recorded["runtime"]["name"] == "tensorflow"

    predictor = Predictor.from_bundle(bundle, warm_up=False)
    assert predictor.runtime_info["name"] == "tensorflow"
    data_dir = find_mura_root(settings.paths.data).parent
    test = cache.index[(cache.index["split"] == "test") & (cache.index["scope"] == "target")]
    labels, predictions = [], []
    for _, images in test.groupby("study_id", sort=False):
        files = [(data_dir / path).read_bytes() for path in images["path"]]
        fracture = predictor.predict_study(files, allow_ood=True)["fracture"]
        if fracture["probability"] is None:  # routed out of scope: abstained, not scored
            continue
        labels.append(int(images["label"].iloc[0]))
        predictions.append(int(fracture["probability"] >= fracture["threshold"]))
    # what packaging recorded is what this service answers, study by study
    assert recorded["study"]["n"] == len(labels)
    assert recorded["study"]["kappa"] == pytest.approx(
        cohen_kappa_score(labels, predictions), abs=1e-9
    )

    # hand's answer is its model on the old preprocessing, not on the cache's
    hand = keras.models.load_model(bundle / "hand" / "model.keras", compile=False)
    path = data_dir / test[test["body_part"] == "hand"]["path"].iloc[0]
    views = predictor.inputs(path.read_bytes())
    got = float(np.asarray(predictor.core.fracture["hand"](views)).reshape(-1)[0])
    x = preprocess_file(path, PreprocessConfig(**older))[None]
    assert got == pytest.approx(float(np.asarray(hand(x.astype(np.float32)))[0, 0]), abs=1e-5)
    new = preprocess_file(path, PreprocessConfig(**manifest["preprocess"]))[None]
    assert not np.array_equal(x, new)  # so feeding it the cache's image would be another input
