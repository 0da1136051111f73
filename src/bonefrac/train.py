"""Training: tf.data from the preprocessed cache, two-phase fine-tuning, MLflow logging.

The train stage fits the body-part model and one fracture model per configured part, each
in its own nested MLflow run under one parent run per pipeline run.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bonefrac.cache import Cache, load_cache
from bonefrac.config import OTHER, Settings, TrainConfig, body_part_class, body_part_classes
from bonefrac.data.mura import body_part_name
from bonefrac.errors import DataError
from bonefrac.models import BODY_PART_MODEL
from bonefrac.tracking import RUN_FILE, read_runs  # runs.json: written here, read downstream


def model_names(settings: Settings) -> list[str]:
    """'body_part' then one fracture model per configured part ('elbow', 'hand', ...)."""
    return [BODY_PART_MODEL, *(body_part_name(p) for p in settings.data.parts)]


@dataclass(frozen=True)
class TaskData:
    """Rows of the cache and targets for one model and one split."""

    rows: np.ndarray  # cache positions
    targets: np.ndarray  # (n, 1) float for fracture, (n, classes) one-hot for body part
    labels: np.ndarray  # (n,) int class index / 0-1 label
    classes: list[str]


def task_data(cache: Cache, name: str, split: str, parts: list[str]) -> TaskData:
    if name == BODY_PART_MODEL:  # `parts`: its classes, "other" last when it has one
        rows = cache.rows(split=split, other=OTHER in parts)
        part_of_row = cache.index["body_part"].to_numpy()[rows]
        labels = np.array(
            [parts.index(body_part_class(p, parts)) for p in part_of_row], dtype=np.int64
        )
        if split == "train" and OTHER in parts and not (labels == parts.index(OTHER)).any():
            raise DataError(
                "the body-part model's 'other' class has no training images: add MURA's other "
                "parts (data.other_parts) to the data, or set data.other_parts: [] to go without"
            )
        targets = np.eye(len(parts), dtype=np.float32)[labels]
        return TaskData(rows, targets, labels, list(parts))
    rows = cache.rows(split=split, body_part=name)
    labels = cache.index["label"].to_numpy()[rows].astype(np.int64)
    return TaskData(rows, labels.astype(np.float32)[:, None], labels, ["normal", "abnormal"])


def augmenter(seed: int, rotation_degrees: float = 30.0):
    """Label-preserving changes: lateral flip and rotation up to ±`rotation_degrees` (the MURA
    baseline's augmentation), small zoom, brightness and contrast changes."""
    import keras

    return keras.Sequential(
        [
            keras.layers.RandomFlip("horizontal", seed=seed),
            # Keras expresses the angle as a fraction of a full turn
            keras.layers.RandomRotation(rotation_degrees / 360, fill_mode="constant", seed=seed),
            keras.layers.RandomZoom(0.1, fill_mode="constant", seed=seed),
            keras.layers.RandomBrightness(0.1, value_range=(0, 255), seed=seed),
            keras.layers.RandomContrast(0.1, seed=seed),
        ],
        name="augment",
    )


def make_dataset(
    cache: Cache,
    data: TaskData,
    batch_size: int,
    training: bool,
    augment: bool = False,
    seed: int = 42,
    deterministic: bool = True,
    rotation_degrees: float = 30.0,
    sample_weights: np.ndarray | None = None,
    on_read: Callable[[int], None] | None = None,
):
    """rows -> images read from the memory-mapped cache, cached in memory,
    shuffled and augmented for training only, batched, prefetched.

    `deterministic` runs every map in order. The augmentation layers draw from one stateful
    seed generator: in a parallel map, which batch gets which draw depends on thread timing
    (a few ms a batch next to a ResNet50 step). The other maps: under op determinism
    tf.data runs every map of a pipeline holding a stateful function (the cache read's
    numpy_function) in order anyway, rewriting each with a C++ ERROR line ("NodeDef mentions
    attribute use_unbounded_threadpool"); asking for order up front does the same work quietly.

    `sample_weights` (one per row) makes elements (x, y, weight); `on_read` is called with
    each cache row as it is read (once per row: the images are cached after the first pass)."""
    import tensorflow as tf

    calls = None if deterministic else tf.data.AUTOTUNE  # parallel maps keep input order
    size = cache.image_size
    images = cache.images

    def read(row):
        if on_read is not None:
            on_read(int(row))
        return np.asarray(images[int(row)])

    columns = (data.rows, data.targets)
    if sample_weights is not None:
        columns = (*columns, sample_weights)
    ds = tf.data.Dataset.from_tensor_slices(columns)
    ds = ds.map(
        lambda row, *rest: (
            tf.ensure_shape(tf.numpy_function(read, [row], tf.uint8), (size, size)),
            *rest,
        ),
        num_parallel_calls=calls,
    ).cache()
    if training:
        ds = ds.shuffle(len(data.rows), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size).map(
        lambda x, *rest: (tf.repeat(tf.cast(x, tf.float32)[..., tf.newaxis], 3, axis=-1), *rest),
        num_parallel_calls=calls,
    )
    if training and augment:
        layers = augmenter(seed, rotation_degrees)
        ds = ds.map(
            lambda x, *rest: (tf.clip_by_value(layers(x, training=True), 0.0, 255.0), *rest),
            num_parallel_calls=calls,
        )
    return ds.prefetch(tf.data.AUTOTUNE)


def class_weights(labels: np.ndarray, n_classes: int) -> dict[int, float] | None:
    from sklearn.utils.class_weight import compute_class_weight

    present = np.unique(labels)
    if len(present) < 2:
        return None
    weights = compute_class_weight("balanced", classes=present, y=labels)
    out = {int(c): 1.0 for c in range(n_classes)}
    out.update({int(c): float(w) for c, w in zip(present, weights, strict=True)})
    return out


@dataclass
class TrainResult:
    name: str
    model_path: Path
    history: dict[str, list[float]]
    best_epoch: int
    seconds: float
    images_per_second: float
    run_id: str | None = None
    model_uri: str | None = None  # the MLflow logged model (models:/m-...)
    val_metrics: dict[str, float] = field(default_factory=dict)
    # one entry per phase that ran: name, epochs, learning rate, trainable weights/parameters
    phases: list[dict] = field(default_factory=list)
    steps: int = 0  # training steps this process ran, all phases
    rows_read: list[int] = field(default_factory=list)  # multi_worker: this worker's train rows
    # the saved inference model, in memory, when fit_model was asked to keep it
    model: Any = field(default=None, repr=False, compare=False)


# AUC and accuracy cannot exceed 1; float32 metrics land within this of it
CEILING_TOLERANCE = 1e-6


class _BestWeights:
    """Keeps the weights of the best epoch across both phases (phase 2 starts from phase 1's
    weights and may never beat them), by the monitored validation metric.

    Only a strictly better epoch replaces the kept one, so once a monitored AUC or accuracy
    reaches 1.0 no later epoch can be chosen: training stops there (`ceiling_epoch`), with the
    model it would have kept after any number of further epochs."""

    @staticmethod
    def make(monitor: str, mode: str, offset: list[int]):
        import keras

        class Callback(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.best_value: float | None = None
                self.best_epoch = 0
                self.weights = None
                self.ceiling_epoch: int | None = None

            def on_epoch_end(self, epoch, logs=None):
                value = (logs or {}).get(monitor)
                if value is None or not np.isfinite(value):
                    return
                better = self.best_value is None or (
                    value > self.best_value if mode == "max" else value < self.best_value
                )
                if better:
                    self.best_value, self.best_epoch = float(value), offset[0] + epoch
                    self.weights = self.model.get_weights()
                if (
                    mode == "max"
                    and not monitor.endswith("loss")
                    and value >= 1 - CEILING_TOLERANCE
                ):
                    self.ceiling_epoch = offset[0] + epoch
                    self.model.stop_training = True

            def restore(self) -> int:
                if self.weights is not None:
                    self.model.set_weights(self.weights)
                return self.best_epoch

        return Callback()


class _MlflowEpochs:
    """Keras callback factory that logs every epoch's metrics to the active MLflow run."""

    @staticmethod
    def make(offset: list[int]):
        import keras
        import mlflow

        class Callback(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                logs = {k: float(v) for k, v in (logs or {}).items() if np.isfinite(v)}
                if mlflow.active_run() is not None and logs:
                    mlflow.log_metrics(logs, step=offset[0] + epoch)

        return Callback()


class _StepCounter:
    """Counts the training steps this process runs (per worker under multi_worker)."""

    @staticmethod
    def make():
        import keras

        class Callback(keras.callbacks.Callback):
            count = 0

            def on_train_batch_end(self, batch, logs=None):
                self.count += 1

        return Callback()


def inference_model(model, name: str | None = None):
    """The trained network without optimizer state (a third of the file size): what the
    registry and the service need; `name` renames it (a reused traced model carries the name
    of the model it was first built for).

    Rebuilt from its config, not `keras.models.clone_model`: in Keras 3 a clone of a
    compiled model is compiled too, and saving it writes Adam's two moment copies of every
    weight (283 MB instead of 95 MB per ResNet50, five copies per model per pipeline run)."""
    import keras

    config = model.get_config()
    if name is not None:
        config = {**config, "name": name}
    clone = keras.Model.from_config(config)
    clone.set_weights(model.get_weights())
    return clone


class _TracedModels:
    """Compiled models whose training and validation steps TensorFlow has already traced,
    kept for the next model of the same shape in this process.

    A ResNet50's first epoch costs ~16 s more than its later ones at 64 px on 2 cores: the
    Python trace of the training step (Adam's update alone creates ~4,000 graph ops), the
    validation step's trace, then Grappler's optimisation of both. The three fracture models
    share one architecture, so the second and third would pay it again for the same graph.
    Instead a phase takes a kept model compiled with the same architecture, trainable weights
    and optimizer settings, gives it the new model's state (every variable, random seed states
    included) and the optimizer's state as it was just after compiling (zero moments, step 0,
    the phase's learning rate), and fits that: the same computation as a fresh model, without
    the trace (tests/unit/test_train_reuse.py checks the weights are identical).

    A model is kept only after its fit finished (a failed one is dropped), one per shape and
    `KEEP` shapes at most (a ResNet50 with Adam's moments holds ~300 MB), and taken out while
    in use, so parallel trainings never share one. `train.strategy: default` only: a
    distribution strategy's variables belong to that strategy object."""

    KEEP = 2  # the body part's shape and the fracture models' one

    def __init__(self) -> None:
        import threading

        self._kept: dict[str, tuple[Any, list[np.ndarray]]] = {}  # oldest first
        self._lock = threading.Lock()

    @staticmethod
    def key(model, n_outputs: int, learning_rate: float, cfg: TrainConfig) -> str | None:
        if cfg.strategy != "default":
            return None
        import re

        def plain(value):  # Keras numbers repeated auto-names: input_layer_1, seed_generator_2
            if isinstance(value, str):
                return re.sub(r"_\d+(?=$|/)", "", value)
            if isinstance(value, dict):
                return {k: plain(v) for k, v in value.items()}
            if isinstance(value, list | tuple):
                return [plain(v) for v in value]
            return value

        config = {k: v for k, v in model.get_config().items() if k != "name"}
        return json.dumps(
            plain(
                {
                    "config": config,
                    "variables": [(v.path, v.shape, str(v.dtype)) for v in model.variables],
                    "trainable": [v.path for v in model.trainable_variables],
                }
            )
            | {
                "pretrained": getattr(model, "backbone_pretrained", None),
                "compile": [n_outputs, learning_rate, str(cfg.jit_compile)],
            },
            sort_keys=True,
            default=str,
        )

    def compiled(self, model, n_outputs: int, learning_rate: float, cfg: TrainConfig):
        """`model`, compiled for a phase (call after `set_phase`, under the strategy's scope):
        a kept traced model given `model`'s state when one fits, else `model` compiled."""
        from bonefrac.models import compile_model

        key = self.key(model, n_outputs, learning_rate, cfg)
        with self._lock:
            kept = self._kept.pop(key, None) if key is not None else None
        if kept is None:
            compile_model(model, n_outputs, learning_rate, cfg.jit_compile)
            model._bonefrac_reuse = (key, [v.numpy() for v in model.optimizer.variables])
            return model
        traced, optimizer_start = kept
        for target, source in zip(traced.variables, model.variables, strict=True):
            target.assign(source)
        for variable, value in zip(traced.optimizer.variables, optimizer_start, strict=True):
            variable.assign(value)
        traced.backbone_pretrained = getattr(model, "backbone_pretrained", True)
        traced._bonefrac_reuse = (key, optimizer_start)
        return traced

    def keep(self, model) -> None:
        """`model`'s fit finished: keep it for the next model of its shape."""
        key, optimizer_start = getattr(model, "_bonefrac_reuse", (None, None))
        if key is not None:
            with self._lock:
                self._kept.pop(key, None)
                self._kept[key] = (model, optimizer_start)
                while len(self._kept) > self.KEEP:
                    del self._kept[next(iter(self._kept))]

    def clear(self) -> None:
        with self._lock:
            self._kept.clear()


TRACED = _TracedModels()


def fit_model(
    cache: Cache,
    name: str,
    parts: list[str],
    cfg: TrainConfig,
    out_dir: Path,
    log_to_mlflow: bool = False,
    callbacks: list | None = None,
    keep_model: bool = False,
    reuse: bool = True,
) -> TrainResult:
    """Train one model (two phases), keep the best weights, save `out_dir/model.keras`.

    `callbacks`: extra Keras callbacks, given to every phase's `fit` (each phase is one fit
    call, so `on_train_begin`/`on_train_end` mark the phase boundaries). `keep_model`: the
    result carries the saved model too (`result.model`), so the caller need not load it.
    `reuse`: fit on a kept model already traced for this shape (`_TracedModels`)."""
    import keras
    import tensorflow as tf

    from bonefrac.models import (
        build_classifier,
        compile_model,
        make_strategy,
        own_seed_draws,
        set_phase,
        set_random_seed,
    )

    set_random_seed(cfg.seed)  # keras.utils', keeping traced steps' kernels when it can
    if cfg.deterministic:
        # process-wide and one-way: this process's later TF work is deterministic too
        tf.config.experimental.enable_op_determinism()
    train = task_data(cache, name, "train", parts)
    val = task_data(cache, name, "val", parts)
    if len(train.rows) == 0:
        raise DataError(f"no training images for model {name!r}: check the manifest's splits")
    if len(np.unique(train.labels)) < 2:
        raise DataError(f"model {name!r} has only one class in its training images")
    n_outputs = 1 if name != BODY_PART_MODEL else len(parts)
    if cfg.mixed_precision and tf.config.list_physical_devices("GPU"):
        keras.mixed_precision.set_global_policy("mixed_float16")

    strategy = make_strategy(cfg.strategy)
    # train.batch_size is per replica: one step's global batch is batch_size x replicas
    batch_size = cfg.batch_size * strategy.num_replicas_in_sync
    weights = class_weights(train.labels, max(n_outputs, 2)) if cfg.class_weights else None
    rows_read: list[int] = []
    if cfg.strategy == "multi_worker":
        from bonefrac.distributed import worker_datasets

        train_ds, val_ds = worker_datasets(
            strategy, cache, train, val, cfg, weights, rows_read, make_dataset
        )
        weights = None  # carried in the datasets as sample weights
    else:
        train_ds = make_dataset(
            cache,
            train,
            batch_size,
            True,
            cfg.augment,
            cfg.seed,
            cfg.deterministic,
            cfg.rotation_degrees,
        )
        val_ds = None
        if len(val.rows):
            val_ds = make_dataset(cache, val, batch_size, False, deterministic=cfg.deterministic)
    monitor_metric = "loss" if cfg.monitor == "loss" else "auc" if n_outputs == 1 else "accuracy"
    monitor = f"val_{monitor_metric}" if val_ds is not None else "loss"
    mode = "min" if monitor.endswith("loss") else "max"

    with strategy.scope(), own_seed_draws(cfg.seed):  # the same weights whatever threads do
        model = build_classifier(n_outputs, cache.image_size, cfg, name=f"bonefrac_{name}")

    history: dict[str, list[float]] = {}
    epoch_offset = [0]
    best = _BestWeights.make(monitor, mode, epoch_offset)
    phases = [
        ("head", cfg.head_epochs, cfg.head_learning_rate),
        ("finetune", cfg.finetune_epochs, cfg.finetune_learning_rate),
    ]
    start = time.perf_counter()
    images_seen = 0
    phase_log: list[dict] = []
    steps = _StepCounter.make()
    used: list = []  # the compiled model of each phase that ran
    for phase, epochs, learning_rate in phases:
        if epochs <= 0 or best.ceiling_epoch is not None:
            continue
        set_phase(model, phase, cfg)
        with strategy.scope():
            model = TRACED.compiled(model, n_outputs, learning_rate, cfg) if reuse else model
            if not reuse:
                compile_model(model, n_outputs, learning_rate, cfg.jit_compile)
        used.append(model)
        phase_callbacks = [
            best,
            keras.callbacks.EarlyStopping(monitor=monitor, mode=mode, patience=cfg.patience),
            keras.callbacks.ReduceLROnPlateau(
                monitor=monitor, mode=mode, factor=cfg.lr_factor, patience=cfg.lr_patience
            ),
            steps,
            *(callbacks or []),
        ]
        if log_to_mlflow:
            phase_callbacks.append(_MlflowEpochs.make(epoch_offset))
        if cfg.strategy == "multi_worker":
            from bonefrac.distributed import build_for_fit

            build_for_fit(model, strategy, train_ds)
        fitted = model.fit(
            train_ds,
            validation_data=val_ds,
            shuffle=False,
            epochs=epochs,
            class_weight=weights,
            callbacks=phase_callbacks,
            verbose=2,
        )
        ran = len(fitted.history.get("loss", []))
        phase_log.append(
            {
                "phase": phase,
                "epochs": ran,
                "learning_rate": learning_rate,
                "jit_compile": bool(model.jit_compile),  # "auto" as Keras resolved it
                "trainable_weights": len(model.trainable_weights),
                "trainable_params": int(sum(np.prod(w.shape) for w in model.trainable_weights)),
            }
        )
        images_seen += ran * len(train.rows)
        for key, values in fitted.history.items():
            history.setdefault(key, []).extend(float(v) for v in values)
        epoch_offset[0] += ran
    seconds = time.perf_counter() - start
    best_epoch = best.restore()

    # the kept weights' validation numbers, as Keras logged them at that epoch
    val_metrics = {
        key.removeprefix("val_"): values[best_epoch]
        for key, values in history.items()
        if key.startswith("val_") and len(values) > best_epoch
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = out_dir / "model.keras"
    served = inference_model(model, name=f"bonefrac_{name}")
    for fitted_model in used:
        TRACED.keep(fitted_model)
    served.save(model_path)
    keras.mixed_precision.set_global_policy("float32")
    meta = {
        "name": name,
        "kind": "body_part" if name == BODY_PART_MODEL else "fracture",
        "classes": train.classes,
        "image_size": cache.image_size,
        "best_epoch": best_epoch,
        "history": history,
        "n_train": int(len(train.rows)),
        "n_val": int(len(val.rows)),
        "weights": cfg.weights,
        "monitor": monitor,
        # the epoch (from 0) whose monitored metric reached 1.0 and ended training, else null
        "stopped_at_ceiling": best.ceiling_epoch,
        "phases": phase_log,
        "val_metrics": val_metrics,
    }
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return TrainResult(
        name=name,
        model_path=model_path,
        history=history,
        best_epoch=best_epoch,
        seconds=seconds,
        images_per_second=images_seen / seconds if seconds else 0.0,
        val_metrics=val_metrics,
        phases=phase_log,
        steps=steps.count,
        rows_read=sorted(set(rows_read)),
        model=served if keep_model else None,
    )


def _log_model(model, cache: Cache, requirements: list[str]) -> str:
    """Log the trained model (as fit_model saved it) to the active run; returns its URI."""
    import mlflow
    from mlflow.models import infer_signature

    sample = cache.rgb(np.arange(min(2, len(cache.index)))).astype(np.float32)
    signature = infer_signature(sample, np.asarray(model(sample, training=False)))
    info = mlflow.keras.log_model(
        model, name="model", signature=signature, pip_requirements=requirements
    )
    return info.model_uri


def start_parent_run(settings: Settings, cache_key: str | None = None) -> str:
    """One MLflow parent run per pipeline run; returns its id (the run itself is ended:
    children attach to it by id, so threads and processes can train in parallel)."""
    import mlflow

    from bonefrac import tracking

    tracking.configure(settings)
    tags = tracking.provenance_tags(settings, cache_key)
    with mlflow.start_run(run_name=f"pipeline-{time.strftime('%Y%m%d-%H%M%S')}", tags=tags) as run:
        mlflow.log_params(settings.flat())
    mark_run(settings, run.info.run_id, "RUNNING")
    return run.info.run_id


def tag_run(settings: Settings, run_id: str, tags: dict[str, str]) -> None:
    """Set tags on a run that is not this thread's active run (the pipeline's parent)."""
    from mlflow.tracking import MlflowClient

    from bonefrac import tracking

    client = MlflowClient(tracking.tracking_uri(settings))
    for key, value in tags.items():
        client.set_tag(run_id, key, value)


def mark_run(settings: Settings, run_id: str, status: str) -> None:
    """Set a run's status (RUNNING while the pipeline goes on, FINISHED or FAILED at the end)."""
    from mlflow.tracking import MlflowClient

    from bonefrac import tracking

    client = MlflowClient(tracking.tracking_uri(settings))
    if status == "RUNNING":
        client.update_run(run_id, status="RUNNING")
    else:
        client.set_terminated(run_id, status=status)


def staging_dir(settings: Settings, parent_run_id: str) -> Path:
    """Where one pipeline run trains its models before they replace the current ones."""
    return settings.layout.models.parent / f".{settings.layout.models.name}.{parent_run_id}"


def train_one(settings: Settings, name: str, parent_run_id: str) -> TrainResult:
    """Train one model in a nested MLflow run under `parent_run_id`, into the staging folder.

    Safe to call from parallel tasks: each model has its own folder and run. A failure marks
    the nested run FAILED and re-raises.
    """
    import mlflow

    from bonefrac import tracking

    cache = load_cache(settings.layout.preprocessed)
    parts = body_part_classes(settings.data)  # the body-part model's classes
    tracking.configure(settings)
    tags = {
        **tracking.provenance_tags(settings, cache.meta.get("key")),
        "bonefrac.model": name,
        "mlflow.parentRunId": parent_run_id,
    }
    tags.update(worker_tags())
    if settings.train.strategy == "multi_worker":
        from bonefrac.distributed import cluster_role

        tags["bonefrac.tf_task"] = cluster_role().name  # the chief: the only worker tracking
    folder = staging_dir(settings, parent_run_id) / name
    shutil.rmtree(folder, ignore_errors=True)
    close_lost_attempts(settings, parent_run_id, name)
    cfg = settings.train.for_model(name)
    # the run shows the values this model trained with (train.body_part applied), the
    # override itself kept as train.body_part
    params = settings.flat()
    params.update({f"train.{k}": v for k, v in cfg.model_dump(mode="json").items()})
    params["train.body_part"] = settings.train.body_part
    with mlflow.start_run(run_name=name, tags=tags) as run:
        mlflow.log_params(params)
        tracking.log_data_input(settings, "training", cache.meta.get("key"))
        result = fit_model(cache, name, parts, cfg, folder, log_to_mlflow=True, keep_model=True)
        result.run_id = run.info.run_id
        _log_training_artifacts(result, folder)
        if settings.tracking.log_models:
            result.model_uri = _log_model(result.model, cache, tracking.pinned_requirements())
        result.model = None  # the result may cross processes (Dask, processes task runner)
    return result


def worker_tags() -> dict[str, str]:
    """Which process trains: its id and, on a Dask worker, the worker's name (no host name)."""
    worker = "none"
    if "distributed" in sys.modules:  # imported by a Dask worker, never by us
        from distributed import get_worker

        with contextlib.suppress(ValueError):  # ValueError: not on a Dask worker
            worker = str(get_worker().name)
    return {"bonefrac.pid": str(os.getpid()), "bonefrac.dask_worker": worker}


def close_lost_attempts(settings: Settings, parent_run_id: str, name: str) -> None:
    """Mark FAILED an earlier attempt at this training that is still RUNNING: its process
    died (a Dask worker lost mid-training) and the task is being retried."""
    from mlflow.tracking import MlflowClient

    from bonefrac import tracking

    client = MlflowClient(tracking.tracking_uri(settings))
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    lost = client.search_runs(
        [experiment_id],
        f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.bonefrac.model = '{name}' "
        "and attributes.status = 'RUNNING'",
    )
    for run in lost:
        client.set_tag(run.info.run_id, "bonefrac.attempt", "lost: its process died, retried")
        client.set_terminated(run.info.run_id, status="FAILED")


def finish_training(
    settings: Settings, parent_run_id: str, results: dict[str, TrainResult]
) -> Path:
    """Swap the run's models into place, all at once: a run that failed part-way never
    mixes its models with the current ones. Models not retrained are carried over."""
    layout = settings.layout
    staging = staging_dir(settings, parent_run_id)
    previous: dict[str, str] = {}
    if layout.models.is_dir():
        for other in set(model_names(settings)) - set(results):
            if (layout.models / other).is_dir() and not (staging / other).exists():
                shutil.copytree(layout.models / other, staging / other)
        if (layout.models / RUN_FILE).is_file():
            previous = read_runs(layout.models)
    runs = {**previous, "parent": parent_run_id, **{n: r.run_id for n, r in results.items()}}
    runs["model_uris"] = {
        **previous.get("model_uris", {}),
        **{n: r.model_uri for n, r in results.items() if r.model_uri},
    }
    (staging / RUN_FILE).write_text(json.dumps(runs, indent=2) + "\n")
    if layout.models.exists():
        shutil.rmtree(layout.models)
    os.replace(staging, layout.models)
    _write_train_metrics(settings, results)
    return layout.models


def run_train_stage(
    settings: Settings, names: list[str] | None = None, parent_run_id: str | None = None
) -> dict[str, TrainResult]:
    """Train the configured models, one after another, under one parent MLflow run.

    `parent_run_id` attaches to an existing pipeline run (the Prefect flow makes one);
    otherwise a new parent run is started (and finished here). On failure the parent run is
    marked FAILED and the current models stay as they were.

    `train.strategy: multi_worker`: every worker of the TF_CONFIG cluster calls this; the
    chief tracks and writes the models, the others only train (bonefrac.distributed).
    """
    names = names or model_names(settings)
    role = None
    if settings.train.strategy == "multi_worker":
        from bonefrac.distributed import cluster_role, write_worker_report
        from bonefrac.models import make_strategy

        role = cluster_role()
        make_strategy("multi_worker")  # before any other TensorFlow work in this process
        if not role.is_chief:
            results = train_as_worker(settings, names, role)
            write_worker_report(settings, role, results)
            return results
    own_parent = parent_run_id is None
    if own_parent:
        parent_run_id = start_parent_run(
            settings, load_cache(settings.layout.preprocessed).meta.get("key")
        )
    try:
        results = {name: train_one(settings, name, parent_run_id) for name in names}
        finish_training(settings, parent_run_id, results)
    except BaseException:
        shutil.rmtree(staging_dir(settings, parent_run_id), ignore_errors=True)
        mark_run(settings, parent_run_id, "FAILED")
        raise
    finally:
        TRACED.clear()
    if own_parent:
        mark_run(settings, parent_run_id, "FINISHED")
    if role is not None:
        write_worker_report(settings, role, results)
    return results


def train_as_worker(settings, names: list[str], role) -> dict:
    """A non-chief worker's share of `bonefrac train`: the same models in the same order
    (each step is a collective with the chief), saved into a temporary folder that is then
    deleted; no MLflow, and the models folder is left alone."""
    import tempfile

    cache = load_cache(settings.layout.preprocessed)
    parts = body_part_classes(settings.data)  # the body-part model's classes
    results = {}
    scratch = Path(tempfile.mkdtemp(prefix=f"bonefrac-{role.task_type}{role.task_index}-"))
    try:
        for name in names:
            results[name] = fit_model(
                cache, name, parts, settings.train.for_model(name), scratch / name
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return results


def _log_training_artifacts(result: TrainResult, folder: Path) -> None:
    import mlflow

    from bonefrac.evaluate import training_curves_plot

    if result.history:  # no curves when a profile trains zero epochs
        plot = training_curves_plot(result.history, folder / "training_curves.png")
        mlflow.log_artifact(str(plot))
    mlflow.log_artifact(str(folder / "meta.json"))
    # what each phase trained (e.g. trainable_weights_head: the head alone while frozen)
    phases = {
        f"{key}_{entry['phase']}": entry[key]
        for entry in result.phases
        for key in ("epochs", "jit_compile", "trainable_weights", "trainable_params")
    }
    if phases:
        mlflow.log_params(phases)
    mlflow.log_metrics(
        {
            "train_seconds": result.seconds,
            "train_images_per_second": result.images_per_second,
            "best_epoch": result.best_epoch,
        }
    )


def _write_train_metrics(settings: Settings, results: dict[str, TrainResult]) -> None:
    layout = settings.layout
    layout.metrics.mkdir(parents=True, exist_ok=True)
    summary = {
        name: {
            "best_epoch": r.best_epoch,
            "seconds": round(r.seconds, 1),
            **{f"val_{k}": v for k, v in r.val_metrics.items()},
        }
        for name, r in results.items()
    }
    (layout.metrics / "train.json").write_text(json.dumps(summary, indent=2) + "\n")
