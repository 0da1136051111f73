"""The preprocess stage: every manifest image through `imaging.preprocess_file`, once.

The cache is one memory-mappable array so an epoch's input cost is a read, not a decode:

    preprocessed/images.npy   (N, S, S) uint8   row i <-> index.csv row i
    preprocessed/index.csv    the manifest rows, in cache order
    preprocessed/meta.json    preprocess params, key, count

`imaging.preprocess` returns three identical channels; the cache keeps one and
`Cache.rgb` restores three, so serving and training see the same array. Work runs in
parallel over processes, in chunks saved as they finish, so an interrupted run resumes
where it stopped; a finished cache with the same key is left alone (idempotent).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from bonefrac.config import PreprocessConfig
from bonefrac.data.mura import COLUMNS
from bonefrac.errors import DataError

CACHE_VERSION = 1
CHUNK_SIZE = 64
# the manifest's columns minus the two only validation needs
INDEX_COLUMNS = [c for c in COLUMNS if c not in ("mura_split", "folder_label")]


@dataclass(frozen=True)
class Cache:
    images: np.ndarray  # (N, S, S) uint8, memory-mapped
    index: pd.DataFrame  # N rows, INDEX_COLUMNS
    meta: dict

    @property
    def image_size(self) -> int:
        return int(self.meta["image_size"])

    def rows(self, split: str | None = None, body_part: str | None = None) -> np.ndarray:
        """Positions of the rows in a split and/or body part (cache order)."""
        mask = np.ones(len(self.index), dtype=bool)
        if split is not None:
            mask &= (self.index["split"] == split).to_numpy()
        if body_part is not None:
            mask &= (self.index["body_part"] == body_part).to_numpy()
        return np.flatnonzero(mask)

    def rgb(self, rows: np.ndarray | int) -> np.ndarray:
        """Images with three identical channels, as `imaging.preprocess` returns them."""
        return np.repeat(self.images[rows][..., np.newaxis], 3, axis=-1)


@dataclass(frozen=True)
class CacheResult:
    path: Path
    count: int
    reused: bool  # True when an up-to-date cache was already there
    resumed_chunks: int


def cache_key(manifest: pd.DataFrame, cfg: PreprocessConfig) -> str:
    """Changes when the image list or any preprocessing parameter changes."""
    hasher = hashlib.sha256()
    hasher.update(json.dumps(cfg.model_dump(exclude={"workers"}), sort_keys=True).encode())
    hasher.update("\n".join(manifest["path"]).encode())
    hasher.update(str(CACHE_VERSION).encode())
    return hasher.hexdigest()[:16]


def _preprocess_chunk(data_dir: str, paths: list[str], cfg_dump: dict) -> np.ndarray:
    """Worker: one chunk of images -> (n, S, S) uint8. Top-level so processes can import it."""
    from bonefrac.imaging import ImageError, preprocess_file

    cfg = PreprocessConfig(**cfg_dump)
    out = np.empty((len(paths), cfg.image_size, cfg.image_size), dtype=np.uint8)
    for i, rel in enumerate(paths):
        try:
            out[i] = preprocess_file(Path(data_dir) / rel, cfg)[..., 0]
        except ImageError as exc:
            raise DataError(f"{rel}: {exc}") from None
    return out


def _workers(cfg: PreprocessConfig, n_chunks: int) -> int:
    wanted = cfg.workers or os.cpu_count() or 1
    return max(1, min(wanted, n_chunks))


def build_cache(
    manifest: pd.DataFrame,
    data_dir: Path,
    out_dir: Path,
    cfg: PreprocessConfig,
    progress: bool = True,
) -> CacheResult:
    """Preprocess every manifest image into `out_dir` (see module docstring)."""
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    key = cache_key(manifest, cfg)
    meta_path = out_dir / "meta.json"
    if meta_path.is_file() and json.loads(meta_path.read_text()).get("key") == key:
        return CacheResult(out_dir, len(manifest), reused=True, resumed_chunks=0)

    work_dir = out_dir.parent / f".{out_dir.name}.partial-{key}"
    work_dir.mkdir(parents=True, exist_ok=True)
    paths = manifest["path"].tolist()
    chunks = [paths[i : i + CHUNK_SIZE] for i in range(0, len(paths), CHUNK_SIZE)]
    chunk_file = [work_dir / f"chunk-{n:06d}.npy" for n in range(len(chunks))]
    todo = [n for n, f in enumerate(chunk_file) if not f.is_file()]
    resumed = len(chunks) - len(todo)

    bar = tqdm(total=len(paths), desc="preprocess", unit="img", disable=not progress)
    bar.update(len(paths) - sum(len(chunks[n]) for n in todo))

    def save(n: int, array: np.ndarray) -> None:
        tmp = chunk_file[n].with_suffix(".tmp.npy")
        np.save(tmp, array)
        os.replace(tmp, chunk_file[n])  # a chunk file exists only when complete
        bar.update(len(array))

    cfg_dump = cfg.model_dump()
    workers = _workers(cfg, len(todo))
    try:
        if workers == 1:
            for n in todo:
                save(n, _preprocess_chunk(str(data_dir), chunks[n], cfg_dump))
        else:
            # fork is fast and needs no `__main__` guard in the caller's script, but forking a
            # process that runs TensorFlow's thread pools can deadlock: spawn then.
            method = "spawn" if "tensorflow" in sys.modules else "fork"
            context = multiprocessing.get_context(method)
            with ProcessPoolExecutor(workers, mp_context=context) as pool:
                futures = {
                    pool.submit(_preprocess_chunk, str(data_dir), chunks[n], cfg_dump): n
                    for n in todo
                }
                for future in as_completed(futures):
                    save(futures[future], future.result())
    finally:
        bar.close()

    _assemble(manifest, out_dir, chunk_file, cfg, key)
    shutil.rmtree(work_dir, ignore_errors=True)
    return CacheResult(out_dir, len(paths), reused=False, resumed_chunks=resumed)


def _assemble(
    manifest: pd.DataFrame, out_dir: Path, chunk_files: list[Path], cfg: PreprocessConfig, key: str
) -> None:
    """Join chunks into images.npy in a temp folder, then swap it into place."""
    staging = out_dir.parent / f".{out_dir.name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    size = cfg.image_size
    images = np.lib.format.open_memmap(
        staging / "images.npy", mode="w+", dtype=np.uint8, shape=(len(manifest), size, size)
    )
    start = 0
    for chunk in chunk_files:
        block = np.load(chunk)
        images[start : start + len(block)] = block
        start += len(block)
    images.flush()
    del images
    manifest[INDEX_COLUMNS].to_csv(staging / "index.csv", index=False)
    meta = {
        "version": CACHE_VERSION,
        "key": key,
        "count": len(manifest),
        "image_size": size,
        "preprocess": cfg.model_dump(exclude={"workers"}),
    }
    (staging / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(staging, out_dir)


def load_cache(path: Path) -> Cache:
    """Open a cache written by `build_cache` (images memory-mapped, not read)."""
    path = Path(path)
    if not (path / "meta.json").is_file():
        raise DataError(f"{path} is not a preprocessed cache: run the preprocess stage first")
    meta = json.loads((path / "meta.json").read_text())
    index = pd.read_csv(path / "index.csv", dtype={"patient_id": str, "study_id": str})
    images = np.load(path / "images.npy", mmap_mode="r")
    if len(images) != len(index):
        raise DataError(f"{path} is inconsistent (images and index differ): rebuild it")
    return Cache(images=images, index=index, meta=meta)
