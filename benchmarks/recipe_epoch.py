"""Time per MURA epoch of the default recipe on this machine: images/s of bonefrac's own
ResNet50 (pretrained path: backbone weights from a file, BatchNorm frozen) for a phase-2
training step with every layer trainable, a phase-1 step with the backbone frozen, and the
validation step, at the recipe's 320 px and batch 8; then the epoch time for MURA's
elbow + hand + shoulder training images. Usage: python benchmarks/recipe_epoch.py
[--size 320] [--batch 8] [--steps 6] [--warmup 2]"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from harness import dump  # noqa: E402

# MURA v1.1 training images (train_image_paths.csv), the parts bonefrac keeps
MURA_TRAIN_IMAGES = {"elbow": 4931, "hand": 5543, "shoulder": 8379}
VAL_FRACTION = 0.1  # data.val_fraction: this share of MURA-train patients is val


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    args = parser.parse_args()
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    print(next((ln for ln in cpu.splitlines() if "Model name" in ln), "cpu: unknown"))

    import keras

    from bonefrac.config import TrainConfig
    from bonefrac.models import build_classifier, compile_model, set_phase

    size, batch = args.size, args.batch
    n = batch * (args.warmup + args.steps)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, size, size, 3)).astype(np.float32)
    y = rng.integers(0, 2, (n, 1)).astype(np.float32)

    class StepTimes(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            self.start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.times.append(time.perf_counter() - self.start)

        def on_train_begin(self, logs=None):
            self.times = []

    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "backbone.weights.h5"
        keras.applications.ResNet50(
            include_top=False, weights=None, input_shape=(size, size, 3), pooling="avg"
        ).save_weights(weights)
        cfg = TrainConfig(weights=str(weights), batch_size=batch)  # finetune_layers: all
        keras.utils.set_random_seed(0)
        model = build_classifier(1, size, cfg, "bench")

    results = []
    for phase, learning_rate in (("finetune", 1e-4), ("head", 1e-3)):
        set_phase(model, phase, cfg)
        compile_model(model, 1, learning_rate)
        timer = StepTimes()
        model.fit(x, y, batch_size=batch, epochs=1, shuffle=False, callbacks=[timer], verbose=0)
        steady = timer.times[args.warmup :]
        per_s = batch / float(np.median(steady))
        results.append({"name": f"train step, {phase} phase", "img_s": per_s})
        print(f"{phase:<9} train step: median {np.median(steady):.2f} s/batch, {per_s:.2f} img/s")

    # validation as `fit` runs it: Keras' compiled test step, batch by batch
    class TestTimes(keras.callbacks.Callback):
        def on_test_begin(self, logs=None):
            self.times = []

        def on_test_batch_begin(self, batch, logs=None):
            self.start = time.perf_counter()

        def on_test_batch_end(self, batch, logs=None):
            self.times.append(time.perf_counter() - self.start)

    timer = TestTimes()
    model.evaluate(x, y, batch_size=batch, callbacks=[timer], verbose=0)
    infer = batch / float(np.median(timer.times[args.warmup :]))
    results.append({"name": "validation step", "img_s": infer})
    print(f"validation step: {infer:.2f} img/s")

    train_img_s, head_img_s = results[0]["img_s"], results[1]["img_s"]
    total = sum(MURA_TRAIN_IMAGES.values())
    train_n, val_n = total * (1 - VAL_FRACTION), total * VAL_FRACTION
    epoch_s = train_n / train_img_s + val_n / infer
    head_s = train_n / head_img_s + val_n / infer
    print(
        f"MURA elbow+hand+shoulder: {total} train images -> {train_n:.0f} train + {val_n:.0f} val"
    )
    print(
        f"one epoch over them (the three fracture models together, or the body-part model): "
        f"phase 2 {epoch_s / 3600:.2f} h, phase 1 {head_s / 3600:.2f} h"
    )
    results.append({"name": "mura_epoch_phase2_hours", "img_s": epoch_s / 3600})
    results.append({"name": "mura_epoch_phase1_hours", "img_s": head_s / 3600})
    dump(results)


if __name__ == "__main__":
    main()
