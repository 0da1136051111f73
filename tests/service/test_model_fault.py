"""A model fault met while answering is the server's (5xx), never the client's (4xx)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from bonefrac.inference import OperatingPoint
from bonefrac.serving.service import answer

pytestmark = pytest.mark.slow


def test_unusable_operating_point_in_the_bundle_is_a_500_not_a_400(
    predictor, good_png, monkeypatch
):
    # a bundle from before packaging checked operating points: every threshold is 1.0
    points = {
        part: OperatingPoint(1.0, point.temperature, point.uncertain_band)
        for part, point in predictor.core.points.items()
    }
    monkeypatch.setattr(predictor, "core", dataclasses.replace(predictor.core, points=points))
    response = answer("predict", lambda: predictor.predict_bytes(good_png.read_bytes()))
    assert response.status_code == 500
    body = json.loads(response.body)
    assert body["error"]["code"] == "internal"
    assert "threshold" not in body["error"]["message"]  # the fault is logged, not blamed on you
