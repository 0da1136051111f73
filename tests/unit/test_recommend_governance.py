"""Governance of the treatment guidance: sign-off metadata, the draft gate, version bumps,
the drug-dose guard, and a hospital's own knowledge file (engine, settings and CLI)."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from bonefrac.cli import cli
from bonefrac.config import load_settings
from bonefrac.recommend import KnowledgeError, load_knowledge, recommend
from bonefrac.recommend.engine import (
    DRAFT_NOTICE,
    FINDING_LABELS,
    changelog_problem,
    require_reviewed,
    states_a_dose,
)

PARAMS = Path(__file__).parents[2] / "params.yaml"


@pytest.fixture(scope="module")
def raw() -> dict:
    text = resources.files("bonefrac.recommend").joinpath("knowledge.yaml").read_text("utf-8")
    return json.loads(json.dumps(yaml.safe_load(text)))  # unshared aliases: one change, one place


def _copy(raw: dict, tmp_path: Path, change=None, name: str = "hospital.yaml") -> Path:
    data = json.loads(json.dumps(raw))
    if change:
        change(data)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def _changelog() -> str:
    return resources.files("bonefrac.recommend").joinpath("CHANGELOG.md").read_text("utf-8")


# -- what the model detects (item 1) ---------------------------------------------------------


def test_findings_are_named_as_abnormality_not_fracture():
    kb = load_knowledge()
    assert "hardware" in kb.detects and "degenerative" in kb.detects
    rec = recommend("elbow", "fracture", 0.93)
    assert rec.detects == kb.detects and rec.finding == "fracture"  # JSON keys and values kept
    text = rec.to_text()
    assert FINDING_LABELS["fracture"] in text and "What the model detects:" in text
    assert "abnormal" in rec.summary and "clinician confirms a fracture" in rec.summary
    for part in ("elbow", "hand", "shoulder"):
        negative = recommend(part, "no_fracture", 0.05).summary
        assert "does not rule out injury" in negative and "no abnormality" in negative


def test_every_referral_for_a_positive_is_conditional_on_confirmation():
    for part in ("elbow", "hand", "shoulder"):
        rec = recommend(part, "fracture", 0.95)
        assert "confirm" in rec.referral.text.lower(), part


# -- citations and missing content (items 6/7) -------------------------------------------------


def test_open_fracture_antibiotics_within_an_hour_cite_boast_4():
    for part in ("elbow", "hand", "shoulder"):
        flags = recommend(part, "fracture", 0.95).red_flags
        open_flag = next(s for s in flags if s.text.startswith("Open fracture"))
        assert "within 1 hour" in open_flag.text and "boast_open" in open_flag.sources
    hand = recommend("hand", "fracture", 0.95).red_flags[0]
    assert "excludes hand and digit injuries" in hand.text  # BOAST 4's inclusions


def test_absent_pulses_are_not_blamed_on_compartment_syndrome():
    kb = load_knowledge()
    compartment = kb.shared["compartment"]
    assert "normal pulse does not exclude compartment syndrome" in compartment.text
    for part in ("elbow", "hand", "shoulder"):
        for flag in recommend(part, "fracture", 0.95).red_flags:
            if "pulse" in flag.text.lower() and "boast_compartment" in flag.sources:
                assert "arterial injury" in flag.text or "does not exclude" in flag.text


def test_fracture_dislocations_need_orthopaedic_led_reduction():
    for part in ("elbow", "shoulder", "wrist"):
        texts = " ".join(s.text for s in recommend(part, "fracture", 0.95).red_flags)
        assert "fracture-dislocation needs orthopaedic-led reduction" in texts
        assert "appropriately trained clinician" not in texts


@pytest.mark.parametrize("finding", ["fracture", "no_fracture"])
def test_hand_soft_tissue_red_flags(finding):
    probability = 0.95 if finding == "fracture" else 0.05
    texts = " ".join(s.text for s in recommend("hand", finding, probability).red_flags)
    for words in ("fight bite", "mallet finger", "tendon injury", "ulnar collateral ligament"):
        assert words in texts


def test_same_day_referral_no_longer_cites_the_open_fracture_guideline():
    kb = load_knowledge()
    assert "nice_ng37_open" not in kb.shared["fracture_clinic"].sources
    assert "nice_ng37_open" not in kb.parts.hand.fracture.high.referral.sources


def test_unverified_statements_say_so_in_the_sources():
    rec = recommend("hand", "no_fracture", 0.05)
    unverified = [s for s in rec.sources if s.id == "unverified"]
    assert unverified and unverified[0].title == "Not verified against a published source"


# -- governance (item 8) -------------------------------------------------------------------------


def test_packaged_content_is_an_unsigned_draft():
    kb = load_knowledge()
    gov = kb.governance
    assert gov.status == "draft" and not kb.reviewed
    assert gov.approver_role is None and gov.approval_date is None and gov.review_due is None
    assert "UK" in gov.jurisdiction and "US" in gov.jurisdiction
    rec = recommend("hand", "fracture", 0.95)
    assert rec.content_reviewed is False and DRAFT_NOTICE in rec.to_text()
    assert rec.model_dump(mode="json")["governance"]["status"] == "draft"


def test_the_draft_gate_refuses_unless_allowed(tmp_path, raw):
    draft = load_knowledge()
    with pytest.raises(KnowledgeError, match="draft not approved by a clinical reviewer"):
        require_reviewed(draft, allow_unreviewed=False)
    require_reviewed(draft, allow_unreviewed=True)

    def sign(data):
        data["governance"].update(
            status="approved",
            approver_role="Consultant in Emergency Medicine (test fixture)",
            approval_date="2026-10-01",
            review_due="2027-10-01",
        )

    signed = load_knowledge(_copy(raw, tmp_path, sign))
    require_reviewed(signed, allow_unreviewed=False)
    rec = recommend("hand", "fracture", 0.95, knowledge=signed)
    assert rec.content_reviewed and DRAFT_NOTICE not in rec.to_text()


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda g: g.update(status="approved"), "approved content needs approver_role"),
        (
            lambda g: g.update(
                status="approved",
                approver_role="x",
                approval_date="2026-10-01",
                review_due="2026-09-01",
            ),
            "review_due must come after approval_date",
        ),
        (lambda g: g.update(status="signed"), "governance.status"),
        (lambda g: g.pop("jurisdiction"), "governance.jurisdiction: is missing"),
    ],
)
def test_bad_governance_is_refused_with_its_path(tmp_path, raw, change, expected):
    path = _copy(raw, tmp_path, lambda d: change(d["governance"]))
    with pytest.raises(KnowledgeError, match=expected):
        load_knowledge(path)


def test_settings_default_refuses_drafts_and_the_quick_profile_allows_them():
    assert load_settings(PARAMS, env={}).serve.allow_unreviewed is False
    assert load_settings(PARAMS, profile="quick", env={}).serve.allow_unreviewed is True


def test_the_changelog_vouches_for_the_packaged_content():
    assert changelog_problem(load_knowledge(), _changelog()) is None


def test_a_content_change_without_a_version_bump_fails(tmp_path, raw):
    def edit(data):
        data["parts"]["elbow"]["fracture"]["high"]["summary"] += " Edited."

    changed = load_knowledge(_copy(raw, tmp_path, edit))
    problem = changelog_problem(changed, _changelog())
    assert problem and "bump it" in problem and changed.content_hash() in problem

    bumped = load_knowledge(
        _copy(raw, tmp_path, lambda d: (edit(d), d.update(content_version="2099.1.0")))
    )
    assert "has no CHANGELOG.md entry" in changelog_problem(bumped, _changelog())
    entry = f"## 2099.1.0\ncontent-sha256: {bumped.content_hash()}\n\n"
    assert changelog_problem(bumped, entry + _changelog()) is None
    twice = entry + entry + _changelog()
    assert "twice" in changelog_problem(bumped, twice)


def test_layout_and_comments_do_not_change_the_hash(tmp_path, raw):
    assert load_knowledge(_copy(raw, tmp_path)).content_hash() == load_knowledge().content_hash()


@pytest.mark.parametrize(
    "text",
    [
        "Give 1 gram of paracetamol.",
        "10 mmol potassium",
        "two tablets four times a day",
        "Take 500mg now",
        "0.5 mg/kg",
        "one to two puffs",
        "3 drops",
        "5 ml",
        "1.5 g",
        "half a tablet",
        "1000 IU",
        "20 micrograms",
        "two sachets",
    ],
)
def test_dose_guard_catches_doses_in_digits_and_words(text):
    assert states_a_dose(text)


@pytest.mark.parametrize(
    "text",
    [
        "within 1 hour of injury",
        "within 72 hours",
        "repeat radiographs in 10-14 days",
        "re-assess within 15 minutes",
        "two views",
        "one image",
        "per local protocol",
        "MRI as first-line imaging",
    ],
)
def test_dose_guard_leaves_ordinary_numbers_alone(text):
    assert not states_a_dose(text)


def test_dose_guard_checks_summaries_too(tmp_path, raw):
    def dose(data):
        data["parts"]["hand"]["no_fracture"]["low"]["summary"] = "Give two tablets of analgesic."

    with pytest.raises(KnowledgeError, match="no_fracture.low.summary: must not state a drug dose"):
        load_knowledge(_copy(raw, tmp_path, dose))


# -- a hospital's own file ---------------------------------------------------------------------


def test_cli_uses_a_hospitals_own_knowledge_file(tmp_path, raw):
    def localise(data):
        data["content_version"] = "st-elsewhere-3"
        data["parts"]["hand"]["fracture"]["high"]["referral"]["text"] = (
            "Once a clinician confirms a fracture, refer to the St Elsewhere hand unit."
        )

    path = _copy(raw, tmp_path, localise)
    args = ["recommend", "--part", "hand", "--finding", "fracture", "--probability", "0.95"]
    result = CliRunner().invoke(cli, [*args, "--json", "--knowledge", str(path)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["content_version"] == "st-elsewhere-3"
    assert "St Elsewhere hand unit" in data["referral"]["text"]


def test_settings_point_at_a_hospital_file_relative_to_params(tmp_path, raw):
    path = _copy(raw, tmp_path, lambda d: d.update(content_version="local-7"))
    params = tmp_path / "params.yaml"
    params.write_text(f"serve:\n  knowledge: {path.name}\n", encoding="utf-8")
    settings = load_settings(params, env={})
    assert settings.serve.knowledge == path
    assert load_knowledge(settings.serve.knowledge).content_version == "local-7"
    env = {"BONEFRAC_KNOWLEDGE": str(path)}
    assert load_settings(tmp_path / "params.yaml", env=env).serve.knowledge == path

    args = ["--params", str(params), "recommend", "--part", "elbow", "--finding", "uncertain"]
    result = CliRunner().invoke(cli, [*args, "--probability", "0.5", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["content_version"] == "local-7"


def test_a_bad_hospital_file_is_one_sentence_and_exit_2(tmp_path, raw):
    path = _copy(raw, tmp_path, lambda d: d["parts"].pop("hand"))
    args = ["recommend", "--part", "hand", "--finding", "fracture", "--probability", "0.95"]
    for extra in (["--knowledge", str(path)], ["--knowledge", str(tmp_path / "absent.yaml")]):
        result = CliRunner().invoke(cli, [*args, *extra])
        assert result.exit_code == 2, result.output
        assert result.stderr.startswith("bonefrac: error: ")
        assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.output
    assert (
        "parts.hand: is missing"
        in CliRunner().invoke(cli, [*args, "--knowledge", str(path)]).stderr
    )


def test_serve_refuses_draft_content_before_starting(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("serve:\n  allow_unreviewed: false\n", encoding="utf-8")
    result = CliRunner().invoke(cli, ["--params", str(params), "serve"])
    assert result.exit_code == 2, result.output
    assert "draft not approved by a clinical reviewer" in result.stderr
    assert "Traceback" not in result.output
