"""The Dask task runner for real (issue 16, item 3): the four trainings as tasks on a
`dask.distributed` cluster of two worker processes, tracking to an `mlflow server` process
(sqlite backend, artifacts served from a local folder). A worker that dies mid-training is
retried `pipeline.dask_allowed_failures` times; past that the run fails, its MLflow runs are
FAILED and nothing is promoted.

Each test reruns the trained project of `pipeline_run` with no epochs and no Bento (cheap:
cache and PCA reused, untrained challengers, the trained champions kept)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.processes import free_port, mlflow_server, stop_group

from .conftest import copy_project, set_params, tool_env

pytestmark = pytest.mark.slow

STARTUP_TIMEOUT_S = 180
EXPERIMENT = "bonefrac-dask"  # a new experiment: its artifacts go through the server
TRAININGS = ("body_part", "elbow", "hand", "shoulder")
DASK = str(Path(sys.executable).parent / "dask")


def _start(command: list[str], project: Path, log: Path, **env: str) -> subprocess.Popen:
    # the Dask workers unpickle flows.retrain's tasks: the project's code on their path
    path = os.pathsep.join(p for p in (str(project), os.environ.get("PYTHONPATH")) if p)
    with log.open("wb") as out:
        return subprocess.Popen(
            command,
            cwd=project,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=tool_env(project, PYTHONPATH=path, **env),
            start_new_session=True,
        )


@pytest.fixture()
def project(pipeline_run, tmp_path):
    """The trained project, copied, tracking to an `mlflow server` on its own store."""
    project = copy_project(pipeline_run[0], tmp_path / "project")
    log = tmp_path / "mlflow-server.log"
    with mlflow_server(
        project,
        log,
        STARTUP_TIMEOUT_S,
        artifacts_dir="server-artifacts",
        cwd=project,
        env=tool_env(project),
    ) as uri:
        set_params(
            project,
            profiles__quick__train__finetune_epochs=0,
            profiles__quick__train__body_part__finetune_epochs=0,  # its own value wins
            pipeline__build_bento=False,
            package__openvino=False,  # the first pipeline run tests the OpenVINO export
            pipeline__task_runner="dask",
            tracking__tracking_uri=uri,
            tracking__experiment=EXPERIMENT,
        )
        yield project, uri


@pytest.fixture()
def dask_cluster(project, tmp_path):
    """`dask scheduler` and two `dask worker` processes (one thread each, no nanny: a killed
    worker stays dead), as an operator would start them; allowed-failures 1, as README says."""
    from distributed import Client

    folder, _ = project
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    policy = {"DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "1"}
    processes = [
        _start(
            [DASK, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
            folder,
            tmp_path / "scheduler.log",
            **policy,
        )
    ]
    try:
        for name in ("w0", "w1"):
            processes.append(
                _start(
                    [DASK, "worker", address, "--name", name, "--nthreads", "1", "--no-nanny"]
                    + ["--memory-limit", "0", "--no-dashboard"],
                    folder,
                    tmp_path / f"worker-{name}.log",
                )
            )
        with Client(address, timeout=STARTUP_TIMEOUT_S) as client:
            client.wait_for_workers(2, timeout=STARTUP_TIMEOUT_S)
        yield address
    finally:
        for process in reversed(processes):
            stop_group(process)


def run_flow(project: Path):
    from flows.retrain import retrain

    os.environ["BENTOML_HOME"] = str(project.parent / "bentoml")
    started = time.perf_counter()
    summary = retrain(params=str(project / "params.yaml"))
    print(f"dask rerun: {time.perf_counter() - started:.0f} s, stages {summary['stage_seconds']}")
    return summary


def client_for(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def pipeline_runs(uri: str) -> tuple[object, list]:
    """This experiment's one pipeline run and its children, read through the server."""
    client = client_for(uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    (parent,) = client.search_runs(
        [experiment.experiment_id], "attributes.run_name LIKE 'pipeline-%'"
    )
    children = client.search_runs(
        [experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    return parent, [r for r in children if r.info.run_name in TRAININGS]


def registry_state(uri: str) -> dict[str, tuple[str, int]]:
    """Each registered model's champion version and number of versions."""
    client = client_for(uri)
    return {
        model.name: (
            client.get_model_version_by_alias(model.name, "champion").version,
            len(client.search_model_versions(f"name = '{model.name}'")),
        )
        for model in client.search_registered_models()
    }


class KillOnTraining:
    """Kill (SIGKILL) the process of the first training seen RUNNING, from a thread, while
    the flow runs in the test's thread."""

    def __init__(self, uri: str, timeout_s: float = 900):
        self.uri, self.timeout_s = uri, timeout_s
        self.killed: dict[str, str] = {}
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.thread.join(timeout=5)

    def _watch(self) -> None:
        client = client_for(self.uri)
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline and not self.killed:
            experiment = client.get_experiment_by_name(EXPERIMENT)
            running = []
            if experiment is not None:
                running = client.search_runs(
                    [experiment.experiment_id],
                    "attributes.status = 'RUNNING' and tags.bonefrac.pid != ''",
                )
            if running:
                run = running[0]
                os.kill(int(run.data.tags["bonefrac.pid"]), signal.SIGKILL)
                self.killed = {"run_id": run.info.run_id, **run.data.tags}
                return
            time.sleep(0.5)


def assert_nothing_half_written(project: Path, models_before: str) -> None:
    models = project / "artifacts" / "models"
    assert (models / "runs.json").read_text() == models_before
    assert not [p.name for p in models.parent.iterdir() if p.name.startswith(".models.")]


def test_trainings_run_on_an_external_dask_cluster_and_track_to_an_mlflow_server(
    project, dask_cluster
):
    folder, uri = project
    set_params(folder, pipeline__dask_address=dask_cluster)
    before = registry_state(uri)
    summary = run_flow(folder)

    assert summary["task_runner"] == "DaskTaskRunner"
    parent, trainings = pipeline_runs(uri)
    assert parent.info.run_id == summary["parent_run_id"]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["bonefrac.task_runner"] == "DaskTaskRunner"
    assert sorted(r.info.run_name for r in trainings) == sorted(TRAININGS)
    assert all(r.info.status == "FINISHED" for r in trainings)
    # each training ran in a Dask worker process, and both workers took part
    workers = {r.data.tags["bonefrac.dask_worker"] for r in trainings}
    assert workers == {"w0", "w1"}
    assert str(os.getpid()) not in {r.data.tags["bonefrac.pid"] for r in trainings}
    # the runs are the server's: its REST API answers for them, its artifact folder holds theirs
    import httpx

    answer = httpx.get(
        f"{uri}/api/2.0/mlflow/runs/get", params={"run_id": trainings[0].info.run_id}
    )
    assert answer.json()["run"]["info"]["status"] == "FINISHED"
    assert all(r.info.artifact_uri.startswith("mlflow-artifacts:") for r in trainings)
    assert len(list((folder / "server-artifacts").rglob("MLmodel"))) >= len(TRAININGS)
    # untrained challengers: the body-part champion stays, four new versions are registered
    after = registry_state(uri)
    assert after["bonefrac-body-part"][0] == before["bonefrac-body-part"][0]
    assert all(after[name][1] == count + 1 for name, (_, count) in before.items())
    runs = json.loads((folder / "artifacts/models/runs.json").read_text())
    assert runs["parent"] == parent.info.run_id


def test_a_training_whose_worker_dies_is_retried_on_another(project):
    folder, uri = project
    # DaskTaskRunner's own local cluster: 2 worker processes under nannies, 1 retry
    set_params(folder, pipeline__dask_workers=2, pipeline__dask_allowed_failures=1)
    with KillOnTraining(uri) as killer:
        summary = run_flow(folder)
    assert killer.killed, "no training was seen running"

    parent, runs = pipeline_runs(uri)
    assert parent.info.status == "FINISHED" and summary["task_runner"] == "DaskTaskRunner"
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert sorted(r.info.run_name for r in finished) == sorted(TRAININGS)
    # the attempt that died is on record as FAILED, and was trained again elsewhere
    lost = next(r for r in runs if r.info.run_id == killer.killed["run_id"])
    assert lost.info.status == "FAILED"
    assert lost.data.tags["bonefrac.attempt"].startswith("lost")
    retried = next(r for r in finished if r.info.run_name == lost.info.run_name)
    assert retried.data.tags["bonefrac.pid"] != killer.killed["bonefrac.pid"]
    assert len({r.data.tags["bonefrac.pid"] for r in runs}) >= 2


def test_a_training_that_keeps_killing_its_worker_fails_the_run_and_promotes_nothing(project):
    folder, uri = project
    set_params(folder, pipeline__dask_workers=2, pipeline__dask_allowed_failures=0)
    before = registry_state(uri)
    models_before = (folder / "artifacts/models/runs.json").read_text()
    with (
        KillOnTraining(uri) as killer,
        pytest.raises(Exception, match="Dask worker died") as failure,
    ):
        run_flow(folder)
    assert killer.killed
    assert "dask_allowed_failures" in str(failure.value)

    parent, runs = pipeline_runs(uri)
    assert parent.info.status == "FAILED"
    assert runs and all(r.info.status == "FAILED" for r in runs)
    assert registry_state(uri) == before  # nothing registered, no alias moved
    assert_nothing_half_written(folder, models_before)
