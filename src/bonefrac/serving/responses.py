"""The JSON pieces of a prediction response, and the request checks they need: one unit's
result (body part, abnormality finding with its operating point and val sensitivity, image
quality), the notices every response carries, a study's view agreement, the age group, and the
error shape. Plain functions on the inference core's `Decisions`; no models here."""

from __future__ import annotations

import numpy as np

from bonefrac.errors import UserError
from bonefrac.inference import BODY_PART_MIN_CONFIDENCE, OOD_LIMIT, Decisions
from bonefrac.recommend.schema import AGE_GROUPS

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


def unit_json(
    decisions: Decisions,
    i: int,
    classes: list[str],
    *,
    negative_cutoff: float,
    sensitivity: dict | None,
) -> dict:
    """Body part, abnormality finding and quality of unit i (an image or a study) as JSON.
    The API keeps its `fracture` keys; the finding is MURA's "abnormal"."""
    probs = decisions.body_probs[i]
    best = int(probs.argmax())
    return {
        "body_part": {
            "label": classes[best],
            "probabilities": {c: float(p) for c, p in zip(classes, probs, strict=True)},
            "confident": bool(probs[best] >= BODY_PART_MIN_CONFIDENCE),
        },
        "fracture": {
            "model": str(decisions.part[i]),
            "probability": float(decisions.prob[i]),
            "uncalibrated_probability": float(decisions.raw[i]),
            "finding": str(decisions.finding[i]),
            "model_finding": str(decisions.model_finding[i]),
            "threshold": float(decisions.threshold[i]),
            "uncertain_band": float(decisions.band[i]),
            # a "no abnormality" is confident only below this (fitted on val; 0 = never)
            "negative_cutoff": negative_cutoff,
            # the study-level sensitivity on val with its Wilson interval; None in older bundles
            "sensitivity": sensitivity,
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
    if not body["confident"]:
        top = body["probabilities"][body["label"]]
        out.append(
            f"The body part is uncertain (most likely {body['label']}, probability "
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
