"""End to end: the served system on the test split, judged by the inference core the service
runs (`bonefrac.inference`), so the headline numbers describe what users get.

Two levels, as the two endpoints answer:
- image: each image on its own, routed to its own most likely part (POST /predict);
- study: a study's images together, routed to the study's part, probability = mean of the
  images' calibrated probabilities (POST /predict_study, the MURA protocol).

At each level: metrics over every unit at the served threshold (the served probability
against its part's threshold; band ignored), metrics over the units the service decides
(neither "uncertain" nor refused by the OOD gate) with their coverage, and the share of each
answer. Nothing is hidden: uncertain and refused answers are counted, not dropped silently.

A target-part unit the body-part model calls "other" (or that is otherwise routed to no
fracture model) is an abstention: the service answers "out_of_scope" with no probability, so
the threshold metrics cover the units a fracture model judged and `abstained` reports the
rest. Test images of MURA's other parts (when the frame holds them) measure the reverse:
the share recognised as out of scope instead of being given a covered part's guidance.

The models come in as forward functions, so `evaluate_end_to_end` runs on any runtime: the
evaluate stage passes its Keras models; a packaged bundle's runtime (fp32 now, int8 once
packaging exports it) is evaluated by handing in that runtime's `TwoStage`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from bonefrac.cache import Cache
from bonefrac.config import EvaluateConfig
from bonefrac.evaluate.bootstrap import bootstrap_ci
from bonefrac.evaluate.metrics import binary_metrics
from bonefrac.imaging import downsample
from bonefrac.inference import (
    FRACTURE,
    NO_FRACTURE,
    OTHER,
    OUT_OF_SCOPE,
    REFUSED,
    UNCERTAIN,
    Decisions,
    OodGate,
    TwoStage,
    Views,
    decide,
    route,
)

ANSWERS = (FRACTURE, NO_FRACTURE, UNCERTAIN, OUT_OF_SCOPE, REFUSED)
KEYS = ["path", "study_id", "study_path", "patient_id", "body_part", "label"]


class CachedForward:
    """A model's outputs on rows of one image array, each row computed once.

    The core is handed row indices instead of images, so the image-level and study-level
    routings (and the per-model evaluation) share one forward pass per model and image.
    """

    def __init__(self, forward: Callable[[np.ndarray], np.ndarray], images: np.ndarray) -> None:
        self.forward = forward
        self.images = images
        self.outputs: dict[int, np.ndarray] = {}

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=int)
        todo = np.array([r for r in dict.fromkeys(rows.tolist()) if r not in self.outputs], int)
        if len(todo):
            order = np.sort(todo)  # memory-mapped caches read fastest in order
            outputs = np.asarray(self.forward(self.images[order]))
            self.outputs.update(zip(order.tolist(), outputs, strict=True))
        if not len(rows):
            return np.empty((0, 1))
        return np.stack([self.outputs[r] for r in rows.tolist()])


@dataclass(frozen=True)
class EndToEnd:
    metrics: dict  # JSON-ready: metrics.json's "end_to_end"
    images: pd.DataFrame  # one row per test image, as /predict answers it
    studies: pd.DataFrame  # one row per test study, as /predict_study answers it


def ood_scores(gate: OodGate, images: np.ndarray) -> np.ndarray:
    return gate.scores(downsample(images, gate.image_size))


def evaluate_end_to_end(
    model: TwoStage,
    inputs: np.ndarray,
    frame: pd.DataFrame,
    ood: np.ndarray,
    cfg: EvaluateConfig,
    *,
    ood_gate: bool = True,
    runtime: str = "keras-fp32",
) -> EndToEnd:
    """The service's answers for every image and study in `frame` (one row per image: path,
    study_id, study_path, patient_id, body_part, label). `inputs` is what the model's forward
    functions take, one entry per frame row (images, or row indices for CachedForward);
    `ood` the images' OOD scores; `ood_gate` whether the service refuses OOD uploads."""
    frame = frame[KEYS].reset_index(drop=True)
    image = decide(model, route(model, inputs), ood)
    groups, _ = pd.factorize(frame["study_id"])
    study = decide(model, route(model, inputs, groups), ood, groups)

    all_images = _answers(frame, image, ood_gate)
    first = frame.groupby("study_id", sort=False).head(1).reset_index(drop=True)
    all_studies = _answers(first.drop(columns="path"), study, ood_gate)
    all_studies["n_images"] = np.bincount(groups)
    target_image = all_images["body_part"].isin(list(model.fracture)).to_numpy()
    target_study = all_studies["body_part"].isin(list(model.fracture)).to_numpy()
    images = all_images[target_image].reset_index(drop=True)
    studies = all_studies[target_study].reset_index(drop=True)
    metrics = {
        "runtime": runtime,
        "ood_gate": ood_gate,
        "routing_accuracy": _share(images["part"] == images["body_part"]),
        "study_routing_accuracy": _share(studies["part"] == studies["body_part"]),
    }
    for level, units in (("image", images), ("study", studies)):
        metrics |= _level(level, units, cfg)
    other_images, other_studies = all_images[~target_image], all_studies[~target_study]
    metrics["other_parts"] = {  # MURA's other parts: recognised as out of scope?
        "n_images": len(other_images),
        "n_studies": len(other_studies),
        "image_recognised": _share(other_images["part"] == OTHER),
        "study_recognised": _share(other_studies["part"] == OTHER),
    }
    return EndToEnd(metrics, images, studies)


