"""ResNet50 classifiers: one for the body part, one per part for abnormal/normal.

Each model takes the preprocessed image values 0..255, (batch, S, S, 3) float32, and
normalises them itself, so training and serving feed exactly the arrays
`imaging.preprocess` returns (cast to float32).
"""

from __future__ import annotations

import contextlib
import random
import threading
from pathlib import Path
from typing import Any

import numpy as np

from bonefrac.config import BODY_PART_MODEL as BODY_PART_MODEL  # re-exported
from bonefrac.config import TrainConfig
from bonefrac.errors import UserError

# keras.applications.resnet50.preprocess_input ("caffe"): RGB->BGR, subtract ImageNet means.
# Our three channels are identical grey copies, so the flip is a no-op and the whole step is
# a per-channel mean subtraction, which Normalization expresses without a custom layer.
IMAGENET_BGR_MEAN = (103.939, 116.779, 123.68)


def resolve_weights(weights: str) -> str | Path | None:
    """'imagenet' (Keras' own download and cache), 'none', or a local weights file."""
    if weights.lower() == "imagenet":
        return "imagenet"
    if weights.lower() in {"none", "null", ""}:
        return None
    path = Path(weights).expanduser()
    if not path.is_file():
        raise UserError(
            f"weights file {path} not found: set train.weights to imagenet, none or an existing "
            ".h5/.keras file"
        )
    if not path.name.endswith((".h5", ".keras")):
        raise UserError(f"weights file {path} must be a .h5 or .keras file")
    return path


@contextlib.contextmanager
def own_seed_draws(seed: int):
    """Keras seeds every unseeded initializer (each of ResNet50's convolutions, the head) and
    the global seed generator from Python's process-wide `random` as layers are made. Any
    other thread drawing from it meanwhile (Prefect's and MLflow's background workers run
    during a pipeline) shifts every later layer's weights, so a seeded training could start
    from different weights from one run to the next. Inside this block Keras draws from a
    generator of its own, seeded with `seed`: the draws an undisturbed process makes after
    `keras.utils.set_random_seed(seed)`, whatever other threads do. One block at a time in a
    process (the threads task runner builds models in parallel threads): the swap is
    process-wide, so a second block waits for the first to put `random` back."""
    from keras.src.random import seed_generator  # Keras 3.15: where make_default_seed draws

    with _SEED_DRAWS:
        shared = seed_generator.python_random
        seed_generator.python_random = random.Random(seed)
        try:
            yield
        finally:
            seed_generator.python_random = shared


_SEED_DRAWS = threading.Lock()


def set_random_seed(seed: int) -> None:
    """`keras.utils.set_random_seed(seed)`, without emptying TensorFlow's kernel cache when
    its global seed already is `seed`.

    TensorFlow's `set_seed` clears that cache (`context._set_global_seed`), which throws away
    the instantiation of every traced function: a training step kept for the next model
    (`train._TracedModels`) would then be instantiated and optimised by Grappler again, ~5 s
    a ResNet50 at 64 px on 2 cores. With the seed unchanged, this does the rest of what
    `set_random_seed` does: Python's, NumPy's and Keras' seeds, and TensorFlow's op-seed
    generator started again from the seed (Keras 3.15, TensorFlow 2.21 internals; any other
    layout falls back to the full reset). Not reset: the position of a stateful random
    kernel already run eagerly (the cache clear restarts those). Training has none: Keras
    draws from stateless ops seeded by its SeedGenerators, tf.data from explicit seeds
    (tests/unit/test_train_reuse.py compares the weights)."""
    import keras
    from tensorflow.python.eager import context

    ctx = context.context()
    if getattr(ctx, "_seed", None) != seed or not hasattr(ctx, "_rng"):
        keras.utils.set_random_seed(seed)
        return
    from keras.src.backend.common import global_state
    from keras.src.random.seed_generator import GLOBAL_SEED_GENERATOR
    from keras.src.utils.rng_utils import GLOBAL_RANDOM_SEED

    global_state.set_global_attribute(GLOBAL_RANDOM_SEED, seed)
    global_state.set_global_attribute(GLOBAL_SEED_GENERATOR, None)
    random.seed(seed)
    np.random.seed(seed)
    ctx._rng = random.Random(seed)  # the op seeds of ops made without one, as set_seed does


def build_classifier(n_outputs: int, image_size: int, cfg: TrainConfig, name: str):
    """ResNet50 (include_top=False, average pooling) + dropout + dense head.

    n_outputs == 1: sigmoid probability of "abnormal"; otherwise softmax over classes.
    """
    import keras

    weights = resolve_weights(cfg.weights)
    inputs = keras.Input((image_size, image_size, 3), dtype="float32", name="image")
    x = keras.layers.Normalization(
        mean=IMAGENET_BGR_MEAN, variance=(1.0, 1.0, 1.0), name="imagenet_mean"
    )(inputs)
    backbone = keras.applications.ResNet50(
        include_top=False,
        weights="imagenet" if weights == "imagenet" else None,
        input_shape=(image_size, image_size, 3),
        pooling="avg",
    )
    if isinstance(weights, Path):
        try:
            backbone.load_weights(weights)
        except Exception as exc:  # keras raises several types for a wrong file
            raise UserError(f"cannot load weights from {weights}: {exc}".splitlines()[0]) from None
    for layer in backbone.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = cfg.bn_momentum
    if weights is None and cfg.zero_init_residual:
        for layer in residual_branch_ends(backbone):
            layer.gamma.assign(keras.ops.zeros_like(layer.gamma))
    # Pretrained BatchNorm statistics are kept (inference mode); from scratch they must learn.
    x = backbone(x, training=False if weights is not None else None)
    x = keras.layers.Dropout(cfg.dropout, name="dropout")(x)
    activation = "sigmoid" if n_outputs == 1 else "softmax"
    outputs = keras.layers.Dense(n_outputs, activation=activation, dtype="float32", name="head")(x)
    model = keras.Model(inputs, outputs, name=name)
    model.backbone_pretrained = weights is not None
    return model


