"""The inference core: what turns model outputs into the answers the service gives.

Calibration, the finding with its uncertain band, the out-of-distribution score, two-stage
routing and study aggregation, in numpy only. The models come in as forward functions
(images -> outputs), so the same code runs behind the service (`serving.predictor`),
`bonefrac predict`, and the evaluate stage's end-to-end numbers: what is evaluated is what
is served. Nothing here imports TensorFlow, scikit-learn or any training code.

    images ──► body-part forward ──► route (each image, or each study as one) ──► that part's
    fracture forward ──► temperature ──► mean per study ──► finding at the part's threshold,
    "uncertain" within its band, or forced "uncertain" for an unsure part / OOD image

A part no fracture model covers (the body-part model's "other" class: MURA's wrist, finger,
forearm, humerus) is not judged at all: its finding is "out_of_scope", with no probability.
A body part the user states routes the images instead of the model's guess; when the two
disagree the finding is "uncertain".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FRACTURE, NO_FRACTURE, UNCERTAIN = "fracture", "no_fracture", "uncertain"
REFUSED = "refused"  # the OOD gate answered 422 instead of a finding
OUT_OF_SCOPE = "out_of_scope"  # a body part no fracture model covers: not judged
OTHER = "other"  # the body-part model's class for those parts
OOD_LIMIT = 1.0  # an OOD score above this = unlike the training radiographs
BODY_PART_MIN_CONFIDENCE = 0.5  # below: the part (and so the fracture model) is a guess
_EPS = 1e-7  # keeps logits finite for probabilities saturated at 0 or 1

Forward = Callable[[np.ndarray], np.ndarray]  # images (N, ...) -> outputs (N, K) or (N,)


# -- calibration and findings -------------------------------------------------------------------


def logits(probs: Sequence[float] | np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(probs, dtype=float), _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


def apply_temperature(probs: Sequence[float] | np.ndarray, temperature: float) -> np.ndarray:
    """sigmoid(logit(p) / T): temperature scaling; T > 1 softens over-confident outputs."""
    return np.exp(-np.logaddexp(0.0, -logits(probs) / temperature))  # sigmoid, no overflow


def finding(prob: float, threshold: float, band: float) -> str:
    """'uncertain' within band of the threshold, else 'fracture' / 'no_fracture'."""
    if abs(prob - threshold) < band:
        return UNCERTAIN
    return FRACTURE if prob >= threshold else NO_FRACTURE


def findings(probs, threshold, band) -> np.ndarray:
    """finding() for many probabilities at once (threshold and band may be arrays too)."""
    probs = np.asarray(probs, dtype=float)
    decided = np.where(probs >= threshold, FRACTURE, NO_FRACTURE)
    return np.where(np.abs(probs - threshold) < band, UNCERTAIN, decided)


@dataclass(frozen=True)
class OperatingPoint:
    """One fracture model's operating point, chosen on val by the evaluate stage."""

    threshold: float
    temperature: float
    uncertain_band: float
    # a "no abnormality" below this counts as confident (chosen on val for a target
    # sensitivity); None = not recorded (older bundles): no negative is confident
    negative_cutoff: float | None = None

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> OperatingPoint:
        cutoff = values.get("negative_cutoff")
        return cls(
            float(values["threshold"]),
            float(values["temperature"]),
            float(values["uncertain_band"]),
            None if cutoff is None else float(cutoff),
        )


# -- the out-of-distribution gate ---------------------------------------------------------------


@dataclass(frozen=True)
class OodGate:
    """A fitted PCA as plain arrays, with its two OOD thresholds.

    score = max(Q / q_threshold, T² / t2_threshold), where Q is the mean squared
    reconstruction error of an image's descriptor and T² Hotelling's distance inside the
    PCA subspace; > OOD_LIMIT means out of distribution. Descriptors come from
    `imaging.downsample(images, image_size)`.
    """

    mean: np.ndarray  # (D,)
    components: np.ndarray  # (K, D), orthonormal rows
    explained_variance: np.ndarray  # (K,)
    q_threshold: float
    t2_threshold: float
    image_size: int  # descriptor resolution

    def scores(self, descriptors: np.ndarray) -> np.ndarray:
        """(N, D) descriptors -> (N,) OOD scores."""
        centred = np.asarray(descriptors, dtype=np.float64) - self.mean
        projected = centred @ self.components.T  # (N, K)
        residual = centred - projected @ self.components
        q = (residual**2).mean(axis=1)
        t2 = (projected**2 / np.maximum(self.explained_variance, 1e-12)).sum(axis=1)
        return np.maximum(q / self.q_threshold, t2 / self.t2_threshold)

    def save(self, path: Path) -> Path:
        with Path(path).open("wb") as file:  # a file object: np.savez would append ".npz"
            np.savez(
                file,
                mean=self.mean,
                components=self.components,
                explained_variance=self.explained_variance,
                thresholds=np.array([self.q_threshold, self.t2_threshold]),
                image_size=np.array(self.image_size),
            )
        return Path(path)

    @classmethod
    def load(cls, path: Path) -> OodGate:
        with np.load(path, allow_pickle=False) as arrays:
            q, t2 = (float(v) for v in arrays["thresholds"])
            return cls(
                arrays["mean"],
                arrays["components"],
                arrays["explained_variance"],
                q,
                t2,
                int(arrays["image_size"]),
            )


