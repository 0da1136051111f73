"""No reassuring negatives (issue 18, item 4): the confident-negative cut-off is fitted on val
for a target sensitivity and travels to the bundle with the val sensitivity and its Wilson
interval; the recommendation engine uses it instead of the distance to the threshold."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from bonefrac import evaluate as ev
from bonefrac.bundle import operating_points
from bonefrac.config import EvaluateConfig
from bonefrac.inference import OperatingPoint
from bonefrac.recommend import recommend
from bonefrac.recommend.engine import confidence_band

from .test_evaluate import _predictions


def _wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval, written out (the code under test uses scipy's)."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def test_negative_cutoff_is_the_highest_cut_that_keeps_the_target_sensitivity():
    labels = [1, 1, 1, 1, 1, 0, 0, 0, 0, 0]
    probs = [0.9, 0.8, 0.7, 0.3, 0.05, 0.6, 0.2, 0.1, 0.04, 0.02]
    # 4 of 5 abnormal studies at or above 0.3; above it only 3 of 5. The cut-off lies midway
    # to the next lower val score (0.2), so the same studies count as confident negatives
    assert ev.negative_cutoff(labels, probs, threshold=0.55, target_sensitivity=0.8) == 0.25
    # never above the decision threshold: a confident negative is a negative first
    assert ev.negative_cutoff(labels, probs, threshold=0.22, target_sensitivity=0.8) == 0.22
    # a stricter target moves the cut-off down, to catch the 0.05 study too
    assert ev.negative_cutoff(labels, probs, 0.55, 0.95) <= 0.05
    # nothing abnormal on val: the sensitivity cannot be measured, so no negative is confident
    assert ev.negative_cutoff([0, 0, 0], [0.1, 0.2, 0.3], 0.5, 0.9) == 0.0


def test_sensitivity_interval_is_wilson():
    labels = np.r_[np.ones(40, int), np.zeros(10, int)]
    probs = np.r_[np.linspace(0.05, 0.95, 40), np.full(10, 0.1)]
    result = ev.sensitivity_interval(labels, probs, cut=0.3)
    detected = int((probs[:40] >= 0.3).sum())
    assert result["detected"] == detected and result["n_positive"] == 40
    assert result["value"] == pytest.approx(detected / 40)
    assert result["ci"] == pytest.approx(_wilson(detected, 40), abs=1e-9)
    assert ev.sensitivity_interval([0, 0], [0.2, 0.8], 0.5)["value"] is None


def test_evaluate_binary_fits_the_cutoff_on_val_and_never_reads_test():
    val, test = _predictions(60, seed=20, split="val"), _predictions(60, seed=21)
    cfg = EvaluateConfig(negative_sensitivity=0.9, bootstrap_samples=20)
    result = ev.evaluate_binary(val, test, cfg)
    assert 0.0 < result.negative_cutoff <= result.threshold
    sens = result.val_sensitivity
    assert sens["split"] == "val" and sens["target"] == 0.9
    assert sens["at_negative_cutoff"]["value"] >= 0.9
    assert sens["at_negative_cutoff"]["ci"][0] <= sens["at_negative_cutoff"]["value"]
    assert sens["at_threshold"]["value"] == pytest.approx(result.val_study["sensitivity"])
    json.dumps(result.to_dict(), allow_nan=False)
    assert result.to_dict()["negative_cutoff"] == result.negative_cutoff

    relabelled = test.assign(label=1 - test["label"])  # test changes no decision (invariant 2)
    again = ev.evaluate_binary(val, relabelled, cfg)
    assert again.negative_cutoff == result.negative_cutoff
    assert again.val_sensitivity == result.val_sensitivity


def test_the_bundle_carries_the_cutoff_and_older_bundles_have_none():
    point = {"threshold": 0.41, "temperature": 1.7, "uncertain_band": 0.03}
    manifest = {"parts": ["elbow", "hand"], "models": {"elbow": point, "hand": point}}
    manifest["models"]["hand"] = {**point, "negative_cutoff": 0.12}
    points = operating_points(manifest)
    assert points["elbow"].negative_cutoff is None  # a bundle from before the cut-off existed
    assert points["hand"] == OperatingPoint(0.41, 1.7, 0.03, 0.12)


def test_a_negative_is_confident_only_below_the_cutoff():
    # at threshold 0.5 the old distance rule called p = 0.15 "high"; the cut-off decides now
    assert confidence_band(0.15, 0.5) == "high"
    assert confidence_band(0.15, 0.5, negative_cutoff=0.1) == "low"
    assert confidence_band(0.05, 0.5, negative_cutoff=0.1) == "high"
    assert confidence_band(0.05, 0.5, negative_cutoff=0.0) == "low"  # no cut-off recorded
    assert confidence_band(0.95, 0.5, negative_cutoff=0.1) == "high"  # positives unchanged

    low = recommend("elbow", "no_fracture", 0.15, negative_cutoff=0.1)
    assert low.confidence == "low" and low.review_by_radiologist
    assert low.negative_cutoff == 0.1
    high = recommend("elbow", "no_fracture", 0.05, negative_cutoff=0.1)
    assert high.confidence == "high" and not high.review_by_radiologist


@pytest.mark.parametrize("part", ["elbow", "hand", "shoulder"])
def test_negatives_are_never_routine_and_keep_the_neurovascular_check(part):
    for probability, cutoff in ((0.01, 0.1), (0.3, 0.1)):
        rec = recommend(part, "no_fracture", probability, negative_cutoff=cutoff)
        assert rec.urgency.level != "routine" and "ROUTINE" not in rec.to_text()
        assert "does not rule out injury" in rec.negative_caution
        assert "does not rule out injury" in rec.summary
        first = rec.immediate_care[0].text.lower()
        assert "check and document" in first and ("pulse" in first or "circulation" in first)
    positive = recommend(part, "fracture", 0.95)
    assert positive.negative_caution is None


def test_the_loader_refuses_a_routine_negative(tmp_path):
    from importlib import resources

    import yaml

    from bonefrac.recommend import KnowledgeError, load_knowledge

    text = resources.files("bonefrac.recommend").joinpath("knowledge.yaml").read_text("utf-8")
    data = json.loads(json.dumps(yaml.safe_load(text)))
    data["parts"]["hand"]["no_fracture"]["high"]["urgency"]["level"] = "routine"
    path = tmp_path / "hospital.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    with pytest.raises(KnowledgeError, match="no_fracture.high.urgency.level: must not be"):
        load_knowledge(path)


def test_packaging_reads_the_cutoff_from_the_champions_tags():
    from bonefrac.packaging import _negative_point

    sensitivity = {"split": "val", "at_threshold": {"value": 0.8, "ci": [0.6, 0.9]}}
    tags = {
        "bonefrac.threshold": "0.4",
        "bonefrac.negative_cutoff": "0.17",
        "bonefrac.val_sensitivity": json.dumps(sensitivity),
    }
    assert _negative_point(tags) == {"negative_cutoff": 0.17, "val_sensitivity": sensitivity}
    assert _negative_point({"bonefrac.threshold": "0.4"}) == {}  # registered before they existed
