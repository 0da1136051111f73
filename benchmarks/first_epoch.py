"""A model's first training epoch: bonefrac's `compile_model` (Adam's moments and the metrics'
variables made before `fit`) against Keras' plain compile (the string "accuracy", the
optimizer built by `fit`), which traces the training step twice. Each run is a fresh process
that builds the quick profile's ResNet50, compiles it one way, and fits `--epochs` on the same
random images with a validation set, under op determinism as `train.deterministic` runs; the
two ways alternate, `--repeat` times each. Reported: compile + first epoch, the median later
epoch, and how often the training step was traced.
Usage: python benchmarks/first_epoch.py [--size 64] [--batch 16] [--steps 11] [--epochs 6]
[--repeat 2]"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from harness import cpu_info, dump  # noqa: E402

WAYS = ("keras-plain", "bonefrac")


def one_run(way: str, size: int, batch: int, steps: int, epochs: int) -> dict:
    """In this (fresh) process: build, compile `way`, fit; the timings as a dict."""
    import keras
    import tensorflow as tf

    from bonefrac.config import TrainConfig
    from bonefrac.models import build_classifier, compile_model

    tf.config.experimental.enable_op_determinism()
    rng = np.random.default_rng(0)
    n = batch * steps
    x = rng.integers(0, 256, (n, size, size, 3)).astype(np.float32)
    y = rng.integers(0, 2, (n, 1)).astype(np.float32)
    keras.utils.set_random_seed(0)
    model = build_classifier(1, size, TrainConfig(weights="none", batch_size=batch), "bench")
    start = time.perf_counter()
    if way == "bonefrac":
        compile_model(model, 1, 1e-3)
    else:  # compile_model before it made the optimizer and metrics early
        model.compile(
            optimizer=keras.optimizers.Adam(1e-3),
            loss="binary_crossentropy",
            metrics=["accuracy", keras.metrics.AUC(name="auc")],
        )
    traces = [0]
    step = model.train_step

    def counted(data):  # Python runs once per trace, not per batch
        traces[0] += 1
        return step(data)

    model.train_step = counted
    ends: list[float] = []
    clock = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: ends.append(time.perf_counter())
    )
    history = model.fit(
        x,
        y,
        batch_size=batch,
        epochs=epochs,
        shuffle=False,
        validation_data=(x[: 3 * batch], y[: 3 * batch]),
        callbacks=[clock],
        verbose=0,
    )
    laters = [b - a for a, b in zip(ends, ends[1:], strict=False)]
    return {
        "way": way,
        "first_epoch_s": ends[0] - start,  # compile included: bonefrac's does more there
        "later_epoch_s": statistics.median(laters),
        "traces": traces[0],
        "loss": [round(v, 6) for v in history.history["loss"]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=11, help="steps per epoch (demo: 11)")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--one", choices=WAYS, help=argparse.SUPPRESS)  # a child run
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_run(args.one, args.size, args.batch, args.steps, args.epochs)))
        return
    cpu_info()
    runs = []
    for _ in range(args.repeat):
        for way in WAYS:
            child = [sys.executable, __file__, "--one", way, "--size", str(args.size)]
            child += ["--batch", str(args.batch), "--steps", str(args.steps)]
            child += ["--epochs", str(args.epochs)]
            out = subprocess.run(child, capture_output=True, text=True, check=True)
            run = json.loads(out.stdout.strip().splitlines()[-1])
            runs.append(run)
            print(
                f"{way:<12} compile + first epoch {run['first_epoch_s']:5.1f} s, later epochs "
                f"(median) {run['later_epoch_s']:4.2f} s, training step traced {run['traces']}x"
            )

    def median(way: str, key: str) -> float:
        return statistics.median(r[key] for r in runs if r["way"] == way)

    same = len({json.dumps(r["loss"]) for r in runs}) == 1
    plain, ours = median("keras-plain", "first_epoch_s"), median("bonefrac", "first_epoch_s")
    plain_later, ours_later = (median(w, "later_epoch_s") for w in WAYS)
    print(
        f"first epoch, median: keras-plain {plain:.1f} s, bonefrac {ours:.1f} s "
        f"(x{plain / ours:.2f}); later epochs: keras-plain {plain_later:.2f} s, bonefrac "
        f"{ours_later:.2f} s (x{plain_later / ours_later:.2f}); same losses in every run: {same}"
    )
    dump(runs)


if __name__ == "__main__":
    main()
