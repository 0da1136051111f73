"""The Predictor without a server: response schema, calibration, study protocol, OOD gate,
Grad-CAM and the train/serve preprocessing identity, on a real (untrained) bundle whose
operating points are not the predictor's old fallbacks (see conftest.OPERATING_POINTS).

Served numbers are checked against values computed here independently: the Keras models
called eagerly, scipy's sigmoid for the temperature, the finding rule written out."""

from __future__ import annotations

import base64
import dataclasses
import json
import shutil

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from scipy.special import expit, logit

from bonefrac import DISCLAIMER
from bonefrac.errors import DataError
from bonefrac.imaging import ImageError, preprocess_file
from bonefrac.serving.predictor import API_VERSION, OutOfDistribution, Predictor

from .conftest import OPERATING_POINTS, PARTS, SIZE
from .inputs import dicom_from_png, out_of_distribution

pytestmark = pytest.mark.slow

FINDINGS = {"fracture", "no_fracture", "uncertain"}


def check_image_result(result: dict) -> None:
    assert set(result["body_part"]["probabilities"]) == set(PARTS)
    assert result["body_part"]["label"] in PARTS
    assert sum(result["body_part"]["probabilities"].values()) == pytest.approx(1, abs=1e-4)
    fracture = result["fracture"]
    assert 0 < fracture["probability"] < 1
    assert fracture["finding"] in FINDINGS and fracture["model_finding"] in FINDINGS
    point = OPERATING_POINTS[fracture["model"]]
    assert fracture["threshold"] == point["threshold"]
    assert fracture["uncertain_band"] == point["uncertain_band"]
    assert set(result["quality"]) == {"ood_score", "accepted", "ood_limit"}


def test_single_image_response_schema(predictor, good_png):
    result = predictor.predict_bytes(good_png.read_bytes())
    check_image_result(result)
    assert result["level"] == "image" and result["api_version"] == API_VERSION
    assert result["model_versions"]["bundle_format"] == 2
    assert result["quality"]["accepted"] is True
    assert result["disclaimer"] == DISCLAIMER
    assert result["synthetic_models"] is True
    assert any("SYNTHETIC" in notice for notice in result["notices"])
    rec = result["recommendation"]
    assert rec["disclaimer"] == DISCLAIMER and rec["sources"] and rec["urgency"]["text"]
    assert rec["body_part"] == result["body_part"]["label"]
    assert result["model_versions"]["models"]["body_part"]["run_id"] == "test-run"
    assert "heatmap" not in result
    json.dumps(result)  # JSON-ready as it is, no numpy scalars


def expected_finding(prob: float, part: str) -> str:
    point = OPERATING_POINTS[part]
    if abs(prob - point["threshold"]) < point["uncertain_band"]:
        return "uncertain"
    return "fracture" if prob >= point["threshold"] else "no_fracture"


def calibrated(raw: float, part: str) -> float:
    return float(expit(logit(raw) / OPERATING_POINTS[part]["temperature"]))


def raw_outputs(predictor, image: np.ndarray) -> dict[str, np.ndarray]:
    """Every model on one preprocessed image, called eagerly (not the served graphs)."""
    x = image[None].astype(np.float32)
    return {
        name: np.asarray(model(x, training=False))[0] for name, model in predictor._keras.items()
    }


def test_served_numbers_follow_the_operating_point_of_the_routed_part(
    predictor, valid_pngs, monkeypatch
):
    paths = [paths[0] for paths in valid_pngs.values()]
    for path in paths:
        image = predictor.preprocess(path.read_bytes())
        raw = raw_outputs(predictor, image)
        result = predictor.predict_image(image, allow_ood=True)
        part = PARTS[int(raw["body_part"].argmax())]
        assert result["body_part"]["label"] == part
        for name, prob in result["body_part"]["probabilities"].items():
            assert prob == pytest.approx(float(raw["body_part"][PARTS.index(name)]), abs=1e-5)
        fracture = result["fracture"]
        assert fracture["model"] == part
        assert fracture["uncalibrated_probability"] == pytest.approx(raw[part][0], abs=1e-5)
        assert fracture["probability"] == pytest.approx(calibrated(raw[part][0], part), abs=1e-5)
        assert fracture["model_finding"] == expected_finding(fracture["probability"], part)

    # Route the same image to each part in turn: each part's own operating point applies.
    image = predictor.preprocess(paths[0].read_bytes())
    raw = raw_outputs(predictor, image)
    for k, part in enumerate(PARTS):
        sure = np.eye(len(PARTS), dtype=np.float32)[k] * 0.9 + 0.1 / len(PARTS)
        core = dataclasses.replace(
            predictor.core, body_part=lambda images, s=sure: np.repeat(s[None], len(images), 0)
        )
        monkeypatch.setattr(predictor, "core", core)
        fracture = predictor.predict_image(image, allow_ood=True)["fracture"]
        assert fracture["model"] == part
        assert fracture["threshold"] == OPERATING_POINTS[part]["threshold"]
        assert fracture["probability"] == pytest.approx(calibrated(raw[part][0], part), abs=1e-5)
        assert fracture["model_finding"] == expected_finding(fracture["probability"], part)


