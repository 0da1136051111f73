"""A bundle whose models were trained with different preprocessing: a fracture champion kept
from before a preprocessing change (another image size, no CLAHE) next to models trained
after it. Each model must get the upload preprocessed the way it was trained, and the OOD gate
the bundle's way (the PCA was fitted on it); an array preprocessed one way is refused rather
than fed to a model trained another way."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from scipy.special import expit, logit

from bonefrac.bundle import BUNDLE_FILE, MIXED_FORMAT, load_ood_gate, read_bundle
from bonefrac.config import PreprocessConfig, ServeConfig
from bonefrac.errors import DataError
from bonefrac.imaging import decode, downsample, preprocess
from bonefrac.runtimes import TENSORFLOW, Loaded
from bonefrac.serving.predictor import Predictor

from .conftest import OPERATING_POINTS, PARTS, SIZE

pytestmark = pytest.mark.slow

OLD = {"image_size": 48, "clahe": False}  # how hand's kept champion was trained
HAND = PARTS.index("hand")


@pytest.fixture(scope="module")
def mixed_bundle(bundle_dir, tmp_path_factory):
    """The test bundle with hand's model replaced by a real ResNet50 at 48 px trained (so the
    bundle says) without CLAHE; the other models keep the bundle's 64 px CLAHE."""
    import keras

    from bonefrac.bundle_integrity import write_manifest
    from bonefrac.config import TrainConfig
    from bonefrac.models import build_classifier

    out = tmp_path_factory.mktemp("mixed") / "bundle"
    shutil.copytree(bundle_dir, out)
    manifest = read_bundle(out)
    old = {**manifest["preprocess"], **OLD}
    manifest["models"]["hand"]["preprocess"] = old
    keras.utils.set_random_seed(5)
    model = build_classifier(1, OLD["image_size"], TrainConfig(weights="none"), "hand")
    model.save(out / "hand" / "model.keras")
    (out / BUNDLE_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    write_manifest(out)  # as packaging writes it: the integrity manifest covers the change
    # a format-2 reader would feed hand the bundle's preprocessing: a mix must say format 3
    with pytest.raises(DataError, match="says format 2 but its models' preprocessing differs"):
        read_bundle(out)
    manifest["format"] = MIXED_FORMAT
    (out / BUNDLE_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    write_manifest(out)
    return out, PreprocessConfig(**old), PreprocessConfig(**manifest["preprocess"])


def _spies(seen: dict) -> dict:
    def spy(name: str, output):
        def forward(images):
            seen.setdefault(name, []).append(np.array(images))
            return output(len(images))

        return forward

    body = np.full(len(PARTS), 0.1)
    body[HAND] = 0.8  # every image is routed to hand
    forwards = {"body_part": spy("body_part", lambda n: np.tile(body, (n, 1)))}
    for part in PARTS:
        forwards[part] = spy(part, lambda n: np.full((n, 1), 0.7))
    return forwards


def test_each_model_and_the_ood_gate_get_the_upload_preprocessed_their_own_way(
    mixed_bundle, valid_pngs
):
    path, old, current = mixed_bundle
    manifest = read_bundle(path)
    seen: dict = {}
    forwards = _spies(seen)
    gate = load_ood_gate(path)
    predictor = Predictor(
        manifest,
        dict.fromkeys(forwards),  # Keras models: only Grad-CAM uses them
        gate,
        ServeConfig(),
        "test",
        Loaded(TENSORFLOW, forwards, dict.fromkeys(forwards, TENSORFLOW)),
    )
    files = [p.read_bytes() for p in valid_pngs["hand"][:3]]
    grays = [decode(f) for f in files]

    result = predictor.predict_bytes(files[0], allow_ood=True)
    assert result["fracture"]["model"] == "hand"
    hand, body = seen["hand"][-1], seen["body_part"][-1]
    assert hand.shape == (1, 48, 48, 3) and body.shape == (1, SIZE, SIZE, 3)
    np.testing.assert_array_equal(hand[0], preprocess(grays[0], old))
    np.testing.assert_array_equal(body[0], preprocess(grays[0], current))
    assert not np.array_equal(
        body[0], preprocess(grays[0], old.model_copy(update={"image_size": SIZE}))
    )
    ood = gate.scores(downsample(preprocess(grays[0], current)[None], gate.image_size))
    assert result["quality"]["ood_score"] == pytest.approx(float(ood[0]), rel=1e-6)

    study = predictor.predict_study(files[:2], allow_ood=True)
    assert study["fracture"]["model"] == "hand" and study["n_images"] == 2
    for got, gray in zip(seen["hand"][-1], grays[:2], strict=True):
        np.testing.assert_array_equal(got, preprocess(gray, old))

    batch = predictor.predict_batch_bytes([files[0], b"not an image", files[2]], allow_ood=True)
    assert ["error" in r for r in batch] == [False, True, False]
    assert seen["body_part"][-1].shape == (2, SIZE, SIZE, 3)
    np.testing.assert_array_equal(seen["hand"][-1][1], preprocess(grays[2], old))

    # an array is one preprocessing: with several, the predictor refuses to guess
    with pytest.raises(DataError, match="differently preprocessed"):
        predictor.predict_image(predictor.preprocess(files[0]), allow_ood=True)


def test_a_mixed_bundle_serves_its_real_models_each_on_its_own_input(mixed_bundle, valid_pngs):
    import keras

    path, old, _ = mixed_bundle
    predictor = Predictor.from_bundle(path, ServeConfig(), runtime=TENSORFLOW)  # warms up too
    assert predictor.runtime_info["name"] == TENSORFLOW
    body = np.full(len(PARTS), 0.1)
    body[HAND] = 0.8
    predictor.core = type(predictor.core)(
        classes=predictor.core.classes,
        body_part=lambda images: np.tile(body, (len(images), 1)),
        fracture=predictor.core.fracture,
        points=predictor.core.points,
    )
    data = valid_pngs["hand"][0].read_bytes()
    result = predictor.predict_bytes(data, allow_ood=True, explain=True)
    hand = keras.models.load_model(path / "hand" / "model.keras", compile=False)
    x = preprocess(decode(data), old)[None].astype(np.float32)
    raw = float(np.asarray(hand(x, training=False))[0, 0])
    temperature = OPERATING_POINTS["hand"]["temperature"]
    assert result["fracture"]["uncalibrated_probability"] == pytest.approx(raw, abs=1e-5)
    assert result["fracture"]["probability"] == pytest.approx(
        float(expit(logit(raw) / temperature)), abs=1e-5
    )
    assert result["heatmap_info"]["model"] == "hand" and result["heatmap"]
