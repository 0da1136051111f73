"""The serving bundle: everything the service needs, in one folder, one BentoML model.

    bundle/
      bundle.json            format, parts, image size and preprocessing (the OOD gate's: this
                             run's), per-model versions, preprocessing (each model's own: a
                             kept champion may predate a preprocessing change) and
                             operating points (threshold, temperature, uncertain band; and,
                             optional, the confident-negative cut-off and the val sensitivity
                             with its interval, both fitted on val),
                             OOD gate thresholds, data version, synthetic flag
      body_part/model.keras
      <part>/model.keras     one fracture model per part
      ood_gate.npz           the PCA out-of-distribution gate as plain arrays (serving)
      pca.joblib             the fitted PCA: the retraining pipeline's drift reference only;
                             serving never loads it (it would need scikit-learn and pca.py)

This module is the train/serve boundary: packaging writes a bundle, serving reads it, and it
imports nothing from evaluation, PCA fitting, tracking, the registry or training (the
import-linter contracts in pyproject.toml check that). The BentoML model store holds it:
`package` saves the bundle there as model `bonefrac`; the service declares it and loads it once.

Format history: 1 = OOD gate only as pca.joblib, operating points optional (serving fell back
to threshold 0.5, temperature 1). 2 = ood_gate.npz, operating points required. 3 = as 2, but
some model was trained with other preprocessing than the bundle's (`models.<name>.preprocess`,
a champion kept across a preprocessing change); a reader of format 2 only would feed it the
bundle's, so such a bundle says 3 and older bonefrac refuses it.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from bonefrac.bundle_integrity import verify_bundle, write_manifest
from bonefrac.config import PreprocessConfig, Settings, body_part_name
from bonefrac.errors import DataError
from bonefrac.inference import OodGate, OperatingPoint
from bonefrac.models import BODY_PART_MODEL

BUNDLE_FILE = "bundle.json"
BUNDLE_FORMAT = 2  # every model takes the bundle's preprocessing
MIXED_FORMAT = 3  # some model takes its own: older bonefrac must refuse it, not feed it wrongly
BENTO_MODEL_NAME = "bonefrac"
MODEL_FILE = "model.keras"
OOD_GATE_FILE = "ood_gate.npz"
DRIFT_REFERENCE_FILE = "pca.joblib"
OPERATING_POINT_FILE = "operating_point.json"  # per part, in the evaluation folder
POINT_KEYS = ("threshold", "temperature", "uncertain_band")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"{path} not found: run the train and evaluate stages first")
    return json.loads(path.read_text())


# -- writing (packaging) --------------------------------------------------------------------------


def write_bundle(
    out_dir: Path,
    settings: Settings,
    model_files: dict[str, Path],
    operating_points: dict[str, dict],
    pca_path: Path,
    versions: dict[str, dict[str, Any]] | None = None,
    data_version: str = "untracked",
    synthetic: bool = False,
    ood_gate: OodGate | Path | None = None,
) -> Path:
    """Assemble a bundle folder from model files, operating points, the OOD gate (default: the
    one the evaluate stage evaluated with, `evaluation/ood_gate.npz`) and the fitted PCA."""
    parts = [body_part_name(p) for p in settings.data.parts]
    missing = [n for n in (BODY_PART_MODEL, *parts) if n not in model_files]
    if missing:
        raise DataError(f"cannot package: no model for {', '.join(missing)}")
    unset = [p for p in parts if set(POINT_KEYS) - set(operating_points.get(p, {}))]
    if unset:
        raise DataError(
            f"cannot package: no operating point (threshold, temperature, uncertain band) for "
            f"{', '.join(unset)}: run the evaluate stage first"
        )
    gate = _gate(ood_gate, settings)
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    models: dict[str, dict] = {}
    for name, source in model_files.items():
        (out_dir / name).mkdir()
        shutil.copyfile(source, out_dir / name / MODEL_FILE)
        models[name] = {**(versions or {}).get(name, {}), **operating_points.get(name, {})}
    gate.save(out_dir / OOD_GATE_FILE)
    shutil.copyfile(pca_path, out_dir / DRIFT_REFERENCE_FILE)
    manifest = {
        "format": BUNDLE_FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "parts": parts,
        "image_size": settings.preprocess.image_size,
        "preprocess": settings.preprocess.model_dump(mode="json", exclude={"workers"}),
        "models": models,
        "ood_gate": {
            "file": OOD_GATE_FILE,
            "q_threshold": gate.q_threshold,
            "t2_threshold": gate.t2_threshold,
            "image_size": gate.image_size,
        },
        "data_version": data_version,
        "synthetic": synthetic,
    }
    if len(set(model_inputs(manifest).values())) > 1:
        manifest["format"] = MIXED_FORMAT
    (out_dir / BUNDLE_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    write_manifest(out_dir)  # SHA-256 of every file, checked on import (bundle_integrity)
    return out_dir


def _gate(ood_gate: OodGate | Path | None, settings: Settings) -> OodGate:
    if isinstance(ood_gate, OodGate):
        return ood_gate
    path = Path(ood_gate) if ood_gate is not None else settings.layout.evaluation / OOD_GATE_FILE
    if not path.is_file():
        raise DataError(f"{path} not found: run the evaluate stage first")
    return OodGate.load(path)


# -- reading (serving) ----------------------------------------------------------------------------


def read_bundle(path: Path) -> dict:
    """bundle.json of a bundle folder, checked for the format this code reads."""
    path = Path(path)
    file = path / BUNDLE_FILE
    if not file.is_file():
        raise DataError(f"{path} is not a bonefrac bundle (no {BUNDLE_FILE}): package the models")
    manifest = json.loads(file.read_text())
    found = manifest.get("format")
    if found == 1:
        raise DataError(
            f"{path} is a format-1 bundle from an older bonefrac (its OOD gate is a pickled "
            "scikit-learn PCA, which serving no longer loads): package the models again with "
            "this version (`bonefrac pipeline`)"
        )
    if found not in (BUNDLE_FORMAT, MIXED_FORMAT):
        raise DataError(
            f"{path} has bundle format {found}, but this bonefrac reads formats "
            f"{BUNDLE_FORMAT} and {MIXED_FORMAT}: serve it with the bonefrac version that "
            "packaged it, or package the models again"
        )
    try:
        mixed = len(set(model_inputs(manifest).values())) > 1
    except (KeyError, TypeError, ValueError):  # pydantic's ValidationError included
        raise DataError(
            f"{path} records missing or invalid preprocessing settings: package it again"
        ) from None
    if mixed != (found == MIXED_FORMAT):
        raise DataError(
            f"{path} says format {found} but its models' preprocessing "
            f"{'differs' if mixed else 'is all the same'}: package the models again"
        )
    return manifest


def operating_points(manifest: dict) -> dict[str, OperatingPoint]:
    """Each part's operating point, as evaluated; a bundle without one is refused."""
    points = {}
    for part in manifest["parts"]:
        meta = manifest["models"].get(part, {})
        if set(POINT_KEYS) - set(meta):
            raise DataError(f"the bundle has no operating point for {part}: package it again")
        points[part] = OperatingPoint.from_dict(meta)
    return points


