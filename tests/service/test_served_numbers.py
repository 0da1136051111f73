"""The running service answers with the bundle's operating point: its JSON over HTTP carries
the API version, and its study probability, threshold and finding equal values computed here
from the models called eagerly and scipy's sigmoid (see test_predictor's helpers)."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from .conftest import OPERATING_POINTS, PARTS
from .test_predictor import calibrated, expected_finding, raw_outputs

pytestmark = pytest.mark.slow


def test_served_study_follows_the_bundles_operating_point(server, predictor, study_pngs):
    from bonefrac.serving.predictor import API_VERSION

    files = [("images", (p.name, p.read_bytes(), "application/octet-stream")) for p in study_pngs]
    response = httpx.post(f"{server.url}/predict_study", files=files, timeout=120)
    assert response.status_code == 200, response.text
    study = response.json()
    assert study["api_version"] == API_VERSION and study["model_versions"]["bundle_format"] == 2

    raws = [raw_outputs(predictor, predictor.preprocess(p.read_bytes())) for p in study_pngs]
    part = PARTS[int(np.mean([raw["body_part"] for raw in raws], axis=0).argmax())]
    expected = float(np.mean([calibrated(raw[part][0], part) for raw in raws]))
    fracture = study["fracture"]
    assert fracture["model"] == part
    assert fracture["probability"] == pytest.approx(expected, abs=1e-5)
    assert fracture["threshold"] == OPERATING_POINTS[part]["threshold"]
    assert fracture["uncertain_band"] == OPERATING_POINTS[part]["uncertain_band"]
    assert fracture["model_finding"] == expected_finding(fracture["probability"], part)
