"""The real service: `bonefrac serve` in a subprocess, hit with BentoML's own client and with
plain multipart HTTP. Every bad input gets a 4xx JSON with one clear sentence, the server
stays healthy, and no patient identifier reaches a response or the log."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bentoml
import httpx
import numpy as np
import pytest

from bonefrac import DISCLAIMER
from bonefrac.serving.responses import OutOfDistribution

from .conftest import MAX_UPLOAD_MB, PARTS
from .inputs import PATIENT_ID, PATIENT_NAME, bad_inputs, dicom_from_png

pytestmark = pytest.mark.slow
TIMEOUT = 120


def upload(server, route: str, files: list[tuple[str, bytes]], **fields: str) -> httpx.Response:
    field = "image" if route == "/predict" else "images"
    parts = [(field, (name, data, "application/octet-stream")) for name, data in files]
    return httpx.post(f"{server.url}{route}", files=parts, data=fields, timeout=TIMEOUT)


def assert_error(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == code
    message = error["message"]
    assert message and "\n" not in message and "Traceback" not in message and len(message) < 300
    return message


def test_health_readiness_and_metrics(server):
    for path in ("/healthz", "/readyz", "/livez"):
        assert httpx.get(f"{server.url}{path}").status_code == 200
    metrics = httpx.get(f"{server.url}/metrics")
    assert metrics.status_code == 200 and "bentoml_service_request" in metrics.text


def test_predict_with_the_bentoml_client(server, good_png):
    with bentoml.SyncHTTPClient(server.url, timeout=TIMEOUT) as client:
        result = client.predict(image=good_png, explain=True)
        study = client.predict_study(images=[good_png, good_png])
    assert result["body_part"]["label"] in PARTS
    assert result["fracture"]["finding"] in {"fracture", "no_fracture", "uncertain"}
    assert result["recommendation"]["sources"] and result["disclaimer"] == DISCLAIMER
    rec = result["recommendation"]  # draft guidance, allowed by the test server's params
    assert rec["content_reviewed"] is False and rec["governance"]["status"] == "draft"
    assert "hardware" in rec["detects"]
    assert result["heatmap"] and result["synthetic_models"] is True
    assert study["level"] == "study" and len(study["images"]) == 2


def test_predict_study_over_plain_http(server, study_pngs):
    response = upload(server, "/predict_study", [(p.name, p.read_bytes()) for p in study_pngs])
    assert response.status_code == 200, response.text
    study = response.json()
    probabilities = [image["fracture"]["probability"] for image in study["images"]]
    assert study["fracture"]["probability"] == pytest.approx(sum(probabilities) / 3)
    assert study["disclaimer"] == DISCLAIMER and study["recommendation"]["urgency"]["level"]


def batched_images(server) -> float:
    """Images through /predict_batch's forward passes so far (the batch-size histogram's sum)."""
    for line in httpx.get(f"{server.url}/metrics", timeout=TIMEOUT).text.splitlines():
        if line.startswith("bonefrac_batch_size_sum"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture(scope="module")
def distinct_pngs(predictor, valid_pngs) -> list[Path]:
    """Three in-distribution images whose fracture probabilities are at least 5e-3 apart, so
    an answer swapped between concurrent requests cannot pass a 1e-4 comparison. (Any three
    images will not do: the untrained test models put some 1e-4 apart, on some CPUs.)"""
    chosen: list[Path] = []
    probabilities: list[float] = []
    for path in (p for paths in valid_pngs.values() for p in paths):
        try:
            probability = predictor.predict_bytes(path.read_bytes())["fracture"]["probability"]
        except OutOfDistribution:
            continue
        if all(abs(probability - q) > 5e-3 for q in probabilities):
            chosen.append(path)
            probabilities.append(probability)
        if len(chosen) == 3:
            return chosen
    pytest.fail(f"no three test images with distinct probabilities: {probabilities}")


def test_batch_endpoint_answers_each_item_and_batches_concurrent_requests(server, distinct_pngs):
    study_pngs = distinct_pngs
    before = batched_images(server)
    files = [("a.png", study_pngs[0].read_bytes()), ("b.txt", b"not an image")]
    items = upload(server, "/predict_batch", files).json()
    assert items[0]["body_part"]["label"] in PARTS
    assert items[1]["error"]["code"] == "not_an_image"  # in place, never sent to the models

    # Each concurrent request gets its own image's answer: the one /predict gives that image.
    alone = {  # by path: images of different studies share names (image1.png)
        p: upload(server, "/predict", [(p.name, p.read_bytes())]).json()["fracture"]
        for p in study_pngs
    }
    assert len(alone) == 3
    gaps = np.diff(sorted(f["probability"] for f in alone.values()))
    assert gaps.min() > 1e-3  # a swapped answer could not pass the 1e-4 check below
    with ThreadPoolExecutor(6) as pool:
        responses = list(
            pool.map(
                lambda p: (p, upload(server, "/predict_batch", [(p.name, p.read_bytes())])),
                [*study_pngs, *study_pngs, *study_pngs],
            )
        )
    for path, response in responses:
        assert response.status_code == 200, response.text
        [item] = response.json()
        assert item["fracture"]["probability"] == pytest.approx(
            alone[path]["probability"], abs=1e-4
        )
    # one request of exactly the limit (16 files) is answered in order
    full = [study_pngs[i % len(study_pngs)] for i in range(16)]
    response = upload(server, "/predict_batch", [(p.name, p.read_bytes()) for p in full])
    assert response.status_code == 200, response.text
    for path, item in zip(full, response.json(), strict=True):
        assert item["fracture"]["probability"] == pytest.approx(
            alone[path]["probability"], abs=1e-4
        )
    assert batched_images(server) - before == 1 + len(responses) + 16  # each image ran once


def test_dicom_upload_never_returns_or_logs_patient_data(server, good_png):
    response = upload(server, "/predict", [("scan.dcm", dicom_from_png(good_png))], explain="true")
    assert response.status_code == 200, response.text
    assert response.json()["body_part"]["label"] in PARTS
    for identifier in (PATIENT_NAME, PATIENT_NAME.split("^")[0], PATIENT_ID, "19500101"):
        assert identifier not in response.text
        assert identifier not in server.log_text()


@pytest.mark.parametrize(
    "name",
    [
        "empty",
        "text",
        "truncated",
        "decompression_bomb",
        "too_small",
        "dicom_no_pixels",
        "dicom_jpeg2000",
        "out_of_distribution",
    ],
)
def test_bad_file_gets_a_clear_4xx(server, good_png, name):
    data, status, code = bad_inputs(good_png.read_bytes())[name]
    message = assert_error(upload(server, "/predict", [("upload.bin", data)]), status, code)
    if code == "out_of_distribution":
        assert "does not look like an elbow, hand or shoulder radiograph" in message
        overridden = upload(server, "/predict", [("photo.png", data)], allow_ood="true")
        assert overridden.status_code == 200, overridden.text
        assert overridden.json()["quality"]["accepted"] is False
        assert overridden.json()["fracture"]["finding"] == "uncertain"


def test_file_over_the_size_limit_is_413_declared_or_streamed(server):
    big = b"\x89PNG\r\n\x1a\n" + bytes((MAX_UPLOAD_MB + 1) * 1_000_000)
    assert_error(upload(server, "/predict", [("big.png", big)]), 413, "too_large")

    boundary = "bonefrac-test-boundary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="big.png"\r\n'
        f"Content-Type: image/png\r\n\r\n".encode()
        + big
        + f"\r\n--{boundary}--\r\n".encode()
    )
    streamed = httpx.post(  # no Content-Length: chunked, counted as it arrives
        f"{server.url}/predict",
        content=(body[i : i + 65536] for i in range(0, len(body), 65536)),
        headers={"content-type": f"multipart/form-data; boundary={boundary}"},
        timeout=TIMEOUT,
    )
    assert_error(streamed, 413, "too_large")


def test_malformed_requests_get_a_clear_4xx(server, good_png):
    missing = httpx.post(f"{server.url}/predict", timeout=TIMEOUT)
    assert "'image'" in assert_error(missing, 400, "missing_file")
    text_field = httpx.post(
        f"{server.url}/predict", files={"image": (None, "not-a-file")}, timeout=TIMEOUT
    )
    assert "must be a file" in assert_error(text_field, 400, "not_a_file")  # never fetched
    raw = httpx.post(
        f"{server.url}/predict",
        content=good_png.read_bytes(),
        headers={"content-type": "image/png"},
        timeout=TIMEOUT,
    )
    assert_error(raw, 415, "not_multipart")
    not_bool = upload(server, "/predict", [("a.png", good_png.read_bytes())], explain="maybe")
    assert "explain" in assert_error(not_bool, 400, "bad_request")


def test_bad_studies_get_a_clear_4xx(server, good_png):
    good = good_png.read_bytes()
    one_bad = upload(server, "/predict_study", [("a.png", good), ("b.png", good[:300])])
    assert "image 2 of 2" in assert_error(one_bad, 400, "truncated")
    too_many = upload(server, "/predict_study", [(f"{i}.png", good) for i in range(9)])
    assert_error(too_many, 422, "too_many_images")
    assert_error(httpx.post(f"{server.url}/predict_study"), 400, "missing_file")


def test_server_is_still_healthy_after_the_bad_inputs(server, good_png):
    assert httpx.get(f"{server.url}/healthz").status_code == 200
    response = upload(server, "/predict", [("again.png", good_png.read_bytes())])
    assert response.status_code == 200
    log = server.log_text()
    assert "Traceback" not in log.split("Service bonefrac initialized")[0]  # clean start-up
    for identifier in (PATIENT_NAME.split("^")[0], PATIENT_ID):
        assert identifier not in log


def test_upload_page_is_served_by_the_service(server):
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200 and DISCLAIMER in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for asset in ("/static/app.js", "/static/style.css"):
        assert httpx.get(f"{server.url}{asset}").status_code == 200


def test_bentoml_build_packs_the_service(server, project_root):
    env = {**os.environ, "BENTOML_HOME": str(server.bentoml_home), "BENTOML_DO_NOT_TRACK": "true"}
    bentoml_cli = [sys.executable, "-m", "bentoml"]
    build = subprocess.run(
        [*bentoml_cli, "build", "-f", "bentofile.yaml", "-o", "tag", "."],
        cwd=project_root, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert build.returncode == 0, build.stdout + build.stderr
    tag = re.search(r"__tag__:(\S+)", build.stdout).group(1)
    # `bentoml get -o path` prints through rich, which wraps a path longer than the
    # terminal (an xdist worker's tmp path is) with a newline; the API does not.
    path = subprocess.run(
        [sys.executable, "-c", f"import bentoml; print(bentoml.get({tag!r}).path)"],
        env=env, capture_output=True, text=True, timeout=60, check=True,
    ).stdout.strip()  # fmt: skip
    bento = Path(path)
    assert (bento / "src/src/bonefrac/serving/web/index.html").is_file()
    assert (bento / "src/params.yaml").is_file()
    manifest = (bento / "bento.yaml").read_text()
    assert "bonefrac.serving.service:BonefracService" in manifest
    assert "tag: bonefrac:" in manifest  # the model bundle travels with the Bento
    requirements = (bento / "env/python/requirements.txt").read_text()
    assert "tensorflow" in requirements.lower() and "bentoml==" in requirements
    json.loads((bento / "apis/schema.json").read_text())
