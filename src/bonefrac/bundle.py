"""The serving bundle: everything the service needs, in one folder, one BentoML model.

    bundle/
      bundle.json            parts, image size, preprocessing, per-model versions and
                             operating points (threshold, temperature, uncertain band),
                             PCA OOD thresholds, data version, synthetic flag
      body_part/model.keras
      <part>/model.keras     one fracture model per part
      pca.joblib             OOD gate (and drift reference)

The BentoML model store is the boundary between training and serving: `package` saves the
bundle there as model `bonefrac`; the service declares it and loads it once.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from bonefrac.bundle_integrity import verify_bundle, write_manifest
from bonefrac.config import Settings
from bonefrac.data.mura import body_part_name
from bonefrac.errors import DataError
from bonefrac.models import BODY_PART_MODEL

BUNDLE_FILE = "bundle.json"
BUNDLE_FORMAT = 1
BENTO_MODEL_NAME = "bonefrac"


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"{path} not found: run the train and evaluate stages first")
    return json.loads(path.read_text())


def write_bundle(
    out_dir: Path,
    settings: Settings,
    model_files: dict[str, Path],
    operating_points: dict[str, dict],
    pca_path: Path,
    versions: dict[str, dict[str, Any]] | None = None,
    data_version: str = "untracked",
    synthetic: bool = False,
) -> Path:
    """Assemble a bundle folder from model files, operating points and the PCA model."""
    from bonefrac.pca import PcaModel

    parts = [body_part_name(p) for p in settings.data.parts]
    missing = [n for n in (BODY_PART_MODEL, *parts) if n not in model_files]
    if missing:
        raise DataError(f"cannot package: no model for {', '.join(missing)}")
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    models: dict[str, dict] = {}
    for name, source in model_files.items():
        (out_dir / name).mkdir()
        shutil.copyfile(source, out_dir / name / "model.keras")
        models[name] = {**(versions or {}).get(name, {}), **operating_points.get(name, {})}
    shutil.copyfile(pca_path, out_dir / "pca.joblib")
    pca = PcaModel.load(pca_path)
    manifest = {
        "format": BUNDLE_FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "parts": parts,
        "image_size": settings.preprocess.image_size,
        "preprocess": settings.preprocess.model_dump(mode="json", exclude={"workers"}),
        "models": models,
        "pca": {
            "ood_threshold": pca.ood_threshold,
            "t2_threshold": pca.t2_threshold,
            "image_size": pca.image_size,
        },
        "data_version": data_version,
        "synthetic": synthetic,
    }
    (out_dir / BUNDLE_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    write_manifest(out_dir)  # SHA-256 of every file, checked on import (bundle_integrity)
    return out_dir


def bundle_from_artifacts(settings: Settings, out_dir: Path) -> Path:
    """A bundle from this project's latest trained and evaluated models (artifacts/)."""
    from bonefrac.data.synthetic import is_synthetic
    from bonefrac.evaluate.stage import OPERATING_POINT
    from bonefrac.tracking import data_version_tag

    layout = settings.layout
    parts = [body_part_name(p) for p in settings.data.parts]
    names = [BODY_PART_MODEL, *parts]
    runs = _read_json(layout.models / "runs.json")
    model_files = {n: layout.models / n / "model.keras" for n in names}
    for path in model_files.values():
        if not path.is_file():
            raise DataError(f"{path} not found: run the train stage first")
    points = {p: _read_json(layout.evaluation / p / OPERATING_POINT) for p in parts}
    meta = {n: _read_json(layout.models / n / "meta.json") for n in names}
    versions = {n: {"run_id": runs.get(n), "classes": meta[n]["classes"]} for n in names}
    return write_bundle(
        out_dir,
        settings,
        model_files,
        points,
        layout.pca / "pca.joblib",
        versions,
        data_version_tag(settings),
        is_synthetic(settings.paths.data),
    )


def read_bundle(path: Path) -> dict:
    """bundle.json of a bundle folder, checked for the format this code reads."""
    manifest = _read_json(Path(path) / BUNDLE_FILE)
    if manifest.get("format") != BUNDLE_FORMAT:
        raise DataError(
            f"{path} has bundle format {manifest.get('format')}, expected "
            f"{BUNDLE_FORMAT}: package the models again"
        )
    return manifest


def save_to_bentoml(
    bundle_dir: Path, name: str = BENTO_MODEL_NAME, parts: list[str] | None = None
) -> str:
    """Copy a bundle into the BentoML model store, after checking it is exactly what packaging
    wrote (bundle_integrity); returns the model tag (name:version)."""
    import bentoml

    manifest = read_bundle(bundle_dir)
    verify_bundle(bundle_dir, manifest, parts)
    metadata = {
        "parts": manifest["parts"],
        "image_size": manifest["image_size"],
        "data_version": manifest["data_version"],
        "synthetic": manifest["synthetic"],
        "models": {
            n: {
                k: v
                for k, v in m.items()
                if k in ("version", "registered_name", "threshold", "temperature")
            }
            for n, m in manifest["models"].items()
        },
    }
    with bentoml.models.create(name, metadata=metadata, labels={"project": "bonefrac"}) as model:
        shutil.copytree(bundle_dir, model.path, dirs_exist_ok=True)
    return str(model.tag)
