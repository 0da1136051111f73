"""The synthetic dataset on disk: patients and studies planned per split and part, images
rendered on a few threads, MURA's four CSVs, and `generate`, which stages it all and renames
it into place."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import threading
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from bonefrac.data.synthetic.radiograph import render_radiograph
from bonefrac.errors import UserError

MURA_FOLDER = "MURA-v1.1"
SPLITS = ("train", "valid")
DEFAULT_PARTS = ("XR_ELBOW", "XR_HAND", "XR_SHOULDER")

MIN_PATIENTS = 2
MIN_SIZE = 32
MIN_STUDIES_PER_LABEL = 2  # per split and part, so both classes always exist for the tests
MAX_STUDIES_PER_PATIENT = 3
MAX_IMAGES_PER_STUDY = 4
RGB_FRACTION = 1 / 6  # MURA holds a few RGB files among the grayscale ones; readers must cope


@dataclass(frozen=True)
class _Study:
    """One study as MURA files it: a patient's visit for one body part, with 1-4 views."""

    split: str
    part: str
    patient: int
    number: int  # 1, 2, ... per patient
    abnormal: bool
    image_count: int

    def path_in(self, mura_folder: Path) -> Path:
        """The study's folder inside a MURA-v1.1 folder (or a staging folder standing in)."""
        return mura_folder / self.folder.removeprefix(f"{MURA_FOLDER}/")

    @property
    def folder(self) -> str:
        """The study's path as MURA's CSVs write it: from MURA-v1.1/, with a trailing slash."""
        label = "positive" if self.abnormal else "negative"
        return (
            f"{MURA_FOLDER}/{self.split}/{self.part}/"
            f"patient{self.patient:05d}/study{self.number}_{label}/"
        )


def _stable_key(text: str) -> int:
    """A seed component that, unlike hash(), is the same in every Python process."""
    return zlib.crc32(text.encode())


