"""Treatment recommendations shown next to a model result: sourced, conservative decision support.

`recommend()` maps (body part, finding, fracture probability) to one entry of `knowledge.yaml`
and returns a frozen `Recommendation`. It never makes the guidance more certain than the model:
an uncertain finding, a low-confidence probability, an out-of-distribution image, a one-image
study or a body part the model does not cover all add "have a radiologist review the images".
The knowledge file is validated at load; a bad entry stops the load with its path.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import re
import textwrap
from collections.abc import Iterator, Mapping
from datetime import date
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from bonefrac import DISCLAIMER
from bonefrac.errors import UserError

Finding = Literal["fracture", "no_fracture", "uncertain"]
Band = Literal["high", "low"]
Urgency = Literal["emergency", "urgent", "soon", "routine"]
FINDINGS: tuple[Finding, ...] = ("fracture", "no_fracture", "uncertain")
BANDS: tuple[Band, ...] = ("high", "low")
PARTS = ("elbow", "hand", "shoulder")

DEFAULT_THRESHOLD = 0.5
# A probability is "high" confidence when it lies at least this fraction of the way from the
# threshold to the nearest extreme (1 for fracture, 0 for no fracture). With threshold 0.5:
# p >= 0.8 or p <= 0.2. Model probabilities are only as trustworthy as their calibration.
DEFAULT_HIGH_CONFIDENCE_MARGIN = 0.6
REVIEW_ADVICE = "Have a radiologist review the images before acting on this result."
DRAFT_NOTICE = (
    "DRAFT CONTENT: not approved by a clinical reviewer; not for clinical use until a reviewer "
    "signs it off."
)
# The model's finding in words: MURA's positive label is "abnormal", not "fracture".
FINDING_LABELS = {
    "fracture": "abnormality suspected (fracture, hardware, degenerative change, ...)",
    "no_fracture": "no abnormality detected",
    "uncertain": "uncertain",
}

# Guidance must never state a dose ("per local protocol" instead): a number, in digits or words,
# followed by any unit in this explicit list.
DOSE_UNITS = (
    "mg", "milligrams?", "g", "grams?", "grammes?", "kg", "mcg", "µg", "ug", "micrograms?",
    "ng", "nanograms?", "mmol", "millimoles?", "mol", "ml", "millilit(?:re|er)s?", "l",
    "lit(?:re|er)s?", "units?", "iu", "international units?", "tablets?", "tabs?", "capsules?",
    "caps?", "puffs?", "drops?", "sachets?", "ampoules?", "vials?", "doses?", "patch(?:es)?",
    "sprays?", "suppositor(?:y|ies)", "mg/kg", "mcg/kg", "ml/kg",
)  # fmt: skip
_NUMBER_WORDS = (
    "half", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "fifteen", "twenty", "thirty", "forty", "fifty", "hundred", "thousand",
    "a single", "single", "double",
)  # fmt: skip
_NUMBER = r"(?:\d+(?:[.,]\d+)?|" + "|".join(_NUMBER_WORDS) + r")"
_DOSE = re.compile(
    rf"(?<![\w.]){_NUMBER}(?:\s*(?:-|to)\s*{_NUMBER})?(?:\s+an?)?\s*(?:{'|'.join(DOSE_UNITS)})(?!\w)",
    re.IGNORECASE,
)
CONTENT_STATUSES = ("draft", "approved")


def states_a_dose(text: str) -> bool:
    """True when `text` gives a number (digits or words) with a dose unit: "1 gram", "10 mmol",
    "two tablets", "500mg"."""
    return _DOSE.search(text) is not None


_Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]


class KnowledgeError(UserError):
    """knowledge.yaml (or a file passed to load_knowledge) is missing, unreadable or invalid."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# -- knowledge file schema -----------------------------------------------------------------


class Citation(_Frozen):
    """A cited document, by name and the topic/section that supports the statements."""

    title: _Text
    section: _Text
    url: str | None = Field(None, pattern=r"^https://\S+$")


class Statement(_Frozen):
    """One piece of guidance and the ids of the citations that support it."""

    text: _Text
    sources: tuple[_Text, ...] = Field(min_length=1)

    @field_validator("text")
    @classmethod
    def _no_doses(cls, text: str) -> str:
        return _no_dose(text)


def _no_dose(text: str) -> str:
    if states_a_dose(text):
        raise ValueError("must not state a drug dose (say 'per local protocol')")
    return text


class UrgencyStatement(Statement):
    level: Urgency