OOD_INPUT = "ood_gate"  # the OOD gate's input in `model_inputs`: the bundle's own preprocessing


def preprocess_key(values: dict) -> str:
    """One preprocessing as a canonical string (equal settings, equal key)."""
    cfg = PreprocessConfig(**values).model_dump(mode="json", exclude={"workers"})
    return json.dumps(cfg, sort_keys=True)


def model_inputs(manifest: dict) -> dict[str, str]:
    """Which preprocessing each model (and the OOD gate, `OOD_INPUT`) takes, as
    `preprocess_key`s: a model's own when the bundle records one (a kept champion may predate
    a preprocessing change), else the bundle's, which is also the OOD gate's (the PCA was
    fitted on it)."""
    inputs = {OOD_INPUT: preprocess_key(manifest["preprocess"])}
    for name, meta in manifest["models"].items():
        inputs[name] = preprocess_key(meta.get("preprocess") or manifest["preprocess"])
    return inputs


def load_ood_gate(path: Path) -> OodGate:
    file = Path(path) / OOD_GATE_FILE
    if not file.is_file():
        raise DataError(f"{file} not found: package the models again")
    return OodGate.load(file)


def save_to_bentoml(
    bundle_dir: Path, name: str = BENTO_MODEL_NAME, parts: list[str] | None = None
) -> str:
    """Copy a bundle into the BentoML model store, after checking it is exactly what packaging
    wrote (bundle_integrity); returns the model tag (name:version)."""
    import bentoml

    manifest = read_bundle(bundle_dir)
    verify_bundle(bundle_dir, manifest, parts)
    metadata = {
        "format": manifest["format"],
        "parts": manifest["parts"],
        "image_size": manifest["image_size"],
        "data_version": manifest["data_version"],
        "synthetic": manifest["synthetic"],
        "models": {
            n: {
                k: v
                for k, v in m.items()
                if k
                in ("version", "registered_name", "threshold", "temperature", "negative_cutoff")
            }
            for n, m in manifest["models"].items()
        },
    }
    with bentoml.models.create(name, metadata=metadata, labels={"project": "bonefrac"}) as model:
        shutil.copytree(bundle_dir, model.path, dirs_exist_ok=True)
    return str(model.tag)
