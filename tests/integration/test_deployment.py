"""The scheduled path, for real: a Prefect server started here, the project's prefect.yaml
deployed to it, a process worker picking the run up. The run must train as params.yaml says
(`pipeline.task_runner`), not under Prefect's default thread pool (issue 16, item 2)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.processes import free_port, stop_group, wait_until_ready

from .conftest import copy_project, run, set_params, tool_env

pytestmark = pytest.mark.slow

STARTUP_TIMEOUT_S = 180
DEPLOYMENT = "bonefrac-retrain/weekly-retrain"
TRAININGS = ("body_part", "elbow", "hand", "shoulder")


@pytest.fixture()
def prefect_server(tmp_path):
    """`prefect server start` on a free port with its own home (SQLite database)."""
    home = tmp_path / "prefect-home"
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {"PREFECT_HOME": str(home), "PREFECT_API_URL": api}
    log = tmp_path / "prefect-server.log"
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1"]
    with log.open("wb") as out:
        process = subprocess.Popen(
            [*command, "--port", str(port), "--no-ui"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=tool_env(tmp_path, **env, PREFECT_SERVER_ANALYTICS_ENABLED="false"),
            start_new_session=True,
        )
    try:
        wait_until_ready(process, f"{api}/health", log, "Prefect server", STARTUP_TIMEOUT_S)
        yield env
    finally:
        stop_group(process)


def _flow_run_state(api_env: dict, flow_run_id: str) -> str:
    import httpx

    answer = httpx.get(f"{api_env['PREFECT_API_URL']}/flow_runs/{flow_run_id}", timeout=10)
    answer.raise_for_status()
    return answer.json()["state"]["type"]


def test_a_deployment_run_by_a_worker_trains_as_params_yaml_says(
    pipeline_run, tmp_path, prefect_server
):
    from mlflow.tracking import MlflowClient

    project = copy_project(pipeline_run[0], tmp_path / "project")
    # the trained champions stay; this run only has to train, so no epochs and no Bento
    set_params(
        project,
        profiles__quick__train__finetune_epochs=0,
        profiles__quick__train__body_part__finetune_epochs=0,  # its own value wins
        pipeline__build_bento=False,
        package__openvino=False,  # the first pipeline run tests the OpenVINO export
    )
    env = {
        **prefect_server,
        "BONEFRAC_PROJECT_DIR": str(project),  # prefect.yaml's pull step: the worker's cwd
        "BENTOML_HOME": str(project.parent / "bentoml"),
    }
    run(project, "prefect", "work-pool", "create", "bonefrac-pool", "--type", "process", **env)
    run(project, "prefect", "--no-prompt", "deploy", "--all", **env)
    started = run(
        project,
        "prefect",
        "deployment",
        "run",
        DEPLOYMENT,
        "--params",
        json.dumps({"profile": "quick"}),
        **env,
    )
    flow_run_id = next(line.split()[-1] for line in started.stdout.splitlines() if "UUID" in line)
    worker = run(
        project,
        "prefect",
        "worker",
        "start",
        "--pool",
        "bonefrac-pool",
        "--run-once",
        check=False,
        **env,
    )
    state = _flow_run_state(env, flow_run_id)
    output = f"{worker.stdout[-4000:]}\n{worker.stderr[-4000:]}"
    assert state == "COMPLETED", f"flow run {state}:\n{output}"

    # the run the worker made, in the project's own MLflow store
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("bonefrac")
    parents = client.search_runs(
        [experiment.experiment_id],
        "tags.bonefrac.task_runner != ''",
        order_by=["attributes.start_time DESC"],
    )
    parent = parents[0]
    assert parent.info.run_id != pipeline_run[2]["parent_run_id"]
    assert parent.info.status == "FINISHED"
    # params.yaml says sequential: one training at a time, whatever Prefect's default is
    assert parent.data.tags["bonefrac.task_runner"] == "ThreadPoolTaskRunner(max_workers=1)"
    children = client.search_runs(
        [experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    trainings = sorted(
        (r for r in children if r.info.run_name in TRAININGS), key=lambda r: r.info.start_time
    )
    assert sorted(r.info.run_name for r in trainings) == sorted(TRAININGS)
    # a training ends when it logs train_seconds (its run is closed later, with the others,
    # once all four are staged); the next may start only after that
    for earlier, later in zip(trainings, trainings[1:], strict=False):
        (ended,) = client.get_metric_history(earlier.info.run_id, "train_seconds")
        assert ended.timestamp <= later.info.start_time, (
            f"{earlier.info.run_name} and {later.info.run_name} trained at the same time"
        )
