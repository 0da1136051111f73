"""The registry against a real MLflow store: only "not found" means no champion, a broken
store is an error, pins and rollbacks are recorded and respected, and packaging refuses an
unusable operating point. Model versions point at empty folders: no TensorFlow needed."""

from __future__ import annotations

import json
import socket

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from bonefrac.cli import cli
from bonefrac.errors import DataError
from bonefrac.gate import Champion, Scored, decide
from bonefrac.packaging import package_champions
from bonefrac.registry import PIN_TAG, RegistryError, current_champion, promote

NAMES = {
    "body_part": "bonefrac-body-part",
    "elbow": "bonefrac-fracture-elbow",
    "hand": "bonefrac-fracture-hand",
    "shoulder": "bonefrac-fracture-shoulder",
}


def _closed_port_uri() -> str:
    with socket.socket() as sock:  # a port nothing listens on: connections are refused
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture()
def store(tmp_path, project_root):
    """A project folder with params.yaml (quick profile) and a real sqlite MLflow store
    holding three versions of each model; v3 is champion."""
    from bonefrac.config import load_settings

    project = tmp_path / "project"
    project.mkdir()
    (project / "params.yaml").write_text((project_root / "params.yaml").read_text())
    settings = load_settings(project / "params.yaml", profile="quick", env={})
    client = MlflowClient(f"sqlite:///{settings.paths.mlflow_db}")
    preprocess = json.dumps(settings.preprocess.model_dump(mode="json", exclude={"workers"}))
    for short, name in NAMES.items():
        client.create_registered_model(name)
        for v in (1, 2, 3):
            source = tmp_path / "models" / name / str(v)
            source.mkdir(parents=True)
            tags = {"bonefrac.preprocess": preprocess, "bonefrac.model": short}
            if short != "body_part":
                tags |= {"bonefrac.threshold": "0.4", "bonefrac.temperature": "1.7"}
                tags["bonefrac.uncertain_band"] = "0.1"
            client.create_model_version(name, str(source), tags=tags)
        client.set_registered_model_alias(name, "champion", "3")
    return project, settings, client


def invoke(project, *args: str, env: dict | None = None):
    return CliRunner().invoke(
        cli, ["--params", str(project / "params.yaml"), "--profile", "quick", *args], env=env
    )


def test_only_not_found_means_no_champion(store, monkeypatch):
    project, settings, client = store
    assert current_champion(client, "bonefrac-never-registered") is None
    client.create_registered_model("bonefrac-no-alias")
    assert current_champion(client, "bonefrac-no-alias") is None
    version, pin = current_champion(client, NAMES["hand"])
    assert str(version.version) == "3" and pin is None

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    broken = _closed_port_uri()
    with pytest.raises(RegistryError, match="failed while reading.*nothing was promoted"):
        current_champion(MlflowClient(broken), NAMES["hand"])
    # the same store through settings: packaging and promotion fail, nothing moves
    down = settings.model_copy(
        update={"tracking": settings.tracking.model_copy(update={"tracking_uri": broken})}
    )
    with pytest.raises(RegistryError, match=broken):
        package_champions(down, build=False)
    from bonefrac.gate import Decision

    move = Decision("hand", NAMES["hand"], "1", "study_kappa", 0.9, "3", 0.5, True, "test")
    with pytest.raises(RegistryError):
        promote(down, [move])
    assert current_champion(client, NAMES["hand"])[0].version == 3
    # the CLI says it in one line, exit 2
    result = invoke(
        project,
        "champion",
        "pin",
        "hand",
        "1",
        "--reason",
        "x",
        env={"MLFLOW_TRACKING_URI": broken},
    )
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and "failed while" in result.output


