"""What the service tells a clinician (issue 18, items 3-5), on the real test bundle's Predictor:
the bundle's confident-negative cut-off and val sensitivity, the age group, the single-view
safeguard for one image, and the flag for a study whose views disagree. Fracture outputs are
placed around each part's operating point (temperature undone), so every branch runs whatever
the untrained models output."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy.special import expit, logit

from bonefrac.serving.predictor import PredictionError

from .conftest import OPERATING_POINTS, PARTS

pytestmark = pytest.mark.slow


def _raw(served: float, part: str) -> float:
    """The model output that calibrates to `served` under the part's temperature."""
    return float(expit(logit(served) * OPERATING_POINTS[part]["temperature"]))


def _routed(predictor, monkeypatch, part: str, served: list[float]) -> None:
    """Route every image to `part` and make its fracture model answer `served` (calibrated)
    for the images in order."""
    sure = np.eye(len(PARTS), dtype=np.float32)[PARTS.index(part)] * 0.9 + 0.1 / len(PARTS)
    raws = np.array([_raw(p, part) for p in served])
    fracture = {**predictor.core.fracture, part: lambda images: raws[: len(images)]}
    core = dataclasses.replace(
        predictor.core,
        body_part=lambda images: np.repeat(sure[None], len(images), 0),
        fracture=fracture,
    )
    monkeypatch.setattr(predictor, "core", core)


@pytest.mark.parametrize("part", PARTS)
def test_a_negative_is_confident_only_below_the_bundles_cutoff(
    predictor, good_png, monkeypatch, part
):
    image = predictor.preprocess(good_png.read_bytes())
    point = OPERATING_POINTS[part]
    cutoff = point.get("negative_cutoff", 0.0)  # the shoulder's bundle entry has none
    just_below_band = point["threshold"] - point["uncertain_band"] - 0.02  # > every cut-off
    for served in (just_below_band, cutoff / 2):
        _routed(predictor, monkeypatch, part, [served])
        result = predictor.predict_image(image, allow_ood=True, age_group="adult")
        fracture, rec = result["fracture"], result["recommendation"]
        assert fracture["model_finding"] == "no_fracture"
        assert fracture["negative_cutoff"] == cutoff
        assert fracture["sensitivity"] == point.get("val_sensitivity")
        confident = served < cutoff and result["quality"]["accepted"]
        assert rec["confidence"] == ("high" if served < cutoff else "low")
        if result["quality"]["accepted"]:
            assert rec["review_by_radiologist"] is not confident
        assert rec["urgency"]["level"] not in ("routine",)
        assert "does not rule out injury" in rec["negative_caution"]


def test_one_image_gets_the_single_view_safeguard_and_the_age_group(
    predictor, good_png, monkeypatch
):
    image = predictor.preprocess(good_png.read_bytes())
    _routed(predictor, monkeypatch, "shoulder", [0.05])
    default = predictor.predict_image(image, allow_ood=True)
    rec = default["recommendation"]
    assert default["age_group"] == rec["age_group"] == "unknown"
    assert "axillary or scapular Y view" in rec["further_imaging"][0]["text"]
    assert "Age group not given" in rec["paediatric"][0]["text"]

    child = predictor.predict_image(image, allow_ood=True, age_group="child")["recommendation"]
    assert child["review_by_radiologist"] and child["age_group"] == "child"
    assert any("Safeguarding" in s["text"] for s in child["paediatric"])
    with pytest.raises(PredictionError) as bad:
        predictor.predict_image(image, age_group="toddler")
    assert bad.value.code == "bad_age_group"


def test_a_study_whose_views_disagree_is_flagged_and_keeps_the_mura_mean(
    predictor, study_pngs, monkeypatch
):
    part = "elbow"
    threshold = OPERATING_POINTS[part]["threshold"]
    served = [0.9, 0.1, 0.12]  # one view well above the threshold, two well below
    _routed(predictor, monkeypatch, part, served)
    files = [p.read_bytes() for p in study_pngs]
    study = predictor.predict_study(files, allow_ood=True, age_group="adult")
    assert study["fracture"]["probability"] == pytest.approx(np.mean(served), abs=1e-6)
    assert study["fracture"]["probability"] < threshold  # diluted by the mean
    assert study["views"] == {"disagree": True, "abnormal": [0], "normal": [1, 2]}
    assert any("views disagree" in n for n in study["notices"])
    rec = study["recommendation"]
    assert rec["review_by_radiologist"]
    assert any("views disagree" in r for r in rec["review_reasons"])

    _routed(predictor, monkeypatch, part, [0.1, 0.12, 0.15])
    agreeing = predictor.predict_study(files, allow_ood=True, age_group="adult")
    assert agreeing["views"]["disagree"] is False
    assert not any("views disagree" in n for n in agreeing["notices"])


def test_cli_predict_takes_the_age_group(predictor, bundle_dir, good_png, monkeypatch):
    import json

    from click.testing import CliRunner

    from bonefrac.cli import cli
    from bonefrac.serving import predictor as predictor_module

    monkeypatch.setattr(
        predictor_module.Predictor, "from_bundle", classmethod(lambda cls, *a, **k: predictor)
    )
    args = ["predict", str(good_png), "--bundle", str(bundle_dir), "--allow-ood"]
    result = CliRunner().invoke(cli, [*args, "--age-group", "child"])
    assert result.exit_code == 0, result.output
    answer = json.loads(result.output)
    assert answer["age_group"] == "child" and answer["recommendation"]["review_by_radiologist"]