def test_finding_is_uncertain_inside_the_band_and_decided_outside(predictor, good_png, monkeypatch):
    """Fracture outputs placed exactly around the threshold (temperature undone), so every
    branch of the finding is exercised whatever the untrained models output."""
    image = predictor.preprocess(good_png.read_bytes())
    part = predictor.predict_image(image)["fracture"]["model"]
    point = OPERATING_POINTS[part]
    threshold, band, temperature = point["threshold"], point["uncertain_band"], point["temperature"]
    for served, expected in (
        (threshold + band / 2, "uncertain"),
        (threshold - band / 2, "uncertain"),
        (threshold + 2 * band, "fracture"),
        (threshold - 2 * band, "no_fracture"),
    ):
        raw = float(expit(logit(served) * temperature))  # calibrates back to `served`
        fracture_models = {
            **predictor.core.fracture,
            part: lambda images, r=raw: np.full(len(images), r),
        }
        monkeypatch.setattr(
            predictor, "core", dataclasses.replace(predictor.core, fracture=fracture_models)
        )
        fracture = predictor.predict_image(image)["fracture"]
        assert fracture["probability"] == pytest.approx(served, abs=1e-9)
        assert fracture["model_finding"] == fracture["finding"] == expected


def test_study_is_the_mean_of_calibrated_image_probabilities(predictor, study_pngs):
    result = predictor.predict_study([p.read_bytes() for p in study_pngs])
    assert result["level"] == "study" and result["n_images"] == 3 == len(result["images"])
    assert result["api_version"] == API_VERSION
    raws = [raw_outputs(predictor, predictor.preprocess(p.read_bytes())) for p in study_pngs]
    mean_body = np.mean([raw["body_part"] for raw in raws], axis=0)
    part = PARTS[int(mean_body.argmax())]
    assert result["body_part"]["label"] == part
    images = result["images"]
    for image, raw in zip(images, raws, strict=True):
        check_image_result(image)
        assert image["fracture"]["model"] == part  # every image judged by the study's part
        assert image["fracture"]["probability"] == pytest.approx(
            calibrated(raw[part][0], part), abs=1e-5
        )
    expected = np.mean([calibrated(raw[part][0], part) for raw in raws])
    fracture = result["fracture"]
    assert fracture["probability"] == pytest.approx(expected, abs=1e-5)
    assert fracture["threshold"] == OPERATING_POINTS[part]["threshold"]
    assert fracture["model_finding"] == expected_finding(fracture["probability"], part)
    assert result["recommendation"]["disclaimer"] == DISCLAIMER
    assert result["disclaimer"] == DISCLAIMER


def test_out_of_distribution_is_refused_unless_overridden(predictor):
    picture = out_of_distribution()
    with pytest.raises(OutOfDistribution) as refused:
        predictor.predict_bytes(picture)
    assert refused.value.code == "out_of_distribution"
    assert "does not look like an elbow, hand or shoulder radiograph" in str(refused.value)

    result = predictor.predict_bytes(picture, allow_ood=True)
    assert result["quality"]["accepted"] is False and result["quality"]["ood_score"] > 1
    assert result["fracture"]["finding"] == "uncertain"
    assert result["recommendation"]["review_by_radiologist"] is True
    assert any("override" in notice for notice in result["notices"])


def test_unsure_body_part_gives_an_uncertain_finding(predictor, good_png, monkeypatch):
    flat = np.array([[0.4, 0.35, 0.25]], dtype=np.float32)
    unsure = dataclasses.replace(
        predictor.core, body_part=lambda images: np.repeat(flat, len(images), axis=0)
    )
    monkeypatch.setattr(predictor, "core", unsure)
    result = predictor.predict_bytes(good_png.read_bytes())
    assert result["body_part"]["confident"] is False
    assert result["fracture"]["finding"] == "uncertain"
    assert result["recommendation"]["finding"] == "uncertain"
    assert result["recommendation"]["review_by_radiologist"] is True


