"""Bundle import refuses anything but the files packaging wrote (bundle_integrity)."""

from __future__ import annotations

import json

import pytest

from bonefrac.bundle_integrity import MANIFEST, verify_bundle, write_manifest
from bonefrac.errors import DataError

PARTS = ["elbow", "hand"]


@pytest.fixture
def bundle(tmp_path):
    folder = tmp_path / "bundle"
    for name in ("body_part", *PARTS):
        (folder / name).mkdir(parents=True)
        (folder / name / "model.keras").write_bytes(name.encode() * 100)
    (folder / "pca.joblib").write_bytes(b"pickled")
    manifest = {"parts": PARTS, "models": {n: {} for n in ("body_part", *PARTS)}}
    (folder / "bundle.json").write_text(json.dumps(manifest))
    write_manifest(folder)
    return folder, manifest


def test_a_packaged_bundle_verifies(bundle):
    folder, manifest = bundle
    verify_bundle(folder, manifest, PARTS + ["shoulder"])
    assert set(json.loads((folder / MANIFEST).read_text())["sha256"]) == {
        "body_part/model.keras", "elbow/model.keras", "hand/model.keras", "pca.joblib",
        "bundle.json",
    }  # fmt: skip


def _refused(folder, manifest, parts=None) -> str:
    with pytest.raises(DataError) as caught:
        verify_bundle(folder, manifest, parts)
    return str(caught.value)


def test_a_changed_pickle_is_refused(bundle):
    folder, manifest = bundle
    (folder / "pca.joblib").write_bytes(b"pickled, then swapped")
    assert "pca.joblib does not match its SHA-256" in _refused(folder, manifest)


def test_symlinks_and_added_files_are_refused(bundle, tmp_path):
    folder, manifest = bundle
    outside = tmp_path / "model-store-secret"
    outside.write_text("x")
    (folder / "hand" / "extra.keras").symlink_to(outside)
    assert "symbolic link" in _refused(folder, manifest)
    (folder / "hand" / "extra.keras").unlink()
    (folder / "hand" / "extra.keras").write_text("x")
    assert "added or missing" in _refused(folder, manifest)


def test_part_names_must_be_plain_configured_names(bundle):
    folder, manifest = bundle
    assert "not plain names" in _refused(folder, {**manifest, "parts": ["../../etc"]})
    assert "not in data.parts" in _refused(folder, manifest, ["elbow"])


def test_manifest_paths_cannot_leave_the_bundle(bundle):
    folder, manifest = bundle
    sums = json.loads((folder / MANIFEST).read_text())
    sums["sha256"]["../outside"] = "0" * 64
    (folder / MANIFEST).write_text(json.dumps(sums))
    assert "outside the bundle" in _refused(folder, manifest)
