"""The train/serve boundary holds: serving, the bundle reader and the inference core import
no evaluation, PCA fitting, tracking, registry or training code, and nothing imports in a
circle. Checked three ways: import-linter's contracts in pyproject.toml (what `lint-imports`
runs), grimp's module graph for cycles, and a fresh interpreter that loads the service."""

from __future__ import annotations

import json
import subprocess
import sys

import grimp
from importlinter.cli import lint_imports

from tests.conftest import PROJECT_ROOT

TRAINING_SIDE = (
    "bonefrac.evaluate",
    "bonefrac.pca",
    "bonefrac.tracking",
    "bonefrac.registry",
    "bonefrac.train",
    "sklearn",
    "mlflow",
    "prefect",
    "dvc",
    "great_expectations",
)


def test_import_linter_contracts_are_kept(monkeypatch):
    monkeypatch.chdir(PROJECT_ROOT)
    exit_code = lint_imports(config_filename=str(PROJECT_ROOT / "pyproject.toml"), no_cache=True)
    assert exit_code == 0, "run `lint-imports` in the project folder to see the broken contract"


def test_no_module_imports_itself_in_a_circle():
    graph = grimp.build_graph("bonefrac", cache_dir=None)
    cycles = []
    for module in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            back = graph.find_shortest_chain(importer=imported, imported=module)
            if back:
                cycles.append(" -> ".join((module, *back)))
    assert cycles == []


def test_loading_the_service_loads_no_training_side_module():
    code = (
        "import json, sys\n"
        "import bonefrac.serving.service, bonefrac.serving.predictor, bonefrac.bundle\n"
        f"prefixes = {TRAINING_SIDE!r}\n"
        "loaded = [m for m in sys.modules\n"
        "          if any(m == p or m.startswith(p + '.') for p in prefixes)]\n"
        "print(json.dumps(sorted(loaded)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert json.loads(result.stdout.splitlines()[-1]) == []
