"""The champion gate: a paired patient bootstrap on val decides; test is reported, never read."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, cohen_kappa_score

from bonefrac import evaluate as ev
from bonefrac.config import EvaluateConfig
from bonefrac.gate import Champion, Scored, compare, decide, point_value


def _images(n_patients: int, split: str, seed: int) -> pd.DataFrame:
    """Patients with 1-2 studies of 1-3 images each; labels per study."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        for s in range(rng.integers(1, 3)):
            label = int(rng.random() < 0.45)
            study = f"{split}/XR_HAND/patient{seed}{p:04d}/study{s + 1}"
            for i in range(rng.integers(1, 4)):
                rows.append(
                    {
                        "path": f"{study}/image{i + 1}.png",
                        "split": split,
                        "patient_id": f"patient{seed}{p:04d}",
                        "study_id": study,
                        "label": label,
                    }
                )
    return pd.DataFrame(rows)


def _model_probs(frame: pd.DataFrame, skill: float, seed: int) -> np.ndarray:
    """Raw (over-confident) probabilities: `skill` separates the classes; temperature != 1."""
    rng = np.random.default_rng(seed)
    logits = skill * (2 * frame["label"].to_numpy() - 1) + rng.normal(0, 1.5, len(frame))
    return 1 / (1 + np.exp(-2.5 * logits))


def _scored(frame: pd.DataFrame, probs: np.ndarray, cfg: EvaluateConfig) -> tuple[Scored, str]:
    """A fracture model's predictions with the operating point evaluate fits on val."""
    frame = frame.assign(prob=probs)
    evaluation = ev.evaluate_binary(
        frame[frame["split"] == "val"], frame[frame["split"] == "test"], cfg
    )
    calibrated = frame.assign(prob=ev.apply_temperature(probs, evaluation.temperature))
    return Scored(calibrated, evaluation.threshold), evaluation.operating_point_problem


GATE = {"confidence": 0.9, "min_improvement": 0.0, "n_samples": 1000, "seed": 3}


def _decide(challenger: Scored, champion: Champion | None, problem=None):
    return decide(
        challenger,
        champion,
        model="hand",
        registered_name="bonefrac-fracture-hand",
        metric="study_kappa",
        multiclass=False,
        operating_problem=problem,
        **GATE,
    )


@pytest.fixture(scope="module")
def images() -> pd.DataFrame:
    return pd.concat([_images(80, "val", 1), _images(60, "test", 2)], ignore_index=True)


def test_paired_bootstrap_separates_better_equal_and_worse(images):
    cfg = EvaluateConfig(bootstrap_samples=50)
    strong, _ = _scored(images, _model_probs(images, 2.0, 10), cfg)
    weak, _ = _scored(images, _model_probs(images, 0.3, 11), cfg)
    better = compare(strong, weak, "study_kappa", **GATE)
    assert better.passed and better.lower > 0 and better.delta > better.lower
    assert better.n_patients == 80 and better.split == "val"
    assert not compare(weak, strong, "study_kappa", **GATE).passed
    same = compare(strong, strong, "study_kappa", **GATE)
    assert same.delta == 0 and same.lower == 0 and not same.passed  # ties never promote
    # a margin the gain cannot clear keeps the champion
    assert not compare(strong, weak, "study_kappa", **{**GATE, "min_improvement": 0.9}).passed
    # power: a gate on fewer patients can only detect larger differences
    few = images[images["patient_id"].isin(images["patient_id"].unique()[:20])]
    small = compare(
        Scored(strong.frame.loc[few.index], strong.threshold),
        Scored(weak.frame.loc[few.index], weak.threshold),
        "study_kappa",
        **GATE,
    )
    assert small.detectable > better.detectable > 0
    # a few patients say nothing, however large the difference looks
    three = images[images["patient_id"].isin(images["patient_id"].unique()[:3])]
    truth = np.full(len(three), "hand")
    right = Scored(three.assign(truth=truth, pred="hand"))
    wrong = Scored(three.assign(truth=truth, pred="elbow"))
    tiny = compare(right, wrong, "accuracy", multiclass=True, **GATE)
    assert tiny.n_patients == 3 and tiny.lower == 1.0 and not tiny.passed


def test_point_values_match_sklearn(images):
    cfg = EvaluateConfig(bootstrap_samples=50)
    scored, _ = _scored(images, _model_probs(images, 1.0, 12), cfg)
    studies = ev.study_level(scored.frame[scored.frame["split"] == "val"])
    expected = cohen_kappa_score(studies["label"], studies["prob"] >= scored.threshold)
    assert point_value(scored, "study_kappa", split="val") == pytest.approx(expected)
    # body part: multiclass accuracy and kappa on images
    rng = np.random.default_rng(0)
    truth = rng.choice(["elbow", "hand", "shoulder"], len(images))
    pred = np.where(rng.random(len(images)) < 0.7, truth, "hand")
    body = Scored(images.assign(truth=truth, pred=pred))
    val = (images["split"] == "val").to_numpy()
    assert point_value(body, "accuracy", multiclass=True, split="val") == pytest.approx(
        accuracy_score(truth[val], pred[val])
    )
    assert point_value(body, "kappa", multiclass=True, split="val") == pytest.approx(
        cohen_kappa_score(truth[val], pred[val])
    )
    with pytest.raises(ValueError, match="same images"):
        compare(body, Scored(body.frame.iloc[1:]), "accuracy", multiclass=True)


