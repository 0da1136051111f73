"""Reports: the official MURA submission file, the comparison table and the model card."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from bonefrac import DISCLAIMER


def write_submission(study_frame: pd.DataFrame, path: Path, threshold: float | np.ndarray) -> Path:
    """The official MURA submission: `study path/,0|1` a line, no header, order as given.
    MURA's format has no abstention: a study no fracture model judged (routed out of scope,
    probability NaN) is written 0, and the evaluation reports those as abstained."""
    paths = study_frame["study_path"].astype(str)
    paths = paths.where(paths.str.endswith("/"), paths + "/")
    prob = study_frame["prob"].to_numpy(dtype=float)
    judged = ~np.isnan(prob)
    predictions = np.zeros(len(prob), dtype=int)
    predictions[judged] = prob[judged] >= np.broadcast_to(threshold, prob.shape)[judged]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{p},{y}\n" for p, y in zip(paths, predictions, strict=True)))
    return path


def read_submission(path: Path) -> dict[str, int]:
    """Study path -> 0/1 from a submission (or MURA *_labeled_studies.csv) file, in file order."""
    frame = pd.read_csv(path, header=None, names=["study_path", "label"], dtype={"study_path": str})
    return dict(zip(frame["study_path"], frame["label"].astype(int), strict=True))


def _format_ci(value: float | None, ci: Sequence[float] | None, digits: int = 2) -> str:
    if value is None:
        return "—"
    text = f"{value:.{digits}f}"
    return text + (f" ({ci[0]:.{digits}f}–{ci[1]:.{digits}f})" if ci else "")


COMPARISON_COLUMNS = (
    ("body_part_accuracy", "Body-part accuracy"),
    ("study_kappa", "Study kappa"),
    ("study_auroc", "Study AUROC"),
    # end to end: the share of target-part studies sent out of scope, and the kappa with
    # those scored normal (0) as in the MURA submission; "—" for per-part models
    ("study_abstained", "Studies abstained"),
    ("study_submission_kappa", "Kappa, abstained as normal"),
)


def comparison_table(
    rows: list[dict], columns: Sequence[tuple[str, str]] = COMPARISON_COLUMNS
) -> str:
    """Markdown table like the paper's Table V; a `<key>_ci` entry adds "(low–high)"."""
    lines = [
        "| Model | " + " | ".join(header for _, header in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for row in rows:
        cells = [_format_ci(row.get(key), row.get(f"{key}_ci")) for key, _ in columns]
        lines.append(f"| {row.get('model', '?')} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


MODEL_CARD = """# Model card: {name}
{synthetic_warning}
## Intended use
{disclaimer} The model flags elbow, hand and shoulder radiographs (MURA) as abnormal or
normal to help prioritise review; it is not for use without a clinician.

## Training data
MURA v1.1 train split, with a patient-disjoint validation split carved out of it.
Data version: `{data_version}`.

## Evaluation protocol
Splits are patient-disjoint; MURA `valid` is the test set and picks nothing. A study's
probability is the mean of its images' probabilities (MURA protocol) and Cohen's kappa is the
headline metric. Temperature and threshold are chosen on val; 95% CIs come from a bootstrap
that resamples patients.

## Metrics (test)
{metrics}
## Calibration
Temperature scaling on val images, T = {temperature}.
{calibration}
## Threshold & uncertain band
Threshold {threshold} ({threshold_method}, chosen on val studies). Probabilities within
{uncertain_band} of it are reported as "uncertain" ({uncertain_share} of test studies).

## Limitations
- MURA labels mean abnormal (fracture, hardware, degenerative disease, other), not only
  fracture: a "fracture" finding means "abnormal study".
- Only elbow, hand and shoulder radiographs; other images are out of distribution.
- Single-source data (Stanford); performance elsewhere is unverified.{synthetic_limitation}

## Parameters
{params}
## Notes
{notes}
"""
SYNTHETIC_WARNING = """
> **Warning: trained and evaluated on SYNTHETIC data.** These numbers say nothing about
> performance on real radiographs.
"""


def _metrics_markdown(metrics: dict) -> str:
    """Study and image tables with CIs, then any other top-level scalar as a bullet."""
    text = ""
    for level in ("study", "image"):
        values = metrics.get(level)
        if not isinstance(values, dict):
            continue
        cis = values.get("ci") or {}
        text += f"\n### {level.capitalize()} level\n\n| metric | value (95% CI) |\n|---|---|\n"
        for name in ("kappa", "auroc", "auprc", "accuracy", "sensitivity", "specificity", "f1"):
            if name in values:
                text += f"| {name} | {_format_ci(values[name], cis.get(name), digits=3)} |\n"
    skip = {
        "study",
        "image",
        "calibration",
        "val_study",
        "threshold",
        "threshold_method",
        "temperature",
        "uncertain_band",
        "uncertain_share",
    }
    other = [f"- {k}: {v}" for k, v in metrics.items() if k not in skip]
    return text + ("\n" + "\n".join(other) + "\n" if other else "")


def model_card(
    name: str,
    metrics: dict,
    params: dict,
    data_version: str,
    notes: str = "",
    synthetic: bool | None = None,
) -> str:
    """Markdown model card. `metrics` is BinaryEvaluation.to_dict() (other top-level keys are
    listed as they come); synthetic=None infers it from data_version and params."""
    if synthetic is None:
        synthetic = "synthetic" in data_version.lower() or any(
            value is True for key, value in params.items() if "synthetic" in str(key).lower()
        )

    def number(key: str) -> str:
        value = metrics.get(key)
        return (
            f"{value:.3f}" if isinstance(value, float) else str(value if value is not None else "—")
        )

    calibration = metrics.get("calibration") or {}
    return MODEL_CARD.format(
        name=name,
        synthetic_warning=SYNTHETIC_WARNING if synthetic else "",
        disclaimer=DISCLAIMER,
        data_version=data_version,
        metrics=_metrics_markdown(metrics),
        temperature=number("temperature"),
        calibration="".join(f"- {k}: {_format_ci(v, None, 3)}\n" for k, v in calibration.items()),
        threshold=number("threshold"),
        threshold_method=metrics.get("threshold_method", "—"),
        uncertain_band=number("uncertain_band"),
        uncertain_share=number("uncertain_share"),
        synthetic_limitation=(
            "\n- Synthetic data: the metrics above are a pipeline check, not evidence."
            if synthetic
            else ""
        ),
        params="".join(f"- `{k}`: {v}\n" for k, v in params.items()) or "—\n",
        notes=notes or "—",
    )
