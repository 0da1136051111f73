"""The deployment files agree with what they deploy.

- requirements-serve.lock (the Bento's requirements): every pin is requirements.lock's, nothing
  for training, tracking, orchestration or testing is in it, and it is closed (every package's
  own requirements are in it too), read from the installed distributions' metadata.
- deploy/kubernetes.yaml: valid against Kubernetes' JSON schema (kubernetes-validate, strict:
  an unknown or misspelt field fails), its probes, ports and user match the image BentoML
  builds, and its Service reaches its pods. No cluster is reachable here, so this is what is
  checked: a schema and the wiring, not admission by a real API server.
"""

from __future__ import annotations

import copy
import importlib.metadata as metadata
import re

import pytest
import yaml
from packaging.requirements import Requirement

NOT_SERVING = {
    "pytest", "selenium", "ruff", "dvc", "prefect", "great-expectations", "mlflow",
    "mlflow-skinny", "scikit-learn", "pandas", "hypothesis", "import-linter",
}  # fmt: skip
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")  # oldest supported-ish and newest the schema ships


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[_normal(name)] = version
    return pins


@pytest.fixture(scope="module")
def serve_pins(project_root) -> dict[str, str]:
    return _pins(project_root / "requirements-serve.lock")


def test_the_bento_installs_the_serving_lock(project_root):
    bentofile = yaml.safe_load((project_root / "bentofile.yaml").read_text())
    assert bentofile["python"]["requirements_txt"] == "requirements-serve.lock"


def test_serving_pins_are_the_tested_versions_and_hold_no_tooling(project_root, serve_pins):
    full = _pins(project_root / "requirements.lock")
    # pip freeze leaves out setuptools and wheel, which TensorFlow's metadata requires
    differing = {n: v for n, v in serve_pins.items() if n in full and full[n] != v}
    assert not differing, f"run `make serve-lock`: {differing}"
    assert set(serve_pins) - set(full) <= {"setuptools", "wheel"}
    assert not NOT_SERVING & set(serve_pins)
    wanted = {
        _normal(Requirement(line).name)
        for line in (project_root / "requirements-serve.in").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert wanted <= set(serve_pins)


def test_serving_lock_is_closed(serve_pins):
    """Each pinned package's own requirements (markers for this Python and platform, no
    extras) are pinned too, so the image's install resolves nothing."""
    missing = set()
    for name in serve_pins:
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue  # setuptools/wheel are not installed as distributions in every venv
        for spec in map(Requirement, requires):
            applies = spec.marker is None or spec.marker.evaluate({"extra": ""})
            if applies and _normal(spec.name) not in serve_pins:
                missing.add(f"{name} -> {spec.name}")
    assert not missing


# -- Kubernetes ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def manifests(project_root) -> dict[str, dict]:
    docs = yaml.safe_load_all((project_root / "deploy" / "kubernetes.yaml").read_text())
    return {doc["kind"]: doc for doc in docs}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_manifest_is_valid_kubernetes(manifests, version):
    import kubernetes_validate

    assert set(manifests) == {"Deployment", "Service"}
    for doc in manifests.values():
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_schema_check_catches_a_misspelt_field(manifests):
    import kubernetes_validate

    broken = copy.deepcopy(manifests["Deployment"])
    probe = broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    probe["httpGet"]["paht"] = probe["httpGet"].pop("path")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)


def test_manifest_matches_the_image_and_reaches_its_pods(manifests):
    from bentoml._internal.container.generate import DEFAULT_BENTO_ENVS

    deployment, service = manifests["Deployment"], manifests["Service"]
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == 3000  # BentoML's serving port in the image
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert pod["spec"]["securityContext"]["runAsUser"] == DEFAULT_BENTO_ENVS["uid_gid"]
    resources = container["resources"]
    assert resources["requests"]["cpu"] and resources["requests"]["memory"]
    assert resources["limits"]["memory"]

    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= set(ports)
