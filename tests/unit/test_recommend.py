"""Treatment recommendations: the knowledge file, the engine's safety rules, the CLI."""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from bonefrac import DISCLAIMER
from bonefrac.cli import cli
from bonefrac.errors import UserError
from bonefrac.recommend import (
    KnowledgeError,
    Recommendation,
    confidence_band,
    load_knowledge,
    recommend,
)
from bonefrac.recommend.engine import BANDS, FINDINGS, PARTS, REVIEW_ADVICE, states_a_dose

SNAPSHOTS = Path(__file__).parent / "snapshots" / "recommend"
REVIEW_SENTENCE = "have a radiologist review the images"
# A probability that is consistent with the finding and falls in the band (threshold 0.5).
PROBABILITY = {
    ("fracture", "high"): 0.95,
    ("fracture", "low"): 0.6,
    ("no_fracture", "high"): 0.05,
    ("no_fracture", "low"): 0.4,
    ("uncertain", "high"): 0.97,
    ("uncertain", "low"): 0.52,
}


@pytest.fixture(scope="module")
def raw_knowledge() -> dict:
    text = resources.files("bonefrac.recommend").joinpath("knowledge.yaml").read_text("utf-8")
    return yaml.safe_load(text)


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "knowledge.yaml"
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    path.write_text(yaml.dump(data, Dumper=dumper, sort_keys=False), encoding="utf-8")
    return path


# -- every combination ---------------------------------------------------------------------


@pytest.mark.parametrize("band", BANDS)
@pytest.mark.parametrize("finding", FINDINGS)
@pytest.mark.parametrize("part", PARTS)
def test_every_combination_loads_and_renders(part, finding, band):
    probability = PROBABILITY[finding, band]
    rec = recommend(part, finding, probability)
    kb = load_knowledge()

    assert isinstance(rec, Recommendation)
    assert (rec.body_part, rec.finding, rec.confidence) == (part, finding, band)
    assert rec.summary == kb.entry(part, finding, band).summary
    assert rec.immediate_care and rec.further_imaging and rec.red_flags
    assert rec.sources and rec.content_version == kb.content_version
    assert rec.disclaimer == DISCLAIMER
    text = rec.to_text()
    assert DISCLAIMER in text and "Sources:" in text and kb.content_version in text
    assert all(f"[{i}]" in text for i in range(1, len(rec.sources) + 1))
    as_json = json.loads(json.dumps(rec.model_dump(mode="json")))
    assert as_json["disclaimer"] == DISCLAIMER
    assert {s["id"] for s in as_json["sources"]} >= set(as_json["referral"]["sources"])


def test_every_statement_cites_a_known_non_empty_source():
    kb = load_knowledge()
    for citation in kb.citations.values():
        assert citation.title.strip() and citation.section.strip()
    for part in PARTS:
        for finding in FINDINGS:
            for band in BANDS:
                entry = kb.entry(part, finding, band)
                statements = [entry.urgency, entry.referral, entry.follow_up]
                statements += [*entry.immediate_care, *entry.further_imaging, *entry.red_flags]
                for statement in statements:
                    assert statement.sources, (part, finding, band, statement.text)
                    assert set(statement.sources) <= set(kb.citations)


def test_body_part_names_are_case_insensitive_and_accept_mura_style():
    base = recommend("elbow", "fracture", 0.93)
    for name in ("XR_ELBOW", "xr_elbow", " Elbow "):
        assert recommend(name, "fracture", 0.93) == base


def test_confidence_band_is_relative_to_the_threshold():
    assert confidence_band(0.93) == "high" and confidence_band(0.55) == "low"
    assert confidence_band(0.1) == "high" and confidence_band(0.3) == "low"
    # threshold 0.3: "high" means 60% of the way to 1 (>= 0.72) or to 0 (<= 0.12)
    assert confidence_band(0.75, threshold=0.3) == "high"
    assert confidence_band(0.6, threshold=0.3) == "low"
    assert confidence_band(0.6, high_confidence_margin=0.1) == "high"
    assert recommend("hand", "fracture", 0.6, band="high").confidence == "high"


# -- never more certain than the model -----------------------------------------------------


def _assert_review(rec: Recommendation) -> None:
    assert rec.review_by_radiologist
    assert rec.review_advice == REVIEW_ADVICE
    assert rec.review_reasons
    assert REVIEW_SENTENCE in rec.to_text().lower()


@pytest.mark.parametrize("part", PARTS)
@pytest.mark.parametrize("probability", [0.0, 0.3, 0.5, 0.7, 1.0])
def test_uncertain_always_recommends_review(part, probability):
    _assert_review(recommend(part, "uncertain", probability))


@pytest.mark.parametrize("part", PARTS)
@pytest.mark.parametrize(("finding", "probability"), [("fracture", 0.6), ("no_fracture", 0.45)])
def test_low_confidence_always_recommends_review(part, finding, probability):
    rec = recommend(part, finding, probability)
    assert rec.confidence == "low"
    _assert_review(rec)


