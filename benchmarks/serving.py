"""Serving speed per runtime, against raw TensorFlow fp32 in the same run.

(0) the CPU: `lscpu`'s model name and flags (machines differ; only ratios of one run count);
(1) raw forward passes (body part + that part's fracture model) on the same preprocessed image:
    TensorFlow fp32 `tf.function` vs OpenVINO fp32 vs OpenVINO int8 (NNCF), batch 1 and 16:
    p50 / p95 latency, img/s, ratio to TensorFlow;
(2) the service's own overhead: `Predictor.predict_bytes` (decode, preprocess, OOD gate,
    calibration, recommendation) + JSON with forward passes that cost nothing;
(3) the service end to end per runtime (`serve.runtime`): single-request POST /predict
    latency, then N concurrent clients through /predict_batch (continuous batching) vs the
    same runtime's raw throughput at the batch size the service formed and at batch N.

Usage (the service and this script each hold the models; only one runs at a time):
    python benchmarks/serving.py --size 224 --data DIR   # untrained ResNet50s at 224 px
    python benchmarks/serving.py --bundle /tmp/bundle    # a packaged bundle (with its IR)
    [--runtimes tensorflow,openvino-fp32,openvino-int8] [--clients 8] [--duration 20]
    [--requests 40] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
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
from bench_bundle import untrained_bundle  # noqa: E402
from harness import cpu_info, dump, time_it  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(port: int, env: dict[str, str], bundle: Path | None, log: Path, params: Path):
    command = [sys.executable, "-m", "bonefrac.cli", "--params", str(params)]
    command += ["serve", "--port", str(port)]
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


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process tree so far (the server and its workers)."""
    import psutil

    root = psutil.Process(pid)
    total = 0.0
    for process in [root, *root.children(recursive=True)]:
        times = process.cpu_times()
        total += times.user + times.system
    return total


def load(
    url: str,
    route: str,
    field: str,
    image: bytes,
    clients: int,
    seconds: float,
    server_pid: int | None = None,
) -> dict:
    """`clients` threads POST one image each, back to back, for `seconds`. With `server_pid`,
    also how many cores the server and these clients kept busy (CPU seconds / wall seconds):
    a server below the machine's core count while its clients wait is idling, not working."""
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

    server_cpu = cpu_seconds(server_pid) if server_pid else None
    client_cpu = time.process_time()
    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    client_cpu = time.process_time() - client_cpu
    if server_pid:
        server_cpu = cpu_seconds(server_pid) - server_cpu
    return {
        "server_cores_busy": server_cpu / elapsed if server_pid else None,
        "server_cpu_ms_per_image": 1e3 * server_cpu / max(done[0], 1) if server_pid else None,
        "client_cores_busy": client_cpu / elapsed,
        "route": route,
        "clients": clients,
        "seconds": elapsed,
        "requests": done[0],
        "errors": errors[0],
        "images_per_s": done[0] / elapsed,
        "p50_ms": 1e3 * float(np.percentile(latencies, 50)) if latencies else None,
        "p95_ms": 1e3 * float(np.percentile(latencies, 95)) if latencies else None,
    }


def mean_batch_size(url: str) -> float | None:
    """Mean batch size of /predict_batch's forward passes so far, from the service's
    `bonefrac_batch_size` histogram on /metrics."""
    total = count = 0.0
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        name = line.split("{")[0].split(" ")[0]
        if name == "bonefrac_batch_size_sum":
            total += float(line.rsplit(" ", 1)[1])
        elif name == "bonefrac_batch_size_count":
            count += float(line.rsplit(" ", 1)[1])
    return total / count if count else None


def timing(name: str, fn, items: int, repeat: int) -> dict:
    """Latency and throughput of `fn`, and the cores this process kept busy meanwhile."""
    cpu, wall = time.process_time(), time.perf_counter()
    t = time_it(name, fn, repeat=repeat, warmup=3, items=items)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {
        "median_ms": t.median_s * 1e3,
        "p95_ms": t.p95_s * 1e3,
        "images_per_s": t.per_second,
        "cores_busy": cpu / wall,
        "cpu_ms_per_image": 1e3 * cpu / (items * (repeat + 3)),
    }