# -- inputs preprocessed several ways ------------------------------------------------------------


class Views:
    """N images preprocessed one or more ways: `views[key]` is the (N, S_k, S_k, 3) uint8
    batch for preprocessing `key`, and `views[rows]` (a mask or index array) keeps those
    images in every preprocessing. A bundle whose models were trained with different
    preprocessing (a kept champion from before a preprocessing change) feeds each model its
    own view; the core only ever indexes rows, so it never needs to know."""

    def __init__(self, arrays: Mapping[str, np.ndarray]) -> None:
        lengths = {len(a) for a in arrays.values()}
        if len(lengths) != 1:
            raise ValueError(f"every preprocessing needs the same images, got lengths {lengths}")
        self._arrays = dict(arrays)

    def __len__(self) -> int:
        return len(next(iter(self._arrays.values())))

    def __getitem__(self, index):
        if isinstance(index, str):
            return self._arrays[index]
        return Views({key: array[index] for key, array in self._arrays.items()})

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(self._arrays)

    @staticmethod
    def concat(items: Sequence[Views]) -> Views:
        """The images of several Views (same preprocessings) as one batch."""
        if not items:
            raise ValueError("no images to put in one batch")
        keys = set(items[0].keys)
        if any(set(v.keys) != keys for v in items):
            raise ValueError("every image needs the same preprocessings to share a batch")
        return Views({key: np.concatenate([v[key] for v in items]) for key in items[0].keys})


def viewed(forward: Forward, key: str, arrays_ok: bool) -> Forward:
    """A forward function that takes Views and runs on preprocessing `key`'s images;
    `arrays_ok`: a plain image array passes through too (a bundle with one preprocessing)."""

    def run(images):
        if isinstance(images, Views):
            return forward(images[key])
        if not arrays_ok:
            raise TypeError("this bundle's models take different preprocessing: pass Views")
        return forward(images)

    return run


# -- the two stages -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TwoStage:
    """The body-part model, one fracture model per part and their operating points."""

    classes: tuple[str, ...]  # the body-part model's softmax order
    body_part: Forward  # images -> (N, len(classes)) probabilities
    fracture: Mapping[str, Forward]  # part -> images -> (N,) or (N, 1) abnormal probability
    points: Mapping[str, OperatingPoint]


@dataclass(frozen=True)
class Routed:
    """N images after both stages."""

    body_probs: np.ndarray  # (N, P) over TwoStage.classes
    parts: np.ndarray  # (N,) where each image went: a fracture model's part, or OTHER
    raw: np.ndarray  # (N,) that model's output (NaN for OTHER: no model judged it)
    probs: np.ndarray  # (N,) calibrated with that part's temperature (NaN for OTHER)
    model_parts: np.ndarray  # (N,) the body-part model's own choice (its class names)
    stated: str | None = None  # the body part the user stated, as `route` got it


def _group_mean(values: np.ndarray, groups: np.ndarray, n_groups: int) -> np.ndarray:
    sums = np.zeros((n_groups, *values.shape[1:]))
    np.add.at(sums, groups, values)
    return sums / np.bincount(groups, minlength=n_groups).reshape(-1, *[1] * (values.ndim - 1))


def stated_route(model: TwoStage, stated: str) -> str:
    """Where a stated body part ('elbow', 'wrist', 'other') sends the images: its own fracture
    model, or OTHER for a part none covers."""
    return stated if stated in model.fracture else OTHER


def route(
    model: TwoStage,
    images: np.ndarray,
    groups: np.ndarray | None = None,
    stated: str | None = None,
) -> Routed:
    """Both stages on N images. groups=None: each image goes to its own most likely part's
    fracture model (/predict). groups (N,) = study index 0..G-1: every image of a study goes
    to the part with the study's highest mean body-part probability (/predict_study, MURA).
    `stated` (a body part the user gave, short name) routes every image instead; the model's
    own choice is kept in `model_parts`. Images routed to OTHER run no fracture model."""
    body = np.asarray(model.body_part(images), dtype=float)  # (N, P)
    if groups is None:
        choice = body.argmax(axis=1)
    else:
        groups = np.asarray(groups)
        choice = _group_mean(body, groups, int(groups.max()) + 1).argmax(axis=1)[groups]
    model_parts = np.asarray(model.classes)[choice]
    parts = model_parts if stated is None else np.full(len(body), stated_route(model, stated))
    raw = np.full(len(body), np.nan)
    probs = np.full(len(body), np.nan)
    for part in dict.fromkeys(parts.tolist()):  # one batched call per fracture model
        if part not in model.fracture:
            continue  # OTHER: out of scope, not judged
        rows = parts == part
        raw[rows] = np.asarray(model.fracture[part](images[rows]), dtype=float).reshape(-1)
        probs[rows] = apply_temperature(raw[rows], model.points[part].temperature)
    return Routed(body, parts, raw, probs, model_parts, stated)


