"""A bundle of untrained ResNet50s at a given size, with its OpenVINO IR (fp32 + NNCF int8),
for timing at the real input size: speed does not depend on the weights.

The PCA (OOD gate) is fitted and int8 calibrated on the demo data's train images, the gate
scored on its valid images. Untrained models have no meaningful outputs, so the accuracy gate
is opened (every limit 1.0) and its verdicts only printed: this bundle exists to time the
runtimes, never to serve.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

PARTS = ("elbow", "hand", "shoulder")
OPEN_GATE = {
    "gate_max_delta_p": 1.0,
    "gate_max_flip_rate": 1.0,
    "gate_max_delta_auroc": 1.0,
    "gate_max_delta_kappa": 1.0,
}


def _images(paths: list[Path], cfg) -> np.ndarray:
    from bonefrac.imaging import preprocess_file

    return np.stack([preprocess_file(p, cfg)[..., 0] for p in paths])  # (N, S, S)


def untrained_bundle(
    size: int, out: Path, mura: Path, calibration: int = 100, val: int = 60
) -> Path:
    import keras

    from bonefrac.bundle import write_bundle
    from bonefrac.config import PackageConfig, PcaConfig, Settings, TrainConfig
    from bonefrac.models import build_classifier
    from bonefrac.optimize import GateData, add_to_bundle
    from bonefrac.pca import fit

    settings = Settings().model_copy(
        update={"preprocess": Settings().preprocess.model_copy(update={"image_size": size})}
    )
    files = {}
    for name, outputs in (("body_part", 3), *((p, 1) for p in PARTS)):
        files[name] = out / f"{name}.keras"
        build_classifier(outputs, size, TrainConfig(weights="none"), name).save(files[name])
        keras.backend.clear_session()
    rng = np.random.default_rng(0)
    data, train_all, val_all, val_parts = {}, [], [], []
    for i, part in enumerate(PARTS):
        train = sorted((mura / "train" / f"XR_{part.upper()}").rglob("*.png"))
        valid = sorted((mura / "valid" / f"XR_{part.upper()}").rglob("*.png"))
        train = [train[j] for j in np.sort(rng.permutation(len(train))[:calibration])]
        valid = valid[: val // len(PARTS)]
        x_train, x_val = _images(train, settings.preprocess), _images(valid, settings.preprocess)
        train_all.append(x_train)
        val_all.append(x_val)
        val_parts += [i] * len(valid)
        labels = np.array([int("positive" in p.parent.name) for p in valid])
        groups = np.unique([p.parent for p in valid], return_inverse=True)[1]
        data[part] = GateData(x_train, x_val, labels, groups, 0.5, 1.0)
    data["body_part"] = GateData(
        np.concatenate(train_all)[rng.permutation(sum(map(len, train_all)))[:calibration]],
        np.concatenate(val_all),
        np.array(val_parts),
    )
    pca = fit(np.concatenate(train_all)[..., None].repeat(3, -1), PcaConfig())
    pca.save(out / "pca.joblib")
    points = {p: {"threshold": 0.5, "temperature": 1.0, "uncertain_band": 0.1} for p in PARTS}
    versions = {"body_part": {"classes": list(PARTS), "run_id": f"untrained-{size}px"}}
    bundle = write_bundle(
        out / "bundle",
        settings,
        files,
        points,
        out / "pca.joblib",
        versions,
        ood_gate=pca.ood_gate(),
    )
    section = add_to_bundle(bundle, data, PackageConfig(**OPEN_GATE))
    for name, entry in section["models"].items():
        metrics = {k: entry["int8"]["metrics"][k] for k in ("max_delta_p", "flip_rate")}
        print(f"int8 {name} (untrained, gate opened): {json.dumps(metrics)}")
    return bundle
