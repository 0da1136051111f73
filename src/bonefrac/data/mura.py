"""MURA v1.1 reader: one manifest row per image, with patient-disjoint splits.

Layout (Stanford AIMI's release):
    MURA-v1.1/{train,valid}/XR_<PART>/patientNNNNN/studyN_{positive,negative}/imageN.png
    MURA-v1.1/{train,valid}_image_paths.csv      no header, one path a line ("MURA-v1.1/...")
    MURA-v1.1/{train,valid}_labeled_studies.csv  no header, "study path/,0|1"

MURA `valid` becomes our **test** split and is never used to pick anything; `val` is carved
from MURA `train` by a stable hash of the patient id (`assign_val_split`).
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pandas as pd

from bonefrac.config import DataConfig, body_part_name
from bonefrac.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".dcm")
MURA_SPLITS = {"train": "train", "valid": "test"}  # MURA folder -> our split name
COLUMNS = [
    "path",
    "mura_split",
    "split",
    "part",
    "body_part",
    "patient_id",
    "study_id",
    "study_path",
    "view",
    "label",
    "folder_label",
    "scope",  # "target": a part with a fracture model; "other": only the body-part model sees it
]
TARGET, OTHER_SCOPE = "target", "other"
_STUDY_RE = re.compile(r"^study(\d+)_(positive|negative)$")
_IMAGE_RE = re.compile(r"^image(\d+)\.\w+$", re.IGNORECASE)


@dataclass(frozen=True)
class ManifestResult:
    frame: pd.DataFrame  # one row per image, COLUMNS
    data_dir: Path  # folder the `path` column is relative to
    problems: list[str] = field(default_factory=list)  # named, human-readable


def find_mura_root(data: Path) -> Path:
    """Accept the folder holding MURA-v1.1/ or the MURA-v1.1 folder itself."""
    data = Path(data)
    if not data.is_dir():
        raise DataError(
            f"{data} not found: pass --data pointing at the folder that holds MURA-v1.1"
        )
    if (data / "MURA-v1.1").is_dir():
        return data / "MURA-v1.1"
    if (data / "train").is_dir() or (data / "train_image_paths.csv").is_file():
        return data
    raise DataError(
        f"{data} does not contain MURA-v1.1/ (nor train/ and valid/): pass --data pointing "
        "at the folder that holds MURA-v1.1"
    )


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _read_lines(csv_path: Path) -> list[str]:
    return [line.strip() for line in csv_path.read_text().splitlines() if line.strip()]


def _relative_to_root(mura_path: str) -> PurePosixPath:
    """'MURA-v1.1/train/XR_HAND/...' -> 'train/XR_HAND/...' (whatever the root is called)."""
    parts = PurePosixPath(mura_path.strip().rstrip("/")).parts
    if parts and parts[0] not in MURA_SPLITS:
        parts = parts[1:]
    return PurePosixPath(*parts)


def _image_paths_from_csv(root: Path, mura_split: str, problems: list[str]) -> list[PurePosixPath]:
    csv_path = root / f"{mura_split}_image_paths.csv"
    out = []
    for line in _read_lines(csv_path):
        rel = _relative_to_root(line)
        if not _is_image_name(rel.name):
            continue
        if not (root / rel).is_file():
            problems.append(f"{csv_path.name}: listed image does not exist: {line}")
            continue
        out.append(rel)
    return out


def _study_labels_from_csv(root: Path, mura_split: str, problems: list[str]) -> dict[str, int]:
    csv_path = root / f"{mura_split}_labeled_studies.csv"
    labels: dict[str, int] = {}
    for number, line in enumerate(_read_lines(csv_path), start=1):
        study, _, label = line.rpartition(",")
        if label.strip() not in {"0", "1"} or not study:
            problems.append(f"{csv_path.name} line {number}: expected 'study path/,0|1': {line}")
            continue
        labels[str(_relative_to_root(study))] = int(label)
    return labels


def _scan_images(root: Path, mura_split: str) -> list[PurePosixPath]:
    split_dir = root / mura_split
    if not split_dir.is_dir():
        return []
    found = []
    for dirpath, dirnames, filenames in os.walk(split_dir):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if _is_image_name(name):
                found.append(PurePosixPath(Path(dirpath, name).relative_to(root).as_posix()))
    return found


def _rows(
    root: Path,
    mura_split: str,
    images: Iterable[PurePosixPath],
    labels: dict[str, int] | None,
    parts: tuple[str, ...],
    problems: list[str],
    other_parts: tuple[str, ...] = (),
) -> list[dict]:
    rows = []
    mismatched: set[str] = set()
    for rel in images:
        if len(rel.parts) != 5:
            problems.append(f"unexpected path depth (want split/part/patient/study/image): {rel}")
            continue
        _, part, patient, study, image = rel.parts
        if part not in parts and part not in other_parts:
            continue
        study_match = _STUDY_RE.match(study)
        if not study_match or not patient.startswith("patient"):
            problems.append(
                f"not a MURA study folder (want patientN/studyN_positive|negative): {rel}"
            )
            continue
        folder_label = int(study_match.group(2) == "positive")
        study_rel = str(rel.parent)
        if labels is None:
            label = folder_label
        elif study_rel in labels:
            label = labels[study_rel]
        else:
            problems.append(f"study has no label in {mura_split}_labeled_studies.csv: {study_rel}/")
            continue
        if label != folder_label and study_rel not in mismatched:
            mismatched.add(study_rel)
            problems.append(
                f"study folder suffix disagrees with its CSV label {label}: "
                f"{root.name}/{study_rel}/"
            )
        view_match = _IMAGE_RE.match(image)
        rows.append(
            {
                "path": f"{root.name}/{rel}",
                "mura_split": mura_split,
                "split": MURA_SPLITS[mura_split],
                "part": part,
                "body_part": body_part_name(part),
                "patient_id": patient,
                "study_id": study_rel,
                "study_path": f"MURA-v1.1/{study_rel}/",
                "view": int(view_match.group(1)) if view_match else 0,
                "label": label,
                "folder_label": folder_label,
                "scope": TARGET if part in parts else OTHER_SCOPE,
            }
        )
    return rows


def patient_draw(patient_id: str, seed: int) -> float:
    """A patient's fixed draw in [0, 1): a hash of (seed, patient id), so it never changes
    when other patients are added or removed."""
    digest = hashlib.sha256(f"{seed}:{patient_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def subsample_other_parts(frame: pd.DataFrame, fraction: float, seed: int) -> pd.DataFrame:
    """Keep the other parts' rows of patients whose draw falls below `fraction` (a draw of
    its own, independent of the val split's, so the kept patients split like the rest)."""
    if fraction >= 1:
        return frame
    other = frame["scope"] == OTHER_SCOPE
    draws = {p: patient_draw(f"other-parts:{p}", seed) for p in frame.loc[other, "patient_id"]}
    dropped = other & (frame["patient_id"].map(draws) >= fraction)
    return frame[~dropped.to_numpy()]


