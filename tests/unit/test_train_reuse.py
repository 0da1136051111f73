"""A second model of the same shape trains on the first one's traced step (train._TracedModels):
the same weights as a model trained on its own, without tracing, optimising or instantiating the
step again (~15 s of each fracture model's first epoch in the demo)."""

from __future__ import annotations

import random

import numpy as np
import pandas as pd
import pytest

from bonefrac.config import TrainConfig

from .tiny_cache import write_tiny_cache


def _two_part_cache(folder, size: int = 32) -> None:
    """48 images: 24 elbow and 24 hand, 16 train and 8 val of each, labels alternating."""
    write_tiny_cache(folder, seed=9, size=size, n=48)
    index = pd.read_csv(folder / "index.csv")
    first = index.index < 24
    index.loc[first, ["part", "body_part"]] = ["XR_ELBOW", "elbow"]
    index["split"] = np.where(index.index % 24 < 16, "train", "val")
    index.to_csv(folder / "index.csv", index=False)


def _tracings(step_function) -> int:
    """How often Keras' tf.functions behind a train/test function were traced."""
    cells = [c.cell_contents for c in step_function.__closure__ or ()]
    return sum(f.experimental_get_tracing_count() for f in cells if hasattr(f, "python_function"))


def _clear_counter(monkeypatch) -> list[int]:
    """Counts TensorFlow kernel-cache clears (each drops every traced function's instance)."""
    from tensorflow.python import pywrap_tfe

    cleared = [0]
    clear = pywrap_tfe.TFE_ContextClearCaches

    def counted(handle):
        cleared[0] += 1
        return clear(handle)

    monkeypatch.setattr(pywrap_tfe, "TFE_ContextClearCaches", counted)
    return cleared


@pytest.mark.slow
def test_a_second_model_of_the_same_shape_reuses_the_traced_step_with_identical_results(
    tmp_path, monkeypatch
):
    import keras

    from bonefrac.cache import load_cache
    from bonefrac.train import TRACED, fit_model

    _two_part_cache(tmp_path)
    cache = load_cache(tmp_path)
    cfg = TrainConfig(
        weights="none",
        batch_size=8,
        head_epochs=0,
        finetune_epochs=2,
        finetune_layers=0,
        bn_momentum=0.6,
        zero_init_residual=True,
        augment=True,
        dropout=0.3,  # its seed generator's state is part of what is handed over
        seed=11,
    )
    TRACED.clear()
    keras.utils.set_random_seed(cfg.seed)  # as a fresh process starts
    alone = fit_model(cache, "hand", [], cfg, tmp_path / "alone", keep_model=True, reuse=False)
    assert not TRACED._kept  # reuse=False keeps nothing

    elbow = fit_model(cache, "elbow", [], cfg, tmp_path / "elbow", keep_model=True)
    ((kept, _),) = TRACED._kept.values()
    train_function, test_function = kept.train_function, kept.test_function
    traced = (_tracings(train_function), _tracings(test_function))
    assert traced[0] >= 1 and traced[1] >= 1
    cleared = _clear_counter(monkeypatch)

    hand = fit_model(cache, "hand", [], cfg, tmp_path / "hand", keep_model=True)

    # it ran on the kept model's traced steps: no new trace, no kernel cache cleared
    ((again, _),) = TRACED._kept.values()
    assert again is kept
    assert kept.train_function is train_function and kept.test_function is test_function
    assert (_tracings(train_function), _tracings(test_function)) == traced
    assert cleared[0] == 0
    # and it is the model trained on its own: weights, BatchNorm statistics, every epoch's
    # metrics (wrong optimizer state, seed state or learning rate would change them)
    assert hand.history == alone.history
    assert hand.best_epoch == alone.best_epoch
    for mine, theirs in zip(hand.model.weights, alone.model.weights, strict=True):
        np.testing.assert_array_equal(np.asarray(mine), np.asarray(theirs), err_msg=mine.path)
    assert hand.history != elbow.history  # other data, another model
    assert hand.model.name == "bonefrac_hand" and elbow.model.name == "bonefrac_elbow"
    saved = keras.models.load_model(hand.model_path, compile=False)
    assert saved.name == "bonefrac_hand" and saved.compiled is False
    TRACED.clear()
    assert not TRACED._kept


def test_kept_models_are_bounded_and_keyed_by_shape():
    """A kept model is only reused for the same architecture, trainable weights and optimizer
    settings, and at most KEEP are held."""
    import keras

    from bonefrac.models import own_seed_draws
    from bonefrac.train import _TracedModels

    def tiny(width: int, name: str):
        with own_seed_draws(1):
            inputs = keras.Input((8, 8, 3))
            x = keras.layers.Conv2D(width, 3)(inputs)
            x = keras.layers.GlobalAveragePooling2D()(x)
            return keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(x), name=name)

    cfg = TrainConfig(weights="none")
    key = _TracedModels.key
    assert key(tiny(4, "a"), 1, 1e-3, cfg) == key(tiny(4, "b"), 1, 1e-3, cfg)  # names aside
    assert key(tiny(4, "a"), 1, 1e-3, cfg) != key(tiny(5, "a"), 1, 1e-3, cfg)
    assert key(tiny(4, "a"), 1, 1e-3, cfg) != key(tiny(4, "a"), 1, 1e-4, cfg)
    frozen = tiny(4, "a")
    frozen.layers[1].trainable = False
    assert key(frozen, 1, 1e-3, cfg) != key(tiny(4, "a"), 1, 1e-3, cfg)
    assert key(tiny(4, "a"), 1, 1e-3, cfg.model_copy(update={"strategy": "mirrored"})) is None

    kept = _TracedModels()
    models = [tiny(w, f"m{w}") for w in (2, 3, 4)]
    for model in models:
        model = kept.compiled(model, 1, 1e-3, cfg)
        kept.keep(model)
    assert len(kept._kept) == kept.KEEP == 2
    assert [m for m, _ in kept._kept.values()] == models[1:]  # the oldest went


def test_set_random_seed_matches_keras_and_keeps_compiled_kernels(monkeypatch):
    """bonefrac's set_random_seed gives the draws keras.utils.set_random_seed gives (Python,
    NumPy, keras.random, the op seeds TensorFlow hands ops made without one), and empties
    TensorFlow's kernel cache only when the seed changes. (What it cannot reset: a stateful
    random kernel already run eagerly continues its stream. Training uses none: Keras draws
    from stateless ops seeded by its SeedGenerators, tf.data from explicit seeds, and the
    test above finds the weights identical.)"""
    import keras
    import tensorflow as tf

    from bonefrac.models import set_random_seed

    def draws():
        return (
            random.random(),
            float(np.random.rand()),
            tf.compat.v1.random.get_seed(None),  # (global seed, the next op seed)
            keras.random.uniform([3]).numpy().tolist(),
        )

    keras.utils.set_random_seed(21)
    expected = draws()
    draws()  # move every generator on
    cleared = _clear_counter(monkeypatch)
    set_random_seed(21)
    assert draws() == expected
    assert cleared[0] == 0
    set_random_seed(22)
    assert cleared[0] == 1
    assert draws() != expected
    set_random_seed(21)
    assert draws() == expected
