"""Facts read from every image file (exists, decodes, size, mode, bit depth), over a process
pool for large manifests."""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import pandas as pd

# Below this many images a process pool costs more to start than it saves.
_POOL_MIN_IMAGES = 200
# Bits per channel for the Pillow modes an X-ray can come in.
_MODE_BITS = {"1": 1, "I": 32, "F": 32, "I;16": 16, "I;16B": 16, "I;16L": 16, "I;16N": 16}


@dataclass(frozen=True)
class ImageFacts:
    """What opening one image file found out."""

    path: str
    exists: bool
    decodes: bool
    width: int | None
    height: int | None
    mode: str | None
    bit_depth: int | None
    extension: str
    error: str | None


def _bit_depth(mode: str) -> int:
    return _MODE_BITS.get(mode, 8)


def _read_facts(data_dir: Path, rel_path: str) -> ImageFacts:
    """Open one image; PNG/JPEG with Pillow (verify, then a full decode), DICOM with pydicom."""
    file = data_dir / rel_path
    extension = Path(rel_path).suffix.lower()
    if not file.is_file():
        return ImageFacts(rel_path, False, False, None, None, None, None, extension, "not found")
    try:
        if extension == ".dcm":
            import pydicom

            dataset = pydicom.dcmread(file)
            pixels = dataset.pixel_array  # (rows, columns[, samples]) decodes every frame
            height, width = int(pixels.shape[0]), int(pixels.shape[1])
            mode = str(dataset.get("PhotometricInterpretation", "MONOCHROME2"))
            bits = int(dataset.get("BitsStored", pixels.dtype.itemsize * 8))
            return ImageFacts(rel_path, True, True, width, height, mode, bits, extension, None)
        from PIL import Image

        with Image.open(file) as image:
            image.verify()  # checks structure and CRCs without decoding pixels
        with Image.open(file) as image:
            image.load()  # a truncated file fails here (LOAD_TRUNCATED_IMAGES is off)
            width, height = image.size
            mode = image.mode
        return ImageFacts(
            rel_path, True, True, width, height, mode, _bit_depth(mode), extension, None
        )
    except Exception as exc:  # any decoder error means "does not decode"
        message = f"{type(exc).__name__}: {exc}"[:300]
        return ImageFacts(rel_path, True, False, None, None, None, None, extension, message)


def _read_chunk(data_dir: Path, rel_paths: list[str]) -> list[ImageFacts]:
    return [_read_facts(data_dir, rel_path) for rel_path in rel_paths]


def _pool_context():
    """fork where the OS has it: workers start in milliseconds and, unlike spawn, do not
    re-run the caller's __main__ script (which breaks scripts without a main guard)."""
    import multiprocessing

    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def image_facts(data_dir: Path, paths: Sequence[str], workers: int = 0) -> pd.DataFrame:
    """Open each image (verify + full load, so truncated files fail) in parallel over cores;
    one row per path: path, exists, decodes, width, height, mode, bit_depth, extension, error.

    `workers=0` uses one process per core; small inputs are read in this process.
    """
    data_dir = Path(data_dir)
    paths = list(paths)
    workers = workers or os.cpu_count() or 1
    if workers == 1 or len(paths) < _POOL_MIN_IMAGES:
        facts = _read_chunk(data_dir, paths)
    else:
        # ~4 chunks per worker balances load without pickling one task per image.
        size = max(1, -(-len(paths) // (workers * 4)))
        chunks = [paths[i : i + size] for i in range(0, len(paths), size)]
        try:
            with ProcessPoolExecutor(workers, mp_context=_pool_context()) as pool:
                facts = [
                    item
                    for chunk in pool.map(_read_chunk, [data_dir] * len(chunks), chunks)
                    for item in chunk
                ]
        except BrokenProcessPool:  # e.g. a worker killed for memory: finish here instead
            facts = _read_chunk(data_dir, paths)
    columns = [f.name for f in fields(ImageFacts)]
    frame = pd.DataFrame([asdict(item) for item in facts], columns=columns)
    for column in ("width", "height", "bit_depth"):
        frame[column] = frame[column].astype("Int64")
    return frame