def raw_runtimes(bundle: Path, runtimes: list[str], image: bytes, repeat: int) -> dict:
    """The two-model forward of each runtime on one preprocessed image, batch 1, 4, 8 and 16
    (4: about what the service forms with 8 closed-loop clients)."""
    from bonefrac.inference import Views
    from bonefrac.serving.predictor import Predictor

    out, predictors = {}, {}
    for runtime in runtimes:
        predictor = Predictor.from_bundle(bundle, warm_up=False, runtime=runtime)
        if predictor.runtime_info["name"] != runtime:
            print(f"{runtime}: not available here ({predictor.runtime.note}); skipped")
            continue
        predictors[runtime] = predictor
        x = predictor.inputs(image)  # one image in each preprocessing, as served
        part = predictor.classes[int(np.asarray(predictor.core.body_part(x)).argmax())]

        def forward(batch, p=predictor, part=part):
            p.core.body_part(batch)
            p.core.fracture[part](batch)

        rows = {}
        for batch in (1, 4, 8, 16):
            xb = Views.concat([x] * batch)
            rows[batch] = timing(f"{runtime} b{batch}", lambda xb=xb: forward(xb), batch, repeat)
        out[runtime] = rows
    base = out.get("tensorflow")
    print(
        f"\n{'raw two-model forward':<16} {'batch':>5} {'p50 ms':>9} {'p95 ms':>9} "
        f"{'img/s':>8} {'vs TF p50':>9} {'vs TF img/s':>11}"
    )
    for runtime, rows in out.items():
        for batch, row in rows.items():
            if base:
                row["speedup_p50"] = base[batch]["median_ms"] / row["median_ms"]
                row["speedup_img_s"] = row["images_per_s"] / base[batch]["images_per_s"]
            print(
                f"{runtime:<16} {batch:>5} {row['median_ms']:9.1f} {row['p95_ms']:9.1f} "
                f"{row['images_per_s']:8.1f} {row.get('speedup_p50', 1):8.2f}x "
                f"{row.get('speedup_img_s', 1):10.2f}x"
            )
    return out, predictors


def service_overhead(predictor, image: bytes, repeat: int) -> dict:
    """predict_bytes + JSON with free forward passes: everything but the models, in-process."""
    from bonefrac.runtimes import Loaded
    from bonefrac.serving.predictor import Predictor

    outputs = {
        n: (len(predictor.classes) if n == "body_part" else 1) for n in predictor.manifest["models"]
    }
    free = {n: (lambda x, k=k: np.full((len(x), k), 1 / k, np.float32)) for n, k in outputs.items()}
    stub = Predictor(
        predictor.manifest,
        predictor._keras,
        predictor.gate,
        predictor.serve,
        "stub",
        Loaded("none", free, dict.fromkeys(free, "none")),
    )
    inproc = timing(
        "overhead", lambda: json.dumps(stub.predict_bytes(image, allow_ood=True)), 1, repeat
    )
    real = timing(
        "predict_bytes",
        lambda: json.dumps(predictor.predict_bytes(image, allow_ood=True)),
        1,
        repeat,
    )
    print(
        f"service overhead in-process (decode, preprocess, OOD, calibration, recommendation, "
        f"JSON; free models): p50 {inproc['median_ms']:.1f} ms"
    )
    return {"in_process": inproc, "predict_bytes_with_models": real}


