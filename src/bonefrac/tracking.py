"""MLflow setup and the provenance every run carries (invariant 5: data version, git commit,
params, metrics, artifacts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from importlib import metadata
from pathlib import Path

from bonefrac.config import Settings
from bonefrac.errors import DataError

RUN_FILE = "runs.json"  # in the models folder: parent and per-model MLflow run ids

# MLflow 3's experiment kind ("Machine learning" in the UI, not "GenAI apps & agents"). MLflow
# 3.17's UI opens experiments by its own workflow switch instead (kept in the browser, GenAI
# by default), so the UI address we print also says `workflowType=machine_learning`.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
MLFLOW_UI_PORT = 5000

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
        experiment_id = mlflow.create_experiment(
            name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
        )
    else:
        experiment_id = experiment.experiment_id
        if EXPERIMENT_KIND_TAG not in experiment.tags:  # a store from before the tag was set
            mlflow.MlflowClient(uri).set_experiment_tag(
                experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND
            )
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def mlflow_ui_command(settings: Settings, port: int = MLFLOW_UI_PORT) -> list[str]:
    """`mlflow ui` on this project's store (the one `configure` writes to), local only."""
    from bonefrac.errors import UserError

    uri = tracking_uri(settings)
    if uri.startswith(("http://", "https://", "databricks")):
        raise UserError(
            f"runs are tracked at {uri}, not in a local store: open that server's UI instead"
        )
    artifacts = settings.paths.mlflow_artifacts.resolve().as_uri()
    return [
        *(sys.executable, "-m", "mlflow", "ui"),
        *("--backend-store-uri", uri, "--default-artifact-root", artifacts),
        *("--host", "127.0.0.1", "--port", str(port)),
    ]


def mlflow_ui_url(port: int = MLFLOW_UI_PORT, experiment_id: str | None = None) -> str:
    """The UI's address; with an experiment, its training runs (not the GenAI overview)."""
    url = f"http://127.0.0.1:{port}/"
    if experiment_id is not None:
        url += f"#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    return url


def experiment_id(settings: Settings) -> str | None:
    """The configured experiment's id in the store, or None before the first run."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient

    experiment = MlflowClient(tracking_uri(settings)).get_experiment_by_name(
        settings.tracking.experiment
    )
    return None if experiment is None else experiment.experiment_id


def log_data_input(settings: Settings, context: str, cache_key: str | None = None) -> None:
    """Record, on the active run, the dataset it used: the data folder, with the DVC version
    (data.dvc's md5) as its digest, so the MLflow UI shows which data each run saw."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    from bonefrac.data.synthetic import is_synthetic

    data = settings.paths.data
    version = data_version_tag(settings)
    with warnings.catch_warnings():  # MLflow registers its local-files source twice and
        warnings.simplefilter("ignore", UserWarning)  # warns of the ambiguity on each call
        source = resolve_dataset_source(str(data.resolve()))
    name = "MURA-v1.1 (SYNTHETIC)" if is_synthetic(data) else "MURA-v1.1"
    tags = {"dvc.file": "data.dvc", "dvc.md5": version}
    if cache_key:
        tags["bonefrac.cache_key"] = cache_key
    dataset = MetaDataset(source, name=name, digest=version)
    retry_lost_insert_race(lambda: mlflow.log_input(dataset, context=context, tags=tags))


def lost_insert_race(exc: Exception) -> bool:
    """An MLflow store refused a row another writer inserted first. MLflow's SQL store logs a
    run's dataset by looking it up and inserting it if absent, in two steps: two trainings
    logging the same new dataset at once (Dask workers, one experiment) can both miss it, and
    the second insert breaks the (experiment, name, digest) unique key. Retrying finds the row."""
    message = str(exc)
    return "datasets" in message and any(
        marker in message
        for marker in ("UNIQUE constraint failed", "duplicate key", "Duplicate entry")
    )


def retry_lost_insert_race(call, attempts: int = 4, pause_s: float = 0.2):
    """`call()`, again after a lost insert race (`lost_insert_race`); any other error, or the
    same one `attempts` times, is raised as it is."""
    from mlflow.exceptions import MlflowException

    for attempt in range(1, attempts):
        try:
            return call()
        except MlflowException as exc:
            if not lost_insert_race(exc):
                raise
            time.sleep(pause_s * attempt)
    return call()


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
