"""Training compile choice (`train.jit_compile`): the ResNet50 training step with XLA off
(Keras' "auto" on a CPU-only host) against forced on, same data, same process. For each, in one
`fit` of 3 epochs: the first epoch (graph construction, XLA compilation when on) and the
fastest later one.
Usage: python benchmarks/train_compile.py [--size 64] [--batch 16] [--steps 8]"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from harness import dump  # noqa: E402


def _epoch_clock(keras, times: list[float]):
    """A callback appending each epoch's wall time to `times`."""
    return keras.callbacks.LambdaCallback(
        on_epoch_begin=lambda epoch, logs: times.append(-time.perf_counter()),
        on_epoch_end=lambda epoch, logs: times.__setitem__(-1, times[-1] + time.perf_counter()),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8, help="steps per epoch")
    args = parser.parse_args()
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    print(next((ln for ln in cpu.splitlines() if "Model name" in ln), "cpu: unknown"))

    import keras
    import tensorflow as tf

    from bonefrac.config import TrainConfig
    from bonefrac.models import build_classifier, compile_model

    print("GPUs seen by TensorFlow:", len(tf.config.list_physical_devices("GPU")))
    n = args.batch * args.steps
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, args.size, args.size, 3)).astype(np.float32)
    y = rng.integers(0, 2, (n, 1)).astype(np.float32)
    cfg = TrainConfig(weights="none", batch_size=args.batch)
    results = []
    for choice in ("auto", True):
        keras.utils.set_random_seed(0)
        model = build_classifier(1, args.size, cfg, name="bench")
        compile_model(model, 1, 1e-4, choice)
        times: list[float] = []
        clock = _epoch_clock(keras, times)
        # one fit: epoch 1 pays the graph build (and XLA compilation when on), later ones not
        model.fit(
            x, y, batch_size=args.batch, epochs=3, shuffle=False, callbacks=[clock], verbose=0
        )
        times = [times[0], min(times[1:])]
        results.append(
            {
                "jit_compile": choice,
                "resolved": bool(model.jit_compile),
                "first_epoch_s": round(times[0], 1),
                "steady_epoch_s": round(times[1], 1),
                "steady_img_s": round(n / times[1], 1),
            }
        )
        print(
            f"jit_compile={choice!s:<5} (resolved {bool(model.jit_compile)!s:<5}): first epoch "
            f"{times[0]:6.1f} s, steady epoch {times[1]:6.1f} s ({n / times[1]:.1f} img/s)"
        )
    auto, forced = results
    print(
        f"forced on / auto: first epoch x{forced['first_epoch_s'] / auto['first_epoch_s']:.2f}, "
        f"steady epoch x{forced['steady_epoch_s'] / auto['steady_epoch_s']:.2f}"
    )
    dump(results)


if __name__ == "__main__":
    main()
