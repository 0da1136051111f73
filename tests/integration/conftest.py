"""Integration fixtures: a throwaway copy of the project, as a fresh clone would be."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

VENV_BIN = str(Path(sys.executable).parent)
SKIP = {
    ".venv",
    ".git",
    "data",
    "artifacts",
    "mlflow.db",
    "mlartifacts",
    ".cache",
    "bentoml",
    "dvc.lock",
    ".pytest_cache",
    ".ruff_cache",
    "__pycache__",
    ".prefect",
}


def tool_env(project: Path, **extra: str) -> dict[str, str]:
    """Environment for running the project's tools in `project` (its venv first on PATH)."""
    env = {
        **os.environ,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "DVC_NO_ANALYTICS": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "GX_ANALYTICS_ENABLED": "false",
    }
    env.pop("BONEFRAC_PROFILE", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(extra)
    return env


def run(project: Path, *args: str, check: bool = True, **env: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        list(args),
        cwd=project,
        capture_output=True,
        text=True,
        env=tool_env(project, **env),
        timeout=1800,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def set_params(project: Path, **values) -> None:
    """Edit params.yaml keys given as dotted names (`profiles__quick__pca__n_components`)."""
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for dotted, value in values.items():
        node = params
        *parents, key = dotted.split("__")
        for name in parents:
            node = node.setdefault(name, {})
        node[key] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def fresh_clone(project_root: Path, target: Path) -> Path:
    """The project's files (no venv, data or outputs) in a new git repo, like a clone."""

    def ignore(folder: str, names: list[str]) -> list[str]:
        top = Path(folder) == project_root
        return [n for n in names if n == "__pycache__" or (top and n in SKIP)]

    shutil.copytree(project_root, target, ignore=ignore)
    run(target, "git", "init", "-q")
    run(target, "git", "add", "-A")
    run(target, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy")
    return target


@pytest.fixture()
def project_copy(project_root, tmp_path) -> Path:
    """The project's files in a temp git repo, with a small synthetic MURA in data/."""
    target = fresh_clone(project_root, tmp_path / "project")
    run(target, "bonefrac", "demo-data", "--patients", "8", "--size", "96")
    run(target, "dvc", "add", "-q", "data")  # this copy's own data version
    set_params(target, profile="quick")
    return target


def copy_project(source: Path, target: Path) -> Path:
    """A full copy of a project that has run (artifacts, MLflow store, and the BentoML home
    beside it), so a test can change it without touching the original."""
    shutil.copytree(source, target, symlinks=True)
    shutil.copytree(source.parent / "bentoml", target.parent / "bentoml", symlinks=True)
    return target


@contextmanager
def captured_logs():
    """Every log record while the block runs (Prefect's flow and task lines, every library's
    warnings and errors, tracebacks included), as `LEVEL logger - message` lines."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.extend(self.format(record).splitlines())

    handler = Collect(level=logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s - %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield lines
    finally:
        root.removeHandler(handler)


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """Prefect's own test harness: a temporary API and database for the session."""
    from prefect.testing.utilities import prefect_test_harness

    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="session")
def pipeline_run(project_root, tmp_path_factory, prefect_harness):
    """The retraining flow, run once on a small SYNTHETIC dataset in a project copy with its
    own MLflow store, DVC remote and BentoML home. Shared by the flow and training tests."""
    from flows.retrain import retrain

    from bonefrac.config import load_settings

    base = tmp_path_factory.mktemp("pipeline")
    project = fresh_clone(project_root, base / "project")
    # BONEFRAC_TEST_SEED reruns the learning tests on other data and initial weights
    seed = int(os.environ.get("BONEFRAC_TEST_SEED", "1"))
    run(project, "bonefrac", "demo-data", "--patients", "10", "--size", "96", "--seed", str(seed))
    # At 96 px films the fracture models cannot learn the synthetic breaks (test_fracture_gate
    # trains one that does, on the demo's 256 px films), so their quick-profile 30 epochs only
    # cost time (~15 min of make test on an AVX2-only CPU): 3 epochs exercise the same code.
    # The body-part model keeps its own quick values: test_train_evaluate needs it to learn.
    set_params(
        project, profile="quick", train__seed=seed, profiles__quick__train__finetune_epochs=3
    )
    os.environ["BENTOML_HOME"] = str(base / "bentoml")  # outside the Bento's build context
    settings = load_settings(project / "params.yaml", env={})
    with captured_logs() as lines:
        summary = retrain(params=str(project / "params.yaml"))
    (base / "flow.log").write_text("\n".join(lines) + "\n")  # read by test_flow_output
    return project, settings, summary