def service_runtime(runtime: str, args, env, bundle, image: bytes, scratch: Path, raw: dict):
    params = scratch / f"params-{runtime}.yaml"
    params.write_text(f"serve:\n  runtime: {runtime}\n  allow_unreviewed: true\n")
    process, url = start_server(free_port(), env, bundle, scratch / f"server-{runtime}.log", params)
    try:
        with httpx.Client(timeout=120) as http:
            form = {"allow_ood": "true"}  # untrained models: time them even if the gate objects
            served = http.post(f"{url}/predict", files={"image": ("x.png", image)}, data=form)
            served = served.json()
            print(f"\nservice with serve.runtime={runtime}: responses say {served['runtime']}")

            def request() -> None:
                response = http.post(f"{url}/predict", files={"image": ("x.png", image)}, data=form)
                assert response.status_code == 200, response.text

            single = timing(f"POST /predict {runtime}", request, 1, args.requests)
        batched = load(
            url, "/predict_batch", "images", image, args.clients, args.duration, process.pid
        )
        batched["mean_batch_size"] = mean_batch_size(url)
        formed = max(1, round(batched["mean_batch_size"] or 1))
        near = min(raw, key=lambda b: abs(b - formed))
        batched["ratio_to_raw_at_formed_batch"] = (
            batched["images_per_s"] / raw[near]["images_per_s"]
        )
        batched["raw_batch_compared"] = near
        batched["ratio_to_raw_batch_8"] = batched["images_per_s"] / raw[8]["images_per_s"]
        print(
            f"POST /predict p50 {single['median_ms']:.1f} ms p95 {single['p95_ms']:.1f} ms "
            f"(raw forward b1 {raw[1]['median_ms']:.1f} ms); /predict_batch {args.clients} "
            f"clients: {batched['images_per_s']:.1f} img/s, {batched['errors']} errors, mean "
            f"batch {batched['mean_batch_size']}, {batched['ratio_to_raw_at_formed_batch']:.2f}x "
            f"raw b{near}, {batched['ratio_to_raw_batch_8']:.2f}x raw b8"
        )
        print(
            f"  cores busy: server {batched['server_cores_busy']:.2f}, clients "
            f"{batched['client_cores_busy']:.2f}; CPU per image: server "
            f"{batched['server_cpu_ms_per_image']:.1f} ms, raw b{near} "
            f"{raw[near]['cpu_ms_per_image']:.1f} ms ({raw[near]['cores_busy']:.2f} cores busy)"
        )
        return {
            "served_runtime": served["runtime"],
            "predict": single,
            "batched": batched,
            "rss_mb": worker_rss_mb(process.pid),
        }
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=None)
    parser.add_argument("--size", type=int, default=None, help="time untrained models at this size")
    parser.add_argument("--data", type=Path, default=ROOT / "data", help="folder of MURA-v1.1/")
    parser.add_argument("--image", type=Path, default=None)
    parser.add_argument("--runtimes", default="tensorflow,openvino-fp32,openvino-int8")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--duration", type=float, default=20)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--repeat", type=int, default=20, help="raw timing repeats per batch")
    parser.add_argument("--no-service", action="store_true", help="raw runtimes and overhead only")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true"}
    results = {"cpu": cpu_info()}
    mura = args.data / "MURA-v1.1"
    scratch = Path(tempfile.mkdtemp(prefix="bonefrac-bench-"))
    env["BENTOML_HOME"] = str(scratch / "bentoml")
    try:
        if args.size is not None:
            args.bundle = untrained_bundle(args.size, scratch, mura)
        if args.bundle is None:
            raise SystemExit("pass --bundle DIR (a packaged bundle) or --size PX")
        image_path = args.image or sorted((mura / "valid").rglob("*.png"))[0]
        image = image_path.read_bytes()
        runtimes = args.runtimes.split(",")
        raw, predictors = raw_runtimes(args.bundle, runtimes, image, args.repeat)
        results["raw"] = raw
        first = next(iter(predictors.values()))
        print(f"bundle {args.bundle} ({first.size} px); image {image_path}")
        results["overhead"] = service_overhead(predictors[runtimes[-1]], image, args.requests)
        results["overhead"]["share_of_int8_forward"] = (
            results["overhead"]["in_process"]["median_ms"] / raw["openvino-int8"][1]["median_ms"]
            if "openvino-int8" in raw
            else None
        )
        del predictors, first
        if not args.no_service:
            results["service"] = {
                r: service_runtime(r, args, env, args.bundle, image, scratch, raw[r]) for r in raw
            }
            base = results["service"].get("tensorflow")
            for r, row in results["service"].items():
                if base:
                    row["predict_speedup_vs_tf_service"] = (
                        base["predict"]["median_ms"] / row["predict"]["median_ms"]
                    )
                    print(
                        f"{r}: /predict p50 {row['predict']['median_ms']:.1f} ms = "
                        f"{row['predict_speedup_vs_tf_service']:.2f}x faster than TF service"
                    )
        dump([results], args.out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