def assign_val_split(frame: pd.DataFrame, val_fraction: float, seed: int) -> pd.DataFrame:
    """Move MURA-train *patients* whose hash draw falls below `val_fraction` to `val`.

    Stable per patient: adding data never moves an existing patient from train to val, so a
    champion trained earlier has never seen today's val patients and a comparison on val is
    fair to the challenger. On small sets a stratum (main body part x any abnormal study) of
    3+ patients with none drawn gives its lowest-draw patient to val, so val keeps both
    classes of every part; that patient can only leave val (when a new patient draws lower).
    """
    frame = frame.copy()
    train = frame[frame["mura_split"] == "train"]
    if train.empty:
        return frame
    per_patient = train.groupby("patient_id").agg(
        part=("part", lambda s: s.mode().iloc[0]), abnormal=("label", "max")
    )
    per_patient["draw"] = [patient_draw(p, seed) for p in per_patient.index]
    val = per_patient["draw"] < val_fraction
    for _, stratum in per_patient.groupby(["part", "abnormal"], sort=True):
        if len(stratum) >= 3 and not val[stratum.index].any():
            val[stratum["draw"].idxmin()] = True
    frame.loc[
        (frame["mura_split"] == "train") & frame["patient_id"].isin(val[val].index), "split"
    ] = "val"
    return frame


def build_manifest(data: Path, cfg: DataConfig) -> ManifestResult:
    """Read MURA from its CSVs (or a folder scan when they are absent) into a manifest."""
    root = find_mura_root(data)
    problems: list[str] = []
    rows: list[dict] = []
    for mura_split in MURA_SPLITS:
        paths_csv = root / f"{mura_split}_image_paths.csv"
        labels_csv = root / f"{mura_split}_labeled_studies.csv"
        if paths_csv.is_file() and labels_csv.is_file():
            images = _image_paths_from_csv(root, mura_split, problems)
            labels = _study_labels_from_csv(root, mura_split, problems)
        else:
            images, labels = _scan_images(root, mura_split), None
        rows += _rows(root, mura_split, images, labels, cfg.parts, problems, cfg.other_parts)

    frame = pd.DataFrame(rows, columns=COLUMNS)
    if not (frame["scope"] == TARGET).any():
        raise DataError(
            f"no {', '.join(cfg.parts)} images found under {root}: check --data and data.parts"
        )
    frame = subsample_other_parts(frame, cfg.other_fraction, cfg.seed)
    frame = frame.drop_duplicates("path").sort_values("path", kind="stable")
    frame = assign_val_split(frame, cfg.val_fraction, cfg.seed).reset_index(drop=True)

    in_both = frame.groupby("patient_id")["mura_split"].nunique()
    for patient in sorted(in_both[in_both > 1].index):
        problems.append(f"patient appears in both MURA train and valid: {patient}")
    return ManifestResult(frame=frame, data_dir=root.parent, problems=problems)


def counts_table(frame: pd.DataFrame) -> str:
    """Images per split x body part x label (0 = normal, 1 = abnormal), with totals."""
    table = pd.crosstab(
        [frame["split"], frame["body_part"]],
        frame["label"].map({0: "normal", 1: "abnormal"}),
        margins=True,
        margins_name="total",
    )
    order = [s for s in ("train", "val", "test") if s in set(frame["split"])] + ["total"]
    table = table.reindex(order, level=0)
    return table.to_string()


def write_manifest(frame: pd.DataFrame, out: Path) -> Path:
    """Write the manifest CSV atomically (a half-written manifest is never left behind)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=out.parent, suffix=".tmp", delete=False) as tmp:
        frame.to_csv(tmp.name, index=False)
    os.replace(tmp.name, out)
    return out


def read_manifest(path: Path) -> pd.DataFrame:
    """Read a manifest written by `write_manifest`, with the right dtypes."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} not found: run `bonefrac manifest` first")
    frame = pd.read_csv(path, dtype={"patient_id": str, "study_id": str, "path": str})
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(f"{path} is not a bonefrac manifest (missing columns {missing})")
    return frame
