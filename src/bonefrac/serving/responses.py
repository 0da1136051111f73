"""The JSON pieces of a prediction response, and the request checks they need: one unit's
result (body part, abnormality finding with its operating point and val sensitivity, image
quality), the notices every response carries, a study's view agreement, the age group, and the
error shape. Plain functions on the inference core's `Decisions`; no models here."""

from __future__ import annotations

import numpy as np

from bonefrac.config import MURA_PARTS, OTHER, body_part_name
from bonefrac.errors import UserError
from bonefrac.inference import BODY_PART_MIN_CONFIDENCE, OOD_LIMIT, Decisions
from bonefrac.recommend.schema import AGE_GROUPS

# what a user may state: MURA's seven parts by short name, or "other"
STATED_PARTS = (*sorted(body_part_name(p) for p in MURA_PARTS), OTHER)

SYNTHETIC_NOTICE = (
    "These models were trained on SYNTHETIC images (the demo dataset), not real radiographs: "
    "their output says nothing about real X-rays."
)


class PredictionError(UserError):
    """A request the models cannot answer; `.code` is short and stable for machines."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


class OutOfDistribution(PredictionError):
    """The image does not look like the radiographs the models were trained on."""

    def __init__(self, score: float, where: str = "the image") -> None:
        super().__init__(
            f"{where} does not look like an elbow, hand or shoulder radiograph (out-of-"
            f"distribution score {score:.2f} > {OOD_LIMIT:.0f}); send an X-ray of one of these "
            "parts, or set allow_ood to analyse it anyway",
            "out_of_distribution",
        )
        self.score = score


def _number(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


def unit_json(
    decisions: Decisions,
    i: int,
    classes: list[str],
    *,
    negative_cutoff: float | None,
    sensitivity: dict | None,
) -> dict:
    """Body part, abnormality finding and quality of unit i (an image or a study) as JSON.
    The API keeps its `fracture` keys; the finding is MURA's "abnormal". A unit out of scope
    (a body part no fracture model covers) has finding "out_of_scope" and null numbers."""
    probs = decisions.body_probs[i]
    best = int(probs.argmax())
    judged = bool(decisions.in_scope[i])
    return {
        "body_part": {
            "label": classes[best],
            "probabilities": {c: float(p) for c, p in zip(classes, probs, strict=True)},
            "confident": bool(probs[best] >= BODY_PART_MIN_CONFIDENCE),
            "stated": decisions.stated,  # what the request said (null: not stated)
            "disagrees": bool(decisions.disagrees[i]),  # the stated part is not the model's
            "covered": judged,  # a fracture model covers the part the images went to
        },
        "fracture": {
            "model": str(decisions.part[i]) if judged else None,
            "probability": _number(decisions.prob[i]),
            "uncalibrated_probability": _number(decisions.raw[i]),
            "finding": str(decisions.finding[i]),
            "model_finding": str(decisions.model_finding[i]),
            "threshold": _number(decisions.threshold[i]),
            "uncertain_band": _number(decisions.band[i]),
            # a "no abnormality" is confident only below this (fitted on val; 0 = never)
            "negative_cutoff": negative_cutoff if judged else None,
            # the study-level sensitivity on val with its Wilson interval; None in older bundles
            "sensitivity": sensitivity if judged else None,
        },
        "quality": {
            "ood_score": float(decisions.ood[i]),
            "accepted": bool(decisions.accepted[i]),
            "ood_limit": OOD_LIMIT,
        },
    }


def notices(result: dict, synthetic: bool) -> list[str]:
    """The plain-language notices a response carries besides the recommendation."""
    out = [SYNTHETIC_NOTICE] if synthetic else []
    body = result["body_part"]
    if not body.get("covered", True):
        what = (
            f"The stated body part ({body['stated']})"
            if body.get("stated")
            else "The body part the model recognised"
        )
        out.append(
            f"{what} is not one the fracture models cover (elbow, hand, shoulder): no "
            "abnormality finding was made. Have a radiologist report the images."
        )
    covered = body.get("covered", True)
    if body.get("disagrees"):
        out.append(
            f"The stated body part ({body['stated']}) is not what the model recognised "
            f"({body['label']}): check the image is the intended one."
            + (" The finding is 'uncertain' until a radiologist reviews it." if covered else "")
        )
    elif not body["confident"] and covered:
        top = body["probabilities"][body["label"]]
        out.append(
            f"The model is unsure of the body part (most likely {body['label']}, probability "
            f"{top:.2f} < {BODY_PART_MIN_CONFIDENCE:.2f}), so the finding is 'uncertain'."
        )
    if result.get("views", {}).get("disagree"):
        out.append(
            "The views disagree: at least one is on the abnormal side of the threshold and "
            "another is not. The study probability is their mean, which can dilute a finding "
            "seen on one view only; look at each view."
        )
    if not result["quality"]["accepted"]:
        out.append(
            "The image does not look like the radiographs the models were trained on; it was "
            "analysed only because the override was set, so the finding is 'uncertain'."
        )
    return out


def check_age_group(age_group: str | None) -> str:
    """The request's age group ("adult", "child" or "unknown"; None = "unknown"), or a 400."""
    value = "unknown" if age_group is None else str(age_group).strip().lower() or "unknown"
    if value not in AGE_GROUPS:
        raise PredictionError(
            f"age_group {str(age_group)[:40]!r} is not one of adult, child, unknown: send one of "
            "them (or leave it out for unknown)",
            "bad_age_group",
        )
    return value


def check_body_part(body_part: str | None) -> str | None:
    """The request's stated body part as a short name ('XR_Wrist' -> 'wrist'; None or empty =
    not stated), or a 400 for a name that is none of MURA's seven parts nor "other"."""
    if body_part is None or not str(body_part).strip():
        return None
    value = str(body_part).strip().lower().removeprefix("xr_")
    if value not in STATED_PARTS:
        raise PredictionError(
            f"body_part {str(body_part)[:40]!r} is not one of {', '.join(STATED_PARTS)}: send "
            "one of them (or leave it out to let the model decide)",
            "bad_body_part",
        )
    return value


def view_agreement(per_image: Decisions, threshold: float) -> dict:
    """Which views of a study fall on the abnormal side of the threshold (calibrated, band
    ignored) and which do not; `disagree` when both kinds are present."""
    above = per_image.prob >= threshold
    abnormal = [int(i) for i in np.flatnonzero(above)]
    normal = [int(i) for i in np.flatnonzero(~above)]
    return {"disagree": bool(abnormal and normal), "abnormal": abnormal, "normal": normal}


def error_body(exc: Exception) -> dict:
    """`{"error": {"code", "message"}}` for a UserError: the shape every bad input gets."""
    code = getattr(exc, "code", "bad_request")
    return {"error": {"code": code, "message": str(exc)}}
