"""Does one part's fracture model learn on the SYNTHETIC generator? Draws a demo-like set
(`--patients` a part, MURA-train only), carves a patient-disjoint val split (20%, as the quick
profile), trains the fracture model with bonefrac's own `fit_model` and the quick profile's
recipe, then scores study AUROC and kappa (threshold: Youden on val) on a held-out set drawn
with another seed, which neither training nor selection saw. SYNTHETIC data: the numbers say
whether the training path learns the generator's breaks, nothing about real X-rays.
Usage: python benchmarks/synthetic_learning.py XR_HAND [--patients 40] [--epochs 30]
[--patience 10] [--lr-patience 5] [--seed 0] [--held-seed 7] [--held 30]"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

PROJECT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("part", choices=["XR_ELBOW", "XR_HAND", "XR_SHOULDER"])
    parser.add_argument("--patients", type=int, default=40, help="train patients of the part")
    parser.add_argument("--epochs", type=int, default=None, help="default: the quick profile's")
    parser.add_argument("--patience", type=int, default=None)
    parser.add_argument("--lr-patience", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0, help="data seed of the training set")
    parser.add_argument("--held-seed", type=int, default=7)
    parser.add_argument(
        "--held", type=int, default=30, help="held-out patients, train folder (+ half in valid)"
    )
    args = parser.parse_args()
    if args.held_seed == args.seed:
        parser.error("--held-seed must differ from --seed: the held-out set must be new films")
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    print(next((ln for ln in cpu.splitlines() if "Model name" in ln), "cpu: unknown"))

    import keras
    from sklearn.metrics import cohen_kappa_score, roc_auc_score, roc_curve

    from bonefrac.cache import Cache
    from bonefrac.config import TrainConfig, load_settings
    from bonefrac.data.synthetic import generate
    from bonefrac.evaluate import study_level
    from bonefrac.imaging import preprocess_file
    from bonefrac.train import fit_model

    settings = load_settings(PROJECT / "params.yaml", profile="quick", env={})
    changes = {"finetune_epochs": args.epochs, "patience": args.patience}
    changes["lr_patience"] = args.lr_patience
    changes = {k: v for k, v in changes.items() if v is not None}
    cfg = TrainConfig.model_validate({**settings.train.model_dump(), **changes})
    work = Path(tempfile.mkdtemp(prefix="synthetic-learning-"))

    def draw(seed: int, patients: int) -> tuple[np.ndarray, pd.DataFrame]:
        root = generate(work / f"seed{seed}", patients=patients, seed=seed, parts=[args.part])
        images, rows = [], []
        for path in sorted(root.rglob("*.png")):
            split, part, patient, study = path.relative_to(root).parts[:4]
            images.append(preprocess_file(path, settings.preprocess)[..., 0])
            rows.append(
                {
                    "mura_split": split,
                    "body_part": part,
                    "patient_id": patient,
                    "study_id": f"{split}/{part}/{patient}/{study}",
                    "label": int(study.endswith("positive")),
                    "scope": "target",
                }
            )
        return np.stack(images), pd.DataFrame(rows)

    images, index = draw(args.seed, args.patients)
    keep = (index["mura_split"] == "train").to_numpy()
    images, index = images[keep], index[keep].reset_index(drop=True)
    patients = sorted(index["patient_id"].unique())
    n_val = max(2, round(0.2 * len(patients)))
    val = set(np.random.default_rng(args.seed).choice(patients, n_val, replace=False))
    index["split"] = np.where(index["patient_id"].isin(val), "val", "train")
    held_images, held_index = draw(args.held_seed, args.held)
    cache = Cache(images=images, index=index, meta={"image_size": settings.preprocess.image_size})

    start = time.perf_counter()
    result = fit_model(cache, args.part, [args.part], cfg, work / "model")
    seconds = time.perf_counter() - start
    model = keras.models.load_model(result.model_path)

    def studies(pixels: np.ndarray, rows: pd.DataFrame) -> pd.DataFrame:
        rgb = np.repeat(pixels[..., np.newaxis], 3, axis=-1).astype("float32")
        p = model.predict(rgb, batch_size=32, verbose=0)[:, 0]
        studies = study_level(rows.assign(prob=p))  # the evaluate stage's study rows (MURA)
        return studies.rename(columns={"label": "y", "prob": "p"})

    def split(name: str) -> pd.DataFrame:
        mask = (index["split"] == name).to_numpy()
        return studies(images[mask], index[mask])

    val_studies, held = split("val"), studies(held_images, held_index)
    fpr, tpr, thresholds = roc_curve(val_studies["y"], val_studies["p"])
    threshold = float(thresholds[np.argmax(tpr - fpr)])
    report = {
        "part": args.part,
        "train_images": int((index["split"] == "train").sum()),
        "val_images": int((index["split"] == "val").sum()),
        "held_studies": len(held),
        "epochs_run": len(result.history.get("loss", [])),
        "best_epoch": result.best_epoch,
        "train_seconds": round(seconds),
        "train_study_auroc": round(roc_auc_score(*split("train")[["y", "p"]].T.values), 3),
        "val_study_auroc": round(roc_auc_score(val_studies["y"], val_studies["p"]), 3),
        "held_study_auroc": round(roc_auc_score(held["y"], held["p"]), 3),
        "held_study_kappa": round(
            cohen_kappa_score(held["y"], (held["p"] >= threshold).astype(int)), 3
        ),
        "val_threshold": round(threshold, 3),
    }
    print("SYNTHETIC", json.dumps(report))


if __name__ == "__main__":
    main()
