"""MLflow setup and the provenance every run carries (invariant 5: data version, git commit,
params, metrics, artifacts)."""

from __future__ import annotations

import json
import os
import subprocess
from importlib import metadata
from pathlib import Path

from bonefrac.config import Settings
from bonefrac.errors import DataError

RUN_FILE = "runs.json"  # in the models folder: parent and per-model MLflow run ids

# What a logged model needs to load elsewhere; versions are read from this environment.
MODEL_REQUIREMENTS = ("tensorflow-cpu", "tensorflow", "keras", "numpy", "mlflow", "h5py")


def tracking_uri(settings: Settings) -> str:
    """Explicit URI (or MLFLOW_TRACKING_URI), else the project's embedded sqlite store."""
    if settings.tracking.tracking_uri:
        return settings.tracking.tracking_uri
    return f"sqlite:///{settings.paths.mlflow_db.resolve()}"


def configure(settings: Settings) -> str:
    """Point MLflow at the configured store and experiment; returns the experiment id.

    Always set explicitly: tests, flows and the service run from different folders, and
    MLflow's implicit default depends on the current directory.
    """
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    uri = tracking_uri(settings)
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    # MLflow also exports the URI to the environment, where the next load_settings in this
    # process would read it as the user's override and log another project's runs here.
    if previous is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = previous
    name = settings.tracking.experiment
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        location = None
        if uri.startswith("sqlite:") or uri.startswith("file:"):
            settings.paths.mlflow_artifacts.mkdir(parents=True, exist_ok=True)
            location = settings.paths.mlflow_artifacts.resolve().as_uri()
        experiment_id = mlflow.create_experiment(name, artifact_location=location)
    else:
        experiment_id = experiment.experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def git_commit(folder: Path) -> str:
    """HEAD commit (with '-dirty' when the tree has uncommitted changes), or 'unknown'."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=folder,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit}-dirty" if dirty else commit


def data_version_tag(settings: Settings) -> str:
    """md5 from the project's data.dvc when it tracks the data in use, else 'untracked'."""
    from bonefrac.data.versioning import data_version
    from bonefrac.errors import DataError

    project = settings.paths.project
    if settings.paths.data.resolve() != (project / "data").resolve():
        return "untracked"
    try:
        return data_version(project).md5
    except DataError:
        return "untracked"


def provenance_tags(settings: Settings, manifest_key: str | None = None) -> dict[str, str]:
    tags = {
        "bonefrac.data_version": data_version_tag(settings),
        "bonefrac.git_commit": git_commit(settings.paths.project),
        "bonefrac.params_hash": settings.section_hash(
            "data", "preprocess", "pca", "train", "evaluate"
        ),
        "bonefrac.profile": settings.profile or "full",
    }
    if manifest_key:
        tags["bonefrac.cache_key"] = manifest_key
    return tags


def pinned_requirements() -> list[str]:
    pins = []
    for name in MODEL_REQUIREMENTS:
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return pins


def read_runs(models_dir: Path) -> dict[str, str]:
    """The models folder's MLflow run ids (the train stage writes them; evaluation, the registry
    and packaging read them): kept here so those stages need not import the training code."""
    path = Path(models_dir) / RUN_FILE
    if not path.is_file():
        raise DataError(f"{path} not found: run the train stage first")
    return json.loads(path.read_text())
