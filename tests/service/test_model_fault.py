"""A model fault met while answering is the server's (5xx), never the client's (4xx)."""

from __future__ import annotations

import json

import pytest

from bonefrac.serving.service import answer

pytestmark = pytest.mark.slow


def test_unusable_operating_point_in_the_bundle_is_a_500_not_a_400(
    predictor, good_png, monkeypatch
):
    # a bundle from before packaging checked operating points: every threshold is 1.0
    models = {
        name: {**meta, "threshold": 1.0} if name in predictor.parts else meta
        for name, meta in predictor.manifest["models"].items()
    }
    monkeypatch.setitem(predictor.manifest, "models", models)
    response = answer("predict", lambda: predictor.predict_bytes(good_png.read_bytes()))
    assert response.status_code == 500
    body = json.loads(response.body)
    assert body["error"]["code"] == "internal"
    assert "threshold" not in body["error"]["message"]  # the fault is logged, not blamed on you
