"""The retraining flow: version data -> validate -> drift check -> preprocess -> fit PCA ->
train (body part + one fracture model per part) -> evaluate -> record in dvc.lock ->
register -> package -> promote.

Orchestration only: every task calls a bonefrac stage function. Safe to run again and
again: unchanged data and params reuse the preprocessed cache and the PCA fit; a failed
stage fails the flow, marks its MLflow runs FAILED and promotes nothing.

    bonefrac pipeline --profile quick          # one run, ephemeral Prefect API
    bonefrac schedule --cron "0 3 * * 1"       # serve it weekly from this machine
"""

from __future__ import annotations

import shutil
import time
from contextlib import contextmanager
from typing import Any

from prefect import flow, get_run_logger, task, unmapped
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from bonefrac.config import Settings


@task(retries=2, retry_delay_seconds=5)  # DVC remote pushes fail transiently (network, locks)
def version_data(settings: Settings) -> dict[str, Any]:
    from bonefrac.data.versioning import track_data

    project, data = settings.paths.project, settings.paths.data
    if data.resolve().parent != project.resolve():
        get_run_logger().warning("%s is outside the project: not versioned with DVC", data)
        return {"md5": "untracked", "pushed": False}
    before = _recorded_version(project, data.name)
    version = track_data(project, data.name)
    return {
        "md5": version.md5,
        "nfiles": version.nfiles,
        "pushed": version.pushed,
        "unchanged": version.md5 == before,
    }


def _recorded_version(project, data_name: str) -> str | None:
    from bonefrac.data.versioning import data_version
    from bonefrac.errors import DataError

    try:
        return data_version(project, f"{data_name}.dvc").md5
    except DataError:
        return None


@task
def validate(settings: Settings) -> dict[str, Any]:
    from bonefrac.errors import DataError
    from bonefrac.stages import run_validate

    result = run_validate(settings)
    if not result.success:
        raise DataError(f"data failed validation (report: {result.report_path}):\n{result.summary}")
    report = str(result.report_path) if result.report_path else None
    return {"images": result.n_images, "summary": result.summary, "report": report}


@task
def check_drift(settings: Settings) -> dict[str, Any]:
    from bonefrac.errors import DataError
    from bonefrac.stages import run_drift_check

    report = run_drift_check(settings)
    if report.get("drifted") and settings.pipeline.drift_gate:
        raise DataError(
            f"data drifted from the champion's (p={report['p_value']:.2g}); "
            "pipeline.drift_gate is on, so nothing is retrained"
        )
    return report


@task(retries=1, retry_delay_seconds=5)  # image reads can fail transiently on network storage
def preprocess(settings: Settings) -> dict[str, Any]:
    from bonefrac.cache import load_cache
    from bonefrac.stages import run_preprocess

    result = run_preprocess(settings, progress=False)
    key = load_cache(result.path).meta.get("key")
    return {
        "images": result.count,
        "preprocessed": result.preprocessed,
        "skipped": result.reused,
        "key": key,
    }


@task
def fit_pca(settings: Settings) -> dict[str, Any]:
    from bonefrac.stages import run_fit_pca

    result = run_fit_pca(settings)
    return {"skipped": result.reused, **result.metrics}


@task
def start_run(settings: Settings) -> str:
    from bonefrac.cache import load_cache
    from bonefrac.train import start_parent_run

    return start_parent_run(settings, load_cache(settings.layout.preprocessed).meta.get("key"))


@task
def train(name: str, settings: Settings, parent_run_id: str):
    from bonefrac.train import train_one

    return train_one(settings, name, parent_run_id)


