"""The Bento's OCI image, built on this machine by `deploy/container.sh` (what `make container`
runs: local base image, `bentoml build`, `bentoml containerize --backend buildah`) from the
test bundle, then run: /readyz answers and /predict returns what the Predictor computes here.

`podman run` cannot start containers on these machines (setrlimit RLIMIT_NOFILE: operation
not permitted), so the image's entrypoint runs under `buildah run --isolation chroot` with the
host's network, which is what README "Scaling out and deploying" documents. Marked `container`
(a few minutes: the first build downloads ~600 MB of wheels): `pytest -m "not container"`
skips it in a quick local loop; `make test` runs it.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.processes import free_port, wait_until_ready

from .conftest import STARTUP_TIMEOUT_S

pytestmark = [pytest.mark.slow, pytest.mark.container]

ENTRYPOINT = "/home/bentoml/bento/env/docker/entrypoint.sh"  # BentoML's, from the Dockerfile
MARKER = "BONEFRAC_CONTAINER_RUN"  # tags the container's processes so teardown finds them all


def _buildah(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(["buildah", *args], check=True, capture_output=True, text=True, **kwargs)


@pytest.fixture(scope="module")
def image(tmp_path_factory, bundle_dir, project_root):
    """`deploy/container.sh` on the test bundle, in a fresh BentoML home; the image is removed
    afterwards (its base image and cached layers stay, so the next build is warm)."""
    home = tmp_path_factory.mktemp("container")
    env = {
        **os.environ,
        "BENTOML_HOME": str(home / "bentoml"),
        "BENTOML_DO_NOT_TRACK": "true",
        "BIN": str(Path(sys.executable).parent),
    }
    store = (
        "import sys, pathlib, bonefrac.bundle as b; b.save_to_bentoml(pathlib.Path(sys.argv[1]))"
    )
    subprocess.run([sys.executable, "-c", store, str(bundle_dir)], check=True, env=env)
    tag = f"localhost/bonefrac-test:{uuid.uuid4().hex[:8]}"
    log = home / "build.log"
    with log.open("w") as out:
        built = subprocess.run(
            [str(project_root / "deploy" / "container.sh"), tag],
            cwd=project_root,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    text = log.read_text(errors="replace")
    print("\n".join(line for line in text.splitlines() if line.startswith("container:")))
    assert built.returncode == 0, text[-4000:]
    try:
        yield tag
    finally:
        subprocess.run(["buildah", "rmi", tag], capture_output=True)


def _container_pids(marker: str) -> list[int]:
    """Every process started in the container (BentoML's workers start their own sessions, so
    a process group does not reach them)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if f"{MARKER}={marker}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


def _stop(marker: str, process: subprocess.Popen) -> None:
    for sig, grace_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        for pid in _container_pids(marker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while _container_pids(marker) and time.monotonic() < deadline:
            time.sleep(0.5)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def container(image, tmp_path_factory):
    """The image's own entrypoint (`bentoml serve` of the Bento) on a free port."""
    name = f"bonefrac-test-{uuid.uuid4().hex[:8]}"
    marker = uuid.uuid4().hex
    port = free_port()
    _buildah("from", "--name", name, image)
    log = tmp_path_factory.mktemp("container-run") / "container.log"
    command = [
        "buildah", "run", "--isolation", "chroot", "--network", "host",
        "--env", f"PORT={port}",  # the entrypoint's port override
        "--env", "BONEFRAC_PROFILE=quick",  # the demo profile serves the draft guidance
        "--env", f"{MARKER}={marker}",
        name, "--", ENTRYPOINT,
    ]  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(process, f"{url}/readyz", log, "container", STARTUP_TIMEOUT_S)
        yield url
    finally:
        _stop(marker, process)
        subprocess.run(["buildah", "rm", name], capture_output=True)


def test_the_image_holds_no_training_or_test_tools(image):
    """The serving-only requirement set is what the image installed (requirements-serve.lock)."""
    name = f"bonefrac-test-{uuid.uuid4().hex[:8]}"
    _buildah("from", "--name", name, image)
    names = "print(' '.join(d.metadata['Name'] for d in m.distributions()))"
    try:
        listed = _buildah(
            "run", "--isolation", "chroot", name, "--",
            "/app/.venv/bin/python", "-c", f"import importlib.metadata as m; {names}",
        ).stdout.split()  # fmt: skip
    finally:
        subprocess.run(["buildah", "rm", name], capture_output=True)
    listed = {re.sub(r"[-_.]+", "-", name).lower() for name in listed}
    assert {"bentoml", "tensorflow-cpu", "keras", "pydicom"} <= listed
    assert not {"pytest", "selenium", "ruff", "dvc", "prefect", "mlflow", "great-expectations",
                "pandas", "scikit-learn"} & listed  # fmt: skip


def test_the_container_answers_ready_and_predicts(container, predictor, good_png):
    assert httpx.get(f"{container}/readyz", timeout=10).status_code == 200
    data = good_png.read_bytes()
    response = httpx.post(
        f"{container}/predict", files={"image": (good_png.name, data, "image/png")}, timeout=300
    )
    assert response.status_code == 200, response.text
    served = response.json()
    expected = predictor.predict_bytes(data)  # the same bundle, loaded here
    assert served["body_part"]["label"] == expected["body_part"]["label"]
    assert served["fracture"]["model"] == expected["fracture"]["model"]
    assert served["fracture"]["threshold"] == expected["fracture"]["threshold"]
    assert served["fracture"]["probability"] == pytest.approx(
        expected["fracture"]["probability"], abs=1e-5
    )
    assert served["disclaimer"] == expected["disclaimer"]
    assert served["synthetic_models"] is True
