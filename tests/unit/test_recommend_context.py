"""The patient and study context of a recommendation (issue 18, items 3 and 5): the age group
(adult / child / unknown), the single-view safeguard for one image sent alone, and studies whose
views disagree."""

from __future__ import annotations

import pytest

from bonefrac.errors import UserError
from bonefrac.recommend import load_knowledge, recommend

PARTS = ("elbow", "hand", "shoulder")


@pytest.mark.parametrize("part", PARTS)
def test_a_child_gets_the_paediatric_warnings_and_review(part):
    rec = recommend(part, "no_fracture", 0.02, {"age_group": "child"}, negative_cutoff=0.1)
    assert rec.age_group == "child" and rec.review_by_radiologist
    assert any("child" in reason for reason in rec.review_reasons)
    texts = " ".join(s.text for s in rec.paediatric)
    assert "Safeguarding" in texts and "nice_cg89_maltreatment" in {
        source for s in rec.paediatric for source in s.sources
    }
    assert {s.id for s in rec.sources} >= {"nice_cg89_maltreatment", "mura"}
    if part == "elbow":
        assert "ossification centres" in texts and "supracondylar" in texts
        assert "anterior interosseous" in texts
    assert "Children (age group: child)" in rec.to_text()


def test_the_adult_elbow_check_names_the_anterior_interosseous_nerve():
    care = recommend("elbow", "fracture", 0.95, {"age_group": "adult"}).immediate_care
    assert "anterior interosseous" in care[0].text


def test_unknown_age_is_the_default_and_cautions_without_forcing_review():
    default = recommend("hand", "no_fracture", 0.02, negative_cutoff=0.1)
    assert default.age_group == "unknown" and not default.review_by_radiologist
    assert default.paediatric == (load_knowledge().paediatric.unknown_age,)
    assert "Age group not given" in default.paediatric[0].text
    adult = recommend("hand", "no_fracture", 0.02, {"age_group": "adult"}, negative_cutoff=0.1)
    assert adult.paediatric == () and not adult.review_by_radiologist


def test_every_result_says_the_models_were_trained_on_mura_mostly_adults():
    for part in (*PARTS, "wrist"):
        rec = recommend(part, "uncertain", 0.5)
        assert "MURA" in rec.trained_on.text and "mostly of adults" in rec.trained_on.text
        assert "Training data: The models were trained on MURA" in rec.to_text()


def test_a_bad_age_group_is_one_clear_error():
    with pytest.raises(UserError, match="age_group"):
        recommend("elbow", "fracture", 0.9, {"age_group": "teenager"})


def test_one_image_sent_alone_asks_for_the_standard_views_without_review():
    views = load_knowledge().parts.shoulder.standard_views
    alone = recommend("shoulder", "no_fracture", 0.02, {"single_image": True}, negative_cutoff=0.1)
    assert alone.further_imaging[0] == views and "axillary or scapular Y" in views.text
    assert not alone.review_by_radiologist  # the prompt, not a review flag for every upload
    plain = recommend("shoulder", "fracture", 0.95)
    assert views in plain.further_imaging  # positives already list the views once
    assert plain.further_imaging.count(views) == 1
    study_of_one = recommend("shoulder", "no_fracture", 0.02, {"study_images": 1})
    assert study_of_one.further_imaging[0] == views and study_of_one.review_by_radiologist


def test_views_that_disagree_ask_for_review():
    rec = recommend("elbow", "no_fracture", 0.02, {"views_disagree": True}, negative_cutoff=0.1)
    assert rec.review_by_radiologist
    assert any("views disagree" in reason for reason in rec.review_reasons)


def test_cli_recommend_takes_the_age_group():
    import json

    from click.testing import CliRunner

    from bonefrac.cli import cli

    args = ["recommend", "--part", "elbow", "--finding", "no_fracture", "--probability", "0.05"]
    result = CliRunner().invoke(cli, [*args, "--age-group", "child", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["age_group"] == "child" and data["review_by_radiologist"] is True
    bad = CliRunner().invoke(cli, [*args, "--age-group", "teen"])
    assert bad.exit_code == 2 and "Traceback" not in bad.output


@pytest.mark.parametrize("part", ["other", "wrist"])
def test_an_unjudged_uncovered_part_gets_generic_guidance_and_review(part):
    kb = load_knowledge()
    rec = recommend(part, "uncertain", None, {"single_image": True}, threshold=None, knowledge=kb)
    assert rec.probability is None and rec.threshold is None
    assert not rec.body_part_covered and rec.review_by_radiologist
    assert rec.summary == kb.generic.summary
    assert "no model judged the image for an abnormality" in rec.review_reasons
    assert rec.disclaimer
    assert "not judged: no model covers this body part" in " ".join(rec.to_text().split())
    if part == "other":
        assert any("a body part the models do not cover" in r for r in rec.review_reasons)


def test_a_covered_part_or_a_finding_needs_a_probability():
    with pytest.raises(UserError, match="probability is missing"):
        recommend("elbow", "uncertain", None, threshold=None)
    with pytest.raises(UserError, match="probability is missing"):
        recommend("wrist", "no_fracture", None, threshold=None)
