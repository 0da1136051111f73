"""The path real MURA takes, at toy size: backbone weights from a file, a head phase with the
backbone frozen, partial unfreezing with BatchNorm frozen, the best epoch kept over both phases.

The quick profile (weights none, no head phase, every layer from scratch) never runs it."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from bonefrac.config import TrainConfig
from bonefrac.models import IMAGENET_BGR_MEAN

from .tiny_cache import write_tiny_cache

pytestmark = pytest.mark.slow
SIZE = 32
HEAD_EPOCHS = 2
FINETUNE_LAYERS = 10


def _by_name(backbone) -> dict[str, np.ndarray]:
    """Every backbone variable by layer and variable name ('conv5_block3_3_bn/moving_mean')."""
    return {f"{layer.name}/{w.name}": w.numpy() for layer in backbone.layers for w in layer.weights}


def _backbone_file(path, images: np.ndarray) -> dict[str, np.ndarray]:
    """A ResNet50 backbone unlike a fresh one: another seed's kernels, and BatchNorm moving
    statistics set from a forward pass over images (a fresh layer has mean 0, variance 1),
    saved as `train.weights` expects. Returns its weights by name."""
    import keras

    keras.utils.set_random_seed(123)
    source = keras.applications.ResNet50(
        include_top=False, weights=None, input_shape=(SIZE, SIZE, 3), pooling="avg"
    )
    norms = [layer for layer in source.layers if isinstance(layer, keras.layers.BatchNormalization)]
    for layer in norms:
        layer.momentum = 0.0  # moving statistics := this batch's statistics
    x = np.repeat(images[..., None].astype(np.float32), 3, axis=-1) - np.float32(IMAGENET_BGR_MEAN)
    source(x, training=True)
    source.save_weights(path)
    return _by_name(source)


def _digest(weights: list[np.ndarray]) -> str:
    return hashlib.sha256(b"".join(np.ascontiguousarray(w).tobytes() for w in weights)).hexdigest()


def test_two_phase_fine_tuning_from_a_weights_file(tmp_path):
    import keras

    from bonefrac.cache import load_cache
    from bonefrac.models import backbone_of
    from bonefrac.train import fit_model

    write_tiny_cache(tmp_path, seed=5, size=SIZE)
    cache = load_cache(tmp_path)
    weights_file = tmp_path / "backbone.weights.h5"
    file_weights = _backbone_file(weights_file, np.asarray(cache.images[:16]))

    class Watch(keras.callbacks.Callback):
        """Backbone weights at each phase's start and end, a digest of all weights per epoch."""

        def __init__(self):
            super().__init__()
            self.starts, self.ends, self.epochs = [], [], []

        def on_train_begin(self, logs=None):
            self.starts.append(_by_name(backbone_of(self.model)))

        def on_train_end(self, logs=None):
            self.ends.append(_by_name(backbone_of(self.model)))

        def on_epoch_end(self, epoch, logs=None):
            self.epochs.append(_digest(self.model.get_weights()))

    # The default recipe's shape (weights from a file, head phase, BatchNorm frozen, best
    # val-loss epoch kept), with a partial unfreeze and a phase-2 learning rate absurd
    # enough that phase 2 only gets worse: the kept model must then come from phase 1.
    cfg = TrainConfig(
        weights=str(weights_file),
        batch_size=4,
        head_epochs=HEAD_EPOCHS,
        finetune_epochs=2,
        finetune_layers=FINETUNE_LAYERS,
        finetune_learning_rate=10.0,
        patience=2,
        augment=False,
        seed=7,
    )
    assert cfg.monitor == "loss"  # the default: best epoch = lowest val loss
    watch = Watch()
    result = fit_model(cache, "hand", ["hand"], cfg, tmp_path / "model", callbacks=[watch])

    # 1. the file's weights are the ones training started from (and differ from a fresh init)
    assert watch.starts[0].keys() == file_weights.keys()
    for name, value in file_weights.items():
        np.testing.assert_array_equal(watch.starts[0][name], value, err_msg=name)
    moving_means = [w for name, w in file_weights.items() if name.endswith("moving_mean")]
    assert moving_means and all(np.abs(m).max() > 0 for m in moving_means)

    # 2. both phases ran, each with its own trainable set
    assert [p["phase"] for p in result.phases] == ["head", "finetune"]
    assert [p["epochs"] for p in result.phases] == [HEAD_EPOCHS, 2]
    # train.jit_compile "auto" as Keras resolved it: XLA off, as it is with only CPUs and
    # under train.deterministic (the default), which turns op determinism on
    assert [p["jit_compile"] for p in result.phases] == [False, False]
    head, finetune = result.phases
    assert head["trainable_weights"] == 2  # the dense head's kernel and bias
    assert head["trainable_params"] == 2048 + 1  # ResNet50's 2048 pooled features -> 1
    model = keras.models.load_model(result.model_path)
    top = backbone_of(model).layers[-FINETUNE_LAYERS:]
    expected = {
        f"{layer.name}/{w.name}": w
        for layer in top
        if not isinstance(layer, keras.layers.BatchNormalization)
        for w in layer.weights
    }
    assert expected  # the top layers hold convolutions
    assert finetune["trainable_weights"] == 2 + len(expected)
    assert finetune["trainable_params"] == 2049 + sum(
        int(np.prod(w.shape)) for w in expected.values()
    )

    # 3. phase 1 left the whole backbone as loaded
    for name, value in watch.starts[0].items():
        np.testing.assert_array_equal(watch.ends[0][name], value, err_msg=name)
    # phase 2 trained the unfrozen convolutions and nothing else of the backbone; the frozen
    # BatchNorm layers kept their moving statistics (and scale/offset)
    changed = {
        name
        for name, value in watch.starts[1].items()
        if not np.array_equal(watch.ends[1][name], value)
    }
    assert changed and changed <= expected.keys()
    statistics = {n for n in watch.starts[1] if n.endswith(("moving_mean", "moving_variance"))}
    assert len(statistics) == 2 * 53  # ResNet50's 53 BatchNorm layers
    assert not changed & statistics

    # 4. the best epoch over both phases is kept: phase 2 only made the val loss worse, so
    # the saved model is the phase-1 epoch with the lowest val loss, weights and all
    val_loss = result.history["val_loss"]
    assert len(val_loss) == len(watch.epochs) == HEAD_EPOCHS + 2
    assert min(val_loss[HEAD_EPOCHS:]) > min(val_loss[:HEAD_EPOCHS])  # as the setup intends
    assert result.best_epoch == int(np.argmin(val_loss)) < HEAD_EPOCHS
    assert _digest(model.get_weights()) == watch.epochs[result.best_epoch]
    assert result.val_metrics["loss"] == val_loss[result.best_epoch]
