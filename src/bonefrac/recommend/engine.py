"""Treatment recommendations shown next to a model result: sourced, conservative decision support.

`recommend()` maps (body part, finding, fracture probability) to one entry of `knowledge.yaml`
and returns a frozen `Recommendation`. It never makes the guidance more certain than the model:
an uncertain finding, a low-confidence probability, an out-of-distribution image, a one-image
study or a body part the model does not cover all add "have a radiologist review the images".
The knowledge file and its governance live in `bonefrac.recommend.schema`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

from pydantic import Field, ValidationError

from bonefrac import DISCLAIMER
from bonefrac.errors import UserError
from bonefrac.recommend.result import (  # noqa: F401 - re-exported for callers and tests
    DRAFT_NOTICE,
    FINDING_LABELS,
    NEGATIVE_CAUTION,
    REVIEW_ADVICE,
    URGENCY_LABELS,
    Recommendation,
    Source,
)
from bonefrac.recommend.schema import (  # noqa: F401 - re-exported for callers and tests
    AGE_GROUPS,
    BANDS,
    FINDINGS,
    PARTS,
    AgeGroup,
    Band,
    Finding,
    Governance,
    Knowledge,
    KnowledgeError,
    Statement,
    UrgencyStatement,
    _describe,
    _Frozen,
    changelog_problem,
    load_knowledge,
    require_reviewed,
    states_a_dose,
)

DEFAULT_THRESHOLD = 0.5
# A probability is "high" confidence when it lies at least this fraction of the way from the
# threshold to the nearest extreme (1 for fracture, 0 for no fracture). With threshold 0.5:
# p >= 0.8 or p <= 0.2. Model probabilities are only as trustworthy as their calibration.
DEFAULT_HIGH_CONFIDENCE_MARGIN = 0.6

# -- engine ----------------------------------------------------------------------------------


class RecommendationContext(_Frozen):
    """What else is known about the study; every field is optional."""

    ood: bool = False  # the image looks unlike the training images (PCA reconstruction error)
    study_images: int | None = Field(None, ge=1)  # images in the study; 1 = a single view
    age_group: AgeGroup = "unknown"  # child: paediatric warnings + review; unknown: a caution
    single_image: bool = False  # one image sent alone (/predict): the study's other views unseen
    views_disagree: bool = False  # a study's views fall on both sides of the threshold


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
    negative_cutoff: float | None = None,
) -> Band:
    """ "high" when the probability is at least `high_confidence_margin` of the way from the
    threshold to 1 (fracture side) or to 0 (no-fracture side); otherwise "low".

    On the no-fracture side a `negative_cutoff` (fitted on val for a target sensitivity, from
    the bundle) replaces the margin: "high" only below it. The service always passes one."""
    if probability < threshold and negative_cutoff is not None:
        return "high" if probability < negative_cutoff else "low"
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
        known = ", ".join(RecommendationContext.model_fields)
        raise UserError(f"context: {problem} (known keys: {known})") from None


def recommend(
    body_part: str | None,
    finding: str,
    probability: float | None,
    context: RecommendationContext | Mapping[str, Any] | None = None,
    *,
    threshold: float | None = DEFAULT_THRESHOLD,
    band: Band | None = None,
    high_confidence_margin: float = DEFAULT_HIGH_CONFIDENCE_MARGIN,
    negative_cutoff: float | None = None,
    knowledge: Knowledge | None = None,
) -> Recommendation:
    """The sourced recommendation for one model result (pure: same inputs, same output).

    `probability` is the model's fracture probability and `threshold` the one the finding was
    made at (both None for a body part no model covers, which no fracture model judged);
    "fracture" needs probability >= threshold and "no_fracture" below it. The confidence band
    comes from the distance to the threshold (see `confidence_band`) unless
    `band` gives one, e.g. from a calibrated interval; `negative_cutoff` (the bundle's, fitted
    on val) decides which negatives are confident. `context` may say `ood=True` (forces the
    uncertain, radiologist-review guidance), `study_images`, `age_group` (child: paediatric
    warnings and review; unknown, the default: a short caution), `single_image` (one image sent
    alone: the part's standard views are asked for) or `views_disagree` (review). A body part
    other than elbow, hand or shoulder (or None) gets the generic radiologist-review guidance.
    Raises UserError for bad arguments and KnowledgeError for a bad knowledge file.
    """
    if finding not in FINDINGS:
        raise UserError(f"finding {finding!r} is not one of {', '.join(FINDINGS)}")
    if body_part is not None and not isinstance(body_part, str):
        raise UserError(f"body part must be a name such as 'elbow' or 'XR_ELBOW', not {body_part}")
    judged = probability is not None  # None: no fracture model covers the part (not judged)
    if not judged and (normalise_body_part(body_part) is not None or finding != "uncertain"):
        raise UserError(
            "probability is missing: only a body part the models do not cover, with finding "
            "'uncertain', goes without one"
        )
    probability = _unit_interval("probability", probability) if judged else None
    threshold = _unit_interval("threshold", threshold, open_ends=True) if judged else None
    if not 0.0 < high_confidence_margin <= 1.0:
        raise UserError(f"high_confidence_margin {high_confidence_margin!r} must be in (0, 1]")
    if band is not None and band not in BANDS:
        raise UserError(f"band {band!r} is not one of high, low")
    if negative_cutoff is not None:
        negative_cutoff = _unit_interval("negative_cutoff", negative_cutoff)
    if judged and (
        (finding == "fracture" and probability < threshold)
        or (finding == "no_fracture" and probability >= threshold)
    ):
        raise UserError(
            f"finding {finding!r} disagrees with probability {probability:.2f} at threshold "
            f"{threshold:.2f}: pass the threshold the finding was made at, or finding 'uncertain'"
        )
    ctx = _context(context)
    kb = knowledge or load_knowledge()
    part = normalise_body_part(body_part)
    if not judged:
        band = "low"
    band = band or confidence_band(probability, threshold, high_confidence_margin, negative_cutoff)

    # 1. Why the result needs a radiologist before anyone acts on it (empty = not flagged).
    reasons = []
    if part is None:
        covered = ", ".join(PARTS)
        if body_part is not None and body_part.strip().lower() == "other":
            reasons.append(f"the image is of a body part the models do not cover ({covered})")
        else:
            reasons.append(f"the body part {body_part!r} is not one the model covers ({covered})")
        if not judged:
            reasons.append("no model judged the image for an abnormality")
    if ctx.ood:
        reasons.append("the image looks unlike the images the model was trained on")
    if finding == "uncertain":
        reasons.append("the model's finding is uncertain")
    if band == "low":
        reasons.append("the probability is close to the threshold (low confidence)")
    if ctx.study_images == 1:
        reasons.append("the study has a single image, and fractures need at least two views")
    if ctx.views_disagree:
        reasons.append(
            "the views disagree: one looks abnormal and another does not, and the study "
            "probability (their mean) can dilute a finding seen on one view only"
        )
    if ctx.age_group == "child":
        reasons.append(
            "the patient is a child: children's injuries are easily missed and the models were "
            "trained mostly on adults"
        )

    # 2. Which guidance: when the model's output cannot be used, the uncertain/low path.
    unusable = part is None or ctx.ood
    guide_finding: Finding = "uncertain" if unusable else finding
    guide_band: Band = "low" if unusable else band
    entry = kb.generic if part is None else kb.entry(part, guide_finding, guide_band)
    further = entry.further_imaging
    views = getattr(kb.parts, part).standard_views if part else None
    one_view = ctx.study_images == 1 or ctx.single_image
    if views is not None and one_view and views not in further:
        further = (views, *further)  # the single-view safeguard (e.g. AP-only shoulder)
    paediatric = _paediatric(kb, part, ctx.age_group)
    if entry.radiologist_review and not reasons:
        reasons.append("the guidance for this result asks for it")
    review = bool(reasons)

    # 3. Sources in order of first citation, so the text numbers them [1], [2], ...
    cited = [*paediatric, entry.urgency, *entry.immediate_care, *further, entry.referral]
    cited += [*entry.red_flags, entry.follow_up, kb.scope, kb.trained_on]
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
        age_group=ctx.age_group,
        paediatric=paediatric,
        trained_on=kb.trained_on,
        negative_cutoff=negative_cutoff,
        negative_caution=NEGATIVE_CAUTION if finding == "no_fracture" else None,
        urgency_label=URGENCY_LABELS[entry.urgency.level],
    )


def _paediatric(kb: Knowledge, part: str | None, age_group: str) -> tuple[Statement, ...]:
    """Children's warnings: every one for a child (with the part's own), the short caution when
    the age group is unknown, none for an adult."""
    if age_group == "child":
        return (*kb.paediatric.child, *kb.paediatric.child_parts.get(part, ()))
    if age_group == "unknown":
        return (kb.paediatric.unknown_age,)
    return ()
