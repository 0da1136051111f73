"""The inference core with numpy stand-ins for the models: calibration, findings, the OOD
gate against scikit-learn's PCA, routing of images and of studies, and study aggregation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.special import expit, logit
from sklearn.decomposition import PCA

from bonefrac import inference as inf

PARTS = ("elbow", "hand", "shoulder")
POINTS = {
    "elbow": inf.OperatingPoint(threshold=0.4, temperature=2.0, uncertain_band=0.05),
    "hand": inf.OperatingPoint(threshold=0.6, temperature=0.5, uncertain_band=0.1),
    "shoulder": inf.OperatingPoint(threshold=0.5, temperature=1.5, uncertain_band=0.0),
}


def test_temperature_is_scipys_sigmoid_of_scaled_logits():
    probs = np.array([1e-9, 0.01, 0.3, 0.5, 0.8, 0.999, 1.0])
    for temperature in (0.3, 1.0, 2.7):
        expected = expit(logit(np.clip(probs, 1e-7, 1 - 1e-7)) / temperature)
        np.testing.assert_allclose(inf.apply_temperature(probs, temperature), expected, rtol=1e-9)


def test_findings_with_per_unit_thresholds_and_bands():
    probs = np.array([0.42, 0.30, 0.66, 0.75, 0.50])
    threshold = np.array([0.4, 0.4, 0.6, 0.6, 0.5])
    band = np.array([0.05, 0.05, 0.1, 0.1, 0.0])
    assert list(inf.findings(probs, threshold, band)) == [
        inf.UNCERTAIN,
        inf.NO_FRACTURE,
        inf.UNCERTAIN,
        inf.FRACTURE,
        inf.FRACTURE,  # no band: the threshold itself is positive
    ]
    assert [inf.finding(*args) for args in zip(probs, threshold, band, strict=True)] == list(
        inf.findings(probs, threshold, band)
    )


def test_ood_gate_equals_scikit_learn_pca(tmp_path):
    rng = np.random.default_rng(0)
    basis = rng.normal(size=(3, 40))
    train = rng.normal(size=(200, 3)) @ basis + 0.05 * rng.normal(size=(200, 40)) + 2.0
    pca = PCA(n_components=3).fit(train)
    gate = inf.OodGate(pca.mean_, pca.components_, pca.explained_variance_, 0.01, 9.0, image_size=6)
    new = np.vstack([train[:5], rng.normal(size=(5, 40)) * 3])
    q = ((new - pca.inverse_transform(pca.transform(new))) ** 2).mean(axis=1)
    t2 = (pca.transform(new) ** 2 / pca.explained_variance_).sum(axis=1)
    np.testing.assert_allclose(gate.scores(new), np.maximum(q / 0.01, t2 / 9.0), rtol=1e-9)
    assert (gate.scores(new[:5]) < gate.scores(new[5:]).min()).all()

    loaded = inf.OodGate.load(gate.save(tmp_path / "gate.npz"))
    assert (tmp_path / "gate.npz").is_file() and loaded.image_size == 6
    np.testing.assert_array_equal(loaded.scores(new), gate.scores(new))


def model_with(body: np.ndarray, raw: dict[str, np.ndarray]) -> inf.TwoStage:
    """Images are row indices here; each model answers from a table, as CachedForward does."""
    return inf.TwoStage(
        classes=PARTS,
        body_part=lambda rows: body[rows],
        fracture={p: (lambda rows, p=p: raw[p][rows]) for p in PARTS},
        points=POINTS,
    )


BODY = np.array(
    [
        [0.8, 0.1, 0.1],  # study 0: elbow, then hand-ish; mean says elbow
        [0.3, 0.6, 0.1],
        [0.1, 0.2, 0.7],  # study 1: shoulder
        [0.4, 0.3, 0.3],  # study 2: one image, unsure part
    ]
)
RAW = {
    "elbow": np.array([0.2, 0.9, 0.5, 0.45]),
    "hand": np.array([0.7, 0.55, 0.3, 0.1]),
    "shoulder": np.array([0.6, 0.6, 0.8, 0.2]),
}


def test_each_image_goes_to_its_own_part_and_is_judged_there():
    model = model_with(BODY, RAW)
    rows = np.arange(4)
    routed = inf.route(model, rows)
    assert list(routed.parts) == ["elbow", "hand", "shoulder", "elbow"]
    expected = [expit(logit(RAW[p][i]) / POINTS[p].temperature) for i, p in enumerate(routed.parts)]
    np.testing.assert_allclose(routed.probs, expected)

    ood = np.array([0.2, 0.5, 1.3, 0.1])
    decisions = inf.decide(model, routed, ood)
    np.testing.assert_allclose(decisions.threshold, [0.4, 0.6, 0.5, 0.4])
    assert list(decisions.accepted) == [True, True, False, True]
    assert list(decisions.confident) == [True, True, True, False]
    assert list(decisions.model_finding) == [
        inf.findings(p, POINTS[part].threshold, POINTS[part].uncertain_band)
        for p, part in zip(decisions.prob, decisions.part, strict=True)
    ]
    # the OOD image and the unsure part are forced to "uncertain"; the gate refuses the OOD one
    assert decisions.finding[2] == decisions.finding[3] == inf.UNCERTAIN
    assert list(decisions.answers(ood_gate=True))[2:] == [inf.REFUSED, inf.UNCERTAIN]
    assert list(decisions.answers(ood_gate=False))[2:] == [inf.UNCERTAIN, inf.UNCERTAIN]
    assert list(decisions.predicted) == [
        int(p >= t) for p, t in zip(decisions.prob, decisions.threshold, strict=True)
    ]


def test_a_study_goes_to_its_mean_part_and_is_the_mean_of_calibrated_probabilities():
    model = model_with(BODY, RAW)
    groups = np.array([0, 0, 1, 2])
    routed = inf.route(model, np.arange(4), groups)
    assert list(routed.parts) == ["elbow", "elbow", "shoulder", "elbow"]
    study = inf.decide(model, routed, np.array([0.2, 1.1, 0.3, 0.4]), groups)
    assert list(study.part) == ["elbow", "shoulder", "elbow"]
    elbow = expit(logit(RAW["elbow"][:2]) / 2.0)
    assert study.prob[0] == pytest.approx(elbow.mean())
    assert study.raw[0] == pytest.approx(RAW["elbow"][:2].mean())
    np.testing.assert_allclose(study.body_probs[0], BODY[:2].mean(axis=0))
    assert list(study.ood) == [1.1, 0.3, 0.4]
    assert list(study.accepted) == [False, True, True]  # one OOD image taints its study
    assert list(study.answers()) == [
        inf.REFUSED,
        study.model_finding[1],
        inf.UNCERTAIN,  # unsure part
    ]


def test_end_to_end_evaluation_scores_each_study_as_the_core_answers_it():
    from bonefrac.config import EvaluateConfig
    from bonefrac.evaluate.end_to_end import CachedForward, evaluate_end_to_end

    calls: dict[str, list[int]] = {}

    def counted(table: np.ndarray, name: str):
        def forward(rows: np.ndarray) -> np.ndarray:
            calls.setdefault(name, []).extend(np.asarray(rows).tolist())
            return table[rows]

        return CachedForward(forward, np.arange(len(table)))

    model = inf.TwoStage(
        classes=PARTS,
        body_part=counted(BODY, "body_part"),
        fracture={p: counted(RAW[p], p) for p in PARTS},
        points=POINTS,
    )
    frame = pd.DataFrame(
        {
            "path": [f"img{i}" for i in range(4)],
            "study_id": ["s0", "s0", "s1", "s2"],
            "study_path": ["a/", "a/", "b/", "c/"],
            "patient_id": ["p0", "p0", "p1", "p2"],
            "body_part": ["elbow", "elbow", "shoulder", "hand"],
            "label": [1, 1, 0, 1],
        }
    )
    ood = np.array([0.2, 0.3, 0.4, 1.5])
    result = evaluate_end_to_end(
        model, np.arange(4), frame, ood, EvaluateConfig(bootstrap_samples=50)
    )
    for rows in calls.values():  # image and study routing shared each model's outputs
        assert sorted(rows) == sorted(set(rows))

    groups = np.array([0, 0, 1, 2])
    study = inf.decide(model, inf.route(model, np.arange(4), groups), ood, groups)
    studies = result.studies
    assert list(studies["study_id"]) == ["s0", "s1", "s2"] and list(studies["n_images"]) == [
        2,
        1,
        1,
    ]
    np.testing.assert_allclose(studies["prob"], study.prob)
    assert list(studies["answer"]) == list(study.answers())
    assert studies["answer"].iloc[2] == inf.REFUSED
    metrics = result.metrics
    assert metrics["study"]["n"] == 3 and metrics["image"]["n"] == 4
    assert metrics["study_answers"][inf.REFUSED] == pytest.approx(1 / 3)
    decided = studies["answer"].isin([inf.FRACTURE, inf.NO_FRACTURE])
    assert metrics["study_decided"]["n"] == decided.sum()
    assert metrics["study_decided"]["coverage"] == pytest.approx(decided.mean())
    assert metrics["routing_accuracy"] == pytest.approx(0.5)  # images 0 and 2 routed right
    assert metrics["study_routing_accuracy"] == pytest.approx(2 / 3)  # s0, s1 right; s2 not


def test_views_keep_every_preprocessing_of_the_same_images_together():
    """Routing indexes rows; every preprocessing of an image must follow it, and a forward
    must never get a plain array where the bundle holds several preprocessings."""
    a = np.arange(5)[:, None] * np.ones((5, 2))  # "64 px" view: row i holds i
    b = np.arange(5)[:, None] * np.ones((5, 3)) + 100  # "48 px" view: row i holds 100 + i
    views = inf.Views({"a": a, "b": b})
    picked = views[np.array([False, True, False, True, True])]
    assert len(picked) == 3
    np.testing.assert_array_equal(picked["a"][:, 0], [1, 3, 4])
    np.testing.assert_array_equal(picked["b"][:, 0], [101, 103, 104])
    assert len(views[np.array([], dtype=int)]) == 0
    joined = inf.Views.concat([views[np.array([4])], views[np.array([0, 2])]])
    np.testing.assert_array_equal(joined["b"][:, 0], [104, 100, 102])

    model = inf.TwoStage(
        classes=("elbow", "hand"),
        body_part=inf.viewed(lambda x: np.tile([0.2, 0.8], (len(x), 1)), "a", False),
        fracture={
            "elbow": inf.viewed(lambda x: np.full(len(x), 0.5), "a", False),
            "hand": inf.viewed(lambda x: x[:, 0] / 1000, "b", False),  # sees only "b"
        },
        points={p: inf.OperatingPoint(0.5, 1.0, 0.0) for p in ("elbow", "hand")},
    )
    routed = inf.route(model, views)
    np.testing.assert_allclose(routed.raw, (100 + np.arange(5)) / 1000)
    with pytest.raises(TypeError, match="pass Views"):
        inf.route(model, a)
    with pytest.raises(ValueError, match="same images"):
        inf.Views({"a": a, "b": b[:4]})
    with pytest.raises(ValueError, match="same preprocessings"):
        inf.Views.concat([views, inf.Views({"a": a})])
    with pytest.raises(ValueError, match="no images"):
        inf.Views.concat([])


# -- the "other" class: parts no fracture model covers, and a stated body part ---------------

CLASSES4 = (*PARTS, inf.OTHER)
BODY4 = np.array(
    [
        [0.7, 0.1, 0.1, 0.1],  # 0: elbow, confident
        [0.1, 0.1, 0.1, 0.7],  # 1: other (a wrist, say)
        [0.2, 0.3, 0.1, 0.4],  # 2: other, unsure
        [0.35, 0.3, 0.05, 0.3],  # 3: elbow, unsure
    ]
)


def four_class_model(calls: dict[str, list[int]]) -> inf.TwoStage:
    def table(name: str, values: np.ndarray):
        def forward(rows):
            calls.setdefault(name, []).extend(np.asarray(rows).tolist())
            return values[rows]

        return forward

    return inf.TwoStage(
        classes=CLASSES4,
        body_part=lambda rows: BODY4[rows],
        fracture={p: table(p, RAW[p]) for p in PARTS},
        points=POINTS,
    )


def test_other_is_out_of_scope_and_runs_no_fracture_model():
    calls: dict[str, list[int]] = {}
    model = four_class_model(calls)
    routed = inf.route(model, np.arange(4))
    assert list(routed.parts) == ["elbow", inf.OTHER, inf.OTHER, "elbow"]
    assert calls == {"elbow": [0, 3]}  # images 1 and 2 were judged by no fracture model
    assert np.isnan(routed.probs[[1, 2]]).all() and np.isfinite(routed.probs[[0, 3]]).all()
    decisions = inf.decide(model, routed, np.array([0.1, 0.2, 0.3, 1.4]))
    assert list(decisions.in_scope) == [True, False, False, True]
    assert list(decisions.finding[1:3]) == [inf.OUT_OF_SCOPE] * 2
    assert np.isnan(decisions.threshold[1:3]).all()
    assert decisions.finding[3] == inf.UNCERTAIN  # unsure part (and OOD)
    assert list(decisions.answers(ood_gate=True)) == [
        decisions.model_finding[0],
        inf.OUT_OF_SCOPE,
        inf.OUT_OF_SCOPE,
        inf.REFUSED,
    ]
    assert not decisions.disagrees.any()


def test_a_stated_part_routes_and_a_disagreeing_model_makes_it_uncertain():
    calls: dict[str, list[int]] = {}
    model = four_class_model(calls)
    ood = np.zeros(4)
    # stated "hand": every image goes to the hand model, whatever the body-part model says
    routed = inf.route(model, np.arange(4), stated="hand")
    assert list(routed.parts) == ["hand"] * 4 and list(routed.model_parts) == [
        "elbow",
        inf.OTHER,
        inf.OTHER,
        "elbow",
    ]
    expected = expit(logit(RAW["hand"]) / POINTS["hand"].temperature)
    np.testing.assert_allclose(routed.probs, expected)
    decisions = inf.decide(model, routed, ood)
    assert decisions.disagrees.all()  # the model saw no hand anywhere
    assert (decisions.finding == inf.UNCERTAIN).all()
    assert decisions.stated == "hand"

    # stated "elbow": images 0 and 3 agree, but 3 is unsure of it: naming the part does not
    # buy the elbow model's answer for an image the body-part model half takes for another
    decisions = inf.decide(model, inf.route(model, np.arange(4), stated="elbow"), ood)
    assert list(decisions.disagrees) == [False, True, True, False]
    assert list(decisions.confident) == [True, True, False, False]
    assert decisions.finding[0] == decisions.model_finding[0] != inf.UNCERTAIN
    assert decisions.model_finding[3] != inf.UNCERTAIN
    assert list(decisions.finding[1:]) == [inf.UNCERTAIN] * 3


def test_a_stated_uncovered_part_is_out_of_scope_even_when_the_model_sees_a_covered_one():
    calls: dict[str, list[int]] = {}
    model = four_class_model(calls)
    decisions = inf.decide(model, inf.route(model, np.arange(4), stated="wrist"), np.zeros(4))
    assert calls == {}  # no fracture model ran
    assert (decisions.finding == inf.OUT_OF_SCOPE).all()
    assert list(decisions.disagrees) == [True, False, False, True]  # the model said elbow
    # a 3-class model (no "other") can never agree with a stated wrist
    three = model_with(BODY, RAW)
    decisions = inf.decide(three, inf.route(three, np.arange(4), stated="wrist"), np.zeros(4))
    assert decisions.disagrees.all() and (decisions.finding == inf.OUT_OF_SCOPE).all()


def test_end_to_end_counts_abstentions_and_recognised_other_parts():
    from bonefrac.config import EvaluateConfig
    from bonefrac.evaluate.end_to_end import evaluate_end_to_end

    model = four_class_model({})
    frame = pd.DataFrame(
        {
            "path": [f"img{i}" for i in range(4)],
            "study_id": ["s0", "s1", "s2", "s3"],
            "study_path": ["a/", "b/", "c/", "d/"],
            "patient_id": ["p0", "p1", "p2", "p3"],
            # image 1 is an elbow the model calls "other" (an abstention); 2 a real wrist,
            # recognised; 3 a finger the model calls elbow (given elbow guidance: a miss)
            "body_part": ["elbow", "elbow", "wrist", "finger"],
            "label": [1, 0, 1, 0],
        }
    )
    result = evaluate_end_to_end(
        model, np.arange(4), frame, np.zeros(4), EvaluateConfig(bootstrap_samples=20)
    )
    metrics = result.metrics
    assert list(result.studies["study_id"]) == ["s0", "s1"]  # the target parts' studies
    assert metrics["study"]["n"] == 1  # only s0 was judged
    assert metrics["study_abstained"] == pytest.approx(0.5)
    # as the MURA submission scores it: both target studies, the abstained s1 as normal (0)
    judged_right = int(result.studies["prediction"].iloc[0] == 1)
    assert metrics["study_submission"]["n"] == 2
    assert metrics["study_submission"]["accuracy"] == pytest.approx((judged_right + 1) / 2)
    assert metrics["study_answers"][inf.OUT_OF_SCOPE] == pytest.approx(0.5)
    assert metrics["study_routing_accuracy"] == pytest.approx(0.5)
    assert metrics["other_parts"] == {
        "n_images": 2,
        "n_studies": 2,
        "image_recognised": 0.5,
        "study_recognised": 0.5,
    }
