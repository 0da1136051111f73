"""Serving speed, against the raw TensorFlow forward passes in the same run:

(a) single-request latency: POST /predict (upload, decode, preprocess, OOD gate, both models,
    calibration, recommendation, JSON) vs the two compiled forward passes (body part + that
    part's fracture model) on the same preprocessed image;
(b) throughput: N concurrent clients for a fixed time through /predict_batch (adaptive
    batching) and through /predict, vs the raw forward passes at batch size N. The load must
    end with zero errors; the worker's memory (RSS) is reported at its start and end.

Usage (the service and this script each hold the models; only one runs at a time):
    BENTOML_HOME=... python benchmarks/serving.py                 # bonefrac:latest in the store
    python benchmarks/serving.py --bundle /tmp/bundle              # imported into a temp store
    python benchmarks/serving.py --size 224     # untrained ResNet50s at 224 px: real-size compute
    [--image X.png] [--clients 8] [--duration 30] [--requests 60] [--out results.json]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from harness import compare, dump, time_it  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(port: int, env: dict[str, str], bundle: Path | None, log: Path):
    command = [sys.executable, "-m", "bonefrac.cli", "serve", "--port", str(port)]
    if bundle is not None:
        command += ["--bundle", str(bundle)]
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(1)
    os.killpg(process.pid, signal.SIGTERM)
    raise SystemExit("server not ready in 600 s")


def worker_rss_mb(server_pid: int) -> float:
    """RSS of the largest process in the server's tree (the worker holding the models)."""
    import psutil

    root = psutil.Process(server_pid)
    procs = [root, *root.children(recursive=True)]
    return max(p.memory_info().rss for p in procs) / 1e6


def load(url: str, route: str, field: str, image: bytes, clients: int, seconds: float) -> dict:
    """`clients` threads POST one image each, back to back, for `seconds`."""
    done, errors, latencies = [0], [0], []
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def client() -> None:
        with httpx.Client(timeout=120) as http:
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                try:
                    response = http.post(f"{url}{route}", files={field: ("x.png", image)})
                    body = response.json()
                    ok = response.status_code == 200 and not (
                        isinstance(body, list) and "error" in body[0]
                    )
                except (httpx.HTTPError, ValueError):
                    ok = False
                with lock:
                    latencies.append(time.perf_counter() - start)
                    done[0] += ok
                    errors[0] += not ok

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    return {
        "route": route,
        "clients": clients,
        "seconds": elapsed,
        "requests": done[0],
        "errors": errors[0],
        "images_per_s": done[0] / elapsed,
        "p50_ms": 1e3 * float(np.percentile(latencies, 50)) if latencies else None,
        "p95_ms": 1e3 * float(np.percentile(latencies, 95)) if latencies else None,
    }


def untrained_bundle(size: int, out: Path) -> Path:
    """A bundle of untrained ResNet50s at `size` px (speed does not depend on the weights) with
    a PCA fitted on the demo data's training images, for timing at the real input size."""
    import keras

    from bonefrac.bundle import write_bundle
    from bonefrac.config import PcaConfig, Settings, TrainConfig
    from bonefrac.imaging import preprocess_file
    from bonefrac.models import build_classifier
    from bonefrac.pca import fit

    settings = Settings().model_copy(
        update={"preprocess": Settings().preprocess.model_copy(update={"image_size": size})}
    )
    parts = ("elbow", "hand", "shoulder")
    files = {}
    for name, outputs in (("body_part", 3), *((p, 1) for p in parts)):
        files[name] = out / f"{name}.keras"
        build_classifier(outputs, size, TrainConfig(weights="none"), name).save(files[name])
        keras.backend.clear_session()
    train = sorted((ROOT / "data/MURA-v1.1/train").rglob("*.png"))[:300]
    images = np.stack([preprocess_file(p, settings.preprocess) for p in train])
    pca = fit(images, PcaConfig())
    pca.save(out / "pca.joblib")
    points = {p: {"threshold": 0.5, "temperature": 1.0, "uncertain_band": 0.1} for p in parts}
    versions = {"body_part": {"classes": list(parts), "run_id": f"untrained-{size}px"}}
    return write_bundle(
        out / "bundle",
        settings,
        files,
        points,
        out / "pca.joblib",
        versions,
        ood_gate=pca.ood_gate(),
    )


