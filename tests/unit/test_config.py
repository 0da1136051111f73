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
    assert full.preprocess.image_size == 320 and full.train.weights == "imagenet"
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
        ({"train": {"finetune_layers": -3}}, "train.finetune_layers"),
        ({"train": {"patience": 2, "lr_patience": 2}}, "must exceed lr_patience"),
        ({"train": {"body_part": {"epochz": 3}}}, "unknown key(s) epochz"),
        ({"train": {"body_part": {"strategy": "mirrored"}}}, "strategy cannot be set"),
        ({"train": {"body_part": {"body_part": {}}}}, "body_part cannot be set"),
        ({"train": {"body_part": {"patience": 1}}}, "body_part: "),
        ({"train": {"body_part": {"batch_size": 0}}}, "body_part.batch_size: Input should be"),
    ],
)
def test_wrong_value_names_the_key_in_one_line(tmp_path, content, message):
    params = write_params(tmp_path, content)
    with pytest.raises(UserError) as info:
        load_settings(params, env={})
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_default_recipe_is_the_documented_one(project_root):
    """params.yaml's real-MURA settings and the code's defaults are one recipe (docs/recipe.md:
    the MURA baseline's 320 px, batch 8, Adam 1e-4, rate /10 on a val-loss plateau, best
    val-loss model, +-30 degree rotations, all layers fine-tuned); the quick profile keeps its
    own (docs/synthetic-learning.md)."""
    from bonefrac.config import PreprocessConfig, TrainConfig

    full = load_settings(project_root / "params.yaml", env={})
    assert full.train == TrainConfig() and full.preprocess == PreprocessConfig()
    recipe = full.train
    assert (full.preprocess.image_size, recipe.batch_size, recipe.finetune_learning_rate) == (
        320,
        8,
        1e-4,
    )
    assert (recipe.monitor, recipe.lr_factor, recipe.rotation_degrees) == ("loss", 0.1, 30)
    assert recipe.finetune_layers == "all" and recipe.patience > recipe.lr_patience
    quick = load_settings(project_root / "params.yaml", profile="quick", env={}).train
    assert (quick.monitor, quick.lr_factor, quick.rotation_degrees) == ("metric", 0.3, 14.4)
    assert (quick.patience, quick.lr_patience, quick.finetune_layers) == (10, 5, "all")
    assert quick.zero_init_residual and not recipe.zero_init_residual  # from scratch only
    # 0 is how older params files wrote "every layer"
    assert TrainConfig(finetune_layers=0).finetune_layers == "all"
    assert TrainConfig(finetune_layers=10).finetune_layers == 10


def test_unknown_profile_and_missing_file(tmp_path, project_root):
    with pytest.raises(UserError, match="unknown profile 'huge'"):
        load_settings(project_root / "params.yaml", profile="huge", env={})
    with pytest.raises(UserError, match="not found"):
        load_settings(tmp_path / "nope.yaml", env={})


def test_flat_view_and_section_hash(project_root):
    settings = load_settings(project_root / "params.yaml", env={})
    flat = settings.flat()
    assert flat["train.batch_size"] == 8 and flat["data.parts"] == [
        "XR_ELBOW",
        "XR_HAND",
        "XR_SHOULDER",
    ]
    quick = load_settings(project_root / "params.yaml", profile="quick", env={})
    assert settings.section_hash("registry") == quick.section_hash("registry")
    assert settings.section_hash("serve") != quick.section_hash("serve")  # allow_unreviewed
    assert settings.section_hash("data") != quick.section_hash("data")
    assert settings.section_hash("train") != quick.section_hash("train")


def test_the_body_part_model_trains_with_its_own_values(project_root):
    """train.body_part applies to the body-part model alone; the fracture models keep the
    section's values (the quick profile: the body part stops early, fractures get 20 epochs)."""
    from bonefrac.models import BODY_PART_MODEL

    quick = load_settings(project_root / "params.yaml", profile="quick", env={}).train
    body_part, hand = quick.for_model(BODY_PART_MODEL), quick.for_model("XR_HAND")
    assert hand is quick and (hand.finetune_epochs, hand.patience) == (20, 10)
    assert (body_part.finetune_epochs, body_part.patience, body_part.lr_patience) == (5, 3, 2)
    # everything not named keeps the section's value, and the override does not nest
    assert body_part.batch_size == quick.batch_size and body_part.body_part == {}
    full = load_settings(project_root / "params.yaml", env={}).train
    assert full.for_model(BODY_PART_MODEL) is full  # nothing set: the same settings
    # its own values win over the section's, also over a later override of the same key
    tuned = load_settings(
        project_root / "params.yaml",
        profile="quick",
        overrides={"train": {"finetune_epochs": 0}},
        env={},
    ).train
    assert tuned.finetune_epochs == 0 and tuned.for_model(BODY_PART_MODEL).finetune_epochs == 5
    # `body_part:` with nothing under it (YAML null) is no override
    from bonefrac.config import TrainConfig

    assert TrainConfig(body_part=None).body_part == {}