class Entry(_Frozen):
    """The guidance for one body part x finding x confidence band."""

    summary: _Text  # what the model result means, in words; not guidance, so not sourced
    urgency: UrgencyStatement

    @field_validator("summary")
    @classmethod
    def _no_doses(cls, text: str) -> str:
        return _no_dose(text)

    immediate_care: tuple[Statement, ...] = Field(min_length=1)
    further_imaging: tuple[Statement, ...] = Field(min_length=1)
    referral: Statement
    red_flags: tuple[Statement, ...] = Field(min_length=1)
    follow_up: Statement
    radiologist_review: bool


class Bands(_Frozen):
    high: Entry
    low: Entry


class PartGuidance(_Frozen):
    standard_views: Statement  # the views a study needs; added when it has a single image
    fracture: Bands
    no_fracture: Bands
    uncertain: Bands


class Parts(_Frozen):
    elbow: PartGuidance
    hand: PartGuidance
    shoulder: PartGuidance


class Governance(_Frozen):
    """Who signed the content off, when, until when, and where it applies. Left empty (status
    "draft") until a real clinical reviewer signs; bonefrac's authors never fill it in."""

    status: Literal["draft", "approved"]
    approver_role: str | None = None  # e.g. "Consultant in Emergency Medicine, <trust>"
    approval_date: date | None = None
    review_due: date | None = None
    jurisdiction: _Text  # where the cited sources apply, e.g. "UK (NICE, BOAST, RCEM) + US (ACR)"

    @model_validator(mode="after")
    def _approved_is_signed(self) -> Governance:
        signed = (self.approver_role, self.approval_date, self.review_due)
        if self.status == "approved" and not all(signed):
            raise ValueError("approved content needs approver_role, approval_date and review_due")
        if self.approval_date and self.review_due and self.review_due <= self.approval_date:
            raise ValueError("review_due must come after approval_date")
        return self


