"""Hostile input, at length: (a) a long fuzz run of the decode path, (b) mixed load on a real
`bonefrac serve`: N clients send valid and hostile uploads for a fixed time.

(a) hypothesis mutations of valid PNG, 16-bit PNG, JPEG and DICOM files (the generators of
    tests/unit/test_decode_budget.py, many more cases): every case decodes or gets an
    ImageError code; reports the slowest case and the largest Python/numpy peak.
(b) every response is checked: 0 x 5xx, every valid request answered 200, hostile ones 4xx
    in the error shape; the worker's RSS is sampled each second and its slope reported
    (MB per minute, least squares over the second half of the run, after warm-up).

    python benchmarks/hostile.py [--fuzz 3000] [--clients 8] [--duration 120] [--out r.json]
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import socket
import sys
import tempfile
import threading
import time
import tracemalloc
from collections import Counter
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(Path(__file__).parent), str(ROOT)]
from harness import dump  # noqa: E402
from serving import free_port, start_server, worker_rss_mb  # noqa: E402

BOUNDARY = "bench-boundary"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"
FORM = "application/x-www-form-urlencoded"


def fuzz_decode(cases: int) -> dict:
    from hypothesis import HealthCheck, given, settings
    from tests.unit.test_decode_budget import FUZZ_MAX_PIXELS, dicom_headers, mutated

    from bonefrac.imaging import ImageError, decode

    codes: Counter[str] = Counter()
    slowest = peak_max = 0.0

    @settings(max_examples=cases, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(mutated() | dicom_headers())
    def run(data: bytes) -> None:
        nonlocal slowest, peak_max
        tracemalloc.start()
        start = time.perf_counter()
        try:
            decode(data, max_pixels=FUZZ_MAX_PIXELS, min_side=8)
            codes["decoded"] += 1
        except ImageError as exc:
            codes[exc.code] += 1
        finally:
            slowest = max(slowest, time.perf_counter() - start)
            peak_max = max(peak_max, tracemalloc.get_traced_memory()[1])
            tracemalloc.stop()

    started = time.perf_counter()
    run()
    result = {
        "cases": sum(codes.values()),
        "outcomes": dict(codes),
        "slowest_case_ms": round(slowest * 1e3, 1),
        "largest_peak_mb": round(peak_max / 1e6, 1),
        "seconds": round(time.perf_counter() - started, 1),
    }
    print("fuzz:", result)
    return result


def _multipart(*parts: tuple[str, bytes]) -> bytes:
    body = b""
    for disposition, content in parts:
        body += f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode()
        body += content + b"\r\n"
    return body + f"--{BOUNDARY}--\r\n".encode()


def hostile_requests(good: bytes) -> list[tuple[str, str, bytes, str]]:
    """(name, route, body, content type) of requests that must get a 4xx."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian
    from tests.service.inputs import decompression_bomb, dicom

    mp = MULTIPART
    bomb = dicom(np.zeros((3000, 3000), np.uint16), syntax=DeflatedExplicitVRLittleEndian)
    header = b"content-disposition: " * 20_000
    file_part = 'form-data; name="image"; filename="Doe^Jane.png"'
    return [
        ("deflate bomb", "/predict", _multipart((file_part, bomb)), mp),
        ("png bomb", "/predict", _multipart((file_part, decompression_bomb())), mp),
        ("long header", "/predict",
         _multipart(('form-data; name="image"; x="' + header.decode() + '"', b"x")), mp),
        ("url as file", "/predict", _multipart(('form-data; name="image"', b"http://x/")), mp),
        ("form-encoded", "/predict", b"image=http://127.0.0.1:1/", FORM),
        ("truncated", "/predict", _multipart((file_part, good[: len(good) // 2])), mp),
        ("batch of 17", "/predict_batch",
         _multipart(*[('form-data; name="images"; filename="a"', good)] * 17), mp),
    ]  # fmt: skip


def oversize_declared(url: str) -> int:
    """A raw request declaring 500 MB: the status the server answers before closing."""
    host, port = url.removeprefix("http://").split(":")
    head = (f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 500000000\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n\r\n").encode()  # fmt: skip
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(head)
        status = sock.recv(64).split(b" ")[1]
    return int(status)


def mixed_load(url: str, pid: int, good: bytes, clients: int, seconds: float) -> dict:
    hostile = hostile_requests(good)
    counts: Counter[str] = Counter()
    lock = threading.Lock()
    deadline = time.monotonic() + seconds
    valid_file = 'form-data; name="image"; filename="x.png"'
    valid = [
        ("/predict", _multipart((valid_file, good), ('form-data; name="allow_ood"', b"true"))),
        ("/predict_batch", _multipart(('form-data; name="images"; filename="x.png"', good))),
    ]

    def client(seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(timeout=180) as http:
            while time.monotonic() < deadline:
                kind = rng.random()
                try:
                    if kind < 0.5:
                        route, body = rng.choice(valid)
                        headers = {"content-type": MULTIPART}
                        response = http.post(f"{url}{route}", content=body, headers=headers)
                        outcome = f"valid_{response.status_code}"
                    elif kind < 0.9:
                        name, route, body, ctype = rng.choice(hostile)
                        response = http.post(f"{url}{route}", content=body,
                                             headers={"content-type": ctype})  # fmt: skip
                        code = response.json()["error"]["code"]
                        outcome = f"hostile_{response.status_code // 100}xx"
                        if response.status_code >= 500:
                            outcome += f" ({name}: {code})"
                    elif kind < 0.95:
                        outcome = f"oversize_{oversize_declared(url) // 100}xx"
                    else:
                        response = http.get(f"{url}/no-such-{rng.random()}")
                        outcome = f"not_found_{response.status_code}"
                except (httpx.HTTPError, OSError, ValueError) as exc:
                    outcome = f"client_error {type(exc).__name__}"
                with lock:
                    counts[outcome] += 1

    rss: list[tuple[float, float]] = []
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.monotonic()
    for thread in threads:
        thread.start()
    while any(t.is_alive() for t in threads):
        rss.append((time.monotonic() - start, worker_rss_mb(pid)))
        time.sleep(1)
    half = rss[len(rss) // 2 :]
    t, mb = np.array([r[0] for r in half]), np.array([r[1] for r in half])
    slope = float(np.polyfit(t, mb, 1)[0] * 60) if len(half) > 2 else float("nan")
    result = {
        "clients": clients,
        "seconds": seconds,
        "outcomes": dict(counts),
        "five_xx": sum(
            n for k, n in counts.items() if "5xx" in k or k.startswith(("valid_5", "not_found_5"))
        ),
        "rss_start_mb": round(rss[0][1], 1),
        "rss_end_mb": round(rss[-1][1], 1),
        "rss_slope_mb_per_min_second_half": round(slope, 2),
        "healthz_after": httpx.get(f"{url}/healthz", timeout=30).status_code,
    }
    print("mixed load:", result)
    return result


def _bundle(work: Path) -> tuple[Path, bytes]:
    """The service tests' bundle: untrained 64 px ResNet50s, PCA on synthetic radiographs."""
    import keras

    from bonefrac.bundle import write_bundle
    from bonefrac.config import TrainConfig, load_settings
    from bonefrac.data import synthetic
    from bonefrac.imaging import preprocess_file
    from bonefrac.models import build_classifier
    from bonefrac.pca import fit

    settings = load_settings(ROOT / "params.yaml", profile="quick", env={})
    data = synthetic.generate(work / "mura", patients=4, size=96, seed=3)
    size, files, parts = settings.preprocess.image_size, {}, ("elbow", "hand", "shoulder")
    for name, outputs in (("body_part", 3), *((p, 1) for p in parts)):
        files[name] = work / f"{name}.keras"
        build_classifier(outputs, size, TrainConfig(weights="none"), name).save(files[name])
        keras.backend.clear_session()
    train = sorted((data / "train").rglob("*.png"))
    fit(np.stack([preprocess_file(p, settings.preprocess) for p in train]), settings.pca).save(
        work / "pca.joblib"
    )
    points = {p: {"threshold": 0.5, "temperature": 1.0, "uncertain_band": 0.1} for p in parts}
    versions = {"body_part": {"classes": list(parts), "run_id": "bench"}}
    bundle = write_bundle(work / "bundle", settings, files, points, work / "pca.joblib", versions)
    good = sorted((data / "valid").rglob("*.png"))[0].read_bytes()
    return bundle, good


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fuzz", type=int, default=3000, help="decode fuzz cases (0: skip)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--duration", type=float, default=120, help="mixed load, seconds (0: skip)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    results = []
    if args.fuzz:
        results.append({"name": "decode fuzz", **fuzz_decode(args.fuzz)})
    if args.duration:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        work = Path(tempfile.mkdtemp(prefix="bonefrac-hostile-"))
        bundle, good = _bundle(work)
        env = {**os.environ, "BENTOML_HOME": str(work / "bentoml"), "BENTOML_DO_NOT_TRACK": "true"}
        process, url = start_server(free_port(), env, bundle, work / "server.log")
        try:
            results.append(
                {
                    "name": "mixed load",
                    **mixed_load(url, process.pid, good, args.clients, args.duration),
                }  # fmt: skip
            )
        finally:
            os.kill(process.pid, signal.SIGTERM)  # `bonefrac serve` is the server: one PID
            process.wait(timeout=120)
        log = (work / "server.log").read_text(errors="replace")
        print("server log: Traceback" if "Traceback" in log else "server log: no traceback")
        print("filename in log:", "Doe^Jane" in log)
    dump(results, args.out)


if __name__ == "__main__":
    main()
