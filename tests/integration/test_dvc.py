"""DVC: the declared stages run with `dvc repro`, status is clean after, and a param change
reruns only the stages that read it."""

from __future__ import annotations

import json

from bonefrac.data.versioning import data_version, track_data

from .conftest import run, set_params

FIRST_STAGES = ("validate", "preprocess", "fit_pca")


def stage_status(project, *targets) -> str:
    return run(project, "dvc", "status", "--with-deps", *targets).stdout


def test_repro_status_and_param_granularity(project_copy):
    project = project_copy
    result = run(project, "dvc", "repro", *FIRST_STAGES)
    for stage in FIRST_STAGES:
        assert f"Running stage '{stage}'" in result.stdout
    assert "up to date" in stage_status(project, "fit_pca")
    metrics = json.loads(run(project, "dvc", "metrics", "show", "--json").stdout)
    assert metrics  # validation.json and pca.json are reported
    assert (project / "artifacts/preprocessed/images.npy").is_file()
    assert (project / "artifacts/pca/pca.joblib").is_file()

    # a PCA parameter: only fit_pca is out of date
    set_params(project, profiles__quick__pca__n_components=8)
    status = stage_status(project, "fit_pca")
    assert "fit_pca:" in status and "profiles.quick.pca" in status
    assert "preprocess:" not in status and "validate:" not in status

    # a preprocessing parameter: preprocess (not validate) reruns, then fit_pca after it
    manifest_mtime = (project / "artifacts/manifest.csv").stat().st_mtime_ns
    set_params(project, preprocess__gaussian_sigma=1.5)
    rerun = run(project, "dvc", "repro", "fit_pca").stdout
    assert "Running stage 'preprocess'" in rerun and "Running stage 'fit_pca'" in rerun
    assert "Running stage 'validate'" not in rerun
    assert (project / "artifacts/manifest.csv").stat().st_mtime_ns == manifest_mtime
    assert "up to date" in stage_status(project, "fit_pca")


def test_corrupted_data_stops_the_pipeline(project_copy):
    project = project_copy
    image = next((project / "data/MURA-v1.1/train/XR_HAND").rglob("image1.png"))
    image.write_bytes(image.read_bytes()[:200])  # truncated PNG
    result = run(project, "dvc", "repro", "preprocess", check=False)
    assert result.returncode != 0
    assert image.relative_to(project / "data").as_posix() in result.stdout + result.stderr
    assert not (project / "artifacts/manifest.csv").exists()
    assert not (project / "artifacts/preprocessed").exists()
    assert (project / "artifacts/validation/data_docs/index.html").is_file()


def test_track_data_versions_and_pushes_to_the_default_remote(project_copy):
    project = project_copy
    version = track_data(project)
    assert version.md5.endswith(".dir") and version.nfiles > 100 and version.pushed
    assert data_version(project) == data_version(project)  # read back from data.dvc
    assert any((project / ".cache/dvc-remote").rglob("*"))
    # unchanged data: same version; a changed image: a new one
    assert track_data(project, push=False).md5 == version.md5
    (project / "data/MURA-v1.1/train_image_paths.csv").write_text("changed\n")
    assert track_data(project, push=False).md5 != version.md5