def _share(mask: pd.Series) -> float | None:
    return float(mask.mean()) if len(mask) else None


def evaluate_bundle(
    model: TwoStage,
    gate: OodGate,
    cache: Cache,
    cfg: EvaluateConfig,
    runtime: str,
    *,
    inputs: Views | None = None,
    ood: np.ndarray | None = None,
) -> EndToEnd:
    """The end-to-end evaluation of a packaged bundle, run by the runtime that will serve it:
    `model` carries that runtime's forward functions (`Predictor.from_bundle(dir).core` for
    the Keras fp32 models today; an int8 runtime hands in its own) and `gate` the bundle's OOD
    gate. Inputs are fed exactly as the service feeds them: (N, S, S, 3) uint8 of the cache's
    test split, or `inputs` with their `ood` scores (a bundle whose models take different
    preprocessing: the test split in each, as `Predictor.as_views` expects)."""
    rows = cache.rows(split="test", other=OTHER in model.classes)
    if inputs is None:
        images = np.asarray(cache.images[rows])  # (N, S, S)
        inputs, ood = np.repeat(images[..., np.newaxis], 3, axis=-1), ood_scores(gate, images)
    elif ood is None or len(ood) != len(inputs) or len(inputs) != len(rows):
        raise ValueError("evaluate_bundle needs the test split's inputs and their OOD scores")
    return evaluate_end_to_end(model, inputs, cache.index.iloc[rows], ood, cfg, runtime=runtime)


def _answers(frame: pd.DataFrame, decisions: Decisions, ood_gate: bool) -> pd.DataFrame:
    return frame.assign(
        part=decisions.part,
        prob=decisions.prob,
        threshold=decisions.threshold,
        prediction=decisions.predicted,
        answer=decisions.answers(ood_gate),
        ood_score=decisions.ood,
    )


def _level(level: str, units: pd.DataFrame, cfg: EvaluateConfig) -> dict:
    """Metrics of one level: every unit a fracture model judged, at its part's threshold (with
    patient-bootstrap CIs; each row is one unit, so the bootstrap runs at "image" level over
    these rows), the decided units alone, the share of each answer and of abstentions (units
    routed to no fracture model). `{level}_submission` scores every unit as the MURA
    submission does, an abstention as normal (0): a model cannot raise its kappa by sending
    hard studies out of scope without that kappa showing it."""
    judged = units[units["part"] != OTHER]
    # `prediction` is the served 0/1, already 0 for a unit routed out of scope
    submission = binary_metrics(units["label"], units["prediction"].astype(float), 0.5)
    threshold = judged["threshold"].to_numpy()
    decided = units[units["answer"].isin([FRACTURE, NO_FRACTURE])]
    intervals = bootstrap_ci(judged, threshold, cfg.bootstrap_samples, cfg.seed, level="image")
    counts = units["answer"].value_counts()
    return {
        level: binary_metrics(judged["label"], judged["prob"], threshold),
        f"{level}_abstained": 1 - len(judged) / len(units) if len(units) else None,
        f"{level}_submission": {k: submission.get(k) for k in ("n", "kappa", "accuracy")},
        f"{level}_ci": {k: (list(v) if v else None) for k, v in intervals.items()},
        f"{level}_decided": {
            **binary_metrics(decided["label"], decided["prob"], decided["threshold"].to_numpy()),
            "coverage": len(decided) / len(units) if len(units) else None,
        },
        f"{level}_answers": {a: float(counts.get(a, 0) / max(len(units), 1)) for a in ANSWERS},
    }