@pytest.mark.parametrize("part", PARTS)
def test_out_of_distribution_forces_the_uncertain_review_path(part):
    rec = recommend(part, "fracture", 0.99, {"ood": True})
    assert (rec.model_finding, rec.finding, rec.confidence) == ("fracture", "uncertain", "low")
    assert rec.summary == load_knowledge().entry(part, "uncertain", "low").summary
    _assert_review(rec)
    assert any("unlike" in reason for reason in rec.review_reasons)


@pytest.mark.parametrize("part", ["XR_WRIST", "knee", "", None])
def test_unknown_body_part_gets_the_generic_review(part):
    rec = recommend(part, "no_fracture", 0.02)
    assert not rec.body_part_covered
    assert rec.summary == load_knowledge().generic.summary
    _assert_review(rec)


def test_high_confidence_fracture_is_not_flagged_but_still_says_report():
    rec = recommend("elbow", "fracture", 0.93)
    assert not rec.review_by_radiologist and rec.review_advice is None
    assert "formal report" in rec.to_text()


def test_single_image_study_asks_for_the_standard_views_and_review():
    kb = load_knowledge()
    rec = recommend("shoulder", "no_fracture", 0.05, {"study_images": 1})
    assert rec.further_imaging[0] == kb.parts.shoulder.standard_views
    assert rec.further_imaging.count(kb.parts.shoulder.standard_views) == 1
    _assert_review(rec)
    assert not recommend("shoulder", "no_fracture", 0.05, {"study_images": 3}).review_by_radiologist


def test_no_statement_states_a_drug_dose():
    kb = load_knowledge()
    dumped = json.dumps(kb.model_dump(mode="json")).lower()
    for unit in (" mg", "mg ", " mcg", " ml "):
        assert unit not in dumped
    assert not states_a_dose(dumped)


# -- bad arguments -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "kwargs", "expected"),
    [
        (("elbow", "maybe", 0.5), {}, "finding 'maybe' is not one of"),
        (("elbow", "fracture", 1.5), {}, "probability 1.5"),
        (("elbow", "fracture", -0.1), {}, "probability -0.1"),
        (("elbow", "fracture", float("nan")), {}, "probability nan"),
        (("elbow", "fracture", "0.9"), {}, "must be a number"),
        (("elbow", "fracture", 0.9), {"threshold": 1.0}, "threshold 1.0"),
        (("elbow", "fracture", 0.2), {}, "disagrees with probability 0.20"),
        (("elbow", "no_fracture", 0.8), {}, "disagrees with probability 0.80"),
        (("elbow", "fracture", 0.9, {"age": 3}), {}, "context: age: unknown key"),
        (("elbow", "fracture", 0.9), {"band": "medium"}, "band 'medium'"),
    ],
)
def test_bad_arguments_raise_one_line_user_errors(args, kwargs, expected):
    with pytest.raises(UserError) as info:
        recommend(*args, **kwargs)
    message = str(info.value)
    assert expected in message and "\n" not in message


def test_recommendation_is_frozen():
    rec = recommend("hand", "fracture", 0.9)
    with pytest.raises(Exception):  # noqa: B017 - pydantic raises ValidationError
        rec.review_by_radiologist = False  # type: ignore[misc]


# -- schema errors name the bad entry ------------------------------------------------------


def _broken(raw: dict, change) -> dict:
    data = json.loads(json.dumps(raw))  # unshare the YAML aliases, so one change hits one entry
    change(data)
    return data


