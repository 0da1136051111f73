"""Issue 18 item 2 on the real test bundle: a body part no fracture model covers is answered
"out_of_scope" (no probability, generic guidance, radiologist review), and a body part the user
states routes the images, flagged when the model disagrees. The model's own "other" answer is
forced with a 4-class stand-in for the body-part forward (the test bundle's is untrained and has
three classes); stated parts run through the real models, over the Predictor, HTTP, the CLI and
the page."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from bonefrac import DISCLAIMER
from bonefrac.inference import OTHER, OUT_OF_SCOPE, UNCERTAIN
from bonefrac.serving.predictor import PredictionError

from .conftest import PARTS
from .test_browser import browser, wait_for  # noqa: F401 - the module's browser fixture
from .test_http import assert_error, upload

pytestmark = pytest.mark.slow
CLASSES = (*PARTS, OTHER)


def _four_classes(predictor, monkeypatch, probs) -> None:
    """The body-part model answers `probs` (over elbow, hand, shoulder, other) for every image."""
    row = np.asarray(probs, dtype=np.float32)
    core = dataclasses.replace(
        predictor.core,
        classes=CLASSES,
        body_part=lambda images: np.repeat(row[None], len(images), 0),
    )
    monkeypatch.setattr(predictor, "core", core)
    monkeypatch.setattr(predictor, "classes", list(CLASSES))


def _strict_json(result: dict) -> dict:
    return json.loads(json.dumps(result, allow_nan=False))  # no NaN may reach a client


def _assert_out_of_scope(result: dict) -> None:
    fracture = result["fracture"]
    assert fracture["finding"] == fracture["model_finding"] == OUT_OF_SCOPE
    assert fracture["model"] is None and fracture["probability"] is None
    assert fracture["threshold"] is None and fracture["sensitivity"] is None
    assert result["body_part"]["covered"] is False
    rec = result["recommendation"]
    assert rec["review_by_radiologist"] is True and rec["body_part_covered"] is False
    assert rec["probability"] is None
    assert "no model judged the image for an abnormality" in rec["review_reasons"]
    assert any("not one the fracture models cover" in n for n in result["notices"])
    assert result["disclaimer"] == DISCLAIMER and rec["disclaimer"] == DISCLAIMER


def test_the_models_other_answer_is_out_of_scope_with_generic_guidance(
    predictor, good_png, study_pngs, monkeypatch
):
    _four_classes(predictor, monkeypatch, [0.1, 0.1, 0.1, 0.7])
    generic = predictor.knowledge.generic.summary
    result = _strict_json(predictor.predict_bytes(good_png.read_bytes(), explain=True))
    _assert_out_of_scope(result)
    assert result["body_part"]["label"] == OTHER and result["body_part"]["stated"] is None
    assert result["recommendation"]["summary"] == generic
    assert "heatmap" not in result  # no fracture model looked at it
    assert any("do not cover" in r for r in result["recommendation"]["review_reasons"])

    study = _strict_json(predictor.predict_study([p.read_bytes() for p in study_pngs]))
    _assert_out_of_scope(study)
    assert study["views"] == {"disagree": False, "abnormal": [], "normal": []}
    assert all(i["fracture"]["finding"] == OUT_OF_SCOPE for i in study["images"])


def test_a_stated_part_routes_and_a_disagreeing_model_is_flagged(predictor, good_png, monkeypatch):
    data = good_png.read_bytes()
    _four_classes(predictor, monkeypatch, [0.1, 0.1, 0.1, 0.7])  # the model: "other"
    stated = _strict_json(predictor.predict_bytes(data, body_part="XR_Hand"))
    assert stated["fracture"]["model"] == "hand"  # the stated part chose the model
    assert stated["fracture"]["probability"] is not None
    assert stated["body_part"]["stated"] == "hand" and stated["body_part"]["disagrees"] is True
    assert stated["fracture"]["finding"] == UNCERTAIN
    assert any("is not what the model recognised (other)" in n for n in stated["notices"])
    assert stated["recommendation"]["review_by_radiologist"] is True

    # the model agrees and is sure (0.6): the stated part's model answers, nothing forced
    _four_classes(predictor, monkeypatch, [0.2, 0.6, 0.05, 0.15])
    sure = _strict_json(predictor.predict_bytes(data, body_part="hand"))
    assert sure["body_part"]["disagrees"] is False and sure["body_part"]["confident"] is True
    assert sure["fracture"]["finding"] == sure["fracture"]["model_finding"]
    assert not any("unsure of the body part" in n for n in sure["notices"])

    # the model agrees but is unsure (0.45 < 0.5; "other" 0.3): saying "hand" does not buy
    # the hand model's answer for what may be a wrist: uncertain, as with nothing stated
    _four_classes(predictor, monkeypatch, [0.2, 0.45, 0.05, 0.3])
    agreed = _strict_json(predictor.predict_bytes(data, body_part="hand"))
    assert agreed["body_part"]["disagrees"] is False and agreed["body_part"]["confident"] is False
    assert agreed["fracture"]["model"] == "hand" and agreed["fracture"]["finding"] == UNCERTAIN
    assert any("unsure of the body part (most likely hand" in n for n in agreed["notices"])
    assert agreed["recommendation"]["review_by_radiologist"] is True
    unstated = predictor.predict_bytes(data)  # the same unsure model, no part stated
    assert unstated["fracture"]["finding"] == UNCERTAIN

    # a stated part no model covers is out of scope, and the model's "hand" is flagged
    wrist = _strict_json(predictor.predict_bytes(data, body_part="wrist"))
    _assert_out_of_scope(wrist)
    assert wrist["body_part"]["disagrees"] is True
    assert wrist["recommendation"]["body_part"] == "wrist"
    # its notices say no finding was made, not that the finding is "uncertain"
    assert not any("'uncertain'" in n for n in wrist["notices"])

    with pytest.raises(PredictionError) as bad:
        predictor.predict_bytes(data, body_part="knee")
    assert bad.value.code == "bad_body_part" and "elbow" in str(bad.value)


def test_body_part_over_http(server, good_png, study_pngs):
    png = [("x.png", good_png.read_bytes())]
    plain = upload(server, "/predict", png).json()
    assert plain["api_version"] == "3" and plain["body_part"]["stated"] is None
    model_part = plain["body_part"]["label"]
    other_part = next(p for p in PARTS if p != model_part)
    flagged = upload(server, "/predict", png, body_part=other_part)
    assert flagged.status_code == 200, flagged.text
    body = flagged.json()
    assert body["fracture"]["model"] == other_part and body["body_part"]["disagrees"] is True
    assert body["fracture"]["finding"] == UNCERTAIN

    files = [(p.name, p.read_bytes()) for p in study_pngs]
    for route, sent in (("/predict", png), ("/predict_study", files)):
        answer = upload(server, route, sent, body_part="forearm")
        assert answer.status_code == 200, answer.text
        _assert_out_of_scope(answer.json())
        message = assert_error(upload(server, route, sent, body_part="knee"), 400, "bad_body_part")
        assert "humerus" in message


def test_cli_predict_takes_the_body_part(predictor, bundle_dir, good_png, monkeypatch):
    from click.testing import CliRunner

    from bonefrac.cli import cli
    from bonefrac.serving import predictor as predictor_module

    monkeypatch.setattr(
        predictor_module.Predictor, "from_bundle", classmethod(lambda cls, *a, **k: predictor)
    )
    args = ["predict", str(good_png), "--bundle", str(bundle_dir), "--allow-ood"]
    result = CliRunner().invoke(cli, [*args, "--body-part", "humerus"])
    assert result.exit_code == 0, result.output
    _assert_out_of_scope(json.loads(result.output))
    wrong = CliRunner().invoke(cli, [*args, "--body-part", "knee"])
    assert wrong.exit_code == 2 and "knee" in wrong.output


def test_page_states_the_body_part(browser, server, good_png):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser.get(server.url)
    select = Select(browser.find_element(By.ID, "body-part"))
    assert select.first_selected_option.get_attribute("value") == ""  # the model decides
    browser.find_element(By.ID, "files").send_keys(str(good_png))
    select.select_by_value("wrist")
    browser.find_element(By.ID, "analyse").click()
    result = wait_for(browser, "article.result")
    badge = result.find_element(By.CSS_SELECTOR, "[data-field=finding] .badge")
    assert badge.get_attribute("data-finding") == OUT_OF_SCOPE
    assert "Not assessed" in badge.text
    assert result.find_element(By.CSS_SELECTOR, "[data-field=stated-part]").text.startswith("Wrist")
    assert "Not assessed" in result.find_element(By.CSS_SELECTOR, "[data-field=probability]").text
    assert "not one the fracture models cover" in result.text
    assert "Disclaimer" in result.text


def test_a_bundle_whose_classes_do_not_match_its_body_part_model_is_refused_at_load(
    bundle_dir, tmp_path
):
    """Four class names on a three-output model (a 'other' class named, say, by settings the
    model was not trained with) would fail every request in the response; load refuses it."""
    import shutil

    from bonefrac.bundle import BUNDLE_FILE
    from bonefrac.bundle_integrity import write_manifest
    from bonefrac.errors import DataError
    from bonefrac.serving.predictor import Predictor

    bundle = tmp_path / "bundle"
    shutil.copytree(bundle_dir, bundle)
    manifest = json.loads((bundle / BUNDLE_FILE).read_text())
    manifest["models"]["body_part"]["classes"] = [*PARTS, OTHER]
    (bundle / BUNDLE_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    write_manifest(bundle)
    with pytest.raises(DataError, match="has 3 outputs but names 4 classes"):
        Predictor.from_bundle(bundle, warm_up=False, runtime="tensorflow")
