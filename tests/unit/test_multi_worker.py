"""`train.strategy: multi_worker`: two real worker processes on this host (TF_CONFIG), the
chief alone tracking and writing the model; TF_CONFIG mistakes as one-line errors."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from bonefrac.distributed import cluster_role
from bonefrac.errors import UserError

from .tiny_cache import write_tiny_cache

N_TRAIN, BATCH_SIZE, WORKERS = 16, 4, 2  # tiny_cache: 16 train rows (0..15), 8 val


def _tf_config(ports: list[int], index: int) -> str:
    workers = [f"localhost:{port}" for port in ports]
    return json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})


def _project(folder: Path, tracking_uri: str) -> Path:
    """A worker's own project folder (as on its own machine): params.yaml and the cache."""
    (folder / "artifacts" / "preprocessed").mkdir(parents=True)
    write_tiny_cache(folder / "artifacts" / "preprocessed", seed=3)
    params = {
        "data": {"parts": ["XR_HAND"]},
        "train": {
            "weights": "none",
            "strategy": "multi_worker",
            "batch_size": BATCH_SIZE,
            "head_epochs": 0,
            "finetune_epochs": 1,
            "augment": False,
            "bn_momentum": 0.6,
        },
        "tracking": {"tracking_uri": tracking_uri, "experiment": "multi-worker-test"},
    }
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    return folder / "params.yaml"


def _env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"MLFLOW_TRACKING_URI", "TF_CONFIG"} and not k.startswith("BONEFRAC_")
    }
    return {**env, "TF_CPP_MIN_LOG_LEVEL": "2", **extra}


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _train(params: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "bonefrac.cli", "--params", str(params), "train"]
    with log.open("w") as out:
        return subprocess.Popen([*command, "--model", "hand"], stdout=out, stderr=out, env=env)


def _wait_all(processes: list[subprocess.Popen], timeout: float) -> list[int]:
    """Exit codes; a worker that fails makes the others wait forever in a collective, so they
    are stopped once one has failed (or at the timeout)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        codes = [p.poll() for p in processes]
        if all(c is not None for c in codes) or any(c not in (None, 0) for c in codes):
            break
        time.sleep(1)
    for p in processes:
        if p.poll() is None:
            p.kill()
    return [p.wait() for p in processes]


@pytest.mark.slow
def test_two_workers_train_one_model_and_only_the_chief_tracks_it(tmp_path):
    import keras
    import numpy as np
    from mlflow.tracking import MlflowClient

    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    chief, other = tmp_path / "worker0", tmp_path / "worker1"
    scratch = tmp_path / "tmp1"  # worker 1's temporary folder, where it saves and deletes
    scratch.mkdir()
    ports = _free_ports(WORKERS)
    processes = [
        _train(
            _project(chief, tracking_uri),
            _env(TF_CONFIG=_tf_config(ports, 0)),
            tmp_path / "worker0.log",
        ),
        _train(
            _project(other, tracking_uri),
            _env(TF_CONFIG=_tf_config(ports, 1), TMPDIR=str(scratch)),
            tmp_path / "worker1.log",
        ),
    ]
    codes = _wait_all(processes, timeout=1200)
    logs = [(tmp_path / f"worker{i}.log").read_text() for i in range(WORKERS)]
    assert codes == [0, 0], "\n---\n".join(log[-3000:] for log in logs)

    # both took part: each ran every global step on its own half of the training images
    reports = [
        json.loads((folder / "artifacts/metrics" / f"train_worker_worker_{i}.json").read_text())
        for i, folder in enumerate((chief, other))
    ]
    assert [r["is_chief"] for r in reports] == [True, False]
    hand = [r["models"]["hand"] for r in reports]
    global_steps = -(-N_TRAIN // (BATCH_SIZE * WORKERS))  # one epoch at the global batch
    assert [h["steps"] for h in hand] == [global_steps, global_steps]
    rows = [set(h["train_rows"]) for h in hand]
    assert all(rows) and not rows[0] & rows[1]
    assert rows[0] | rows[1] == set(range(N_TRAIN))
    assert sum(len(r) for r in rows) == N_TRAIN
    # every worker logs the same (global) epoch metrics: they decide early stopping alike
    epoch_logs = [re.findall(r" - loss: \S+ .* - val_loss: \S+", log) for log in logs]
    assert epoch_logs[0] and epoch_logs[0] == epoch_logs[1]
    shown = f"hand: this worker ran {global_steps} steps on {N_TRAIN // WORKERS} training images"
    assert all(shown in log for log in logs)

    # the chief alone tracked: one parent run and one model run (with the model logged)
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("multi-worker-test")
    runs = client.search_runs([experiment.experiment_id])
    model_runs = [r for r in runs if r.data.tags.get("bonefrac.model") == "hand"]
    assert len(runs) == 2 and len(model_runs) == 1
    assert model_runs[0].data.tags["bonefrac.tf_task"] == "worker:0"
    logged = client.search_logged_models([experiment.experiment_id])
    assert [m.source_run_id for m in logged] == [model_runs[0].info.run_id]
    runs_json = json.loads((chief / "artifacts/models/runs.json").read_text())
    assert runs_json["hand"] == model_runs[0].info.run_id

    # the chief wrote the model; the other worker saved into its temporary folder and removed it
    model = keras.models.load_model(chief / "artifacts/models/hand/model.keras")
    assert model.predict(np.zeros((1, 32, 32, 3), np.float32), verbose=0).shape == (1, 1)
    assert not (other / "artifacts/models").exists()
    assert not list(other.rglob("*.keras")) and not list(scratch.rglob("*.keras"))
    assert not list(scratch.glob("bonefrac-*"))


def test_chief_follows_tensorflow_convention():
    workers = ["a:1", "b:2"]
    config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": 0}}
    assert cluster_role({"TF_CONFIG": json.dumps(config)}).is_chief
    config["cluster"]["chief"] = ["c:3"]  # with a chief, worker 0 is an ordinary worker
    role = cluster_role({"TF_CONFIG": json.dumps(config)})
    assert not role.is_chief and role.n_workers == 3
    config["task"] = {"type": "chief", "index": 0}
    assert cluster_role({"TF_CONFIG": json.dumps(config)}).is_chief


@pytest.mark.parametrize(
    ("tf_config", "message"),
    [
        (None, "needs the TF_CONFIG environment variable"),
        ("{cluster: worker}", "TF_CONFIG is not valid JSON"),
        ('{"cluster": {"worker": ["a:1"]}}', "needs a 'cluster' and a 'task'"),
        ('{"cluster": {"worker": "a:1"}, "task": {"type": "worker", "index": 0}}', "host:port"),
        ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 1}}', "outside"),
        ('{"cluster": {"ps": ["a:1"]}, "task": {"type": "ps", "index": 0}}', "only chief"),
    ],
)
def test_bad_tf_config_is_one_sentence(tf_config, message):
    with pytest.raises(UserError, match=message) as info:
        cluster_role({} if tf_config is None else {"TF_CONFIG": tf_config})
    assert "\n" not in str(info.value)


def test_cli_bad_tf_config_exits_2_without_traceback(tmp_path):
    """Fast: the check comes before TensorFlow, the cache or MLflow are touched."""
    params = _project(tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}")
    for env in (_env(TF_CONFIG='{"cluster": '), _env()):
        result = subprocess.run(
            [sys.executable, "-m", "bonefrac.cli", "--params", str(params), "train"],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert result.returncode == 2
        assert result.stderr.startswith("bonefrac: error: ") and "TF_CONFIG" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
        assert "tensorflow" not in result.stderr.lower()
    assert not (tmp_path / "mlflow.db").exists()
