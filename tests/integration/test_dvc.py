"""DVC: the declared stages run with `dvc repro`, status is clean after, and a param change
reruns only the stages that read it; after a Prefect flow run, `dvc status` agrees with it."""

from __future__ import annotations

import json

import pytest
import yaml

from bonefrac.data.fingerprints import content_md5s, file_md5
from bonefrac.data.versioning import data_version, track_data
from bonefrac.stages import STAGES

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


def dir_listing(project, md5: str) -> dict[str, str]:
    """DVC's own per-file md5s behind a directory version (its `.dir` object in the cache)."""
    digest = md5.removesuffix(".dir")
    listing = project / ".dvc/cache/files/md5" / digest[:2] / f"{digest[2:]}.dir"
    return {entry["relpath"]: entry["md5"] for entry in json.loads(listing.read_text())}


def test_track_data_versions_and_pushes_to_the_default_remote(project_copy):
    project = project_copy
    version = track_data(project)
    assert version.md5.endswith(".dir") and version.nfiles > 100 and version.pushed
    recorded = yaml.safe_load((project / "data.dvc").read_text())["outs"][0]
    assert data_version(project).md5 == recorded["md5"] == version.md5
    assert any((project / ".cache/dvc-remote").rglob("*"))
    # the caches' content identity of each image is DVC's own md5 of that file
    listing = dir_listing(project, version.md5)
    assert content_md5s(project / "data", list(listing)) == list(listing.values())
    # unchanged data: same version; one image's bytes changed: a new version in data.dvc
    assert track_data(project, push=False).md5 == version.md5
    image = next((project / "data/MURA-v1.1/train/XR_HAND").rglob("image1.png"))
    image.write_bytes(image.read_bytes() + b"\0")
    changed = track_data(project, push=False)
    assert changed.md5 != version.md5
    assert data_version(project).md5 == changed.md5
    relpath = image.relative_to(project / "data").as_posix()
    assert dir_listing(project, changed.md5)[relpath] == file_md5(image) != listing[relpath]


@pytest.mark.slow
def test_flow_run_is_recorded_in_dvc_lock(pipeline_run):
    """The Prefect flow's run and DVC's view agree: nothing for `dvc repro` to redo."""
    project, _, summary = pipeline_run
    assert summary["dvc_recorded"]
    status = run(project, "dvc", "status", "--json").stdout
    assert json.loads(status) == {}, status
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    assert list(lock) == [stage.name for stage in STAGES]
    # recorded as the flow ran it: the quick profile's params, the data version it used
    assert lock["preprocess"]["params"]["params.yaml"]["profile"] == "quick"
    data_dep = next(d for d in lock["validate"]["deps"] if d["path"] == "data")
    assert data_dep["md5"] == summary["data_version"]
    dry = run(project, "dvc", "repro", "--dry").stdout
    assert "Running stage" not in dry, dry