class Knowledge(_Frozen):
    content_version: _Text
    content_status: _Text
    governance: Governance
    detects: _Text  # what the model's "fracture" finding means (MURA's "abnormal" label)
    citations: dict[str, Citation] = Field(min_length=1)
    scope: Statement
    shared: dict[str, Statement] = Field(default_factory=dict)  # anchors for repeated statements
    generic: Entry  # body part not covered by the model: clinical assessment + radiologist
    parts: Parts

    def entry(self, part: str, finding: Finding, band: Band) -> Entry:
        return getattr(getattr(getattr(self.parts, part), finding), band)

    def content_hash(self) -> str:
        """SHA-256 of the content (not its layout or comments) minus the version itself: any
        change to what a clinician could read changes it. CHANGELOG.md records it per version."""
        content = self.model_dump(mode="json", exclude={"content_version"})
        text = json.dumps(content, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    @property
    def reviewed(self) -> bool:
        return self.governance.status == "approved"


_CHANGELOG_ENTRY = re.compile(r"^## (\S+)\s*\ncontent-sha256: ([0-9a-f]{64})\s*$", re.MULTILINE)


def changelog_problem(kb: Knowledge, changelog: str) -> str | None:
    """Why `changelog` (CHANGELOG.md next to knowledge.yaml) does not vouch for `kb`, or None.
    Its newest entry must name kb's content_version with kb's content hash, and no version may
    appear twice, so a content change without a version bump (and a new entry) is caught."""
    entries = _CHANGELOG_ENTRY.findall(changelog)
    versions = [version for version, _ in entries]
    twice = sorted({v for v in versions if versions.count(v) > 1})
    if twice:
        return f"CHANGELOG.md lists version {twice[0]} twice"
    digest = kb.content_hash()
    if not entries or entries[0][0] != kb.content_version:
        return (
            f"content_version {kb.content_version} has no CHANGELOG.md entry: add '## "
            f"{kb.content_version}' with 'content-sha256: {digest}' at the top"
        )
    if entries[0][1] != digest:
        return (
            f"the knowledge content changed but content_version is still {kb.content_version}: "
            f"bump it and add a CHANGELOG.md entry with content-sha256: {digest}"
        )
    return None


def require_reviewed(kb: Knowledge, allow_unreviewed: bool, source: str = "knowledge") -> None:
    """The service's gate: refuse draft content unless the deployment explicitly allows it
    (serve.allow_unreviewed, set by the quick/demo profile and the tests only)."""
    if kb.reviewed or allow_unreviewed:
        return
    raise KnowledgeError(
        f"{source}: content {kb.content_version} is a draft not approved by a clinical reviewer; "
        "have it approved (governance in the knowledge file) or set serve.allow_unreviewed: true "
        "for a demo"
    )


def _statements(node: Any, path: str) -> Iterator[tuple[str, Statement]]:
    if isinstance(node, Statement):
        yield path, node
    elif isinstance(node, tuple):
        for i, item in enumerate(node):
            yield from _statements(item, f"{path}.{i}")
    elif isinstance(node, BaseModel) and not isinstance(node, Citation):
        for name in type(node).model_fields:
            yield from _statements(getattr(node, name), f"{path}.{name}" if path else name)


def _cross_check(kb: Knowledge) -> list[str]:
    """Checks pydantic cannot do per field: citation ids exist; review flags are set."""
    problems = []
    for path, statement in _statements(kb, ""):
        for i, source in enumerate(statement.sources):
            if source not in kb.citations:
                problems.append(f"{path}.sources.{i}: unknown citation {source!r}")
    must_review = [("generic", kb.generic)]
    for part in PARTS:
        for finding in FINDINGS:
            for band in BANDS:
                if finding == "uncertain" or band == "low":
                    entry = kb.entry(part, finding, band)
                    must_review.append((f"parts.{part}.{finding}.{band}", entry))
    for path, entry in must_review:
        if not entry.radiologist_review:
            problems.append(f"{path}.radiologist_review: must be true for uncertain guidance")
    return problems


def _describe(error: Mapping[str, Any]) -> str:
    path = ".".join(str(p) for p in error["loc"]) or "(top level)"
    kind = error["type"]
    if kind == "missing":
        message = "is missing"
    elif kind == "extra_forbidden":
        message = "unknown key"
    elif kind in ("too_short", "string_too_short"):
        message = "must not be empty"
    elif kind == "value_error":
        message = str(error["ctx"]["error"])
    else:
        message = error["msg"][0].lower() + error["msg"][1:]
    return f"{path}: {message}"


def _fail(source: str, problems: list[str]) -> KnowledgeError:
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    return KnowledgeError(f"{source}: " + "; ".join(problems[:3]) + more)


def _parse(text: str, source: str) -> Knowledge:
    try:
        raw = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as exc:
        raise KnowledgeError(f"{source}: not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise KnowledgeError(f"{source}: must be a mapping with content_version, parts, ...")
    try:
        kb = Knowledge.model_validate(raw)
    except ValidationError as exc:
        raise _fail(source, [_describe(e) for e in exc.errors()]) from None
    problems = _cross_check(kb)
    if problems:
        raise _fail(source, problems)
    return kb


@lru_cache(maxsize=1)
def _packaged_knowledge() -> Knowledge:
    text = resources.files("bonefrac.recommend").joinpath("knowledge.yaml").read_text("utf-8")
    return _parse(text, "knowledge.yaml")


def load_knowledge(path: Path | str | None = None) -> Knowledge:
    """The validated knowledge base: the packaged knowledge.yaml (cached), or the file at `path`.

    Raises KnowledgeError naming the bad entry, e.g.
    `knowledge.yaml: parts.elbow.fracture.high.referral.sources: must not be empty`.
    """
    if path is None:
        return _packaged_knowledge()
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise KnowledgeError(
            f"{path} cannot be read ({exc.strerror}): pass the path of a knowledge YAML file"
        ) from None
    return _parse(text, str(path))


# -- engine ----------------------------------------------------------------------------------


class RecommendationContext(_Frozen):
    """What else is known about the study; every field is optional."""

    ood: bool = False  # the image looks unlike the training images (PCA reconstruction error)
    study_images: int | None = Field(None, ge=1)  # images in the study; 1 = a single view


class Source(_Frozen):
    id: str
    title: str
    section: str
    url: str | None = None


class Recommendation(_Frozen):
    """Guidance for one model result. `.to_text()` for people, `.model_dump(mode="json")` for the
    service and the web page. `finding`/`confidence` are what the guidance was chosen for: they
    fall back to "uncertain"/"low" when the model's output cannot be used (OOD, unknown part)."""

    body_part: str | None
    body_part_covered: bool
    model_finding: Finding
    finding: Finding
    probability: float
    threshold: float
    confidence: Band
    summary: str
    urgency: UrgencyStatement
    immediate_care: tuple[Statement, ...]
    further_imaging: tuple[Statement, ...]
    referral: Statement
    red_flags: tuple[Statement, ...]
    follow_up: Statement
    review_by_radiologist: bool
    review_advice: str | None
    review_reasons: tuple[str, ...]
    scope: Statement
    sources: tuple[Source, ...]
    content_version: str
    content_status: str
    disclaimer: str
    # added in content 2026.11.1: what "fracture" means here, and the content's sign-off
    detects: str = ""
    content_reviewed: bool = False
    governance: Governance | None = None

    def to_text(self, width: int = 100) -> str:
        """Plain text for the CLI: sections, numbered citations, sources, disclaimer."""
        number = {source.id: i for i, source in enumerate(self.sources, start=1)}

        def para(text: str, first: str = "", rest: str = "") -> str:
            return textwrap.fill(
                text, width, initial_indent=first, subsequent_indent=rest, break_on_hyphens=False
            )

        def cited(statement: Statement) -> str:
            refs = ", ".join(str(n) for n in sorted(number[s] for s in statement.sources))
            return f"{statement.text} [{refs}]"

        part = self.body_part if self.body_part_covered else f"{self.body_part!r} (not covered)"
        finding = FINDING_LABELS[self.finding]
        if self.model_finding != self.finding:
            finding += f" (model said {FINDING_LABELS[self.model_finding]})"
        lines = [
            para(
                f"bonefrac recommendation: {part}, {finding} (probability "
                f"{self.probability:.2f}, threshold {self.threshold:.2f}, confidence "
                f"{self.confidence})"
            ),
            self.disclaimer,  # never wrapped, so it is always found whole
            "",
            para(self.summary),
            para(f"What the model detects: {self.detects}"),
            "",
            para(f"Urgency: {self.urgency.level.upper()}. {cited(self.urgency)}", rest="  "),
        ]
        sections = [
            ("Immediate care", self.immediate_care),
            ("Further imaging", self.further_imaging),
            ("Referral", (self.referral,)),
            ("Red flags (need emergency care)", self.red_flags),
            ("Follow-up", (self.follow_up,)),
        ]
        for title, statements in sections:
            lines += ["", f"{title}:"]
            lines += [para(cited(s), "  - ", "    ") for s in statements]
        lines.append("")
        if self.review_by_radiologist:
            lines.append(para(f"Radiologist review: {self.review_advice}"))
            lines.append(para("Why: " + "; ".join(self.review_reasons) + ".", "  ", "  "))
        else:
            lines.append(para("Radiologist review: the images still get the usual formal report."))
        lines += ["", para(f"Scope: {cited(self.scope)}"), "", "Sources:"]
        for i, source in enumerate(self.sources, start=1):
            url = f" {source.url}" if source.url else ""
            lines.append(para(f"[{i}] {source.title}. {source.section}.{url}", "  ", "      "))
        lines += ["", para(f"Content version {self.content_version}. {self.content_status}")]
        if not self.content_reviewed:
            lines.append(DRAFT_NOTICE)  # never wrapped, so it is always found whole
        return "\n".join(lines) + "\n"


def normalise_body_part(name: str | None) -> str | None:
    """'elbow', 'XR_ELBOW', ' Hand ' -> 'elbow'/'hand'; anything not covered -> None."""
    if name is None:
        return None
    key = name.strip().lower().removeprefix("xr_")
    return key if key in PARTS else None


def confidence_band(
    probability: float,
    threshold: float = DEFAULT_THRESHOLD,
    high_confidence_margin: float = DEFAULT_HIGH_CONFIDENCE_MARGIN,
) -> Band:
    """ "high" when the probability is at least `high_confidence_margin` of the way from the
    threshold to 1 (fracture side) or to 0 (no-fracture side); otherwise "low"."""
    room = (1.0 - threshold) if probability >= threshold else threshold
    return "high" if abs(probability - threshold) / room >= high_confidence_margin else "low"


def _unit_interval(name: str, value: object, *, open_ends: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise UserError(f"{name} must be a number between 0 and 1, not {value!r}")
    number = float(value)
    inside = 0.0 < number < 1.0 if open_ends else 0.0 <= number <= 1.0
    if math.isnan(number) or not inside:
        bounds = "strictly between 0 and 1" if open_ends else "within [0, 1]"
        raise UserError(f"{name} {value!r} is not {bounds}: pass the model's fracture {name}")
    return number


def _context(context: RecommendationContext | Mapping[str, Any] | None) -> RecommendationContext:
    if context is None or isinstance(context, RecommendationContext):
        return context or RecommendationContext()
    try:
        return RecommendationContext.model_validate(dict(context))
    except (ValidationError, TypeError, ValueError) as exc:
        problem = _describe(exc.errors()[0]) if isinstance(exc, ValidationError) else str(exc)
        raise UserError(f"context: {problem} (known keys: ood, study_images)") from None


def recommend(
    body_part: str | None,
    finding: str,
    probability: float,
    context: RecommendationContext | Mapping[str, Any] | None = None,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    band: Band | None = None,
    high_confidence_margin: float = DEFAULT_HIGH_CONFIDENCE_MARGIN,
    knowledge: Knowledge | None = None,
) -> Recommendation:
    """The sourced recommendation for one model result (pure: same inputs, same output).

    `probability` is the model's fracture probability and `threshold` the one the finding was
    made at; "fracture" needs probability >= threshold and "no_fracture" below it. The
    confidence band comes from the distance to the threshold (see `confidence_band`) unless
    `band` gives one, e.g. from a calibrated interval. `context` may say `ood=True` (forces the
    uncertain, radiologist-review guidance) or `study_images`. A body part other than elbow,
    hand or shoulder (or None) gets the generic radiologist-review guidance. Raises UserError
    for bad arguments and KnowledgeError for a bad knowledge file.
    """
    if finding not in FINDINGS:
        raise UserError(f"finding {finding!r} is not one of {', '.join(FINDINGS)}")
    probability = _unit_interval("probability", probability)
    threshold = _unit_interval("threshold", threshold, open_ends=True)
    if not 0.0 < high_confidence_margin <= 1.0:
        raise UserError(f"high_confidence_margin {high_confidence_margin!r} must be in (0, 1]")
    if band is not None and band not in BANDS:
        raise UserError(f"band {band!r} is not one of high, low")
    if (finding == "fracture" and probability < threshold) or (
        finding == "no_fracture" and probability >= threshold
    ):
        raise UserError(
            f"finding {finding!r} disagrees with probability {probability:.2f} at threshold "
            f"{threshold:.2f}: pass the threshold the finding was made at, or finding 'uncertain'"
        )
    if body_part is not None and not isinstance(body_part, str):
        raise UserError(f"body part must be a name such as 'elbow' or 'XR_ELBOW', not {body_part}")
    ctx = _context(context)
    kb = knowledge or load_knowledge()
    part = normalise_body_part(body_part)
    band = band or confidence_band(probability, threshold, high_confidence_margin)

    # 1. Why the result needs a radiologist before anyone acts on it (empty = not flagged).
    reasons = []
    if part is None:
        covered = ", ".join(PARTS)
        reasons.append(f"the body part {body_part!r} is not one the model covers ({covered})")
    if ctx.ood:
        reasons.append("the image looks unlike the images the model was trained on")
    if finding == "uncertain":
        reasons.append("the model's finding is uncertain")
    if band == "low":
        reasons.append("the probability is close to the threshold (low confidence)")
    if ctx.study_images == 1:
        reasons.append("the study has a single image, and fractures need at least two views")

    # 2. Which guidance: when the model's output cannot be used, the uncertain/low path.
    unusable = part is None or ctx.ood
    guide_finding: Finding = "uncertain" if unusable else finding
    guide_band: Band = "low" if unusable else band
    entry = kb.generic if part is None else kb.entry(part, guide_finding, guide_band)
    further = entry.further_imaging
    views = getattr(kb.parts, part).standard_views if part else None
    if views is not None and ctx.study_images == 1 and views not in further:
        further = (views, *further)
    if entry.radiologist_review and not reasons:
        reasons.append("the guidance for this result asks for it")
    review = bool(reasons)

    # 3. Sources in order of first citation, so the text numbers them [1], [2], ...
    cited = [entry.urgency, *entry.immediate_care, *further, entry.referral, *entry.red_flags]
    cited += [entry.follow_up, kb.scope]
    ids = dict.fromkeys(s for statement in cited for s in statement.sources)
    sources = tuple(Source(id=i, **kb.citations[i].model_dump()) for i in ids)

    return Recommendation(
        body_part=part or (body_part.strip() if body_part else None),
        body_part_covered=part is not None,
        model_finding=finding,
        finding=guide_finding,
        probability=probability,
        threshold=threshold,
        confidence=guide_band,
        summary=entry.summary,
        urgency=entry.urgency,
        immediate_care=entry.immediate_care,
        further_imaging=further,
        referral=entry.referral,
        red_flags=entry.red_flags,
        follow_up=entry.follow_up,
        review_by_radiologist=review,
        review_advice=REVIEW_ADVICE if review else None,
        review_reasons=tuple(reasons),
        scope=kb.scope,
        sources=sources,
        content_version=kb.content_version,
        content_status=kb.content_status,
        disclaimer=DISCLAIMER,
        detects=kb.detects,
        content_reviewed=kb.reviewed,
        governance=kb.governance,
    )
