"""Servers that tests start as real processes: a free port, waiting for readiness, stopping
the whole process group (a server's workers included)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_ready(
    process: subprocess.Popen, url: str, log: Path, what: str, timeout_s: float
) -> None:
    """Poll `url` until it answers 200; fail with `log` when `process` exits or time runs out."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise AssertionError(f"the {what} exited ({process.returncode}):\n{log.read_text()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise AssertionError(f"the {what} was not ready in time:\n{log.read_text()}")
        time.sleep(1)


def stop_group(process: subprocess.Popen, grace_s: float = 30) -> None:
    """SIGTERM the process group started with `start_new_session=True`, SIGKILL after
    `grace_s`."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@contextlib.contextmanager
def mlflow_server(store: Path, log: Path, timeout_s: float = 180, **popen):
    """A real `mlflow server` (one worker) on a sqlite store in `store`, serving artifacts from
    `store`/`artifacts_dir`; yields its URI and stops it on exit. `popen` goes to Popen (cwd,
    env)."""
    import sys

    artifacts = popen.pop("artifacts_dir", "artifacts")
    port = free_port()
    with log.open("wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)]
            + ["--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}"]
            + ["--artifacts-destination", str(store / artifacts), "--workers", "1"],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **popen,
        )
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(server, f"{uri}/health", log, "MLflow server", timeout_s)
        yield uri
    finally:
        stop_group(server)
