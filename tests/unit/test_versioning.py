"""Which flow runs may be written into dvc.lock: only those `dvc repro` would reproduce."""

from __future__ import annotations

import shutil

import pytest
import yaml

from bonefrac.config import load_settings
from bonefrac.dvc_lock import record_flow_run, why_not_reproducible

ALL = ("validate", "preprocess", "fit_pca", "train", "evaluate")


@pytest.fixture()
def project(project_root, tmp_path):
    """The committed params.yaml (`profile: null`) and dvc.yaml in a folder DVC would use."""
    shutil.copy(project_root / "params.yaml", tmp_path / "params.yaml")
    shutil.copy(project_root / "dvc.yaml", tmp_path / "dvc.yaml")
    (tmp_path / ".dvc").mkdir()
    return tmp_path


def set_profile(project, profile: str | None) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["profile"] = profile
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_only_the_profile_params_yaml_names_is_recorded(project):
    params = project / "params.yaml"
    assert why_not_reproducible(load_settings(params, env={}), ALL) is None
    as_make_demo = load_settings(params, profile="quick", env={})  # bonefrac --profile quick
    reason = why_not_reproducible(as_make_demo, ALL)
    assert reason and "set `profile:` in params.yaml" in reason
    from_env = load_settings(params, env={"BONEFRAC_PROFILE": "quick"})
    assert "profile" in why_not_reproducible(from_env, ALL)
    record = record_flow_run(from_env, ALL)  # refused before any DVC command runs
    assert not record.recorded and record.reason == why_not_reproducible(from_env, ALL)
    set_profile(project, "quick")  # as the test fixtures and a `dvc repro` user set it
    assert why_not_reproducible(load_settings(params, env={}), ALL) is None


def test_overridden_paths_or_stage_params_are_not_recorded(project, tmp_path_factory):
    params = project / "params.yaml"
    elsewhere = str(tmp_path_factory.mktemp("data"))
    moved = load_settings(params, overrides={"paths": {"data": elsewhere}}, env={})
    assert "paths.data" in why_not_reproducible(moved, ALL)
    from_env = load_settings(params, env={"BONEFRAC_ARTIFACTS": elsewhere})
    assert "paths.artifacts" in why_not_reproducible(from_env, ALL)
    patient = load_settings(params, overrides={"train": {"patience": 7}}, env={})
    assert "stage train" in why_not_reproducible(patient, ALL)
    # checked per stage, at dvc.yaml's granularity: the stages before train don't read it
    assert why_not_reproducible(patient, ("validate", "preprocess", "fit_pca")) is None
    # a tracking server is no stage's param
    tracked = load_settings(params, env={"MLFLOW_TRACKING_URI": "http://mlflow:5000"})
    assert why_not_reproducible(tracked, ALL) is None


def test_a_folder_without_dvc_is_not_recorded(project):
    shutil.rmtree(project / ".dvc")
    settings = load_settings(project / "params.yaml", env={})
    assert "no DVC pipeline" in why_not_reproducible(settings, ALL)