@flow(name="bonefrac-train", log_prints=True)
def train_models(settings: Settings, parent_run_id: str) -> list:
    """The four trainings, as tasks of this subflow under `pipeline.task_runner`.

    A subflow because a flow's task runner is fixed when it starts: settings are read inside
    `retrain`, and a run from a deployment, `bonefrac schedule` or `bonefrac pipeline` all
    reach this line, so each one trains as params.yaml says (not under Prefect's default
    thread pool, four ResNet50s at once)."""
    from prefect.context import get_run_context

    from bonefrac.train import TRACED, model_names, tag_run

    runner = get_run_context().task_runner
    tag_run(settings, parent_run_id, {"bonefrac.task_runner": runner_label(runner)})
    futures = train.map(
        model_names(settings),
        settings=unmapped(settings),
        parent_run_id=unmapped(parent_run_id),
    )
    try:
        return futures.result()
    except Exception as error:  # Dask's KilledWorker names a task key, not what to do
        if type(error).__name__ != "KilledWorker":
            raise
        raise RuntimeError(
            "a training's Dask worker died more often than the scheduler retries it "
            "(allowed-failures; pipeline.dask_allowed_failures for the local cluster): "
            f"check the workers' memory and logs. Dask: {error}"
        ) from error
    finally:
        TRACED.clear()  # the kept traced models (threads runner: this process) are done with


def runner_label(runner) -> str:
    """`ThreadPoolTaskRunner(max_workers=1)`: what actually scheduled the trainings."""
    import sys

    workers = getattr(runner, "_max_workers", None)
    if workers is None:
        return type(runner).__name__
    bound = "unbounded" if workers >= sys.maxsize else workers
    return f"{type(runner).__name__}(max_workers={bound})"


@task
def finish_training(settings: Settings, parent_run_id: str, results: list) -> None:
    from bonefrac.train import finish_training as swap_in

    swap_in(settings, parent_run_id, {r.name: r for r in results})


@task
def evaluate(settings: Settings) -> dict[str, Any]:
    from bonefrac.evaluate.stage import run_evaluate_stage

    return run_evaluate_stage(settings).metrics


@task(retries=1, retry_delay_seconds=10)  # another DVC command may hold the repository lock
def record_in_dvc(settings: Settings) -> dict[str, Any]:
    """Write the DVC stages this flow ran into dvc.lock, so `dvc status` agrees with it."""
    from bonefrac.dvc_lock import record_flow_run
    from bonefrac.stages import STAGES

    record = record_flow_run(settings, tuple(stage.name for stage in STAGES))
    if not record.recorded:
        get_run_logger().warning(
            "dvc.lock not updated (`dvc status` will differ): %s", record.reason
        )
    return {"recorded": record.recorded, "reason": record.reason, "seconds": record.seconds}


@task  # no retries: a registry failure must stop the run before anything is promoted
def register(settings: Settings) -> list:
    from bonefrac.registry import register as register_models

    return register_models(settings)


@task(retries=1, retry_delay_seconds=5)
def package(settings: Settings, decisions: list) -> dict[str, Any]:
    from bonefrac.packaging import package_champions

    return package_champions(settings, decisions, build=settings.pipeline.build_bento)


@task
def promote(settings: Settings, decisions: list) -> None:
    from bonefrac.registry import promote as move_aliases

    move_aliases(settings, decisions)


def _fail_runs(settings: Settings, parent_run_id: str) -> None:
    """Mark the pipeline's parent run and its children FAILED."""
    from mlflow.tracking import MlflowClient

    from bonefrac import tracking

    client = MlflowClient(tracking.tracking_uri(settings))
    parent = client.get_run(parent_run_id)
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'"
    )
    for run in [parent, *children]:
        client.set_terminated(run.info.run_id, status="FAILED")


