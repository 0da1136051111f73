"""A hand-made MURA-format folder with the real release's quirks, for reader tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# (mura_split, part, patient, study, label, n_images, rgb)
STUDIES = [
    ("train", "XR_ELBOW", "patient00001", "study1_positive", 1, 2, False),
    ("train", "XR_ELBOW", "patient00002", "study1_negative", 0, 1, True),
    ("train", "XR_ELBOW", "patient00003", "study1_negative", 0, 2, False),
    ("train", "XR_ELBOW", "patient00003", "study2_positive", 1, 1, False),
    ("train", "XR_HAND", "patient00004", "study1_positive", 1, 3, False),
    ("train", "XR_HAND", "patient00005", "study1_negative", 0, 1, True),
    ("train", "XR_HAND", "patient00006", "study1_negative", 0, 2, False),
    ("train", "XR_SHOULDER", "patient00007", "study1_positive", 1, 2, False),
    ("train", "XR_SHOULDER", "patient00008", "study1_negative", 0, 2, False),
    ("train", "XR_SHOULDER", "patient00009", "study1_negative", 0, 1, False),
    ("train", "XR_WRIST", "patient00010", "study1_positive", 1, 2, False),
    ("valid", "XR_ELBOW", "patient11001", "study1_positive", 1, 2, False),
    ("valid", "XR_HAND", "patient11002", "study1_negative", 0, 1, True),
    ("valid", "XR_SHOULDER", "patient11003", "study1_positive", 1, 1, False),
    ("valid", "XR_FINGER", "patient11004", "study1_negative", 0, 1, False),
]


def write_png(path: Path, rgb: bool, seed: int) -> None:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, size=(48, 40), dtype=np.uint8)
    image = Image.fromarray(pixels, "L")
    if rgb:
        image = image.convert("RGB")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def make_mura(base: Path, with_csvs: bool = True) -> Path:
    """Write base/MURA-v1.1 with headerless CSVs, trailing slashes, other parts, hidden files."""
    root = base / "MURA-v1.1"
    image_lines = {"train": [], "valid": []}
    study_lines = {"train": [], "valid": []}
    for n, (split, part, patient, study, label, n_images, rgb) in enumerate(STUDIES):
        study_dir = root / split / part / patient / study
        for view in range(1, n_images + 1):
            write_png(study_dir / f"image{view}.png", rgb, seed=n * 10 + view)
            image_lines[split].append(f"MURA-v1.1/{split}/{part}/{patient}/{study}/image{view}.png")
        # macOS resource forks and stray files shipped in some copies of MURA
        (study_dir / "._image1.png").write_bytes(b"\x00\x05\x16\x07junk")
        (study_dir / "notes.txt").write_text("not an image")
        study_lines[split].append(f"MURA-v1.1/{split}/{part}/{patient}/{study}/,{label}")
    if with_csvs:
        for split in ("train", "valid"):
            (root / f"{split}_image_paths.csv").write_text("\n".join(image_lines[split]) + "\n")
            (root / f"{split}_labeled_studies.csv").write_text("\n".join(study_lines[split]) + "\n")
    return root


def expected_images(parts=("XR_ELBOW", "XR_HAND", "XR_SHOULDER")) -> int:
    return sum(s[5] for s in STUDIES if s[1] in parts)