BROKEN = {
    "missing combination": (
        lambda d: d["parts"]["hand"]["no_fracture"].pop("low"),
        "parts.hand.no_fracture.low: is missing",
    ),
    "empty sources": (
        lambda d: d["parts"]["elbow"]["fracture"]["high"]["referral"].update(sources=[]),
        "parts.elbow.fracture.high.referral.sources: must not be empty",
    ),
    "empty citation section": (
        lambda d: d["citations"]["acr_hand"].update(section=" "),
        "citations.acr_hand.section: must not be empty",
    ),
    "unknown key in an entry": (
        lambda d: d["parts"]["shoulder"]["uncertain"]["high"].update(dose="x"),
        "parts.shoulder.uncertain.high.dose: unknown key",
    ),
    "unknown body part": (
        lambda d: d["parts"].update(knee=d["parts"]["elbow"]),
        "parts.knee: unknown key",
    ),
    "unknown citation id": (
        lambda d: d["parts"]["elbow"]["uncertain"]["low"]["red_flags"][1].update(sources=["nope"]),
        "parts.elbow.uncertain.low.red_flags.1.sources.0: unknown citation 'nope'",
    ),
    "uncertain without review": (
        lambda d: d["parts"]["hand"]["uncertain"]["high"].update(radiologist_review=False),
        "parts.hand.uncertain.high.radiologist_review: must be true",
    ),
    "low band without review": (
        lambda d: d["parts"]["shoulder"]["fracture"]["low"].update(radiologist_review=False),
        "parts.shoulder.fracture.low.radiologist_review: must be true",
    ),
    "bad urgency level": (
        lambda d: d["generic"]["urgency"].update(level="whenever"),
        "generic.urgency.level: input should be",
    ),
    "a drug dose": (
        lambda d: d["parts"]["hand"]["fracture"]["high"]["immediate_care"][1].update(
            text="Give 400 mg ibuprofen."
        ),
        "parts.hand.fracture.high.immediate_care.1.text: must not state a drug dose",
    ),
    "empty content version": (
        lambda d: d.update(content_version=""),
        "content_version: must not be empty",
    ),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_schema_errors_name_the_bad_entry(tmp_path, raw_knowledge, case):
    change, expected = BROKEN[case]
    path = _write(tmp_path, _broken(raw_knowledge, change))
    with pytest.raises(KnowledgeError) as info:
        load_knowledge(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert expected in message


def test_valid_copy_loads_and_drives_the_engine(tmp_path, raw_knowledge):
    data = _broken(raw_knowledge, lambda d: d.update(content_version="test-1"))
    kb = load_knowledge(_write(tmp_path, data))
    assert recommend("elbow", "fracture", 0.93, knowledge=kb).content_version == "test-1"


def test_unreadable_and_invalid_files_fail_with_one_line(tmp_path):
    with pytest.raises(KnowledgeError, match="cannot be read"):
        load_knowledge(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("parts: [unclosed\n", encoding="utf-8")
    with pytest.raises(KnowledgeError, match="not valid YAML"):
        load_knowledge(bad)
    bad.write_text("- a list\n", encoding="utf-8")
    with pytest.raises(KnowledgeError, match="must be a mapping"):
        load_knowledge(bad)


def test_packaged_knowledge_is_cached():
    assert load_knowledge() is load_knowledge()


# -- snapshot ------------------------------------------------------------------------------


ENTRIES = [(p, f, b) for p in PARTS for f in FINDINGS for b in BANDS] + [("generic", None, None)]


def _entry_text(part, finding, band) -> str:
    if part == "generic":
        return recommend("wrist", "fracture", 0.93).to_text()
    return recommend(part, finding, PROBABILITY[finding, band], band=band).to_text()


@pytest.mark.parametrize(("part", "finding", "band"), ENTRIES)
def test_snapshot_of_every_entry(part, finding, band):
    """Every entry's rendered text (all 19). Set BONEFRAC_UPDATE_SNAPSHOTS=1 to rewrite after an
    intended content change, and review the diff."""
    name = "_".join(x for x in (part, finding, band) if x) + ".txt"
    text = _entry_text(part, finding, band)
    if os.environ.get("BONEFRAC_UPDATE_SNAPSHOTS") == "1":
        SNAPSHOTS.mkdir(parents=True, exist_ok=True)
        (SNAPSHOTS / name).write_text(text, encoding="utf-8")
    assert text == (SNAPSHOTS / name).read_text(encoding="utf-8")


def test_snapshots_are_exactly_the_entries():
    expected = {"_".join(x for x in e if x) + ".txt" for e in ENTRIES}
    assert {p.name for p in SNAPSHOTS.glob("*.txt")} == expected and len(expected) == 19


# -- CLI -----------------------------------------------------------------------------------


def test_cli_prints_a_sourced_recommendation():
    args = ["recommend", "--part", "elbow", "--finding", "fracture", "--probability", "0.93"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert result.output == recommend("elbow", "fracture", 0.93).to_text()
    assert "Sources:" in result.output and "NICE guideline NG38" in result.output
    assert DISCLAIMER in result.output


def test_cli_json_matches_the_model_dump():
    args = ["recommend", "--part", "XR_HAND", "--finding", "uncertain", "--probability", "0.5"]
    result = CliRunner().invoke(cli, [*args, "--ood", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    expected = recommend("hand", "uncertain", 0.5, {"ood": True}).model_dump(mode="json")
    assert data == expected and data["review_by_radiologist"] is True


def test_cli_threshold_is_passed_through():
    args = ["recommend", "--part", "hand", "--finding", "fracture", "--probability", "0.35"]
    assert CliRunner().invoke(cli, args).exit_code == 2
    result = CliRunner().invoke(cli, [*args, "--threshold", "0.3", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["threshold"] == 0.3


def test_cli_rejects_an_unknown_finding():
    args = ["recommend", "--part", "elbow", "--finding", "maybe", "--probability", "0.5"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2
    assert "Traceback" not in result.output


def test_cli_bad_probability_is_one_line_without_traceback():
    args = ["recommend", "--part", "elbow", "--finding", "fracture", "--probability", "1.5"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.strip().count("\n") == 0
    assert result.stderr.startswith("bonefrac: error: probability 1.5")
    assert "Traceback" not in result.output
