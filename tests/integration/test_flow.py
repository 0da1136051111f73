"""The Prefect retraining flow end to end: registry, champion gate, packaging, caching,
failure semantics and the scheduled deployment."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import bentoml
import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.processes import free_port

from .conftest import captured_logs, copy_project, run, set_params, tool_env

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
    from flows.retrain import retrain

    from bonefrac.config import load_settings

    os.environ["BENTOML_HOME"] = str(project.parent / "bentoml")
    settings = load_settings(project / "params.yaml", env={})
    return retrain(params=str(project / "params.yaml")), settings  # as `bonefrac pipeline`


def test_first_run_registers_four_champions_and_builds_the_bento(pipeline_run):
    project, settings, summary = pipeline_run
    assert champions(project) == dict.fromkeys(REGISTERED, "1")
    assert all(d["promoted"] and "first version" in d["reason"] for d in summary["decisions"])
    # params.yaml's pipeline.task_runner (sequential), applied by the flow itself
    assert summary["task_runner"] == "ThreadPoolTaskRunner(max_workers=1)"
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
        "bonefrac.negative_cutoff",  # the confident-negative cut-off, fitted on val
        "bonefrac.val_sensitivity",
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
    stored = bentoml.models.get(summary["model_tag"])
    bundle = json.loads((Path(stored.path) / "bundle.json").read_text())
    # the body-part model's classes, "other" last (MURA's uncovered parts), reach serving
    assert bundle["models"]["body_part"]["classes"] == ["elbow", "hand", "shoulder", "other"]
    assert bundle["parts"] == ["elbow", "hand", "shoulder"]  # no fracture model for "other"
    for part in ("elbow", "hand", "shoulder"):  # the cut-off and val sensitivity reach serving
        model = bundle["models"][part]
        assert 0 <= model["negative_cutoff"] <= model["threshold"]
        assert model["val_sensitivity"]["split"] == "val"
    assert summary["bento_tag"] and bentoml.get(summary["bento_tag"]).tag.name == "bonefrac"
    parent = client.get_run(summary["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["bonefrac.bento_tag"] == summary["bento_tag"]


def test_rerun_skips_cached_stages_and_a_worse_challenger_does_not_win(pipeline_run, tmp_path):
    project = copy_project(pipeline_run[0], tmp_path / "project")
    # same data and preprocessing; training crippled (no epochs: untrained networks)
    set_params(
        project,
        profiles__quick__train__finetune_epochs=0,
        profiles__quick__train__body_part__finetune_epochs=0,  # its own value wins
        pipeline__build_bento=False,
        package__openvino=False,  # the first run tests the OpenVINO export
    )
    with captured_logs() as lines:
        summary, _ = run_flow(project)
    assert summary["preprocess_skipped"] and summary["pca_skipped"]
    assert summary["data_version"] == pipeline_run[2]["data_version"] and summary["data_unchanged"]
    # each reuse says so on its stage's line
    stages = stage_lines(lines)
    key = json.loads((project / "artifacts/preprocessed/meta.json").read_text())["key"]
    assert f"cache hit (key {key}), reused" in stages["preprocess"]
    assert "PCA fit reused" in stages["fit_pca"]
    assert "unchanged (data.dvc), reused" in stages["version_data"]
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


def stage_lines(lines: list[str]) -> dict[str, str]:
    """The flow's `stage <name> <seconds> s <note>` lines by stage name (each at most once)."""
    found: dict[str, str] = {}
    for line in lines:
        if " - stage " in line:
            text = line.split(" - stage ", 1)[1]
            name = text.split()[0]
            assert name not in found, f"two lines for stage {name}"
            found[name] = text
    return found


