"""Pseudonymised patient identifiers for artifacts that leave the machine (MLflow, reports).

Study paths name the patient (`XR_ELBOW/patient11185/study1_positive/`): public ids for MURA,
protected health information on a hospital's data. `pseudonymise_paths` replaces each patient
folder with `pt-` and 12 hex digits of an HMAC-SHA256 under a project secret, so the same
patient maps to the same pseudonym across runs (studies stay groupable) while the id cannot
be read back or guessed without the key. The key lives next to the artifacts, never in them.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from collections.abc import Iterable
from pathlib import Path

KEY_FILE = ".pseudonym-key"
_PATIENT = re.compile(r"^patient[^/]*$", re.IGNORECASE)
_PART = re.compile(r"^XR_[A-Z]+$")


def project_key(folder: Path) -> bytes:
    """The project's pseudonym key (32 random bytes, created once, readable by the owner)."""
    path = Path(folder) / KEY_FILE
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(secrets.token_bytes(32))
    return path.read_bytes()


def pseudonym(patient: str, key: bytes) -> str:
    return "pt-" + hmac.new(key, patient.encode("utf-8"), hashlib.sha256).hexdigest()[:12]


def pseudonymise_path(path: str, key: bytes) -> str:
    """The study path with its patient folder (named `patient*`, or the folder right after
    the `XR_*` body-part folder) replaced by its pseudonym; other folders are kept."""
    parts = path.split("/")
    for i, part in enumerate(parts):
        after_body_part = i > 0 and _PART.match(parts[i - 1]) is not None
        if part and (_PATIENT.match(part) or after_body_part):
            parts[i] = pseudonym(part, key)
    return "/".join(parts)


def pseudonymise_paths(paths: Iterable[str], key: bytes) -> list[str]:
    return [pseudonymise_path(str(p), key) for p in paths]


_PATH_COLUMNS = ("study_id", "study_path", "path")


def pseudonymise_frame(frame, key: bytes):
    """A copy of a per-image or per-study table with patient ids and the patient folder of
    every path column replaced by their pseudonyms."""
    out = frame.copy()
    for column in _PATH_COLUMNS:
        if column in out.columns:
            out[column] = pseudonymise_paths(out[column].astype(str), key)
    if "patient_id" in out.columns:
        out["patient_id"] = [pseudonym(str(p), key) for p in out["patient_id"]]
    return out