def test_flipping_test_labels_changes_no_promotion_decision(images):
    """Invariant 2: everything that chooses reads val. The challenger's operating point is
    fitted by evaluate_binary as in the evaluate stage; the gate then decides. Relabelling
    every test study must change the reported test numbers and no decision."""
    cfg = EvaluateConfig(bootstrap_samples=50)
    test = (images["split"] == "test").to_numpy()
    flipped = images.assign(label=np.where(test, 1 - images["label"], images["label"]))

    def decisions(frame: pd.DataFrame) -> list:
        strong, strong_problem = _scored(frame, _model_probs(images, 2.0, 10), cfg)
        weak, _ = _scored(frame, _model_probs(images, 0.3, 11), cfg)
        mid, _ = _scored(frame, _model_probs(images, 1.9, 13), cfg)
        pin = {"by": "dr.x", "at": "2026-11-30T08:00:00Z", "reason": "audit"}
        return [
            _decide(strong, None, strong_problem),  # first version
            _decide(strong, Champion("1", weak)),  # clearly better: promoted
            _decide(weak, Champion("1", strong)),  # clearly worse: kept
            _decide(mid, Champion("1", strong)),  # about equal: kept
            _decide(strong, Champion("1", weak, pin=pin)),  # pinned: kept
        ]

    before, after = decisions(images), decisions(flipped)
    assert [d.promoted for d in before] == [True, True, False, False, False]  # power to decide
    for old, new in zip(before, after, strict=True):
        assert (old.promoted, old.reason, old.value, old.gate) == (
            new.promoted,
            new.reason,
            new.value,
            new.gate,
        )
        assert old.test_value != new.test_value  # the test labels really were flipped
    assert before[1].test_delta != after[1].test_delta


def test_decision_reasons_and_tags(images):
    cfg = EvaluateConfig(bootstrap_samples=50)
    strong, _ = _scored(images, _model_probs(images, 2.0, 10), cfg)
    weak, _ = _scored(images, _model_probs(images, 0.3, 11), cfg)
    promoted = _decide(strong, Champion("4", weak))
    assert promoted.reason.startswith("promoted over champion v4: val study_kappa Δ +")
    tags = promoted.tags()
    assert tags["bonefrac.gate.decision"] == "promoted"
    assert tags["bonefrac.gate.split"] == "val"
    for key in ("delta", "lower", "detectable", "n_patients", "confidence"):
        assert tags[f"bonefrac.gate.{key}"] not in ("", "nan", "None"), key
    assert float(tags["bonefrac.gate.lower"]) > 0
    assert tags["bonefrac.test.value"] != "nan"  # reported

    unusable = _decide(strong, None, "at threshold 0.5 every val study is called normal")
    assert not unusable.promoted and "unusable operating point" in unusable.reason
    pinned = _decide(strong, Champion("2", weak, pin={"by": "a", "at": "t", "reason": "audit"}))
    assert not pinned.promoted and "pinned by a" in pinned.reason and pinned.gate.passed
    blind = _decide(strong, Champion("2", None, "its preprocessing is not recorded"))
    assert not blind.promoted and "cannot be scored" in blind.reason
    one_class = Scored(strong.frame.assign(label=0), strong.threshold)
    assert not _decide(one_class, Champion("2", weak)).promoted


def test_threshold_is_strictly_inside_zero_one_and_problems_are_named():
    # saturated scores: the best cut is at 1.0; the threshold moves below it
    labels = [0, 0, 0, 1, 1, 1]
    probs = [0.1, 0.2, 0.4, 1.0, 1.0, 1.0]
    threshold = ev.choose_threshold(labels, probs, "youden")
    assert 0.4 < threshold < 1.0
    assert ev.binary_metrics(labels, probs, threshold)["accuracy"] == 1.0
    assert ev.operating_point_problem(labels, probs, threshold) is None
    assert "strictly between" in ev.operating_point_problem(labels, probs, 1.0)
    assert "called normal" in ev.operating_point_problem(labels, [0.1, 0.5, 0.6] * 2, 0.9)
    assert "called abnormal" in ev.operating_point_problem(labels, [0.1, 0.5, 0.6] * 2, 0.05)
    assert "one class" in ev.operating_point_problem([1, 1], [0.2, 0.9], 0.5)
    # a model that scores everything the same has no usable operating point
    flat = [0.7] * 6
    assert ev.operating_point_problem(labels, flat, ev.choose_threshold(labels, flat))