def test_flow_output_has_one_line_per_stage_and_no_errors(pipeline_run):
    from flows.retrain import PIPELINE_STAGES

    project, _, summary = pipeline_run
    text = (project.parent / "flow.log").read_text()
    lines = text.splitlines()
    stages = stage_lines(lines)
    assert list(stages) == list(PIPELINE_STAGES)  # in order, each once
    for name, line in stages.items():
        assert float(line.split()[1]) == pytest.approx(summary["stage_seconds"][name], abs=0.06)
    assert not [ln for ln in lines if ln.startswith(("ERROR", "CRITICAL")) or "Traceback" in ln]
    # the results: per part its test study kappa, the body-part accuracy, marked SYNTHETIC
    results = text[text.index("results\n") :]
    assert "test results — SYNTHETIC data" in results
    metrics = summary["metrics"]
    for part in ("elbow", "hand", "shoulder"):
        row = next(ln for ln in results.splitlines() if ln.split()[:1] == [part])
        assert row.split()[1] == f"{metrics[f'{part}_study_kappa']:.3f}"
    assert f"body-part accuracy {metrics['body_part_accuracy']:.3f}" in results
    for name in ("body_part", "elbow", "hand", "shoulder"):  # the champion gate's table
        assert any(ln.split()[:2] == [name, "v1"] for ln in results.splitlines())


def test_experiment_opens_on_its_runs_and_each_run_shows_its_data(pipeline_run):
    project, settings, summary = pipeline_run
    client = client_for(project)
    experiment = client.get_experiment_by_name("bonefrac")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    dvc_md5 = yaml.safe_load((project / "data.dvc").read_text())["outs"][0]["md5"]
    assert summary["data_version"] == dvc_md5
    runs = json.loads((settings.layout.models / "runs.json").read_text())
    key = json.loads((settings.layout.preprocessed / "meta.json").read_text())["key"]
    for name, context in [(m, "training") for m in REGISTERED_MODELS] + [("parent", "evaluation")]:
        inputs = client.get_run(runs[name]).inputs.dataset_inputs
        assert len(inputs) == 1, name
        tags = {tag.key: tag.value for tag in inputs[0].tags}
        dataset = inputs[0].dataset
        assert tags["mlflow.data.context"] == context
        assert dataset.digest == dvc_md5 and tags["dvc.md5"] == dvc_md5
        assert json.loads(dataset.source)["uri"] == str((project / "data").resolve())
        assert dataset.name == "MURA-v1.1 (SYNTHETIC)"
        if context == "training":
            assert tags["bonefrac.cache_key"] == key


REGISTERED_MODELS = ("body_part", "elbow", "hand", "shoulder")


