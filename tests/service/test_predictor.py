"""The Predictor without a server: response schema, calibration, study protocol, OOD gate,
Grad-CAM and the train/serve preprocessing identity, on a real (untrained) bundle."""

from __future__ import annotations

import base64
import json

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from bonefrac import DISCLAIMER
from bonefrac.evaluate.calibration import apply_temperature
from bonefrac.imaging import ImageError, preprocess_file
from bonefrac.serving.predictor import OutOfDistribution

from .conftest import PARTS, SIZE
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
    assert fracture["threshold"] == 0.5 and fracture["uncertain_band"] == 0.1
    assert set(result["quality"]) == {"ood_score", "accepted", "ood_limit"}


def test_single_image_response_schema(predictor, good_png):
    result = predictor.predict_bytes(good_png.read_bytes())
    check_image_result(result)
    assert result["level"] == "image"
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


def test_calibration_and_finding_follow_the_operating_point(predictor, good_png):
    result = predictor.predict_bytes(good_png.read_bytes())
    fracture = result["fracture"]
    assert fracture["probability"] == pytest.approx(
        apply_temperature([fracture["uncalibrated_probability"]], 1.0)[0]
    )
    p = fracture["probability"]
    expected = "uncertain" if abs(p - 0.5) < 0.1 else ("fracture" if p >= 0.5 else "no_fracture")
    assert fracture["model_finding"] == expected


def test_study_is_the_mean_of_calibrated_image_probabilities(predictor, study_pngs):
    result = predictor.predict_study([p.read_bytes() for p in study_pngs])
    assert result["level"] == "study" and result["n_images"] == 3 == len(result["images"])
    images = result["images"]
    for image in images:
        check_image_result(image)
        assert image["fracture"]["model"] == result["body_part"]["label"]  # routed to the study
    mean = np.mean([image["fracture"]["probability"] for image in images])
    assert result["fracture"]["probability"] == pytest.approx(mean)
    combined = {
        part: np.mean([image["body_part"]["probabilities"][part] for image in images])
        for part in PARTS
    }
    assert result["body_part"]["label"] == max(combined, key=combined.get)
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
    monkeypatch.setitem(
        predictor._forward, "body_part", lambda images: np.repeat(flat, len(images), axis=0)
    )
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
