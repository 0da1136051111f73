"""ResNet50 classifiers: weights sources, heads, fine-tuning phases, strategies."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from bonefrac.config import TrainConfig
from bonefrac.errors import UserError
from bonefrac.models import resolve_weights

from .tiny_cache import write_tiny_cache


def test_weights_setting_is_checked_in_one_line(tmp_path):
    assert resolve_weights("imagenet") == "imagenet"
    assert resolve_weights("none") is None
    with pytest.raises(UserError, match="not found") as info:
        resolve_weights(str(tmp_path / "resnet50.h5"))
    assert "\n" not in str(info.value)
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(UserError, match=r"\.h5 or \.keras"):
        resolve_weights(str(tmp_path / "weights.bin"))


def test_a_seeded_model_starts_from_the_same_weights_whatever_other_threads_draw():
    """Keras seeds each unseeded initializer from Python's shared `random` while a model is
    built; Prefect's and MLflow's threads draw from it during a pipeline. A thread drawing
    meanwhile must not change the weights a seeded training starts from (two demo runs
    trained one model differently from its first epoch before this)."""
    import random
    import threading

    import keras

    from bonefrac.models import build_classifier, own_seed_draws

    cfg = TrainConfig(weights="none", zero_init_residual=True, seed=7)

    def weights(protected: bool, disturbed: bool) -> list[np.ndarray]:
        keras.utils.set_random_seed(cfg.seed)
        stop = threading.Event()

        def draw():
            while not stop.is_set():
                random.random()

        other = threading.Thread(target=draw, daemon=True)
        if disturbed:
            other.start()
        try:
            with own_seed_draws(cfg.seed) if protected else contextlib.nullcontext():
                model = build_classifier(1, 32, cfg, "seeded")
        finally:
            stop.set()
            if disturbed:
                other.join()
        return [w.numpy() for w in model.weights]

    def same(a, b) -> bool:
        return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))

    # the reference is protected too: other tests' Prefect and MLflow threads may live on
    quiet = weights(protected=True, disturbed=False)
    assert not same(quiet, weights(protected=False, disturbed=True))  # the hazard is real
    assert same(quiet, weights(protected=True, disturbed=True))  # and gone

    # two trainings building at once (the threads task runner): each gets its seed's weights,
    # and Keras draws from the shared `random` again afterwards
    from keras.src.random import seed_generator

    built: dict[int, list[np.ndarray]] = {}

    def build(seed: int) -> None:
        with own_seed_draws(seed):
            model = build_classifier(1, 32, cfg.model_copy(update={"seed": seed}), f"t{seed}")
        built[seed] = [w.numpy() for w in model.weights]

    threads = [threading.Thread(target=build, args=(seed,)) for seed in (7, 8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert same(built[7], quiet) and not same(built[8], quiet)
    assert seed_generator.python_random is random


def test_zero_init_residual_starts_every_block_as_its_shortcut(tmp_path):
    """train.zero_init_residual: from scratch, the BatchNorm closing each of ResNet50's 16
    residual branches starts with gamma 0, so the branches' convolutions cannot change the
    output yet; off, or with pretrained weights, every gamma is what it was."""
    import keras

    from bonefrac.models import backbone_of, build_classifier, residual_branch_ends

    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)

    def gammas(model) -> dict[str, float]:
        return {
            layer.name: float(np.abs(layer.gamma.numpy()).max())
            for layer in backbone_of(model).layers
            if isinstance(layer, keras.layers.BatchNormalization)
        }

    def branch_conv_ignored(model) -> bool:
        """Does the output stay put when a residual branch's convolutions change?"""
        before = np.asarray(model(x, training=False))
        backbone = backbone_of(model)
        for name in ("conv2_block2_2_conv", "conv3_block1_1_conv", "conv5_block3_3_conv"):
            kernel = backbone.get_layer(name).kernel
            kernel.assign(kernel.numpy() * 3.0 + 0.05)
        return np.array_equal(before, np.asarray(model(x, training=False)))

    zero = build_classifier(1, 32, TrainConfig(weights="none", zero_init_residual=True), "z")
    ends = {layer.name for layer in residual_branch_ends(backbone_of(zero))}
    assert len(ends) == 3 + 4 + 6 + 3  # one per residual block
    zeroed = {name for name, value in gammas(zero).items() if value == 0.0}
    assert zeroed == ends and all(v == 1.0 for n, v in gammas(zero).items() if n not in ends)
    assert branch_conv_ignored(zero)

    plain = build_classifier(1, 32, TrainConfig(weights="none"), "plain")
    assert set(gammas(plain).values()) == {1.0} and not branch_conv_ignored(plain)

    # pretrained weights replace any initialisation: a file's gammas are kept
    source = keras.applications.ResNet50(
        include_top=False, weights=None, input_shape=(32, 32, 3), pooling="avg"
    )
    for layer in residual_branch_ends(source):
        layer.gamma.assign(np.full(layer.gamma.shape, 0.5, np.float32))
    path = tmp_path / "resnet50_notop.weights.h5"
    source.save_weights(path)
    loaded = build_classifier(1, 32, TrainConfig(weights=str(path), zero_init_residual=True), "f")
    assert {gammas(loaded)[name] for name in ends} == {0.5}


