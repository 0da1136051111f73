"""PCA: OOD gate separates radiographs from other pictures, drift, baseline, stage outputs."""

from __future__ import annotations

import json

import cv2
import numpy as np

from bonefrac import pca
from bonefrac.imaging import preprocess


def _photos_and_noise(n: int, settings, seed: int = 0) -> np.ndarray:
    """Not radiographs (uniform noise, a bright scene, a text-like page), preprocessed
    exactly as serving would."""
    size = 200
    rng = np.random.default_rng(seed)
    images = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            image = rng.integers(0, 256, (size, size), dtype=np.uint8)
        elif kind == 1:
            image = np.full((size, size), 200, np.uint8)  # a bright "photo" with a sky gradient
            image[: size // 2] = np.linspace(120, 250, size // 2, dtype=np.uint8)[:, None]
            cv2.circle(image, (size // 3, size // 3), size // 6, 30, -1)
        else:
            image = np.zeros((size, size), np.uint8)
            image[:, ::4] = 255  # a page of text / barcode
        images.append(preprocess(image.astype(np.float32) / 255.0, settings.preprocess)[..., 0])
    return np.stack(images)


def test_ood_score_separates_radiographs_from_other_pictures(demo_cache):
    settings, cache = demo_cache
    model = pca.fit(cache.images[cache.rows(split="train")], settings.pca)
    radiographs = model.ood_score(cache.images[cache.rows(split="test")])
    others = model.ood_score(_photos_and_noise(30, settings))
    assert np.median(radiographs) < 1.0
    assert (others > 1.0).mean() >= 0.9
    assert others.min() > np.median(radiographs)


def test_drift_flags_a_shifted_batch_but_not_a_fresh_sample(demo_cache):
    settings, cache = demo_cache
    model = pca.fit(cache.images[cache.rows(split="train")], settings.pca)
    same = pca.drift(model, cache.images[cache.rows(split="test")])
    assert not same.drifted
    shifted = np.clip(cache.images[cache.rows(split="test")].astype(int) + 70, 0, 255)
    report = pca.drift(model, shifted.astype(np.uint8))
    assert report.drifted and report.p_value < same.p_value


def test_fit_pca_stage_writes_model_plots_baseline_and_metrics(demo_cache, tmp_path):
    settings, cache = demo_cache
    result = pca.fit_pca_stage(
        cache, settings.pca, tmp_path / "pca", tmp_path / "m/pca.json", tmp_path / "p/ev.csv"
    )
    for name in (
        "pca.joblib",
        "explained_variance.png",
        "projection.png",
        "reconstruction_error.png",
        "baseline_predictions.csv",
    ):
        assert (tmp_path / "pca" / name).is_file(), name
    metrics = json.loads((tmp_path / "m/pca.json").read_text())
    assert 0 < metrics["explained_variance"] <= 1
    baseline = metrics["baseline"]
    # synthetic anatomies are distinct: PCA + logistic regression names the part well
    assert baseline["body_part_accuracy"] > 0.6
    assert np.isfinite(baseline["fracture_image_auroc"])
    loaded = pca.PcaModel.load(tmp_path / "pca" / "pca.joblib")
    assert loaded.ood_threshold == result.metrics["ood_threshold"]
