"""`bonefrac serve` stops when told to: SIGTERM to the PID we started (what systemd,
supervisors and `kill` send) stops the server and frees its port; nothing is left serving.

The one extra server of the suite: it reuses the session server's BentoML home (the bundle is
already imported there) and is stopped as soon as it listens, so it never loads the models.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.processes import free_port

pytestmark = pytest.mark.slow
LISTEN_TIMEOUT_S = 300  # `bonefrac serve` + BentoML's arbiter start on 2 busy cores
GRACE_S = 60  # what a supervisor would wait after SIGTERM before SIGKILL


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def test_sigterm_to_bonefrac_serve_frees_the_port(server, tmp_path):
    port = free_port()
    env = {
        **os.environ,
        "BENTOML_HOME": str(server.bentoml_home),
        "BENTOML_DO_NOT_TRACK": "true",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    command = [sys.executable, "-m", "bonefrac.cli", "--params", str(server.params), "serve",
               "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        deadline = time.monotonic() + LISTEN_TIMEOUT_S
        while not _accepts(port):
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the server never listened:\n" + log.read_text()
            time.sleep(0.5)
        process.send_signal(signal.SIGTERM)  # the PID we started, not its process group
        process.wait(timeout=GRACE_S)
        deadline = time.monotonic() + GRACE_S
        while _accepts(port) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _accepts(port), "the port is still served after SIGTERM"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # whatever is left of the group
        process.wait()
