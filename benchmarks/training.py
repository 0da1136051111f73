"""Training input overhead: images/s of bonefrac's pipeline (tf.data from the memory-mapped
cache, ordered maps as deterministic training runs them, cache, prefetch) against a plain
`model.fit` on the same in-memory arrays, same model, same run; plus evaluation throughput
(direct batched calls vs `model.predict`).
Usage: python benchmarks/training.py [--size 64] [--images 192]"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from harness import dump  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()

    import keras

    from bonefrac.cache import Cache
    from bonefrac.config import TrainConfig
    from bonefrac.evaluate.stage import predict
    from bonefrac.models import build_classifier, compile_model
    from bonefrac.train import TaskData, make_dataset

    rng = np.random.default_rng(0)
    n, size = args.images, args.size
    with tempfile.TemporaryDirectory() as tmp:
        images = np.lib.format.open_memmap(
            f"{tmp}/images.npy", mode="w+", dtype=np.uint8, shape=(n, size, size)
        )
        images[:] = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
        labels = rng.integers(0, 2, n)
        cache = Cache(images=images, index=None, meta={"image_size": size})
        data = TaskData(np.arange(n), labels.astype(np.float32)[:, None], labels, ["0", "1"])
        cfg = TrainConfig(weights="none", batch_size=16)
        keras.utils.set_random_seed(0)
        model = build_classifier(1, size, cfg, "bench")
        compile_model(model, 1, 1e-3)
        arrays = np.repeat(np.asarray(images)[..., None], 3, axis=-1).astype(np.float32)
        model.fit(arrays[:32], labels[:32], batch_size=16, epochs=1, verbose=0)  # trace once
        small = TaskData(np.arange(32), data.targets[:32], labels[:32], ["0", "1"])
        model.fit(make_dataset(cache, small, 16, True, False), epochs=1, verbose=0)

        def timed(fit) -> float:
            start = time.perf_counter()
            fit()
            return (n * args.epochs) / (time.perf_counter() - start)

        results = []
        for round_ in range(2):  # alternate to even out machine noise
            plain = timed(
                lambda: model.fit(
                    arrays, labels, batch_size=16, epochs=args.epochs, shuffle=True, verbose=0
                )
            )
            ours = timed(
                lambda: model.fit(
                    make_dataset(cache, data, 16, True, False), epochs=args.epochs, verbose=0
                )
            )
            results.append(
                {
                    "round": round_,
                    "plain_fit_img_s": plain,
                    "bonefrac_img_s": ours,
                    "overhead": plain / ours - 1,
                }
            )
        for r in results:
            print(
                f"round {r['round']}: plain model.fit {r['plain_fit_img_s']:.1f} img/s, "
                f"bonefrac pipeline {r['bonefrac_img_s']:.1f} img/s, "
                f"overhead {100 * r['overhead']:+.1f}%"
            )

        start = time.perf_counter()
        predict(model, images)
        direct = n / (time.perf_counter() - start)
        start = time.perf_counter()
        model.predict(arrays, batch_size=32, verbose=0)
        keras_predict = n / (time.perf_counter() - start)
        print(
            f"evaluation: direct batched calls {direct:.1f} img/s, "
            f"model.predict {keras_predict:.1f} img/s"
        )
        results.append({"eval_direct_img_s": direct, "eval_predict_img_s": keras_predict})
        dump(results)


if __name__ == "__main__":
    main()
