"""Service fixtures: a small REAL bundle (untrained ResNet50s at 64 px, nothing trained, and a
PCA fitted on synthetic radiographs), a Predictor on it, and one `bonefrac serve` subprocess
for the whole session, with its own BentoML home and a 2 MB upload limit.

Everything with TensorFlow is slow (seconds per model), so each is built once per session.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.processes import free_port, stop_group, wait_until_ready

SIZE = 64
MAX_UPLOAD_MB = 2  # the test server's serve.max_upload_mb: "too large" needs only 3 MB
BODY_TIMEOUT_S = 4  # the test server's serve.body_timeout_s: a stalled upload is cut off fast
PARTS = ("elbow", "hand", "shoulder")
# A different, non-trivial operating point per part (temperature != 1, threshold != 0.5,
# band > 0): a service that ignored the bundle's operating point, or used another part's,
# would answer differently. The models are untrained, so outputs sit near their own biases;
# the tests recompute every served number from the raw model outputs.
OPERATING_POINTS = {
    "elbow": {"threshold": 0.41, "temperature": 1.7, "uncertain_band": 0.03},
    "hand": {"threshold": 0.58, "temperature": 0.6, "uncertain_band": 0.05},
    "shoulder": {"threshold": 0.47, "temperature": 2.4, "uncertain_band": 0.02},
}


def _val_sensitivity(detected: int, at_cutoff: int, n: int, ci: tuple, ci_cutoff: tuple) -> dict:
    """The shape the evaluate stage records (evaluate.binary.val_sensitivity)."""

    def one(k, interval):
        return {"value": k / n, "ci": list(interval), "detected": k, "n_positive": n}

    return {
        "split": "val",
        "level": "study",
        "interval": "Wilson 95%",
        "target": 0.95,
        "at_threshold": one(detected, ci),
        "at_negative_cutoff": one(at_cutoff, ci_cutoff),
    }


# The confident-negative cut-off (below the threshold, and different per part) with the val
# sensitivity it was recorded with; the shoulder has none, as in a bundle packaged before they
# existed, so no shoulder negative may be confident.
OPERATING_POINTS["elbow"] |= {
    "negative_cutoff": 0.22,
    "val_sensitivity": _val_sensitivity(34, 39, 40, (0.71, 0.93), (0.87, 0.996)),
}
OPERATING_POINTS["hand"] |= {
    "negative_cutoff": 0.31,
    "val_sensitivity": _val_sensitivity(25, 29, 30, (0.66, 0.93), (0.83, 0.994)),
}
STARTUP_TIMEOUT_S = 420  # TF import + 4 model loads + graph tracing on 2 busy cores


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A tiny SYNTHETIC MURA (4 patients per part) to fit the PCA and to upload."""
    from bonefrac.data import synthetic

    return synthetic.generate(tmp_path_factory.mktemp("mura"), patients=4, size=96, seed=3)


@pytest.fixture(scope="session")
def quick_settings(project_root):
    from bonefrac.config import load_settings

    settings = load_settings(project_root / "params.yaml", profile="quick", env={})
    assert settings.preprocess.image_size == SIZE
    return settings


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory, synthetic_root, quick_settings) -> Path:
    """A bundle folder exactly as packaging writes it, with untrained but real models."""
    import keras

    from bonefrac.bundle import write_bundle
    from bonefrac.config import TrainConfig
    from bonefrac.imaging import preprocess_file
    from bonefrac.models import build_classifier
    from bonefrac.pca import fit

    work = tmp_path_factory.mktemp("bundle-parts")
    keras.utils.set_random_seed(0)
    files = {}
    for name, outputs in (("body_part", 3), *((p, 1) for p in PARTS)):
        model = build_classifier(outputs, SIZE, TrainConfig(weights="none"), name)
        files[name] = work / f"{name}.keras"
        model.save(files[name])
        del model
    keras.backend.clear_session()

    train = sorted((synthetic_root / "train").rglob("*.png"))
    images = np.stack([preprocess_file(p, quick_settings.preprocess) for p in train])
    pca = fit(images, quick_settings.pca)
    pca.save(work / "pca.joblib")
    versions = {"body_part": {"classes": list(PARTS), "run_id": "test-run"}}
    out = tmp_path_factory.mktemp("bundle") / "bundle"
    return write_bundle(
        out,
        quick_settings,
        files,
        OPERATING_POINTS,
        work / "pca.joblib",
        versions,
        synthetic=True,
        ood_gate=pca.ood_gate(),
    )


@pytest.fixture(scope="session")
def predictor(bundle_dir):
    """The Predictor on the test bundle, loaded the way the service loads it."""
    from bonefrac.config import ServeConfig
    from bonefrac.serving.predictor import Predictor

    return Predictor.from_bundle(
        bundle_dir, ServeConfig(max_upload_mb=MAX_UPLOAD_MB), warm_up=False
    )


@pytest.fixture(scope="session")
def valid_pngs(synthetic_root) -> dict[str, list[Path]]:
    """Synthetic test-split images per part (never seen by the PCA)."""
    return {
        part: sorted((synthetic_root / "valid" / f"XR_{part.upper()}").rglob("*.png"))
        for part in PARTS
    }


@pytest.fixture(scope="session")
def good_png(predictor, valid_pngs) -> Path:
    """The valid image the OOD gate likes best, so tests of the happy path never depend on
    where a held-out image falls against a threshold fitted on a few dozen images."""
    candidates = [p for paths in valid_pngs.values() for p in paths[:4]]
    scores = predictor.ood_scores(
        np.stack([predictor.preprocess(p.read_bytes()) for p in candidates])
    )
    return candidates[int(np.argmin(scores))]


@pytest.fixture(scope="session")
def study_pngs(predictor, valid_pngs) -> list[Path]:
    """Three in-distribution images of one part: a study."""
    paths = valid_pngs["hand"][:8]
    scores = predictor.ood_scores(np.stack([predictor.preprocess(p.read_bytes()) for p in paths]))
    return [paths[i] for i in np.argsort(scores)[:3]]


# -- the server --------------------------------------------------------------------------------


class Server:
    def __init__(self, url: str, log: Path, bentoml_home: Path, params: Path) -> None:
        self.url = url
        self.log = log
        self.bentoml_home = bentoml_home
        self.params = params

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture(scope="session")
def server(tmp_path_factory, bundle_dir, project_root):
    """`bonefrac serve --bundle DIR` on a free port: imports the bundle into a fresh BentoML
    home, starts `bentoml serve`, and is ready when /readyz answers."""

    home = tmp_path_factory.mktemp("server")
    params = home / "params.yaml"
    params.write_text(
        f"serve:\n  max_upload_mb: {MAX_UPLOAD_MB}\n  body_timeout_s: {BODY_TIMEOUT_S}\n"
        "  allow_unreviewed: true\n"  # the packaged guidance is a draft
    )
    port = free_port()
    log = home / "server.log"
    env = {
        **os.environ,
        "BENTOML_HOME": str(home / "bentoml"),
        "BENTOML_DO_NOT_TRACK": "true",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    command = [
        sys.executable,
        "-m",
        "bonefrac.cli",
        "--params",
        str(params),
        "serve",
        "--bundle",
        str(bundle_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    with log.open("wb") as out:
        process = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=home,
            start_new_session=True,  # its own process group: teardown stops the workers too
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(process, f"{url}/readyz", log, "server", STARTUP_TIMEOUT_S)
        yield Server(url, log, home / "bentoml", params)
    finally:
        stop_group(process)
