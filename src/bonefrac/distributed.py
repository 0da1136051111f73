"""Training across processes or machines: `train.strategy: multi_worker`.

Every worker runs the same command (`bonefrac train`) with its own TF_CONFIG, e.g. for two
workers on one host:

    TF_CONFIG='{"cluster": {"worker": ["localhost:12345", "localhost:12346"]},
                "task": {"type": "worker", "index": 0}}'

TensorFlow's convention names the chief: the task of type "chief", or worker 0 when the
cluster has no chief. Only the chief tracks (MLflow runs, logged models) and writes the
models folder; the others train in lock-step and save into a temporary folder they delete,
because saving reads the distributed variables, which every worker must take part in.

Batch size: `train.batch_size` is per replica (one replica per worker on CPU, per GPU
otherwise), so a step's global batch is batch_size x replicas. Each worker reads only its
own share of the training rows (rows i, i+W, i+2W, ... for worker i of W), so no image is
decoded, augmented or trained on twice in an epoch.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from bonefrac.errors import UserError

TF_CONFIG = "TF_CONFIG"
_EXAMPLE = (
    '{"cluster": {"worker": ["host1:12345", "host2:12345"]}, "task": {"type": "worker", '
    '"index": 0}}'
)


@dataclass(frozen=True)
class ClusterRole:
    """This process's place in the TF_CONFIG cluster."""

    task_type: str
    task_index: int
    n_workers: int  # chief + workers: the processes that train
    is_chief: bool
    input_index: int  # TensorFlow's id in the cluster: the chief 0, then the workers

    @property
    def name(self) -> str:
        return f"{self.task_type}:{self.task_index}"


def cluster_role(environ: dict[str, str] | None = None) -> ClusterRole:
    """Parse and check TF_CONFIG; one-sentence UserError when it is missing or malformed."""
    raw = (os.environ if environ is None else environ).get(TF_CONFIG, "").strip()
    if not raw:
        raise UserError(
            f"train.strategy multi_worker needs the TF_CONFIG environment variable on every "
            f"worker, e.g. {_EXAMPLE}"
        )
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise UserError(f"TF_CONFIG is not valid JSON ({exc.msg}): e.g. {_EXAMPLE}") from None
    cluster = config.get("cluster") if isinstance(config, dict) else None
    task = config.get("task") if isinstance(config, dict) else None
    if not isinstance(cluster, dict) or not isinstance(task, dict):
        raise UserError(f"TF_CONFIG needs a 'cluster' and a 'task' object: e.g. {_EXAMPLE}")
    for kind, addresses in cluster.items():
        if kind not in {"chief", "worker"}:
            raise UserError(f"TF_CONFIG cluster has a {kind!r} job: only chief and worker train")
        if not isinstance(addresses, list) or not all(
            isinstance(a, str) and a.rpartition(":")[2].isdigit() for a in addresses
        ):
            raise UserError(f"TF_CONFIG cluster.{kind} must be a list of 'host:port' strings")
    if len(cluster.get("chief", [])) > 1:
        raise UserError("TF_CONFIG cluster has more than one chief: name one chief at most")
    task_type, index = task.get("type"), task.get("index")
    if task_type not in cluster or not isinstance(index, int) or isinstance(index, bool):
        raise UserError(
            f"TF_CONFIG task must name a job of the cluster ({', '.join(cluster)}) and an "
            "integer index"
        )
    if not 0 <= index < len(cluster[task_type]):
        raise UserError(
            f"TF_CONFIG task index {index} is outside cluster.{task_type} "
            f"({len(cluster[task_type])} addresses)"
        )
    n_workers = sum(len(a) for a in cluster.values())
    is_chief = task_type == "chief" or (
        task_type == "worker" and index == 0 and "chief" not in cluster
    )
    input_index = index if task_type == "chief" else index + len(cluster.get("chief", []))
    return ClusterRole(task_type, index, n_workers, is_chief, input_index)


def worker_datasets(strategy, cache, train, val, cfg, weights, rows_read: list[int], make_dataset):
    """multi_worker input: worker i of W (its id in the cluster, chief first) reads rows i,
    i+W, i+2W, ... only, so no image is read, augmented or trained on by two workers.

    Keras hands the dataset to `strategy.experimental_distribute_dataset` with auto-sharding
    off, and each step takes one batch of this worker's own rows: batched at batch_size (one
    replica per worker on CPU), the global batch is batch_size x W. Class weights travel as
    sample weights. `make_dataset` is `bonefrac.train.make_dataset` (passed in: this module
    must not import the training code, which imports it)."""
    import dataclasses

    import numpy as np
    import tensorflow as tf

    role = cluster_role()
    i, n = role.input_index, role.n_workers
    local_batch = cfg.batch_size * strategy.num_replicas_in_sync // n  # per-replica x local
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF

    def share(data):
        rows, targets, labels = data.rows[i::n], data.targets[i::n], data.labels[i::n]
        return dataclasses.replace(data, rows=rows, targets=targets, labels=labels)

    part = share(train)
    sample_weights = None
    if weights is not None:
        sample_weights = np.array([weights[int(label)] for label in part.labels], np.float32)
    train_ds = make_dataset(
        cache,
        part,
        local_batch,
        True,
        cfg.augment,
        cfg.seed,
        cfg.deterministic,
        cfg.rotation_degrees,
        sample_weights=sample_weights,
        on_read=rows_read.append,
    ).with_options(options)
    val_ds = None
    if len(val.rows):
        val_ds = make_dataset(
            cache, share(val), local_batch, False, deterministic=cfg.deterministic
        ).with_options(options)
    return train_ds, val_ds


def build_for_fit(model, strategy, dataset) -> None:
    """Build the compiled model from the dataset's element spec, before `fit`.

    Keras 3.15's `fit` otherwise learns the shapes by reducing a first batch across replicas,
    and under MultiWorkerMirroredStrategy that reduce fails for a batch tuple ("Attempt to
    convert a value (PerReplica...) to a Tensor"); so the model is built here and that step
    skipped (call again after each compile). Both workarounds touch Keras internals and only
    under multi_worker: recheck them when Keras is upgraded (the two-worker test fails if
    they break)."""
    with strategy.scope():
        model._symbolic_build(data_batch=dataset.element_spec)
    model._maybe_symbolic_build = lambda iterator=None, data_batch=None: None
    # Second Keras 3.15 bug: each step's logs (scalars, already reduced over all workers by
    # the synced metrics) are reduced again across workers with MEAN over axis 0, which fails
    # for a scalar ("Invalid reduction dimension 0 for input with 0 dimensions"). Taking the
    # local replicas' mean instead gives every worker the same logs (checked by the test).
    from keras.src.backend.tensorflow import trainer as tf_trainer

    tf_trainer._collective_all_reduce_multi_worker = lambda strategy: False


def write_worker_report(settings, role: ClusterRole, results: dict) -> Path:
    """What this worker trained, per model: steps run and the training rows it read
    (<artifacts>/metrics/train_worker_<type>_<index>.json; one line each on stdout too)."""
    report = {
        "task": role.name,
        "is_chief": role.is_chief,
        "workers": role.n_workers,
        "models": {
            name: {
                "steps": result.steps,
                "train_rows": result.rows_read,
                "seconds": round(result.seconds, 1),
            }
            for name, result in results.items()
        },
    }
    folder = settings.layout.metrics
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"train_worker_{role.task_type}_{role.task_index}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path
