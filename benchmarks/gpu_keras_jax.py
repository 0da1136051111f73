"""ResNet50 training and inference throughput on one GPU (Keras 3, JAX backend).

TensorFlow is not installable on the lent GPU machine (no registry; the TF wheel is
larger than what can be carried), so this measures the same Keras 3 ResNet50 graph
through Keras' JAX backend (XLA-compiled, like TF with jit_compile=True). Results: docs/recipe.md.

Usage on a GPU machine: pip install keras==3.15.1 jax[cuda13]; python benchmarks/gpu_keras_jax.py
(writes gpu_bench.json to $OUT or the current directory).
"""

import json
import os
import subprocess
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")
import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

results = {
    "devices": [str(d) for d in jax.devices()],
    "keras": keras.__version__,
    "jax": jax.__version__,
    "backend": keras.backend.backend(),
}
cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
results["cpu"] = next(
    (ln.split(":", 1)[1].strip() for ln in cpu.splitlines() if "Model name" in ln), ""
)
print(json.dumps(results), flush=True)


def build(size, trainable=True):
    base = keras.applications.ResNet50(
        weights=None, include_top=False, input_shape=(size, size, 3), pooling="avg"
    )
    base.trainable = trainable
    out = keras.layers.Dense(1, activation="sigmoid")(base.output)
    model = keras.Model(base.input, out)
    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="binary_crossentropy")
    return model


def train_rate(size, batch, trainable, steps=60, policy="float32"):
    keras.mixed_precision.set_global_policy(policy)
    keras.utils.set_random_seed(0)
    model = build(size, trainable)
    x = np.random.rand(batch * steps, size, size, 3).astype("float32")
    y = (np.random.rand(batch * steps, 1) > 0.5).astype("float32")
    t0 = time.perf_counter()
    model.fit(x[: batch * 4], y[: batch * 4], batch_size=batch, epochs=1, verbose=0)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.fit(x, y, batch_size=batch, epochs=1, verbose=0)
    dt = time.perf_counter() - t0
    keras.mixed_precision.set_global_policy("float32")
    return {
        "what": "train",
        "size": size,
        "batch": batch,
        "trainable": trainable,
        "policy": policy,
        "first_call_s": round(first, 2),
        "img_per_s": round(batch * steps / dt, 1),
    }


def infer_rate(size, batch, reps=50, policy="float32"):
    keras.mixed_precision.set_global_policy(policy)
    model = build(size)
    x = np.random.rand(batch, size, size, 3).astype("float32")
    model.predict_on_batch(x)
    lat = []
    for _ in range(reps):
        t0 = time.perf_counter()
        np.asarray(model.predict_on_batch(x))
        lat.append(time.perf_counter() - t0)
    keras.mixed_precision.set_global_policy("float32")
    p50 = float(np.median(lat))
    return {
        "what": "infer",
        "size": size,
        "batch": batch,
        "policy": policy,
        "p50_ms": round(p50 * 1000, 2),
        "p95_ms": round(float(np.percentile(lat, 95)) * 1000, 2),
        "img_per_s": round(batch / p50, 1),
    }


runs = [
    lambda: train_rate(320, 8, True),
    lambda: train_rate(320, 8, False),
    lambda: train_rate(320, 8, True, policy="mixed_bfloat16"),
    lambda: train_rate(320, 32, True, steps=30),
    lambda: train_rate(64, 16, True),
    lambda: infer_rate(224, 1),
    lambda: infer_rate(224, 32),
    lambda: infer_rate(320, 1),
    lambda: infer_rate(320, 32),
]
out = []
for r in runs:
    try:
        res = r()
    except Exception as exc:  # keep going: one failure should not lose the rest
        res = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    print(json.dumps(res), flush=True)
    out.append(res)
with open(os.path.join(os.environ.get("OUT", "."), "gpu_bench.json"), "w") as f:
    json.dump({"env": results, "runs": out}, f, indent=1)
sys.exit(0)
