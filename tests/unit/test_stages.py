"""One list of stages feeds dvc.yaml and the flow; the committed dvc.yaml is in step."""

from __future__ import annotations

import subprocess
import sys

import yaml

from bonefrac.stages import STAGES


def test_committed_dvc_yaml_is_generated_from_the_stage_list(project_root):
    result = subprocess.run(
        [sys.executable, "-m", "bonefrac.cli", "dvc-yaml", "--check"],
        cwd=project_root,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    stages = yaml.safe_load((project_root / "dvc.yaml").read_text())["stages"]
    assert list(stages) == [s.name for s in STAGES]
    assert list(stages) == ["validate", "preprocess", "fit_pca", "train", "evaluate"]
    for name, spec in stages.items():
        assert spec["cmd"] == f"bonefrac stage {name}"
        params = yaml.safe_load((project_root / "params.yaml").read_text())
        for key in spec["params"]:  # every declared key exists in params.yaml
            node = params
            for part in key.split("."):
                node = node[part]


def test_flow_calls_every_stage(project_root):
    flow = (project_root / "flows" / "retrain.py").read_text()
    for call in (
        "run_validate",
        "run_preprocess",
        "run_fit_pca",
        "train_one",
        "run_evaluate_stage",
        "register",
        "package_champions",
    ):
        assert call in flow, call
