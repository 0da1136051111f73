"""What `recommend()` returns: a frozen `Recommendation` (JSON for the service and the page via
`model_dump`, plain text for the CLI via `to_text`), and the fixed wording it carries."""

from __future__ import annotations

import textwrap

from bonefrac.recommend.schema import (
    AgeGroup,
    Band,
    Finding,
    Governance,
    Statement,
    UrgencyStatement,
    _Frozen,
)

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
# How the urgency level reads to a person; "clinical" (negatives): the model sets no urgency.
URGENCY_LABELS = {
    "emergency": "EMERGENCY",
    "urgent": "URGENT",
    "soon": "SOON",
    "routine": "ROUTINE",
    "clinical": "SET BY THE CLINICAL ASSESSMENT",
}
NEGATIVE_CAUTION = (
    "A normal result does not rule out injury: decide from the clinical assessment, and keep "
    "checking the circulation and nerves."
)

# Guidance must never state a dose ("per local protocol" instead): a number, in digits or words,


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
    probability: float | None  # None: a body part no model covers, not judged
    threshold: float | None
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
    # added in content 2026.11.2: age group, children's warnings, training data, the
    # confident-negative cut-off the band was chosen with, and the caution every negative shows
    age_group: AgeGroup = "unknown"
    paediatric: tuple[Statement, ...] = ()
    trained_on: Statement | None = None
    negative_cutoff: float | None = None
    negative_caution: str | None = None
    urgency_label: str = ""

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
        if self.probability is None:
            scored = "not judged: no model covers this body part"
        else:
            scored = (
                f"probability {self.probability:.2f}, threshold {self.threshold:.2f}, "
                f"confidence {self.confidence}"
            )
        lines = [
            para(f"bonefrac recommendation: {part}, {finding} ({scored})"),
            self.disclaimer,  # never wrapped, so it is always found whole
            "",
            para(self.summary),
            para(f"What the model detects: {self.detects}"),
        ]
        if self.negative_caution:
            lines.append(para(self.negative_caution))
        lines += [
            "",
            para(f"Urgency: {self.urgency_label}. {cited(self.urgency)}", rest="  "),
        ]
        sections = [
            (f"Children (age group: {self.age_group})", self.paediatric),
            ("Immediate care", self.immediate_care),
            ("Further imaging", self.further_imaging),
            ("Referral", (self.referral,)),
            ("Red flags (need emergency care)", self.red_flags),
            ("Follow-up", (self.follow_up,)),
        ]
        for title, statements in sections:
            if not statements:
                continue
            lines += ["", f"{title}:"]
            lines += [para(cited(s), "  - ", "    ") for s in statements]
        lines.append("")
        if self.review_by_radiologist:
            lines.append(para(f"Radiologist review: {self.review_advice}"))
            lines.append(para("Why: " + "; ".join(self.review_reasons) + ".", "  ", "  "))
        else:
            lines.append(para("Radiologist review: the images still get the usual formal report."))
        lines += ["", para(f"Scope: {cited(self.scope)}")]
        if self.trained_on:
            lines.append(para(f"Training data: {cited(self.trained_on)}"))
        lines += ["", "Sources:"]
        for i, source in enumerate(self.sources, start=1):
            url = f" {source.url}" if source.url else ""
            lines.append(para(f"[{i}] {source.title}. {source.section}.{url}", "  ", "      "))
        lines += ["", para(f"Content version {self.content_version}. {self.content_status}")]
        if not self.content_reviewed:
            lines.append(DRAFT_NOTICE)  # never wrapped, so it is always found whole
        return "\n".join(lines) + "\n"
