"""The Prefect retraining flow end to end: registry, champion gate, packaging, caching,
failure semantics and the scheduled deployment."""

from __future__ import annotations

import json
import os

import bentoml
import pytest
import yaml
from mlflow.tracking import MlflowClient

from .conftest import copy_project, set_params

pytestmark = pytest.mark.slow
REGISTERED = (
    "bonefrac-body-part",
    "bonefrac-fracture-elbow",
    "bonefrac-fracture-hand",
    "bonefrac-fracture-shoulder",
)


def client_for(project) -> MlflowClient:
    return MlflowClient(f"sqlite:///{project / 'mlflow.db'}")


def champions(project) -> dict[str, str]:
    client = client_for(project)
    return {
        name: str(client.get_model_version_by_alias(name, "champion").version)
        for name in REGISTERED
    }


def run_flow(project):
    from flows.retrain import retrain, task_runner

    from bonefrac.config import load_settings

    os.environ["BENTOML_HOME"] = str(project.parent / "bentoml")
    settings = load_settings(project / "params.yaml", env={})
    flow = retrain.with_options(task_runner=task_runner(settings))  # as `bonefrac pipeline`
    return flow(params=str(project / "params.yaml")), settings


def test_first_run_registers_four_champions_and_builds_the_bento(pipeline_run):
    project, settings, summary = pipeline_run
    assert champions(project) == dict.fromkeys(REGISTERED, "1")
    assert all(d["promoted"] and "first version" in d["reason"] for d in summary["decisions"])
    client = client_for(project)
    version = client.get_model_version("bonefrac-fracture-hand", "1")
    for tag in (
        "bonefrac.data_version",
        "bonefrac.git_commit",
        "bonefrac.params_hash",
        "bonefrac.gate.value",  # the decision's number: val
        "bonefrac.gate.decision",
        "bonefrac.test.value",  # reported only
        "bonefrac.preprocess",
        "bonefrac.threshold",
        "bonefrac.temperature",
    ):
        assert version.tags.get(tag), tag
    assert 0 < float(version.tags["bonefrac.threshold"]) < 1
    assert version.tags["bonefrac.data_version"] == summary["data_version"]
    # the data were versioned with DVC and pushed to the project's default remote
    assert summary["data_version"].endswith(".dir")
    assert any((project / ".cache/dvc-remote").rglob("*"))
    # the champions are in the BentoML store and a Bento was built from bentofile.yaml
    os.environ["BENTOML_HOME"] = str(project.parent / "bentoml")
    assert bentoml.models.get(summary["model_tag"]).info.metadata["synthetic"] is True
    assert summary["bento_tag"] and bentoml.get(summary["bento_tag"]).tag.name == "bonefrac"
    parent = client.get_run(summary["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["bonefrac.bento_tag"] == summary["bento_tag"]


def test_rerun_skips_cached_stages_and_a_worse_challenger_does_not_win(pipeline_run, tmp_path):
    project = copy_project(pipeline_run[0], tmp_path / "project")
    # same data and preprocessing; training crippled (no epochs: untrained networks)
    set_params(project, profiles__quick__train__finetune_epochs=0, pipeline__build_bento=False)
    summary, _ = run_flow(project)
    assert summary["preprocess_skipped"] and summary["pca_skipped"]
    assert summary["data_version"] == pipeline_run[2]["data_version"]
    decisions = {d["model"]: d for d in summary["decisions"]}
    # an untrained body-part network cannot beat the trained champion (chance is 1/3)
    body = decisions["body_part"]
    assert not body["promoted"] and body["reason"].startswith("kept champion v1")
    assert champions(project)["bonefrac-body-part"] == "1"
    for decision in decisions.values():  # promoted only on a significant gain on val
        gate = decision["gate"]
        if decision["promoted"]:
            assert gate["lower"] > gate["min_improvement"] and gate["split"] == "val"
        else:
            assert gate is None or not gate["passed"]
    client = client_for(project)
    tags = client.get_model_version("bonefrac-body-part", "2").tags
    assert tags["bonefrac.promotion"].startswith("kept champion")
    assert tags["bonefrac.gate.decision"] == "not promoted"
    assert float(tags["bonefrac.gate.delta"]) < 0  # an untrained challenger is worse
    assert float(tags["bonefrac.gate.lower"]) <= float(tags["bonefrac.gate.delta"])
    assert float(tags["bonefrac.gate.detectable"]) > 0  # the gate's power is on record


def test_failed_stage_promotes_nothing_and_marks_runs_failed(pipeline_run, tmp_path):
    project = copy_project(pipeline_run[0], tmp_path / "project")
    before = champions(project)
    # the train stage fails: the configured weights file is missing
    set_params(project, profiles__quick__train__weights=str(tmp_path / "missing.h5"))
    from prefect.exceptions import PrefectException

    from bonefrac.errors import UserError

    with pytest.raises((UserError, PrefectException), match="missing.h5"):
        run_flow(project)
    assert champions(project) == before
    client = client_for(project)
    experiment = client.get_experiment_by_name("bonefrac")
    parents = client.search_runs(
        [experiment.experiment_id],
        "attributes.run_name LIKE 'pipeline-%'",
        order_by=["start_time DESC"],
        max_results=1,
    )
    parent = parents[0]
    assert parent.info.run_id != pipeline_run[2]["parent_run_id"]
    family = client.search_runs(
        [experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert parent.info.status == "FAILED"
    assert family and all(r.info.status == "FAILED" for r in family)
    assert not (project / "artifacts" / f".models.{parent.info.run_id}").exists()


def test_prefect_yaml_deploys_the_flow_weekly(project_root):
    config = yaml.safe_load((project_root / "prefect.yaml").read_text())
    deployment = config["deployments"][0]
    assert deployment["entrypoint"] == "flows/retrain.py:retrain"
    from prefect.client.schemas.schedules import CronSchedule

    cron = deployment["schedules"][0]["cron"]
    assert CronSchedule(cron=cron).cron == "0 3 * * 1"
    assert deployment["work_pool"]["name"]
    from flows.retrain import retrain

    assert retrain.name == "bonefrac-retrain"


def test_runs_json_names_every_model(pipeline_run):
    _, settings, _ = pipeline_run
    runs = json.loads((settings.layout.models / "runs.json").read_text())
    assert {"parent", "body_part", "elbow", "hand", "shoulder", "model_uris"} <= set(runs)