_TRAINED: dict[tuple, Any] = {}


def load_trained(path: Path):
    """A trained model file (`artifacts/models/<name>/model.keras`), loaded once per process
    while the file stays the same: the evaluate and register stages read the same files one
    after the other, and each ResNet50 load and forward trace costs seconds. A new training
    replaces the files (new inode and time), which loads them afresh."""
    import keras

    path = Path(path).resolve()
    stat = path.stat()
    key = (str(path), stat.st_ino, stat.st_mtime_ns, stat.st_size)
    if key not in _TRAINED:
        for old in [k for k in _TRAINED if k[0] == key[0]]:
            del _TRAINED[old]  # an earlier version of this file
        _TRAINED[key] = keras.models.load_model(path, compile=False)
    return _TRAINED[key]


def forget_trained() -> None:
    """Release what `load_trained` holds (the register stage, its last reader, calls this)."""
    _TRAINED.clear()


def residual_branch_ends(backbone) -> list:
    """The BatchNorm closing each residual block's branch, just before the block's add: 16 in
    a ResNet50, `conv{stage}_block{n}_3_bn` in Keras' names (the shortcut's is `_0_bn`)."""
    import keras

    return [
        layer
        for layer in backbone.layers
        if isinstance(layer, keras.layers.BatchNormalization) and layer.name.endswith("_3_bn")
    ]


def backbone_of(model):
    import keras

    return next(layer for layer in model.layers if isinstance(layer, keras.Model))


def set_phase(model, phase: str, cfg: TrainConfig) -> None:
    """'head': backbone frozen. 'finetune': the top `finetune_layers` layers of the backbone
    trainable ("all": every layer), BatchNorm frozen when the backbone was pretrained (its
    moving statistics stay those of the pretraining data, as the Keras fine-tuning guide
    advises for small batches)."""
    import keras

    backbone = backbone_of(model)
    if phase == "head":
        backbone.trainable = False
        return
    backbone.trainable = True
    layers = backbone.layers
    cut = 0 if cfg.finetune_layers == "all" else max(0, len(layers) - cfg.finetune_layers)
    pretrained = getattr(model, "backbone_pretrained", True)
    for i, layer in enumerate(layers):
        trainable = i >= cut
        if pretrained and isinstance(layer, keras.layers.BatchNormalization):
            trainable = False
        layer.trainable = trainable


def compile_model(
    model, n_outputs: int, learning_rate: float, jit_compile: bool | str = "auto"
) -> None:
    """Adam and the loss of the task; `jit_compile` as Keras takes it ("auto" resolves to off
    when TensorFlow sees only CPUs). `model.jit_compile` then holds the resolved choice.
    Call under the distribution strategy's scope: the optimizer's variables are made here."""
    import keras

    # Metric objects, not the string "accuracy": Keras resolves that string inside `fit` and
    # makes its variables in the first trace, which then runs twice (see below).
    if n_outputs == 1:
        loss = "binary_crossentropy"
        accuracy = keras.metrics.BinaryAccuracy(name="accuracy")
        metrics = [accuracy, keras.metrics.AUC(name="auc")]
    else:
        loss = "categorical_crossentropy"
        accuracy = keras.metrics.CategoricalAccuracy(name="accuracy")
        # num_labels given: without it the AUC's variables wait for the first batch too
        auc = keras.metrics.AUC(name="auc", multi_label=True, num_labels=n_outputs)
        metrics = [accuracy, auc]
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=loss,
        metrics=metrics,
        jit_compile=jit_compile,
    )
    # Adam's moments made now, eagerly. Left to `fit`, Keras 3.15 initialises them inside the
    # first trace of the training step, and tf.function traces a step again whenever its
    # first trace created variables: ~15 s of a ~37 s first epoch of a ResNet50 at 64 px on
    # 2 cores, for the same numbers (benchmarks/first_epoch.py).
    model.optimizer.build(model.trainable_variables)


_MULTI_WORKER: list = []  # the process's one MultiWorkerMirroredStrategy, once made


def make_strategy(name: str):
    """default | mirrored (all GPUs, else all logical CPUs) | multi_worker (TF_CONFIG cluster).

    multi_worker is made once per process (TensorFlow allows one, and it must exist before
    other TensorFlow work: `bonefrac train` makes it first); later calls return it."""
    import tensorflow as tf

    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
        return tf.distribute.MirroredStrategy(devices)
    if name == "multi_worker":
        if not _MULTI_WORKER:
            from bonefrac.distributed import cluster_role

            cluster_role()  # a clear error before TensorFlow reads TF_CONFIG itself
            _MULTI_WORKER.append(tf.distribute.MultiWorkerMirroredStrategy())
        return _MULTI_WORKER[0]
    raise UserError(f"unknown train.strategy {name!r}: use default, mirrored or multi_worker")
