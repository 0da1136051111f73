"""Settings: params.yaml sections, profiles, environment overrides, one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from bonefrac.config import load_settings
from bonefrac.errors import UserError


def write_params(tmp_path: Path, content: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(content))
    return path


def test_project_params_load_with_and_without_quick_profile(project_root):
    full = load_settings(project_root / "params.yaml", env={})
    quick = load_settings(project_root / "params.yaml", profile="quick", env={})
    assert full.preprocess.image_size == 224 and full.train.weights == "imagenet"
    assert quick.profile == "quick"
    assert quick.preprocess.image_size == 64 and quick.train.weights == "none"
    # a profile overrides only what it names
    assert quick.preprocess.gaussian_kernel == full.preprocess.gaussian_kernel
    assert full.paths.data == project_root / "data"


def test_settings_are_frozen(project_root):
    settings = load_settings(project_root / "params.yaml", env={})
    with pytest.raises(ValidationError):
        settings.train.batch_size = 3


def test_environment_overrides_paths(tmp_path, project_root):
    settings = load_settings(
        project_root / "params.yaml",
        env={"BONEFRAC_DATA": str(tmp_path / "mura"), "BONEFRAC_PROFILE": "quick"},
    )
    assert settings.paths.data == tmp_path / "mura"
    assert settings.profile == "quick"


def test_relative_paths_resolve_against_params_folder(tmp_path):
    params = write_params(tmp_path, {"paths": {"data": "mydata"}})
    assert load_settings(params, env={}).paths.data == tmp_path / "mydata"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"train": {"batch_size": "many"}}, "train.batch_size"),
        ({"train": {"epochz": 3}}, "train.epochz: unknown key"),
        ({"preprocess": {"gaussian_kernel": 4}}, "preprocess.gaussian_kernel"),
        ({"data": {"parts": ["XR_KNEE"]}}, "data.parts"),
        ({"serve": {"port": 0}}, "serve.port"),
    ],
)
def test_wrong_value_names_the_key_in_one_line(tmp_path, content, message):
    params = write_params(tmp_path, content)
    with pytest.raises(UserError) as info:
        load_settings(params, env={})
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_profile_and_missing_file(tmp_path, project_root):
    with pytest.raises(UserError, match="unknown profile 'huge'"):
        load_settings(project_root / "params.yaml", profile="huge", env={})
    with pytest.raises(UserError, match="not found"):
        load_settings(tmp_path / "nope.yaml", env={})


def test_flat_view_and_section_hash(project_root):
    settings = load_settings(project_root / "params.yaml", env={})
    flat = settings.flat()
    assert flat["train.batch_size"] == 32 and flat["data.parts"] == [
        "XR_ELBOW",
        "XR_HAND",
        "XR_SHOULDER",
    ]
    quick = load_settings(project_root / "params.yaml", profile="quick", env={})
    assert settings.section_hash("registry") == quick.section_hash("registry")
    assert settings.section_hash("serve") != quick.section_hash("serve")  # allow_unreviewed
    assert settings.section_hash("data") != quick.section_hash("data")
    assert settings.section_hash("train") != quick.section_hash("train")
