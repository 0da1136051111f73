"""The treatment-guidance knowledge file: its schema, governance and loading.

`load_knowledge()` validates `knowledge.yaml` (or a hospital's own file with the same schema)
and returns a frozen `Knowledge`; a bad entry stops the load with its path. Governance: the
content carries its sign-off (`governance`), `require_reviewed` is the service's draft gate, and
`changelog_problem` checks that CHANGELOG.md records the content's hash under its version.
"""

from __future__ import annotations

import hashlib
import json
import re
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

from bonefrac.errors import UserError

Finding = Literal["fracture", "no_fracture", "uncertain"]
Band = Literal["high", "low"]
# "clinical": the urgency is set by the clinical assessment, not by the model (negatives)
Urgency = Literal["emergency", "urgent", "soon", "routine", "clinical"]
FINDINGS: tuple[Finding, ...] = ("fracture", "no_fracture", "uncertain")
BANDS: tuple[Band, ...] = ("high", "low")
PARTS = ("elbow", "hand", "shoulder")
Part = Literal["elbow", "hand", "shoulder"]
AgeGroup = Literal["adult", "child", "unknown"]
AGE_GROUPS: tuple[AgeGroup, ...] = ("adult", "child", "unknown")

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


class Paediatric(_Frozen):
    """Children's warnings. Children are outside the models' training data (MURA, mostly adults)
    and their injuries are the classic misses, so a child's result always asks for review."""

    unknown_age: Statement  # short caution shown when the age group is not given
    child: tuple[Statement, ...] = Field(min_length=1)  # every child's study
    child_parts: dict[Part, tuple[Statement, ...]] = Field(default_factory=dict)  # per part


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
    trained_on: Statement  # the training data (MURA: mostly adults), shown with every result
    citations: dict[str, Citation] = Field(min_length=1)
    scope: Statement
    shared: dict[str, Statement] = Field(default_factory=dict)  # anchors for repeated statements
    generic: Entry  # body part not covered by the model: clinical assessment + radiologist
    parts: Parts
    paediatric: Paediatric

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
    elif isinstance(node, dict):
        for key, item in node.items():
            yield from _statements(item, f"{path}.{key}")
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
    for part in PARTS:  # a negative must never read as permission to discharge
        for band in BANDS:
            if kb.entry(part, "no_fracture", band).urgency.level == "routine":
                problems.append(
                    f"parts.{part}.no_fracture.{band}.urgency.level: must not be 'routine' (a "
                    "normal result does not rule out injury; use 'clinical')"
                )
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