def test_gradcam_heatmap_and_overlay(predictor, good_png):
    result = predictor.predict_bytes(good_png.read_bytes(), explain=True)
    overlay = cv2.imdecode(np.frombuffer(base64.b64decode(result["heatmap"]), np.uint8), 1)
    assert overlay.shape == (SIZE, SIZE, 3)
    assert result["heatmap_info"]["target"] == "abnormal"

    image = predictor.preprocess(good_png.read_bytes())
    gradcam = predictor._gradcam(result["fracture"]["model"])  # the GradCam the result used
    heatmaps = gradcam.heatmaps(np.stack([image, image]))
    assert heatmaps.shape == (2, SIZE, SIZE) and heatmaps.dtype == np.float32
    assert heatmaps.min() >= 0 and heatmaps.max() <= 1


def test_serving_preprocessing_is_the_training_preprocessing(predictor, good_png, quick_settings):
    served = predictor.preprocess(good_png.read_bytes())
    trained = preprocess_file(good_png, quick_settings.preprocess)
    np.testing.assert_array_equal(served, trained)


def test_dicom_gives_the_same_kind_of_answer_without_patient_data(predictor, good_png):
    from .inputs import PATIENT_ID, PATIENT_NAME

    result = predictor.predict_bytes(dicom_from_png(good_png))
    check_image_result(result)
    text = json.dumps(result)
    assert PATIENT_NAME.split("^")[0] not in text and PATIENT_ID not in text


def test_batch_matches_single_images_and_keeps_errors_in_place(predictor, study_pngs):
    files = [p.read_bytes() for p in study_pngs]
    batch = predictor.predict_batch_bytes([files[0], b"not an image", files[1]])
    assert batch[1] == {"error": {"code": "not_an_image", "message": batch[1]["error"]["message"]}}
    for result, data in zip((batch[0], batch[2]), files[:2], strict=True):
        single = predictor.predict_bytes(data)
        assert result["fracture"]["probability"] == pytest.approx(
            single["fracture"]["probability"], rel=1e-4
        )
        assert result["body_part"]["label"] == single["body_part"]["label"]


def test_bad_image_raises_the_imaging_error(predictor):
    with pytest.raises(ImageError) as bad:
        predictor.predict_bytes(b"")
    assert bad.value.code == "empty"


def test_cli_predict_prints_the_service_json(predictor, bundle_dir, good_png, monkeypatch):
    from bonefrac.cli import cli
    from bonefrac.serving import predictor as predictor_module

    monkeypatch.setattr(
        predictor_module.Predictor, "from_bundle", classmethod(lambda cls, *a, **k: predictor)
    )
    runner = CliRunner()
    ok = runner.invoke(cli, ["predict", str(good_png), "--bundle", str(bundle_dir)])
    assert ok.exit_code == 0, ok.output
    assert (
        json.loads(ok.output)["fracture"]
        == predictor.predict_bytes(good_png.read_bytes())["fracture"]
    )
    bad = runner.invoke(cli, ["predict", __file__, "--bundle", str(bundle_dir)])
    assert bad.exit_code == 2
    assert bad.output.count("\n") == 1 and "not a PNG, JPEG or DICOM" in bad.output


def test_bundle_of_the_previous_format_is_refused_with_a_clear_message(bundle_dir, tmp_path):
    from bonefrac.cli import cli

    old = shutil.copytree(bundle_dir, tmp_path / "old")
    manifest = json.loads((old / "bundle.json").read_text())
    (old / "bundle.json").write_text(json.dumps({**manifest, "format": 1}))
    (old / "ood_gate.npz").unlink()  # format 1 had only the pickled PCA
    with pytest.raises(DataError, match="format-1 bundle from an older bonefrac"):
        Predictor.from_bundle(old, warm_up=False)
    result = CliRunner().invoke(cli, ["predict", __file__, "--bundle", str(old)])
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert "package the models again" in result.output

    (old / "bundle.json").write_text(json.dumps({**manifest, "format": 4}))
    with pytest.raises(DataError, match="reads formats 2 and 3"):
        Predictor.from_bundle(old, warm_up=False)
    # format 3 = some model takes its own preprocessing; this one's models all take the bundle's
    (old / "bundle.json").write_text(json.dumps({**manifest, "format": 3}))
    with pytest.raises(DataError, match="says format 3 but its models' preprocessing is all"):
        Predictor.from_bundle(old, warm_up=False)
    broken = {**manifest, "preprocess": {**manifest["preprocess"], "image_size": "big"}}
    (old / "bundle.json").write_text(json.dumps(broken))
    with pytest.raises(DataError, match="missing or invalid preprocessing settings"):
        Predictor.from_bundle(old, warm_up=False)