def test_pin_rollback_unpin_are_recorded_and_the_next_gate_respects_a_pin(store):
    project, settings, client = store
    result = invoke(project, "champion", "pin", "hand", "2", "--reason", "v3 misses fractures")
    assert result.exit_code == 0, result.output
    assert "bonefrac-fracture-hand@champion -> v2 (was v3)" in result.output
    version, pin = current_champion(client, NAMES["hand"])
    assert str(version.version) == "2"
    assert pin["reason"] == "v3 misses fractures" and pin["by"] and pin["at"].endswith("Z")
    assert version.tags["bonefrac.pin.previous"] == "3"
    assert client.get_registered_model(NAMES["hand"]).tags[PIN_TAG] == "2"

    # the next gate keeps a pinned champion even against a clearly better challenger
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 60)
    frame = pd.DataFrame(
        {
            "path": [f"p{i}" for i in range(120)],
            "split": "val",
            "patient_id": [f"patient{i}" for i in range(120)],
            "study_id": [f"s{i}" for i in range(120)],
            "label": labels,
        }
    )
    good = Scored(frame.assign(prob=np.clip(labels * 0.6 + rng.random(120) * 0.4, 0, 1)), 0.5)
    bad = Scored(frame.assign(prob=rng.random(120)), 0.5)
    gate = {"confidence": 0.9, "min_improvement": 0.0, "n_samples": 500, "seed": 0}
    kwargs = {"model": "hand", "registered_name": NAMES["hand"], "metric": "study_kappa"}
    kept = decide(
        good,
        Champion(version.version, bad, pin=pin),
        multiclass=False,
        operating_problem=None,
        **kwargs,
        **gate,
    )
    assert not kept.promoted and "pinned by" in kept.reason and kept.gate.passed

    # rollback only goes back; a bad request is one line and exit 2
    result = invoke(project, "champion", "rollback", "hand", "3", "--reason", "undo")
    assert result.exit_code == 2 and "older version" in result.output
    result = invoke(project, "champion", "rollback", "hand", "1", "--reason", "back to v1")
    assert result.exit_code == 0, result.output
    assert current_champion(client, NAMES["hand"])[0].tags["bonefrac.pin.action"] == "rollback"
    for args, message in (
        (("pin", "hand", "9", "--reason", "x"), "no version 9"),
        (("pin", "knee", "1", "--reason", "x"), "unknown model 'knee'"),
        (("pin", "hand", "1", "--reason", " "), "--reason is empty"),
    ):
        result = invoke(project, "champion", *args)
        assert result.exit_code == 2 and message in result.output, result.output
        assert "Traceback" not in result.output

    result = invoke(project, "champion", "unpin", "hand", "--reason", "gate may decide")
    assert result.exit_code == 0, result.output
    version, pin = current_champion(client, NAMES["hand"])
    assert str(version.version) == "1" and pin is None  # the champion stays; the pin is gone
    assert "gate may decide" in version.tags["bonefrac.unpinned"]


def test_packaging_refuses_an_unusable_operating_point(store):
    project, settings, client = store
    client.set_model_version_tag(NAMES["elbow"], "3", "bonefrac.threshold", "1.0")
    with pytest.raises(DataError, match=r"elbow v3: its threshold 1.0 is not strictly between"):
        package_champions(settings, build=False)
    client.set_model_version_tag(NAMES["elbow"], "3", "bonefrac.threshold", "0.3")
    client.delete_model_version_tag(NAMES["shoulder"], "3", "bonefrac.temperature")
    with pytest.raises(DataError, match="shoulder v3: it has no recorded operating point"):
        package_champions(settings, build=False)


def test_packaging_refuses_a_champion_whose_preprocessing_is_not_recorded(store):
    """A champion from other preprocessing is packaged with its own (see
    test_served_evaluation); one whose preprocessing nobody recorded cannot be served the way
    it was trained, so packaging says so instead of guessing."""
    project, settings, client = store
    older = settings.preprocess.model_copy(update={"clahe_clip_limit": 3.0})
    older = json.dumps(older.model_dump(mode="json", exclude={"workers"}))
    client.set_model_version_tag(NAMES["elbow"], "3", "bonefrac.preprocess", older)
    client.delete_model_version_tag(NAMES["hand"], "3", "bonefrac.preprocess")
    unrecorded = r"bonefrac-fracture-hand v3: its preprocessing is not recorded"
    with pytest.raises(DataError, match=unrecorded) as e:
        package_champions(settings, build=False)
    assert "elbow" not in str(e.value)  # other preprocessing is fine; unrecorded is not


def test_a_champion_with_other_preprocessing_is_scored_on_images_preprocessed_its_way(
    demo_cache,
):
    from bonefrac.config import PreprocessConfig
    from bonefrac.data import mura
    from bonefrac.imaging import preprocess_file
    from bonefrac.registry import split_images, version_preprocess

    settings, cache = demo_cache
    rows = cache.rows(split="val")[:5]
    current = settings.preprocess.model_dump(mode="json", exclude={"workers"})
    np.testing.assert_array_equal(split_images(settings, cache, rows, current), cache.images[rows])
    other = {**current, "clahe": False, "gaussian_kernel": 3}
    images = split_images(settings, cache, rows, other)
    data_dir = mura.find_mura_root(settings.paths.data).parent
    first = preprocess_file(data_dir / cache.index["path"].iloc[rows[0]], PreprocessConfig(**other))
    np.testing.assert_array_equal(images[0], first[..., 0])
    assert not np.array_equal(images, cache.images[rows])

    class Version:  # what the registry reads from a version: its tags
        tags = {"bonefrac.preprocess_hash": "0ld"}

    assert version_preprocess(Version, settings) is None  # unknown: the champion is not scored
    Version.tags = {"bonefrac.preprocess": json.dumps(other)}
    assert version_preprocess(Version, settings) == other