def mean_batch_size(url: str) -> float | None:
    """Mean adaptive batch size of /predict_batch so far, from BentoML's Prometheus metrics."""
    total = count = 0.0
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("bentoml_service_adaptive_batch_size_") and "predict_batch" in line:
            if line.split("{")[0].endswith("_sum"):
                total += float(line.rsplit(" ", 1)[1])
            elif line.split("{")[0].endswith("_count"):
                count += float(line.rsplit(" ", 1)[1])
    return total / count if count else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=None)
    parser.add_argument("--size", type=int, default=None, help="time untrained models at this size")
    parser.add_argument("--image", type=Path, default=None)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--duration", type=float, default=30)
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true"}
    temp_home = work = None
    if args.size is not None:
        work = Path(tempfile.mkdtemp(prefix="bonefrac-bench-"))
        args.bundle = untrained_bundle(args.size, work)
    if args.bundle is not None:
        temp_home = Path(tempfile.mkdtemp(prefix="bonefrac-bench-bentoml-"))
        env["BENTOML_HOME"] = str(temp_home)
        bundle = args.bundle
    else:
        import bentoml

        bundle = Path(bentoml.models.get("bonefrac:latest").path)
    image_path = args.image or sorted((ROOT / "data/MURA-v1.1/valid").rglob("*.png"))[0]
    image = image_path.read_bytes()

    from bonefrac.serving.predictor import Predictor

    scratch = Path(tempfile.mkdtemp(prefix="bonefrac-bench-log-"))
    process, url = start_server(free_port(), env, args.bundle, scratch / "server.log")
    try:
        raw = Predictor.from_bundle(bundle)  # same models, same compiled graphs as the service
        x = raw.preprocess(image)[None].astype(np.float32)  # (1, S, S, 3)
        part = raw.classes[int(np.asarray(raw._forward["body_part"](x)).argmax())]
        print(f"bundle {bundle} ({raw.size} px, synthetic={raw.synthetic}); image {image_path}")

        def forward(batch: np.ndarray) -> None:
            raw._forward["body_part"](batch)
            raw._forward[part](batch)

        results = []
        with httpx.Client(timeout=120) as http:

            def request() -> None:
                response = http.post(f"{url}/predict", files={"image": ("x.png", image)})
                assert response.status_code == 200, response.text

            latency = compare(
                "POST /predict vs raw two-model forward",
                request,
                lambda: forward(x),
                repeat=args.requests,
                warmup=5,
                unit="img",
            )
        results.append(latency)

        n = args.clients
        xb = np.repeat(x, n, axis=0)
        raw_batched = time_it(f"raw forward, batch {n}", lambda: forward(xb), repeat=20, items=n)
        print(f"raw forward at batch {n}: {raw_batched.per_second:.1f} img/s")
        rss_start = worker_rss_mb(process.pid)
        batched = load(url, "/predict_batch", "images", image, n, args.duration)
        batched["mean_batch_size"] = mean_batch_size(url)
        unbatched = load(url, "/predict", "image", image, n, args.duration)
        rss_end = worker_rss_mb(process.pid)
        for run in (batched, unbatched):
            run["ratio_to_raw_batched"] = run["images_per_s"] / raw_batched.per_second
            print(
                f"{run['route']:<15} {n} clients {run['seconds']:.0f} s: {run['requests']} ok, "
                f"{run['errors']} errors, {run['images_per_s']:.1f} img/s "
                f"({run['ratio_to_raw_batched']:.2f}x raw batched), p50 {run['p50_ms']:.0f} ms"
            )
        print(
            f"worker RSS {rss_start:.0f} MB at the start of the load, {rss_end:.0f} MB at the end"
        )
        results.append(
            {
                "name": "throughput",
                "raw_batched_images_per_s": raw_batched.per_second,
                "adaptive_batching": batched,
                "no_batching": unbatched,
                "worker_rss_mb": {"start": rss_start, "end": rss_end},
                "image_size": raw.size,
                "synthetic_models": raw.synthetic,
            }
        )
        dump(results, args.out)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)
        for folder in (temp_home, work, scratch):
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