@dataclass(frozen=True)
class Decisions:
    """One answer per unit (an image, or a study): arrays of length U."""

    part: np.ndarray  # the fracture model that judged it, or OTHER (out of scope, not judged)
    body_probs: np.ndarray  # (U, P) mean body-part probabilities
    prob: np.ndarray  # mean calibrated probability (MURA: a study is its images' mean); NaN: OTHER
    raw: np.ndarray  # mean uncalibrated probability
    ood: np.ndarray  # the highest OOD score of its images
    threshold: np.ndarray  # NaN where out of scope
    band: np.ndarray
    accepted: np.ndarray  # every image passed the OOD gate
    confident: np.ndarray  # body-part probability >= BODY_PART_MIN_CONFIDENCE
    model_finding: np.ndarray  # the probability against threshold and band alone
    finding: np.ndarray  # model_finding, or "uncertain" when not accepted or the part unsure
    model_part: np.ndarray  # the body-part model's own choice for the unit
    disagrees: np.ndarray  # a stated body part that is not the model's choice
    stated: str | None = None

    @property
    def in_scope(self) -> np.ndarray:
        """Units a fracture model judged (not OTHER)."""
        return self.part != OTHER

    @property
    def predicted(self) -> np.ndarray:
        """0/1 at the threshold, band ignored: the served probability against its threshold
        (0 for out-of-scope units, which have no probability: select `in_scope` first)."""
        return (self.prob >= self.threshold).astype(int)

    def answers(self, ood_gate: bool = True) -> np.ndarray:
        """What the service answers: the finding, or "refused" where the OOD gate is on and
        an image failed it (without the `allow_ood` override)."""
        return np.where(ood_gate & ~self.accepted, REFUSED, self.finding)


def decide(
    model: TwoStage, routed: Routed, ood: np.ndarray, groups: np.ndarray | None = None
) -> Decisions:
    """Judge each image (groups=None) or each group of images (a study) as the service does.
    Out of scope (routed to OTHER): "out_of_scope", no probability. Otherwise the finding, or
    "uncertain" when an image failed the OOD gate, or the body part is in doubt: the model
    unsure of it (< BODY_PART_MIN_CONFIDENCE, stated or not), or a stated part the model
    disagrees with."""
    ood = np.asarray(ood, dtype=float)
    if groups is None:
        groups = np.arange(len(ood))
    groups = np.asarray(groups)
    n = int(groups.max()) + 1 if len(groups) else 0
    first = np.zeros(n, dtype=int)
    first[groups[::-1]] = np.arange(len(groups))[::-1]  # the first image of each unit
    part = routed.parts[first]  # the same for every image of a unit routed by that unit
    body = _group_mean(routed.body_probs, groups, n)
    prob = _group_mean(routed.probs, groups, n)
    worst = np.full(n, -np.inf)
    np.maximum.at(worst, groups, ood)
    scoped = part != OTHER
    points = [model.points[p] if p != OTHER else None for p in part]
    threshold = np.array([p.threshold if p else np.nan for p in points])
    band = np.array([p.uncertain_band if p else np.nan for p in points])
    accepted = worst <= OOD_LIMIT
    confident = body.max(axis=1) >= BODY_PART_MIN_CONFIDENCE
    model_part = routed.model_parts[first]
    if routed.stated is None:
        disagrees = np.zeros(n, dtype=bool)
        part_sure = confident
    else:
        said = routed.stated if routed.stated in model.classes else OTHER
        disagrees = model_part != said
        # the model must agree with the user and be sure of it: a wrist the model half takes
        # for an elbow must not get the elbow model's confident answer because "elbow" was said
        part_sure = ~disagrees & confident
    with np.errstate(invalid="ignore"):
        model_finding = np.where(scoped, findings(prob, threshold, band), OUT_OF_SCOPE)
    finding = np.where(accepted & part_sure, model_finding, UNCERTAIN)
    return Decisions(
        part=part,
        body_probs=body,
        prob=prob,
        raw=_group_mean(routed.raw, groups, n),
        ood=worst,
        threshold=threshold,
        band=band,
        accepted=accepted,
        confident=confident,
        model_finding=model_finding,
        finding=np.where(scoped, finding, OUT_OF_SCOPE),
        model_part=model_part,
        disagrees=disagrees,
        stated=routed.stated,
    )
