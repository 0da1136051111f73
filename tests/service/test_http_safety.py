"""Issue 18 over real HTTP: the age group and the single-view safeguard on the session's
`bonefrac serve`, the val sensitivity in every answer, and a service given draft guidance with
serve.allow_unreviewed false refusing to serve it (a second server that loads no model)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import httpx
import pytest

from tests.processes import free_port, stop_group

from .conftest import OPERATING_POINTS
from .test_http import assert_error, upload

pytestmark = pytest.mark.slow
LISTEN_TIMEOUT_S = 300  # BentoML's arbiter + the service module on 2 busy cores


def test_age_group_and_single_view_safeguard_over_http(server, good_png, study_pngs):
    png = [("x.png", good_png.read_bytes())]
    default = upload(server, "/predict", png)
    assert default.status_code == 200, default.text
    body = default.json()
    assert body["age_group"] == body["recommendation"]["age_group"] == "unknown"
    assert "Age group not given" in body["recommendation"]["paediatric"][0]["text"]
    part = body["fracture"]["model"]
    assert body["fracture"]["sensitivity"] == OPERATING_POINTS[part].get("val_sensitivity")
    assert body["fracture"]["negative_cutoff"] == OPERATING_POINTS[part].get("negative_cutoff", 0)
    first_step = body["recommendation"]["further_imaging"][0]["text"]
    assert first_step.startswith("Make sure the study includes")  # the part's standard views

    child = upload(server, "/predict", png, age_group="child").json()["recommendation"]
    assert child["age_group"] == "child" and child["review_by_radiologist"] is True
    assert any("Safeguarding" in s["text"] for s in child["paediatric"])

    files = [(p.name, p.read_bytes()) for p in study_pngs]
    study = upload(server, "/predict_study", files, age_group="adult").json()
    assert study["age_group"] == "adult" and study["recommendation"]["paediatric"] == []
    assert set(study["views"]) == {"disagree", "abnormal", "normal"}
    assert sorted(study["views"]["abnormal"] + study["views"]["normal"]) == [0, 1, 2]

    for route, sent in (("/predict", png), ("/predict_study", files)):
        message = assert_error(upload(server, route, sent, age_group="teen"), 400, "bad_age_group")
        assert "adult, child, unknown" in message


def test_the_service_refuses_draft_guidance_unless_allowed(server, good_png, tmp_path):
    """`bentoml serve` run directly (as a container does), on the session's BentoML home with
    its bundle, but with the default serve.allow_unreviewed (false): it starts, loads no model,
    is never ready, and answers every prediction with a 503 that names the reason."""
    params = tmp_path / "params.yaml"
    params.write_text("serve:\n  allow_unreviewed: false\n", encoding="utf-8")
    port = free_port()
    env = {
        **os.environ,
        "BENTOML_HOME": str(server.bentoml_home),
        "BENTOML_DO_NOT_TRACK": "true",
        "BONEFRAC_PARAMS": str(params),
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    command = [sys.executable, "-m", "bentoml", "serve", "bonefrac.serving.service:BonefracService",
               "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    log = tmp_path / "serve.log"
    url = f"http://127.0.0.1:{port}"
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        deadline = time.monotonic() + LISTEN_TIMEOUT_S
        while True:
            assert process.poll() is None, log.read_text()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/livez", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, "never listened:\n" + log.read_text()
            time.sleep(0.5)
        assert httpx.get(f"{url}/readyz", timeout=30).status_code == 503
        refused = upload(SimpleNamespace(url=url), "/predict", [("x.png", good_png.read_bytes())])
        message = assert_error(refused, 503, "unreviewed_content")
        assert "draft not approved by a clinical reviewer" in message
        assert "serve.allow_unreviewed" in message
        assert "draft not approved by a clinical reviewer" in log.read_text()
        assert "Traceback" not in log.read_text()
    finally:
        stop_group(process, grace_s=60)
