"""The champion gate's statistics: is the challenger better than the champion on the gate split?

Both models are scored on the same images of the gate split (`val`: patient-disjoint from
training, stable per patient, never the test split). A bootstrap that resamples *patients*
(the unit the splits keep apart) scores both models on every resample, so each resample gives
one paired difference Δ = challenger − champion. The challenger passes only when the lower
bound of the one-sided interval of Δ at `confidence` lies above `min_improvement`. The spread
of Δ also says how large a true Δ the gate could have detected (`detectable`, at 80% power),
so "not promoted" on a small gate split reads as "could not tell", not "is no better".

Pure numpy/pandas: the registry feeds it prediction frames, the tests feed it constructed ones.
Frames hold one row per image with `split`, `patient_id`, `study_id`, `path` and either
`label` + `prob` (fracture model: calibrated probability, judged at `threshold`) or
`truth` + `pred` (body-part model: class names).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from scipy.stats import norm

from bonefrac.evaluate.bootstrap import patient_weights, weighted_metrics
from bonefrac.evaluate.metrics import study_level

GATE_SPLIT = "val"
POWER = 0.8  # for `detectable`: the Δ found with this probability at the gate's confidence
MIN_PATIENTS = 5  # below this a patient bootstrap says nothing: the challenger cannot pass
MULTICLASS_METRICS = ("accuracy", "kappa")


@dataclass(frozen=True)
class Scored:
    """One model's predictions; `threshold` is its own operating point (fracture models)."""

    frame: pd.DataFrame
    threshold: float | None = None


@dataclass(frozen=True)
class Comparison:
    """Challenger vs champion on one split: point values, Δ and its one-sided lower bound."""

    metric: str
    split: str
    n_patients: int
    challenger: float | None
    champion: float | None
    delta: float | None
    lower: float | None  # one-sided lower bound of Δ at `confidence`
    confidence: float
    min_improvement: float
    detectable: float | None  # smallest true Δ this split detects with POWER
    passed: bool  # lower > min_improvement

    def to_dict(self) -> dict:
        return asdict(self)

    def tags(self, prefix: str) -> dict[str, str]:
        """`prefix.key -> text` for MLflow version tags (None as 'nan')."""
        out = {}
        for key, value in self.to_dict().items():
            if isinstance(value, float):
                value = f"{value:.6g}"
            out[f"{prefix}.{key}"] = "nan" if value is None else str(value)
        return out


def _units(scored: Scored, level: str, multiclass: bool) -> pd.DataFrame:
    """The rows the metric counts: images, or studies (mean image probability, MURA)."""
    frame = scored.frame
    if multiclass or level == "image":
        return frame.sort_values("path", kind="stable").reset_index(drop=True)
    studies = study_level(frame)
    return studies.sort_values("study_id", kind="stable").reset_index(drop=True)


