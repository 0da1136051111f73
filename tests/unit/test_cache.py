"""Preprocessed cache: same arrays as the serving path, parallel = serial, resumable, idempotent,
and keyed on everything it depends on (manifest rows, each image's bytes, the params)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from bonefrac.cache import build_cache, load_cache, md5_memo_path
from bonefrac.data import mura
from bonefrac.data.fingerprints import content_md5s, file_md5
from bonefrac.errors import DataError
from bonefrac.imaging import preprocess_bytes, preprocess_file
from bonefrac.pca import fit_pca_stage


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


def test_interrupted_run_resumes_from_finished_chunks(data_copy, tmp_path):
    settings, data_dir = data_copy
    frame = manifest_of(settings).iloc[:150]
    cfg = settings.preprocess.model_copy(update={"workers": 1})
    out = tmp_path / "cache"
    image = data_dir / frame["path"].iloc[-1]
    good = image.read_bytes()
    image.write_bytes(good[:200])  # truncated: its chunk (the third of 64) fails
    with pytest.raises(DataError, match=frame["path"].iloc[-1]):
        build_cache(frame, data_dir, out, cfg, progress=False)
    assert not out.exists()  # nothing half-written where readers look
    partial = tmp_path / ".cache.partial"
    assert len(list(partial.glob("chunk-*.npy"))) == 2  # 150 images: the first two completed
    image.write_bytes(good)  # repair the data and resume
    result = build_cache(frame, data_dir, out, cfg, progress=False)
    assert result.resumed_chunks == 2 and result.preprocessed == 150
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


# --- the key follows every input: manifest rows, image bytes, params ---------------------


@pytest.fixture()
def data_copy(demo_data_dir, quick_settings_factory, tmp_path):
    """A private copy of the demo data (tests here change it) and settings pointing at it."""
    data_dir = tmp_path / "data"
    shutil.copytree(demo_data_dir, data_dir)
    settings = quick_settings_factory(data_dir, tmp_path / "artifacts", **{"preprocess.workers": 1})
    return settings, data_dir


def manifest_of(settings, **data_overrides):
    cfg = settings.data.model_copy(update=data_overrides)
    return mura.build_manifest(settings.paths.data, cfg).frame


def build(settings, frame):
    return build_cache(
        frame, settings.paths.data, settings.layout.preprocessed, settings.preprocess, False
    )


def test_unchanged_rerun_reuses_cache_and_pca(data_copy):
    settings, _ = data_copy
    first = build(settings, manifest_of(settings))
    assert not first.reused and first.preprocessed == first.count
    fit = fit_pca_on(settings)
    assert not fit.reused
    again = build(settings, manifest_of(settings))  # manifest rebuilt from the same files
    assert again.reused and again.preprocessed == 0
    assert fit_pca_on(settings).reused


def test_new_split_seed_rebuilds_index_and_refits_pca(data_copy):
    settings, _ = data_copy
    build(settings, manifest_of(settings))
    before = load_cache(settings.layout.preprocessed)
    fit_pca_on(settings)
    reseeded = manifest_of(settings, seed=settings.data.seed + 1)  # same paths, other val
    assert (reseeded["split"] != before.index["split"]).any()
    result = build(settings, reseeded)
    assert not result.reused
    assert result.preprocessed == 0  # same images, same params: pixels copied, not redone
    after = load_cache(settings.layout.preprocessed)
    assert after.index["split"].tolist() == reseeded["split"].tolist()
    np.testing.assert_array_equal(after.images, before.images)
    assert not fit_pca_on(settings).reused  # PCA is fitted on train rows: they changed


def test_one_corrected_label_rebuilds_index_and_refits_pca(data_copy):
    settings, data_dir = data_copy
    build(settings, manifest_of(settings))
    fit_pca_on(settings)
    labels_csv = data_dir / "MURA-v1.1/train_labeled_studies.csv"
    lines = labels_csv.read_text().splitlines()
    study, label = lines[0].rsplit(",", 1)
    lines[0] = f"{study},{1 - int(label)}"  # a radiologist corrects one study's label
    labels_csv.write_text("\n".join(lines) + "\n")
    corrected = manifest_of(settings)
    result = build(settings, corrected)
    assert not result.reused and result.preprocessed == 0
    index = load_cache(settings.layout.preprocessed).index
    rows = index["study_path"] == study
    assert rows.any() and (index.loc[rows, "label"] == 1 - int(label)).all()
    assert index["label"].tolist() == corrected["label"].tolist()
    assert not fit_pca_on(settings).reused  # the baseline is fitted on the labels


def test_one_rewritten_image_is_preprocessed_again_alone(data_copy):
    settings, data_dir = data_copy
    frame = manifest_of(settings)
    build(settings, frame)
    before = np.array(load_cache(settings.layout.preprocessed).images)
    row = len(frame) // 2
    image = data_dir / frame["path"].iloc[row]
    with Image.open(image) as original:  # same path, size and name: new pixels in place
        original.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(image)
    result = build(settings, manifest_of(settings))
    assert not result.reused and result.preprocessed == 1
    after = load_cache(settings.layout.preprocessed)
    expected = preprocess_file(image, settings.preprocess)[..., 0]
    assert not np.array_equal(expected, before[row])
    np.testing.assert_array_equal(after.images[row], expected)
    others = np.arange(len(frame)) != row
    np.testing.assert_array_equal(after.images[others], before[others])
    assert after.index.loc[row, "md5"] == file_md5(image)


def fit_pca_on(settings):
    layout = settings.layout
    return fit_pca_stage(
        load_cache(layout.preprocessed),
        settings.pca,
        layout.pca,
        layout.metrics / "pca.json",
        layout.plots / "pca.csv",
    )


def test_md5_memo_trusts_only_unchanged_files(data_copy, tmp_path):
    _, data_dir = data_copy
    paths = [p.relative_to(data_dir).as_posix() for p in sorted(data_dir.rglob("*.png"))[:3]]
    memo = tmp_path / "memo.json"
    truth = [file_md5(data_dir / p) for p in paths]
    assert content_md5s(data_dir, paths, memo, racy_ns=0) == truth
    # the memo is what answers for an unchanged file: make it say something recognisable
    saved = json.loads(memo.read_text())
    saved["files"][paths[0]][4] = "from-the-memo"
    memo.write_text(json.dumps(saved))
    assert content_md5s(data_dir, paths, memo, racy_ns=0)[0] == "from-the-memo"
    # a rewrite of the file (same bytes even) changes its stat: hashed again, memo corrected
    image = data_dir / paths[0]
    stat = image.stat()
    image.write_bytes(image.read_bytes())
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # whatever the clock tick
    assert content_md5s(data_dir, paths, memo, racy_ns=0) == truth
    # an entry hashed within RACY_NS of its file's last change is not trusted: the file may
    # have changed again in the same clock tick without a visible stat change
    saved = json.loads(memo.read_text())
    ctime = (data_dir / paths[1]).stat().st_ctime_ns
    saved["files"][paths[1]][4:6] = ["stale", ctime + 1]
    memo.write_text(json.dumps(saved))
    assert content_md5s(data_dir, paths, memo) == truth


def test_cache_md5_memo_lives_outside_the_dvc_output(data_copy):
    settings, _ = data_copy
    build(settings, manifest_of(settings))
    memo = md5_memo_path(settings.layout.preprocessed)
    assert memo.is_file() and settings.layout.preprocessed not in memo.parents
