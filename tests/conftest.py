"""Shared fixtures. Everything runs against temp folders; nothing touches the user's home."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Telemetry off and every tool's state in temp folders, before any tool is imported.
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

PROJECT_ROOT = Path(__file__).resolve().parents[1]


# `make test` runs the suite on two pytest-xdist workers (`-n 2 --dist loadgroup`): most of it
# waits on one core (process and server start-ups, imports, graph tracing, I/O) while TensorFlow
# trains on two, so two workers overlap the waits. loadgroup runs each xdist_group whole on one
# worker; these groups keep every expensive fixture built once: the tests on the flow's run
# share one pipeline_run, the service tests one bundle and server, the demo-data tests one
# cache. A module's tests stay together (its module-scoped fixtures are built once too): a
# module joins the group of the first shared fixture any of its tests uses, else is its own.
SHARED_FIXTURE_GROUPS = {
    "pipeline_run": "pipeline",
    "bundle_dir": "service",
    "synthetic_root": "service",
    "server": "service",
    "demo_cache": "demo-data",
    "demo_data_dir": "demo-data",
}


@pytest.hookimpl(tryfirst=True)  # before xdist reads the marks
def pytest_collection_modifyitems(config, items):
    used: dict[str, set[str]] = {}
    for item in items:
        used.setdefault(item.module.__name__, set()).update(item.fixturenames)
    for item in items:
        module = item.module.__name__
        shared = (g for f, g in SHARED_FIXTURE_GROUPS.items() if f in used[module])
        item.add_marker(pytest.mark.xdist_group(next(shared, module)))


@pytest.fixture(scope="session")
def project_root() -> Path:
    return PROJECT_ROOT


@pytest.fixture(scope="session")
def demo_data_dir(tmp_path_factory) -> Path:
    """A small SYNTHETIC MURA (exact layout and CSVs), shared read-only by the session."""
    from bonefrac.config import OTHER_PARTS
    from bonefrac.data import synthetic

    base = tmp_path_factory.mktemp("demo-data")
    synthetic.generate(
        base, patients=8, size=96, seed=0, extra_parts=OTHER_PARTS, extra_patients=2
    )  # MURA's other parts too, for the body-part model's "other" class
    return base


@pytest.fixture(scope="session")
def quick_settings_factory(project_root):
    """Quick-profile settings pointed at temp data/artifacts folders."""
    from bonefrac.config import load_settings

    def make(data: Path, artifacts: Path, **overrides):
        nested = {"paths": {"data": str(data), "artifacts": str(artifacts)}}
        for dotted, value in overrides.items():
            section, key = dotted.split(".")
            nested.setdefault(section, {})[key] = value
        return load_settings(
            project_root / "params.yaml", profile="quick", overrides=nested, env={}
        )

    return make


@pytest.fixture(scope="session")
def demo_cache(demo_data_dir, quick_settings_factory, tmp_path_factory):
    """Manifest + preprocessed cache of the demo data (quick profile, 64 px)."""
    from bonefrac.cache import build_cache, load_cache
    from bonefrac.data import mura

    artifacts = tmp_path_factory.mktemp("artifacts")
    settings = quick_settings_factory(demo_data_dir, artifacts, **{"data.val_fraction": 0.2})
    result = mura.build_manifest(settings.paths.data, settings.data)
    mura.write_manifest(result.frame, settings.layout.manifest)
    build_cache(
        result.frame,
        result.data_dir,
        settings.layout.preprocessed,
        settings.preprocess,
        progress=False,
    )
    return settings, load_cache(settings.layout.preprocessed)