@pytest.mark.slow
def test_local_weights_file_for_air_gapped_sites(tmp_path):
    """A hospital without internet points train.weights at a local file (here: made by us)."""
    import keras

    from bonefrac.models import backbone_of, build_classifier, set_phase

    source = keras.applications.ResNet50(
        include_top=False, weights=None, input_shape=(32, 32, 3), pooling="avg"
    )
    path = tmp_path / "resnet50_notop.weights.h5"
    source.save_weights(path)
    model = build_classifier(1, 32, TrainConfig(weights=str(path)), "fracture")
    backbone = backbone_of(model)
    for mine, theirs in zip(backbone.weights, source.weights, strict=True):
        np.testing.assert_array_equal(mine.numpy(), theirs.numpy())
    assert model.output_shape == (None, 1)
    # pretrained backbone: phase 1 freezes it; phase 2 unfreezes the top layers, BN stays frozen
    cfg = TrainConfig(weights=str(path), finetune_layers=10)
    set_phase(model, "head", cfg)
    assert not backbone.trainable
    set_phase(model, "finetune", cfg)
    trainable = [layer for layer in backbone.layers if layer.trainable]
    assert 0 < len(trainable) <= 10
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in trainable)
    body = build_classifier(3, 32, TrainConfig(weights="none"), "body_part")
    x = np.zeros((2, 32, 32, 3), np.float32)
    np.testing.assert_allclose(np.asarray(body(x)).sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.slow
def test_mirrored_strategy_on_two_logical_cpus(tmp_path):
    """MirroredStrategy, exercised on one CPU split into two logical devices (subprocess:
    the split must happen before TensorFlow initialises)."""
    write_tiny_cache(tmp_path, seed=0)
    script = textwrap.dedent(f"""
        import json, tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        from pathlib import Path
        from bonefrac.cache import load_cache
        from bonefrac.config import TrainConfig
        from bonefrac.models import make_strategy
        from bonefrac.train import fit_model
        strategy = make_strategy("mirrored")
        cfg = TrainConfig(weights="none", strategy="mirrored", batch_size=4, head_epochs=0,
                          finetune_epochs=1, finetune_layers=0, augment=False)
        result = fit_model(load_cache(Path({str(tmp_path)!r})), "hand", ["hand"], cfg,
                           Path({str(tmp_path / "model")!r}))
        print(json.dumps({{"replicas": strategy.num_replicas_in_sync,
                          "loss": result.history["loss"]}}))
    """)
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["replicas"] == 2
    assert len(report["loss"]) == 1 and np.isfinite(report["loss"][0])
    assert (tmp_path / "model" / "model.keras").is_file()


@pytest.mark.slow
def test_training_is_reproducible_on_one_machine(tmp_path):
    """train.deterministic: the same data, seed and settings give the same weights and
    history, augmentation included (its random draws happen in a fixed order). Without it,
    thread timing changed which batch got which augmentation, and CI's learning tests
    passed or failed by chance (issue 10)."""
    write_tiny_cache(tmp_path, seed=1)
    script = textwrap.dedent(f"""
        import hashlib, json, keras
        from pathlib import Path
        from bonefrac.cache import load_cache
        from bonefrac.config import TrainConfig
        from bonefrac.train import fit_model
        cfg = TrainConfig(weights="none", batch_size=4, head_epochs=0, finetune_epochs=2,
                          finetune_layers=0, bn_momentum=0.6, augment=True, seed=7)
        runs = []
        for attempt in range(2):
            result = fit_model(load_cache(Path({str(tmp_path)!r})), "hand", ["hand"], cfg,
                               Path({str(tmp_path)!r}) / f"model{{attempt}}")
            saved = keras.models.load_model(result.model_path)
            weights = saved.get_weights()
            digest = hashlib.sha256(b"".join(w.tobytes() for w in weights)).hexdigest()
            runs.append({{"loss": result.history["loss"], "weights": digest,
                         "compiled": saved.compiled,
                         "file_per_weight_byte": result.model_path.stat().st_size
                         / sum(w.nbytes for w in weights)}})
        print(json.dumps(runs))
    """)
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 0, out.stderr[-2000:]
    first, second = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(first["loss"]) == 2 and np.isfinite(first["loss"]).all()
    assert first == second
    # saved without optimizer state: Adam's two moment copies would make the file ~3x the
    # weights (it was, through keras.models.clone_model, and filled CI's disk)
    assert first["compiled"] is False
    assert first["file_per_weight_byte"] < 1.2


def test_deterministic_datasets_build_without_tensorflow_error_lines(tmp_path):
    """Under op determinism tf.data rewrote each parallel map of the pipeline (its cache read
    is a stateful numpy_function) into an ordered one, printing a C++ ERROR line each time:
    eight in a `make demo`. The datasets now ask for ordered maps and print nothing. Their
    batches, augmentation included, hashed the same as the rewritten pipeline's when this
    changed, and they repeat from run to run."""
    write_tiny_cache(tmp_path, seed=2)
    script = textwrap.dedent(f"""
        import hashlib
        from pathlib import Path
        import tensorflow as tf
        from bonefrac.cache import load_cache
        from bonefrac.train import make_dataset, task_data
        tf.config.experimental.enable_op_determinism()
        cache = load_cache(Path({str(tmp_path)!r}))
        digest = hashlib.sha256()
        for split, training in (("train", True), ("val", False)):
            data = task_data(cache, "hand", split, ["hand"])
            ds = make_dataset(cache, data, 4, training, training, 3, True, 30.0)
            for x, y in ds:
                digest.update(x.numpy().tobytes() + y.numpy().tobytes())
        print("batches", digest.hexdigest())
    """)
    runs = [
        subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
        for _ in range(2)
    ]
    for run in runs:
        assert run.returncode == 0, run.stderr[-2000:]
        assert "E0000" not in run.stderr and "use_unbounded_threadpool" not in run.stderr, (
            run.stderr[-2000:]
        )
    assert runs[0].stdout.split()[-1] == runs[1].stdout.split()[-1]  # augmentation in order


def test_jit_compile_is_a_train_param_that_reaches_keras():
    """train.jit_compile: forced on, forced off, or Keras' "auto" (off when TensorFlow sees only
    CPUs, where XLA measured slower). The model carries the resolved choice; training records
    it per phase (test_finetune_path). Keras turns XLA off under op determinism, which
    train.deterministic enables process-wide, so forcing it on with deterministic is refused
    and the check runs in a fresh process."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="jit_compile"):
        TrainConfig(jit_compile="sometimes")
    with pytest.raises(ValidationError, match="needs deterministic: false"):
        TrainConfig(jit_compile=True)
    assert TrainConfig().jit_compile == "auto"
    assert TrainConfig(jit_compile=True, deterministic=False).jit_compile is True
    script = textwrap.dedent("""
        import json, warnings
        import tensorflow as tf
        from bonefrac.config import TrainConfig
        from bonefrac.models import build_classifier, compile_model
        model = build_classifier(1, 32, TrainConfig(weights="none"), name="jit")
        seen = {}
        for choice in (True, False, "auto"):
            compile_model(model, 1, 1e-3, choice)
            seen[str(choice)] = model.jit_compile
        tf.config.experimental.enable_op_determinism()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compile_model(model, 1, 1e-3, True)
        seen["True, deterministic"] = model.jit_compile
        seen["gpu"] = bool(tf.config.list_physical_devices("GPU"))
        print(json.dumps(seen))
    """)
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen == {
        "True": True,
        "False": False,
        "auto": seen["gpu"],
        "True, deterministic": False,
        "gpu": seen["gpu"],
    }


@pytest.mark.parametrize("n_outputs", [1, 4])  # a fracture model, the body-part model
def test_training_step_is_traced_once_and_trains_as_before(n_outputs):
    """compile_model makes Adam's moments and the metrics' variables before `fit`. Keras 3.15
    otherwise creates them inside the first trace of the training step, and tf.function
    traces that step again: two traces (~15 s of a ResNet50's first epoch here) where one
    does. The weights after two epochs are those of a model compiled the plain Keras way."""
    import keras

    from bonefrac.models import compile_model

    activation = "sigmoid" if n_outputs == 1 else "softmax"

    def tiny():
        keras.utils.set_random_seed(5)
        inputs = keras.Input((8, 8, 3))
        x = keras.layers.Conv2D(4, 3)(inputs)
        x = keras.layers.BatchNormalization()(x)
        x = keras.layers.GlobalAveragePooling2D()(x)
        return keras.Model(inputs, keras.layers.Dense(n_outputs, activation=activation)(x))

    rng = np.random.default_rng(5)
    x = rng.random((48, 8, 8, 3), dtype=np.float32)
    labels = rng.integers(0, max(n_outputs, 2), 48)
    y = labels[:, None].astype(np.float32) if n_outputs == 1 else np.eye(n_outputs)[labels]
    ours, plain = tiny(), tiny()
    compile_model(ours, n_outputs, 3e-3)
    plain.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss="binary_crossentropy" if n_outputs == 1 else "categorical_crossentropy",
        metrics=["accuracy", keras.metrics.AUC(name="auc", multi_label=n_outputs > 1)],
    )
    traces, history = {}, {}
    for label, model in (("ours", ours), ("plain", plain)):
        step = model.train_step

        def counted(data, step=step, label=label):  # runs once per trace, not per batch
            traces[label] = traces.get(label, 0) + 1
            return step(data)

        model.train_step = counted
        fitted = model.fit(
            x, y, batch_size=16, epochs=2, shuffle=False, validation_data=(x, y), verbose=0
        )
        history[label] = fitted.history
    assert traces == {"ours": 1, "plain": 2}  # plain: Keras' own double trace, still there
    assert history["ours"].keys() == history["plain"].keys()  # accuracy, auc, loss, val_*
    for key, values in history["plain"].items():  # the same metrics, measured the same way
        np.testing.assert_allclose(history["ours"][key], values, rtol=1e-5, err_msg=key)
    for mine, theirs in zip(ours.weights, plain.weights, strict=True):
        np.testing.assert_allclose(np.asarray(mine), np.asarray(theirs), rtol=1e-5, atol=1e-7)


def test_evaluation_traces_each_model_once_per_image_size():
    """The evaluate stage's forward pass: 70 images in batches of 32 (32, 32, 6) run through
    one trace, not one per batch shape, and give what the model gives."""
    import keras

    from bonefrac.evaluate.stage import predict

    keras.utils.set_random_seed(3)
    # Inputs scaled to [0, 1]: raw 0-255 values saturate the sigmoid, and a saturated output
    # (1.8e-38 eager, 0.0 in the graph, on an AVX512 Xeon) fails any relative tolerance.
    model = keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            keras.layers.Rescaling(1 / 255),
            keras.layers.Flatten(),
            keras.layers.Dense(1, "sigmoid"),
        ]
    )
    images = np.random.default_rng(3).integers(0, 256, (70, 8, 8), dtype=np.uint8)
    out = predict(model, images)
    out_again = predict(model, images[:5])
    expected = np.asarray(model(np.repeat(images[..., None], 3, -1).astype("float32")))
    np.testing.assert_allclose(out, expected, rtol=1e-5)
    np.testing.assert_allclose(out_again, expected[:5], rtol=1e-5)
    assert model._bonefrac_forward_8x8.experimental_get_tracing_count() == 1


@pytest.mark.slow
def test_training_stops_once_the_monitored_val_metric_reaches_its_maximum(tmp_path):
    """Only a strictly better epoch replaces the kept one, so an epoch after val AUC reached
    1.0 can never be chosen: training stops there, phases to come included. A monitored loss
    has no such ceiling, and the same films then train every epoch."""
    import keras

    from bonefrac.cache import load_cache
    from bonefrac.train import CEILING_TOLERANCE, fit_model

    write_tiny_cache(tmp_path, seed=4)
    labels = np.arange(24) % 2  # write_tiny_cache's labels
    noise = np.random.default_rng(4).integers(0, 40, (24, 32, 32))
    np.save(tmp_path / "images.npy", (40 + 150 * labels[:, None, None] + noise).astype(np.uint8))
    cache = load_cache(tmp_path)
    epochs = {"head_epochs": 2, "finetune_epochs": 3}
    common = dict(weights="none", batch_size=4, finetune_layers=0, augment=False, seed=3)
    common |= dict(patience=6, lr_patience=5, **epochs)

    by_auc = fit_model(
        cache, "hand", ["hand"], TrainConfig(monitor="metric", **common), tmp_path / "auc"
    )
    keras.backend.clear_session()
    by_loss = fit_model(
        cache, "hand", ["hand"], TrainConfig(monitor="loss", **common), tmp_path / "loss"
    )

    total = sum(epochs.values())
    assert len(by_loss.history["loss"]) == total  # no ceiling: every epoch ran
    auc = by_auc.history["val_auc"]
    reached = [i for i, value in enumerate(auc) if value >= 1 - CEILING_TOLERANCE]
    assert reached, f"val AUC never reached 1.0 on separable films: {auc}"
    first = reached[0]
    assert first < total - 1 and len(auc) == first + 1  # stopped at the first 1.0
    assert by_auc.best_epoch == first
    meta = json.loads((tmp_path / "auc" / "meta.json").read_text())
    assert meta["stopped_at_ceiling"] == first and meta["best_epoch"] == first
    ran = [p["phase"] for p in by_auc.phases]
    assert ran == (["head"] if first < epochs["head_epochs"] else ["head", "finetune"])
