"""Preprocessed cache: same arrays as the serving path, parallel = serial, resumable, idempotent."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bonefrac.cache import build_cache, cache_key, load_cache
from bonefrac.data import mura
from bonefrac.errors import DataError
from bonefrac.imaging import preprocess_bytes


def test_cache_rows_equal_serving_path(demo_cache, demo_data_dir):
    settings, cache = demo_cache
    rng = np.random.default_rng(0)
    for row in rng.choice(len(cache.index), size=8, replace=False):
        data = (demo_data_dir / cache.index.loc[row, "path"]).read_bytes()
        served = preprocess_bytes(data, settings.preprocess)
        assert served.dtype == np.uint8
        np.testing.assert_array_equal(cache.rgb(row), served)


def test_cache_shape_and_index(demo_cache):
    settings, cache = demo_cache
    size = settings.preprocess.image_size
    assert cache.images.shape == (len(cache.index), size, size)
    assert set(cache.index["split"]) == {"train", "val", "test"}
    assert len(cache.rows(split="test", body_part="hand")) > 0


@pytest.fixture()
def small_manifest(demo_data_dir, quick_settings_factory, tmp_path):
    settings = quick_settings_factory(demo_data_dir, tmp_path / "artifacts")
    frame = mura.build_manifest(settings.paths.data, settings.data).frame.iloc[:150]
    return settings, frame


def test_parallel_equals_serial_and_rerun_is_a_no_op(small_manifest, demo_data_dir, tmp_path):
    settings, frame = small_manifest
    serial_cfg = settings.preprocess.model_copy(update={"workers": 1})
    parallel_cfg = settings.preprocess.model_copy(update={"workers": 2})
    serial = build_cache(frame, demo_data_dir, tmp_path / "serial", serial_cfg, progress=False)
    parallel = build_cache(frame, demo_data_dir, tmp_path / "par", parallel_cfg, progress=False)
    assert not serial.reused and not parallel.reused
    np.testing.assert_array_equal(load_cache(serial.path).images, load_cache(parallel.path).images)
    mtime = (tmp_path / "serial" / "images.npy").stat().st_mtime_ns
    again = build_cache(frame, demo_data_dir, tmp_path / "serial", serial_cfg, progress=False)
    assert again.reused
    assert (tmp_path / "serial" / "images.npy").stat().st_mtime_ns == mtime


def test_interrupted_run_resumes_from_finished_chunks(small_manifest, demo_data_dir, tmp_path):
    settings, frame = small_manifest
    cfg = settings.preprocess.model_copy(update={"workers": 1})
    out = tmp_path / "cache"
    broken = frame.copy()
    broken.loc[broken.index[-1], "path"] = "MURA-v1.1/train/XR_HAND/missing/image1.png"
    with pytest.raises(DataError, match="missing/image1.png"):
        build_cache(broken, demo_data_dir, out, cfg, progress=False)
    assert not out.exists()  # nothing half-written where readers look
    partial = tmp_path / f".cache.partial-{cache_key(broken, cfg)}"
    finished = sorted(partial.glob("chunk-*.npy"))
    assert len(finished) == 2  # 150 images, chunks of 64: the first two completed
    # repair the data (same key: same paths) and resume
    missing = demo_data_dir / "MURA-v1.1/train/XR_HAND/missing/image1.png"
    missing.parent.mkdir(parents=True)
    missing.write_bytes((demo_data_dir / frame["path"].iloc[0]).read_bytes())
    try:
        result = build_cache(broken, demo_data_dir, out, cfg, progress=False)
    finally:
        missing.unlink()
        missing.parent.rmdir()
    assert result.resumed_chunks == 2
    assert load_cache(out).images.shape[0] == 150
    assert not partial.exists()


def test_param_change_rebuilds(small_manifest, demo_data_dir, tmp_path):
    settings, frame = small_manifest
    cfg = settings.preprocess.model_copy(update={"workers": 1})
    build_cache(frame, demo_data_dir, tmp_path / "c", cfg, progress=False)
    changed = cfg.model_copy(update={"gaussian_kernel": 0})
    result = build_cache(frame, demo_data_dir, tmp_path / "c", changed, progress=False)
    assert not result.reused
    assert (
        json.loads((tmp_path / "c" / "meta.json").read_text())["preprocess"]["gaussian_kernel"] == 0
    )