def _weighted(units: pd.DataFrame, scored: Scored, key: str, multiclass: bool, weights):
    """The metric for every row of `weights` (n_resamples, n_units) at once."""
    if not multiclass:
        labels = units["label"].to_numpy(dtype=int)
        probs = units["prob"].to_numpy(dtype=float)
        return weighted_metrics(labels, probs, float(scored.threshold), weights)[key]
    classes = sorted(set(units["truth"]) | set(units["pred"]))
    k = len(classes)
    truth = pd.Categorical(units["truth"], categories=classes).codes
    pred = pd.Categorical(units["pred"], categories=classes).codes
    cells = np.eye(k * k)[truth * k + pred]  # (n_units, k*k) one-hot confusion cell
    confusion = (weights @ cells).reshape(len(weights), k, k)
    n = confusion.sum(axis=(1, 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        observed = np.trace(confusion, axis1=1, axis2=2) / n
        if key == "accuracy":
            return observed
        chance = (confusion.sum(axis=2) * confusion.sum(axis=1)).sum(axis=1) / n**2
        return (observed - chance) / (1 - chance)


def compare(
    challenger: Scored,
    champion: Scored,
    metric: str,
    *,
    multiclass: bool = False,
    split: str = GATE_SPLIT,
    confidence: float = 0.9,
    min_improvement: float = 0.0,
    n_samples: int = 2000,
    seed: int = 42,
) -> Comparison:
    """Paired patient bootstrap of Δ = challenger − champion on `split` (see module doc).

    `metric` is `<image|study>_<name>` for fracture models (name from CI_METRICS) and
    `accuracy` or `kappa` for the body-part model. Both frames must hold the same images."""
    level, key = ("image", metric) if multiclass else metric.split("_", 1)
    if multiclass and metric not in MULTICLASS_METRICS:
        raise ValueError(f"body-part gate metric must be one of {MULTICLASS_METRICS}")
    ours = Scored(challenger.frame[challenger.frame["split"] == split], challenger.threshold)
    theirs = Scored(champion.frame[champion.frame["split"] == split], champion.threshold)
    a, b = _units(ours, level, multiclass), _units(theirs, level, multiclass)
    id_col = "path" if multiclass or level == "image" else "study_id"
    if not a[id_col].equals(b[id_col]):
        raise ValueError("challenger and champion must be scored on the same images")
    n_patients = int(a["patient_id"].nunique()) if len(a) else 0
    ones = np.ones((1, len(a)))
    point_a = float(_weighted(a, ours, key, multiclass, ones)[0]) if len(a) else np.nan
    point_b = float(_weighted(b, theirs, key, multiclass, ones)[0]) if len(b) else np.nan
    resamples = patient_weights(a["patient_id"], n_samples, seed) if len(a) else []
    deltas = [
        _weighted(a, ours, key, multiclass, w) - _weighted(b, theirs, key, multiclass, w)
        for w in resamples
    ]
    delta_samples = np.concatenate(deltas) if deltas else np.empty(0)
    delta_samples = delta_samples[np.isfinite(delta_samples)]
    if not (np.isfinite(point_a) and np.isfinite(point_b)) or len(delta_samples) < n_samples // 2:
        # undefined on this split (one class, too few patients): nothing can be concluded
        return Comparison(
            metric,
            split,
            n_patients,
            _finite(point_a),
            _finite(point_b),
            None,
            None,
            confidence,
            min_improvement,
            None,
            False,
        )
    lower = float(np.quantile(delta_samples, 1 - confidence))
    spread = float(delta_samples.std(ddof=1))
    return Comparison(
        metric=metric,
        split=split,
        n_patients=n_patients,
        challenger=point_a,
        champion=point_b,
        delta=point_a - point_b,
        lower=lower,
        confidence=confidence,
        min_improvement=min_improvement,
        detectable=float(min_improvement + (norm.ppf(confidence) + norm.ppf(POWER)) * spread),
        passed=lower > min_improvement and n_patients >= MIN_PATIENTS,
    )


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def point_value(scored: Scored, metric: str, *, multiclass: bool = False, split: str) -> float:
    """One model's metric on one split (the challenger alone, when there is no champion)."""
    level, key = ("image", metric) if multiclass else metric.split("_", 1)
    own = Scored(scored.frame[scored.frame["split"] == split], scored.threshold)
    units = _units(own, level, multiclass)
    if units.empty:
        return float("nan")
    return float(_weighted(units, scored, key, multiclass, np.ones((1, len(units))))[0])


# --- the decision -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Champion:
    """What the gate knows of the current champion: its version, its predictions made with its
    own preprocessing and operating point (None when it cannot be scored, with `unscorable`
    saying why), and its pin (who/when/why) when a person pinned it."""

    version: str
    scored: Scored | None
    unscorable: str | None = None
    pin: dict | None = None


@dataclass(frozen=True)
class Decision:
    model: str
    registered_name: str
    version: str
    metric: str
    value: float | None  # the challenger's metric on the gate split
    champion_version: str | None
    champion_value: float | None  # the champion's metric on the same gate images
    promoted: bool
    reason: str
    gate: Comparison | None = None  # Δ, its lower bound and power (None: nothing to compare)
    test_value: float | None = None  # reported, never read by the decision
    test_delta: float | None = None  # reported, never read by the decision

    def to_dict(self) -> dict:
        return asdict(self)

    def tags(self) -> dict[str, str]:
        """What the registered version carries about this decision."""
        tags = {
            "bonefrac.promotion": self.reason,
            "bonefrac.gate.decision": "promoted" if self.promoted else "not promoted",
            "bonefrac.gate.split": GATE_SPLIT,
            "bonefrac.gate.metric": self.metric,
            "bonefrac.gate.value": _text(self.value),
            "bonefrac.gate.champion_version": self.champion_version or "none",
            "bonefrac.test.value": _text(self.test_value),
            "bonefrac.test.delta": _text(self.test_delta),
        }
        if self.gate is not None:
            tags |= self.gate.tags("bonefrac.gate")
        return tags


def _text(value: float | None) -> str:
    return "nan" if value is None else f"{value:.6g}"


def _signed(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.3f}"


def decide(
    challenger: Scored,
    champion: Champion | None,
    *,
    model: str,
    registered_name: str,
    metric: str,
    multiclass: bool,
    operating_problem: str | None,
    confidence: float,
    min_improvement: float,
    n_samples: int,
    seed: int,
) -> Decision:
    """Promote or keep, from the gate split only; test numbers are computed for the record.

    Order: an unusable operating point is never promoted; a first version is; a pinned
    champion is kept (the comparison is still recorded); a champion that cannot be scored is
    kept (a person can pin the challenger); otherwise the paired bootstrap decides."""
    kind = {"multiclass": multiclass}
    value = _finite(point_value(challenger, metric, split=GATE_SPLIT, **kind))
    test_value = _finite(point_value(challenger, metric, split="test", **kind))
    comparison, test_delta = None, None
    if champion is not None and champion.scored is not None:
        comparison = compare(
            challenger,
            champion.scored,
            metric,
            confidence=confidence,
            min_improvement=min_improvement,
            n_samples=n_samples,
            seed=seed,
            **kind,
        )
        champion_test = _finite(point_value(champion.scored, metric, split="test", **kind))
        if test_value is not None and champion_test is not None:
            test_delta = test_value - champion_test

    def decision(promoted: bool, reason: str) -> Decision:
        return Decision(
            model=model,
            registered_name=registered_name,
            version="",
            metric=metric,
            value=value,
            champion_version=champion.version if champion else None,
            champion_value=comparison.champion if comparison else None,
            promoted=promoted,
            reason=reason,
            gate=comparison,
            test_value=test_value,
            test_delta=test_delta,
        )

    where = f"{GATE_SPLIT} {metric}"
    if operating_problem:
        return decision(False, f"not promoted: unusable operating point ({operating_problem})")
    if value is None:
        return decision(False, f"not promoted: {where} could not be computed")
    if champion is None:
        return decision(True, f"promoted: first version ({where} {value:.3f})")
    if champion.pin:
        pin = champion.pin
        return decision(
            False,
            f"kept champion v{champion.version}: pinned by {pin.get('by')} at {pin.get('at')} "
            f"({pin.get('reason')}); `bonefrac champion unpin` lets the gate decide again",
        )
    if comparison is None:
        return decision(
            False,
            f"kept champion v{champion.version}: it cannot be scored on {GATE_SPLIT} "
            f"({champion.unscorable}); `bonefrac champion pin` promotes by hand",
        )
    summary = (
        f"{where} Δ {_signed(comparison.delta)}, {confidence:.0%} lower bound "
        f"{_signed(comparison.lower)} vs min_improvement {min_improvement:.3f}, "
        f"{comparison.n_patients} patients (detects Δ ≥ {_signed(comparison.detectable)})"
    )
    if comparison.passed:
        return decision(True, f"promoted over champion v{champion.version}: {summary}")
    if comparison.n_patients < MIN_PATIENTS:
        summary += f"; fewer than {MIN_PATIENTS} val patients: too few to promote on"
    return decision(False, f"kept champion v{champion.version}: {summary}")
