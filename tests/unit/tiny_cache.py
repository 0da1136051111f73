"""A tiny preprocessed cache, as the preprocess stage writes it, for tests that train."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd


def write_tiny_cache(folder: Path, seed: int, size: int = 32, n: int = 24) -> None:
    """n random size-px images of one part, 16 train and the rest val, labels alternating."""
    rng = np.random.default_rng(seed)
    np.save(folder / "images.npy", rng.integers(0, 255, (n, size, size), dtype=np.uint8))
    rows = [
        {
            "path": f"p{i}",
            "split": "train" if i < 16 else "val",
            "part": "XR_HAND",
            "body_part": "hand",
            "patient_id": f"patient{i}",
            "study_id": f"s{i}",
            "study_path": f"s{i}/",
            "view": 1,
            "label": i % 2,
        }
        for i in range(n)
    ]
    pd.DataFrame(rows).to_csv(folder / "index.csv", index=False)
    (folder / "meta.json").write_text(json.dumps({"image_size": size, "key": "t"}))
