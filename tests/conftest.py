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
# trains on two, so two workers overlap the waits. Each group below runs whole on one worker,
# so every expensive fixture is still built once: the modules on the flow's run share one
# `pipeline_run`, the service tests one bundle and server, and a module's tests its
# module-scoped fixtures (every other module is a group of its own). xdist's own loadgroup
# cannot do this with pytest 9.2 (it marks groups by rewriting node ids, which pytest 9.2 no
# longer reads: pytest-xdist issue 1386), so the scheduler below groups by module path.
PIPELINE_MODULES = {
    f"tests/integration/test_{name}.py"
    for name in ("dask", "deployment", "dvc", "flow", "served_evaluation", "train_evaluate")
}


def xdist_group(module_path: str) -> str:
    """The group of a test module, by its path from the project root."""
    if module_path in PIPELINE_MODULES:
        return "pipeline"
    if module_path.startswith("tests/service/"):
        return "service"
    return module_path


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ByGroup(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return xdist_group(nodeid.split("::", 1)[0])

    return ByGroup(config, log)


def pytest_collection_modifyitems(config, items):
    """A module on the flow's run outside PIPELINE_MODULES would run it a second time."""
    for item in items:
        path = item.nodeid.split("::", 1)[0]
        if "pipeline_run" in item.fixturenames and xdist_group(path) != "pipeline":
            raise pytest.UsageError(
                f"{path} uses pipeline_run: add it to PIPELINE_MODULES in tests/conftest.py"
            )


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
