"""The pipeline's stages, listed once.

Each stage is a function `settings -> result`; `dvc.yaml` (via `bonefrac stage NAME`) and the
Prefect flow both call these, and `dvc.yaml` itself is generated from `STAGES`
(`bonefrac dvc-yaml`), so the two can't drift apart (a test checks the committed file).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bonefrac.config import Settings
from bonefrac.data.mura import body_part_name
from bonefrac.errors import DataError


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[Settings], Any]
    sections: tuple[str, ...]  # params.yaml sections the stage reads
    deps: tuple[str, ...]  # layout names or project paths
    outs: tuple[str, ...]
    metrics: tuple[str, ...] = ()
    plots: tuple[str, ...] = ()
    code: tuple[str, ...] = field(default=())  # source files whose change reruns the stage


@dataclass(frozen=True)
class ValidateStageResult:
    success: bool
    summary: str
    report_path: Path | None
    n_images: int
    problems: list[str]


def validation_options(settings: Settings) -> dict:
    from bonefrac.data.validate import ImageBounds

    cfg = settings.data
    return {
        "min_rows_per_group": cfg.min_images_per_group,
        "balance_bounds": cfg.abnormal_share_bounds,
        "image_bounds": ImageBounds(min_side=cfg.image_min_side, max_side=cfg.image_max_side),
        "workers": settings.preprocess.workers,
    }


def run_validate(settings: Settings) -> ValidateStageResult:
    """Manifest + Great Expectations. The manifest is written only when the data passes,
    so nothing downstream can start from data that failed."""
    from bonefrac.data import mura, validate

    layout = settings.layout
    result = mura.build_manifest(settings.paths.data, settings.data)
    checked = validate.validate(
        result.frame,
        result.data_dir,
        settings.data.parts,
        layout.validation,
        other_parts=settings.data.other_parts,
        **validation_options(settings),
    )
    layout.metrics.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(layout.validation / "validation.json", layout.metrics / "validation.json")
    if checked.success:
        mura.write_manifest(result.frame, layout.manifest)
    else:
        layout.manifest.unlink(missing_ok=True)
    return ValidateStageResult(
        success=checked.success,
        summary=checked.summary(),
        report_path=checked.report_path,
        n_images=len(result.frame),
        problems=result.problems,
    )


def run_preprocess(settings: Settings, progress: bool = True):
    from bonefrac.cache import build_cache
    from bonefrac.data import mura

    manifest = mura.read_manifest(settings.layout.manifest)
    data_dir = mura.find_mura_root(settings.paths.data).parent
    return build_cache(
        manifest, data_dir, settings.layout.preprocessed, settings.preprocess, progress=progress
    )


def run_fit_pca(settings: Settings):
    from bonefrac.cache import load_cache
    from bonefrac.pca import fit_pca_stage

    layout = settings.layout
    return fit_pca_stage(
        load_cache(layout.preprocessed),
        settings.pca,
        layout.pca,
        metrics_path=layout.metrics / "pca.json",
        plot_path=layout.plots / "pca_explained_variance.csv",
    )


def run_drift_check(settings: Settings) -> dict:
    """Compare the data about to be trained on with the serving champion's PCA reference.

    Samples training images from the manifest, preprocesses them with the serving bundle's
    own preprocessing (the one its PCA was fitted on), and runs `pca.drift`. First run (no
    champion yet): nothing to compare.
    """
    import numpy as np

    from bonefrac.config import PreprocessConfig
    from bonefrac.data import mura
    from bonefrac.imaging import preprocess_file
    from bonefrac.pca import PcaModel, drift

    reference = _champion_bundle()
    if reference is None:
        return {"status": "no champion yet: nothing to compare", "drifted": False}
    bundle_dir, bundle = reference
    cfg = PreprocessConfig(**bundle["preprocess"])
    manifest = mura.read_manifest(settings.layout.manifest)
    rows = manifest[manifest["split"] == "train"]
    rng = np.random.default_rng(settings.data.seed)
    sample = rows.iloc[rng.permutation(len(rows))[: settings.pipeline.drift_sample]]
    data_dir = mura.find_mura_root(settings.paths.data).parent
    images = np.stack([preprocess_file(data_dir / p, cfg)[..., 0] for p in sample["path"]])
    report = drift(
        PcaModel.load(bundle_dir / "pca.joblib"), images, alpha=settings.pipeline.drift_alpha
    )
    return {"status": "drifted" if report.drifted else "no drift", **report.to_dict()}


def _champion_bundle():
    """(folder, bundle.json) of the latest packaged champions in the BentoML store, or None."""
    import bentoml

    from bonefrac.bundle import BENTO_MODEL_NAME, read_bundle

    try:
        model = bentoml.models.get(f"{BENTO_MODEL_NAME}:latest")
    except bentoml.exceptions.NotFound:
        return None
    return Path(model.path), read_bundle(model.path)


def run_train(settings: Settings):
    from bonefrac.train import run_train_stage

    return run_train_stage(settings)


def run_evaluate(settings: Settings):
    from bonefrac.evaluate.stage import run_evaluate_stage

    return run_evaluate_stage(settings)


STAGES: tuple[Stage, ...] = (
    Stage(
        name="validate",
        run=run_validate,
        sections=("data",),
        deps=("data",),
        outs=("manifest", "validation"),
        metrics=("metrics/validation.json",),
        code=("src/bonefrac/data/mura.py", "src/bonefrac/data/validate"),
    ),
    Stage(
        name="preprocess",
        run=run_preprocess,
        sections=("preprocess",),
        deps=("data", "manifest"),
        outs=("preprocessed",),
        code=("src/bonefrac/imaging.py", "src/bonefrac/cache.py"),
    ),
    Stage(
        name="fit_pca",
        run=run_fit_pca,
        sections=("pca",),
        deps=("preprocessed",),
        outs=("pca",),
        metrics=("metrics/pca.json",),
        plots=("plots/pca_explained_variance.csv",),
        code=("src/bonefrac/pca.py",),
    ),
    Stage(
        name="train",
        run=run_train,
        sections=("train",),
        deps=("preprocessed",),
        outs=("models",),
        metrics=("metrics/train.json",),
        code=("src/bonefrac/models.py", "src/bonefrac/train.py"),
    ),
    Stage(
        name="evaluate",
        run=run_evaluate,
        sections=("evaluate",),
        deps=("preprocessed", "models", "pca"),
        outs=("evaluation",),
        metrics=("metrics/evaluate.json",),
        plots=("plots/roc_{part}.csv",),
        code=("src/bonefrac/evaluate", "src/bonefrac/inference.py"),
    ),
)


def get_stage(name: str) -> Stage:
    for stage in STAGES:
        if stage.name == name:
            return stage
    raise DataError(f"unknown stage {name!r}: choose from {', '.join(s.name for s in STAGES)}")


def _path(settings: Settings, project_dir: Path, name: str) -> str:
    """A layout name ('manifest', 'preprocessed') or an artifacts-relative path -> project path."""
    if name == "data":
        target = settings.paths.data
    elif hasattr(type(settings.layout), name):
        target = getattr(settings.layout, name)
    else:
        target = settings.paths.artifacts / name
    try:
        return Path(target).resolve().relative_to(project_dir.resolve()).as_posix()
    except ValueError:
        return Path(target).as_posix()


def dvc_yaml(settings: Settings, project_dir: Path, params: dict) -> str:
    """Render dvc.yaml from STAGES.

    Each stage lists exactly the params.yaml keys it reads: its sections, the same sections
    of every profile, and `profile` (which profile is active), so changing one value reruns
    only the stages that read it.
    """
    profiles = params.get("profiles") or {}
    stages: dict[str, dict] = {}
    for stage in STAGES:
        keys = ["profile", *stage.sections]
        keys += [
            f"profiles.{name}.{section}"
            for name, overrides in sorted(profiles.items())
            for section in stage.sections
            if section in (overrides or {})
        ]
        spec: dict[str, Any] = {
            "cmd": f"bonefrac stage {stage.name}",
            "deps": [_path(settings, project_dir, d) for d in stage.deps] + list(stage.code),
            "params": keys,
            "outs": [_path(settings, project_dir, o) for o in stage.outs],
        }
        if stage.metrics:
            spec["metrics"] = [
                {_path(settings, project_dir, m): {"cache": False}} for m in stage.metrics
            ]
        if stage.plots:
            parts = [body_part_name(p) for p in settings.data.parts]
            plots = [p.format(part=part) for p in stage.plots for part in parts]
            spec["plots"] = [
                {_path(settings, project_dir, p): {"cache": False}} for p in dict.fromkeys(plots)
            ]
        stages[stage.name] = spec
    header = (
        "# Generated from src/bonefrac/stages.py by `bonefrac dvc-yaml`; edit the code, not this.\n"
        "# Run inside the project's environment (`source .venv/bin/activate`), then `dvc repro`.\n"
    )
    return header + yaml.safe_dump({"stages": stages}, sort_keys=False, width=100)