def _plan_studies(
    parts: Sequence[str], patients: int | dict[str, int], seed: int, abnormal_fraction: float
) -> list[_Study]:
    """Patients, studies, labels and view counts for the whole dataset, in MURA's folder order.

    Patient numbers run on across parts and from train into valid, as in MURA, so a patient
    belongs to exactly one split: the splits stay patient-disjoint.
    """
    studies: list[_Study] = []
    next_patient = 1
    per_part = patients if isinstance(patients, dict) else dict.fromkeys(parts, patients)
    for split in SPLITS:
        for part in parts:
            train_count = per_part[part]
            patient_count = train_count if split == "train" else max(MIN_PATIENTS, train_count // 2)
            rng = np.random.default_rng([seed, _stable_key(split), _stable_key(part)])
            studies_per_patient = rng.integers(1, MAX_STUDIES_PER_PATIENT + 1, patient_count)
            _top_up(studies_per_patient, 2 * MIN_STUDIES_PER_LABEL)
            abnormal = rng.random(studies_per_patient.sum()) < abnormal_fraction
            _ensure_both_labels(abnormal, rng)
            image_counts = rng.integers(1, MAX_IMAGES_PER_STUDY + 1, abnormal.size)
            study_index = 0
            for patient_offset, study_count in enumerate(studies_per_patient):
                for number in range(1, study_count + 1):
                    studies.append(
                        _Study(
                            split,
                            part,
                            next_patient + patient_offset,
                            number,
                            bool(abnormal[study_index]),
                            int(image_counts[study_index]),
                        )
                    )
                    study_index += 1
            next_patient += patient_count
    return studies


def _top_up(studies_per_patient: np.ndarray, minimum_total: int) -> None:
    """Adds studies to patients in turn until there are enough to hold both labels twice."""
    patient = 0
    while studies_per_patient.sum() < minimum_total:
        if studies_per_patient[patient] < MAX_STUDIES_PER_PATIENT:
            studies_per_patient[patient] += 1
        patient = (patient + 1) % studies_per_patient.size


def _ensure_both_labels(abnormal: np.ndarray, rng: np.random.Generator) -> None:
    """Flips random studies until each label has MIN_STUDIES_PER_LABEL, so every split and part
    can be trained and evaluated on both classes whatever `abnormal_fraction` says."""
    for label in (True, False):
        missing = MIN_STUDIES_PER_LABEL - int(np.count_nonzero(abnormal == label))
        if missing > 0:
            others = np.flatnonzero(abnormal != label)
            abnormal[rng.choice(others, missing, replace=False)] = label


def _write_image(path: Path, pixels: np.ndarray) -> None:
    # OpenCV writes a (H, W) array as 8-bit grayscale and (H, W, 3) as RGB, with no timestamp.
    if not cv2.imwrite(str(path), pixels):
        raise UserError(f"could not write {path}: check the --out folder is writable")


def _check_arguments(
    patients: int, size: int, seed: int, parts: Sequence[str], abnormal_fraction: float
) -> None:
    if patients < MIN_PATIENTS:
        raise UserError(f"patients is {patients}: use at least {MIN_PATIENTS} per body part")
    if size < MIN_SIZE:
        raise UserError(f"size is {size}: use at least {MIN_SIZE} pixels")
    if seed < 0:
        raise UserError(f"seed is {seed}: use a seed of 0 or more")
    if not 0 <= abnormal_fraction <= 1:
        raise UserError(f"abnormal_fraction is {abnormal_fraction}: use a value from 0 to 1")
    for part in parts:
        if not re.fullmatch(r"XR_[A-Z]+", part):
            raise UserError(f"body part {part!r} is not a MURA name: use e.g. XR_ELBOW")


SYNTHETIC_MARKER = "SYNTHETIC.txt"


def generate(
    out: Path,
    patients: int = 24,
    size: int = 256,
    seed: int = 0,
    parts: Sequence[str] = DEFAULT_PARTS,
    extra_parts: Sequence[str] = (),
    abnormal_fraction: float = 0.4,
    extra_patients: int | None = None,
) -> Path:
    """Writes a synthetic dataset as `out/MURA-v1.1/` and returns that folder.

    `patients` is per body part in train; valid gets half (at least 2). Each patient has 1-3
    studies of 1-4 images. `extra_parts` adds parts outside the project's three (MURA's other
    parts, which the body-part model's "other" class learns; or to test readers' filtering),
    `extra_patients` each (default: `patients`). The dataset is built in a hidden sibling
    folder and renamed into place at the end, so an interrupted run never leaves a
    half-written MURA-v1.1.
    """
    out = Path(out)
    all_parts = list(dict.fromkeys([*parts, *extra_parts]))  # keeps order, drops repeats
    _check_arguments(patients, size, seed, all_parts, abnormal_fraction)
    if extra_patients is not None and extra_patients < MIN_PATIENTS:
        raise UserError(f"extra_patients is {extra_patients}: use at least {MIN_PATIENTS}")
    counts = {part: patients for part in all_parts}
    counts |= {p: extra_patients or patients for p in extra_parts if p not in parts}
    target = out / MURA_FOLDER
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise UserError(f"{target} already exists: choose an empty --out folder or delete it")

    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{MURA_FOLDER}.partial-", dir=out))
    try:
        _write_dataset(
            staging, _plan_studies(all_parts, counts, seed, abnormal_fraction), seed, size
        )
        (staging / SYNTHETIC_MARKER).write_text(
            "SYNTHETIC data generated by `bonefrac demo-data` for the demo and the tests.\n"
            "These are drawn shapes, not radiographs: numbers measured on them say nothing\n"
            f"about real X-rays. seed={seed} patients={patients} size={size}\n"
        )
        staging.chmod(0o755)  # mkdtemp makes it private; the dataset is meant to be shared
        if target.exists():
            target.rmdir()  # empty, checked above; rename cannot replace a folder everywhere
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def is_synthetic(data: Path) -> bool:
    """True when `data` (the MURA-v1.1 folder or the folder holding it) was generated here."""
    data = Path(data)
    return (data / SYNTHETIC_MARKER).is_file() or (data / MURA_FOLDER / SYNTHETIC_MARKER).is_file()


def _write_dataset(root: Path, studies: list[_Study], seed: int, size: int) -> None:
    """Renders and writes every image, then MURA's four CSVs, inside `root` (the MURA folder).

    Images render on a few threads (OpenCV and NumPy release the GIL); each has its own seed,
    so the files do not depend on the order in which threads finish.
    """
    image_lines: dict[str, list[str]] = {split: [] for split in SPLITS}
    study_lines: dict[str, list[str]] = {split: [] for split in SPLITS}
    views: list[tuple[_Study, int]] = []
    for study in studies:
        study.path_in(root).mkdir(parents=True)
        study_lines[study.split].append(f"{study.folder},{int(study.abnormal)}")
        for image_number in range(1, study.image_count + 1):
            image_lines[study.split].append(f"{study.folder}image{image_number}.png")
            views.append((study, image_number))

    failed = threading.Event()  # set by the first error: queued views then do no work

    def write_view(view: tuple[_Study, int]) -> None:
        if failed.is_set():
            return
        try:
            _render_and_write(view)
        except BaseException:
            failed.set()
            raise

    def _render_and_write(view: tuple[_Study, int]) -> None:
        study, image_number = view
        # Seeded by the image's place in the dataset, not by a shared running generator.
        place = [study.split, study.part, study.patient, study.number, image_number]
        rng = np.random.default_rng([seed, *(_stable_key(str(key)) for key in place)])
        pixels = render_radiograph(study.part, study.abnormal, rng, size)
        if rng.random() < RGB_FRACTION:
            pixels = np.repeat(pixels[:, :, np.newaxis], 3, axis=2)  # (H, W, 3) gray as RGB
        _write_image(study.path_in(root) / f"image{image_number}.png", pixels)

    pool = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1))
    try:
        for _ in pool.map(write_view, views):
            pass  # iterating re-raises the first error from any thread
    finally:
        # On an error or Ctrl-C, drop the queued images instead of rendering them all first
        # (cancel what is queued; a view a thread already took returns at once).
        failed.set()
        pool.shutdown(wait=True, cancel_futures=True)

    for split in SPLITS:
        for name, lines in (("image_paths", image_lines), ("labeled_studies", study_lines)):
            text = "".join(f"{line}\n" for line in lines[split])
            (root / f"{split}_{name}.csv").write_text(text, encoding="utf-8", newline="\n")