def _number(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def _report(
    data: dict,
    drift: dict,
    pca: dict,
    metrics: dict,
    decisions: list,
    packaged: dict,
    synthetic: bool,
) -> None:
    rows = [
        {
            "model": d.model,
            "registered": f"{d.registered_name} v{d.version}",
            "metric": f"val {d.metric}",
            "value": d.value,
            "champion": d.champion_version,
            "champion value": d.champion_value,
            "delta": d.gate.delta if d.gate else None,
            "delta lower bound": d.gate.lower if d.gate else None,
            "test value (reported)": d.test_value,
            "promoted": d.promoted,
            "reason": d.reason,
        }
        for d in decisions
    ]
    create_table_artifact(rows, key="bonefrac-promotions", description="Champion gate decisions")
    warning = "**SYNTHETIC data: numbers say nothing about real X-rays.**\n\n" if synthetic else ""
    lines = [
        f"# bonefrac retraining\n\n{warning}",
        f"- data version: `{data['md5']}` (pushed: {data.get('pushed')})",
        f"- drift vs champion: {drift.get('status')}"
        + (f" (p = {drift['p_value']:.3g})" if "p_value" in drift else ""),
        f"- preprocess / PCA: {'cached' if pca.get('skipped') else 'fitted'}; "
        f"PCA explained variance {pca.get('explained_variance', float('nan')):.2f}",
        f"- body part accuracy {_number(metrics.get('body_part_accuracy'))}; "
        f"end-to-end study kappa {_number(metrics.get('end_to_end_study_kappa'))}"
        f" (target-part studies abstained: {_number(metrics.get('end_to_end_study_abstained'))})",
        f"- Bento: `{packaged.get('bento_tag')}` (model `{packaged.get('model_tag')}`)",
        "",
        "| model | version | gate metric | value | Δ (lower bound) | test | promoted | reason |",
        "|---|---|---|---|---|---|---|---|",
        *[
            f"| {r['model']} | {r['registered']} | {r['metric']} | {_number(r['value'])} | "
            f"{_number(r['delta'])} ({_number(r['delta lower bound'])}) | "
            f"{_number(r['test value (reported)'])} | {r['promoted']} | {r['reason']} |"
            for r in rows
        ],
    ]
    create_markdown_artifact(
        "\n".join(lines), key="bonefrac-summary", description="Retraining summary"
    )


# The flow's stages, in order: each logs one `stage <name> <seconds> s <note>` line.
PIPELINE_STAGES = (
    "version_data",
    "validate",
    "check_drift",
    "preprocess",
    "fit_pca",
    "train",
    "evaluate",
    "record_in_dvc",
    "register",
    "package",
    "promote",
)


class _Stages:
    """Times each stage and logs its one line when it finishes (a failure is logged by
    Prefect instead); `note` says what the stage did or reused."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        from bonefrac.console import stage_line

        start = time.perf_counter()
        notes: list[str] = []
        yield notes
        seconds = time.perf_counter() - start
        self.seconds[name] = round(seconds, 1)
        get_run_logger().info(stage_line(name, seconds, "; ".join(notes)))


@flow(name="bonefrac-retrain", log_prints=True)
def retrain(
    profile: str | None = None, data: str | None = None, params: str | None = None
) -> dict[str, Any]:
    """Retrain, evaluate, register and package bonefrac's models (see module docstring)."""
    import mlflow

    from bonefrac.config import load_settings
    from bonefrac.console import data_note, pipeline_summary, preprocess_note
    from bonefrac.data.mura import body_part_name
    from bonefrac.data.synthetic import is_synthetic
    from bonefrac.train import mark_run, staging_dir

    overrides = {"paths": {"data": data}} if data else None
    settings = load_settings(params, profile, overrides)
    stage = _Stages()
    with stage("version_data") as note:
        data_version = version_data(settings)
        note.append(data_note(data_version))
    with stage("validate") as note:
        validation = validate(settings)
        note.append(f"{validation['images']} images passed")
    with stage("check_drift") as note:
        drift = check_drift(settings)
        note.append(str(drift.get("status")))
    with stage("preprocess") as note:
        preprocessed = preprocess(settings)
        note.append(preprocess_note(preprocessed))
    with stage("fit_pca") as note:
        pca = fit_pca(settings)
        note.append("PCA fit reused (same cache and params)" if pca["skipped"] else "fitted")
    parent_run_id = start_run(settings)
    try:
        with stage("train") as note:
            runner = task_runner(settings)
            trained = train_models.with_options(task_runner=runner)(settings, parent_run_id)
            finish_training(settings, parent_run_id, trained)
            note.append(", ".join(f"{r.name} {r.seconds:.0f} s" for r in trained))
        with stage("evaluate"):
            metrics = evaluate(settings)
        with stage("record_in_dvc") as note:
            dvc_record = record_in_dvc(settings)  # every dvc.yaml stage has run by now
            note.append("dvc.lock updated" if dvc_record["recorded"] else "dvc.lock unchanged")
        with stage("register") as note:
            decisions = register(settings)
            note.append(", ".join(f"{d.registered_name} v{d.version}" for d in decisions))
        with stage("package") as note:
            packaged = package(settings, decisions)
            note.append(f"Bento {packaged.get('bento_tag')}")
        with stage("promote") as note:
            promote(settings, decisions)
            promoted = [d.model for d in decisions if d.promoted]
            note.append(f"champion moved: {', '.join(promoted)}" if promoted else "no change")
    except BaseException:
        shutil.rmtree(staging_dir(settings, parent_run_id), ignore_errors=True)
        _fail_runs(settings, parent_run_id)
        raise
    from bonefrac import tracking

    experiment_id = tracking.configure(settings)
    with mlflow.start_run(run_id=parent_run_id):
        mlflow.set_tags(
            {
                "bonefrac.data_version": data_version["md5"],
                "bonefrac.bento_tag": str(packaged.get("bento_tag")),
                "bonefrac.model_tag": str(packaged.get("model_tag")),
            }
        )
        mlflow.log_dict(
            {
                "drift": drift,
                "validation": validation,
                "decisions": [d.to_dict() for d in decisions],
            },
            "pipeline.json",
        )
    mark_run(settings, parent_run_id, "FINISHED")
    synthetic = is_synthetic(settings.paths.data)
    _report(data_version, drift, pca, metrics, decisions, packaged, synthetic)
    summary = {
        "parent_run_id": parent_run_id,
        "experiment_id": experiment_id,
        "data_version": data_version["md5"],
        "data_unchanged": data_version.get("unchanged", False),
        "drift": drift,
        "preprocess_skipped": preprocessed["skipped"],
        "pca_skipped": pca["skipped"],
        "dvc_recorded": dvc_record["recorded"],
        "metrics": metrics,
        "decisions": [d.to_dict() for d in decisions],
        "synthetic": synthetic,
        "parts": [body_part_name(p) for p in settings.data.parts],
        "validation_report": validation.get("report"),
        "stage_seconds": stage.seconds,
        "task_runner": runner_label(runner),
        **packaged,
    }
    get_run_logger().info("results\n%s", pipeline_summary(summary, summary["parts"], synthetic))
    return summary


def task_runner(settings: Settings):
    """The configured task runner for the training subflow (`pipeline.task_runner`)."""
    from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

    from bonefrac.errors import UserError

    kind = settings.pipeline.task_runner
    if kind == "sequential":
        return ThreadPoolTaskRunner(max_workers=1)
    if kind == "threads":
        return ThreadPoolTaskRunner()
    if kind == "processes":
        return ProcessPoolTaskRunner()
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise UserError("pipeline.task_runner is dask: pip install prefect-dask") from None
    pipeline = settings.pipeline
    if pipeline.dask_address:  # its scheduler's allowed-failures decides retries (README)
        return DaskTaskRunner(address=pipeline.dask_address)
    return DaskTaskRunner(  # one training per process: Keras state is process-global
        cluster_kwargs={
            "n_workers": pipeline.dask_workers,
            "threads_per_worker": 1,
            "processes": True,
            "scheduler_kwargs": {"allowed_failures": pipeline.dask_allowed_failures},
        }
    )