def _get_json(url: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


@contextmanager
def headless_chromium(profile):
    """Debian's Chromium, headless, through Selenium (as tests/service/test_browser.py)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not go online
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000"):
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")  # fresh: the UI's GenAI default
    driver = webdriver.Chrome(
        service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"),
        options=options,
    )
    try:
        yield driver
    finally:
        driver.quit()


@pytest.mark.browser
def test_make_ui_opens_the_experiment_on_its_training_runs(pipeline_run, tmp_path):
    from selenium.webdriver.support.ui import WebDriverWait

    project, _, summary = pipeline_run
    # --no-print-directory: under `make test` a nested make would add "Leaving directory" lines
    make = run(project, "make", "--no-print-directory", "-n", "ui").stdout
    assert make.splitlines()[-1] == ".venv/bin/bonefrac ui"  # what `make ui` runs
    port = free_port()
    printed = run(project, "bonefrac", "ui", "--print-command", "--port", str(port)).stdout
    command = shlex.split(printed.strip())
    assert command[command.index("--backend-store-uri") + 1] == (
        f"sqlite:///{(project / 'mlflow.db').resolve()}"
    )
    out = tmp_path / "ui.out"
    with out.open("w") as sink:
        server = subprocess.Popen(  # `make ui` without make: bonefrac execs `mlflow ui`
            ["bonefrac", "ui", "--port", str(port)],
            cwd=project,
            env=tool_env(project),
            stdout=sink,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    client = client_for(project)
    experiment_id = client.get_experiment_by_name("bonefrac").experiment_id
    parent_name = client.get_run(summary["parent_run_id"]).info.run_name
    api = f"http://127.0.0.1:{port}/ajax-api/2.0/mlflow"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                found = _get_json(f"{api}/experiments/get-by-name?experiment_name=bonefrac")
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "UI did not start"
                time.sleep(1)
        tags = {t["key"]: t["value"] for t in found["experiment"]["tags"]}
        assert tags["mlflow.experimentKind"] == "custom_model_development"
        found = _get_json(f"{api}/runs/search", {"experiment_ids": [experiment_id]})
        by_name = {r["info"]["run_name"]: r for r in found["runs"]}
        for name in REGISTERED_MODELS:  # what the UI reads for each run's dataset
            (dataset_input,) = by_name[name]["inputs"]["dataset_inputs"]
            assert dataset_input["dataset"]["digest"] == summary["data_version"]
        # the address `bonefrac ui` prints opens the runs table, not the GenAI overview
        url = out.read_text().split("open ", 1)[1].split()[0]
        assert url == (
            f"http://127.0.0.1:{port}/#/experiments/{experiment_id}/runs"
            "?workflowType=machine_learning"
        )
        with headless_chromium(tmp_path / "chromium") as browser:
            browser.get(url)
            page = WebDriverWait(browser, 120).until(
                lambda b: (
                    (text := b.find_element("tag name", "body").text)
                    and parent_name in text
                    and "MURA-v1.1 (SYNTHETIC)" in text
                    and text
                )
            )
            assert "Run Name" in page and "Dataset" in page
            assert f"/experiments/{experiment_id}/runs" in browser.current_url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


# TensorFlow 2.21 prints this INFO line, with absl's banner before it, whatever
# TF_CPP_MIN_LOG_LEVEL says, on CPUs where it turns oneDNN on by default (Xeons with
# AVX512-VNNI or AMX; AVX2-only EPYCs print nothing): tensorflow/tensorflow#100442. No setting
# silences it short of turning oneDNN off, so exactly that pair of lines is allowed.
ONEDNN_NOTE = re.compile(
    r"WARNING: All log messages before absl::InitializeLog\(\) is called are written to "
    r"STDERR\n\S+ \S+ +\d+ port\.cc:\d+\] oneDNN custom operations are on\.[^\n]*\n"
)

QUIET_RUN = """
from bonefrac.console import quiet_tools

quiet_tools()  # what every `bonefrac` command does first
import tensorflow as tf
from prefect import flow

tf.constant(1.0) + 1.0  # TensorFlow's first op: its CPU-feature INFO line would print here


@flow
def tiny() -> int:
    return 7


print("result", tiny())
"""


def test_bonefrac_environment_runs_a_flow_and_imports_tensorflow_quietly(tmp_path):
    # a fresh Prefect home, as on a first `make demo`: Prefect's server telemetry would print
    # an ERROR line (offline) or a 'database is locked' traceback there
    env = {k: v for k, v in os.environ.items() if k not in QUIET_NAMES}
    env |= {"PREFECT_HOME": str(tmp_path / "prefect"), "PYTHONPATH": os.pathsep.join(sys.path)}
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "180"
    result = subprocess.run(
        [sys.executable, "-c", QUIET_RUN],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "result 7" in output, output
    assert "Beginning flow run" in output  # Prefect's own INFO lines still print
    output = ONEDNN_NOTE.sub("", output)
    for noise in ("ERROR", "Traceback", "telemetry", "cpu_feature_guard", "absl::InitializeLog"):
        assert noise not in output, output


QUIET_NAMES = (
    "TF_CPP_MIN_LOG_LEVEL",
    "PREFECT_SERVER_ANALYTICS_ENABLED",
    "DO_NOT_TRACK",
    "PREFECT_API_URL",  # the session's test harness: this run starts its own server
)
