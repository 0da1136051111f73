"""The preprocess stage: every manifest image through `imaging.preprocess_file`, once.

The cache is one memory-mappable array so an epoch's input cost is a read, not a decode:

    preprocessed/images.npy   (N, S, S) uint8   row i <-> index.csv row i
    preprocessed/index.csv    the manifest rows, in cache order, with each image's md5
    preprocessed/meta.json    preprocess params, key, count

`imaging.preprocess` returns three identical channels; the cache keeps one and
`Cache.rgb` restores three, so serving and training see the same array.

The key covers everything the cache depends on: every manifest row (path, split, label,
part, patient, study, view), each image's bytes (its md5, as DVC records it) and the
preprocessing params. A new split seed, a corrected label or a rewritten image gives a new
key; an unchanged rerun is a no-op. Rebuilding is incremental: pixels depend only on an
image's bytes and the params, so images whose md5 is already in the old cache (same params)
are copied from it and only new or changed images are preprocessed. That work runs in
parallel over processes, in chunks named by their contents and saved as they finish, so an
interrupted run resumes where it stopped.
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
from bonefrac.data.fingerprints import content_md5s
from bonefrac.data.mura import COLUMNS
from bonefrac.errors import DataError

CACHE_VERSION = 3  # 3: the manifest's `scope` column
CHUNK_SIZE = 64
# the manifest's columns minus the two only validation needs, plus each image's md5
INDEX_COLUMNS = [c for c in COLUMNS if c not in ("mura_split", "folder_label")] + ["md5"]
COPY_BLOCK = 4096  # rows copied from the previous cache at a time (bounded memory)


@dataclass(frozen=True)
class Cache:
    images: np.ndarray  # (N, S, S) uint8, memory-mapped
    index: pd.DataFrame  # N rows, INDEX_COLUMNS
    meta: dict

    @property
    def image_size(self) -> int:
        return int(self.meta["image_size"])

    def rows(
        self, split: str | None = None, body_part: str | None = None, *, other: bool = False
    ) -> np.ndarray:
        """Positions of the rows in a split and/or body part (cache order). Only the target
        parts' rows unless `other`: MURA's other parts (manifest scope "other") are for the
        body-part model alone, never the fracture models, the PCA gate or their metrics."""
        mask = np.ones(len(self.index), dtype=bool)
        if not other and "scope" in self.index:
            mask &= (self.index["scope"] != "other").to_numpy()
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
    preprocessed: int = 0  # images decoded and preprocessed by this run (the rest were copied)


def params_key(cfg: PreprocessConfig) -> str:
    """What the pixels of one image depend on besides its bytes."""
    params = json.dumps(cfg.model_dump(exclude={"workers"}), sort_keys=True)
    return hashlib.sha256(f"{CACHE_VERSION}\n{params}".encode()).hexdigest()[:16]


def cache_key(index: pd.DataFrame, cfg: PreprocessConfig) -> str:
    """Changes when any row of `index` (INDEX_COLUMNS, md5 included) or any param changes."""
    hasher = hashlib.sha256(params_key(cfg).encode())
    hasher.update(index[INDEX_COLUMNS].to_csv(index=False, lineterminator="\n").encode())
    return hasher.hexdigest()[:16]


def md5_memo_path(out_dir: Path) -> Path:
    """The stat memo of the images' md5s: beside the cache, outside DVC's output folder."""
    return Path(out_dir).parent / f".{Path(out_dir).name}.md5.json"


def cache_index(manifest: pd.DataFrame, data_dir: Path, out_dir: Path) -> pd.DataFrame:
    """The manifest's INDEX_COLUMNS with each image's md5 (memoised next to `out_dir`)."""
    md5s = content_md5s(data_dir, manifest["path"].tolist(), md5_memo_path(out_dir))
    return manifest.assign(md5=md5s)[INDEX_COLUMNS].reset_index(drop=True)


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


def _digest(*parts) -> str:
    text = "\n".join(p if isinstance(p, str) else "\n".join(p) for p in parts)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _workers(cfg: PreprocessConfig, n_chunks: int) -> int:
    wanted = cfg.workers or os.cpu_count() or 1
    return max(1, min(wanted, n_chunks))


def _previous(out_dir: Path, cfg: PreprocessConfig) -> Cache | None:
    """The cache already in `out_dir` when its pixels can be reused (same version, params)."""
    try:
        cache = load_cache(out_dir)
    except (DataError, OSError, ValueError):
        return None  # missing or damaged: nothing to reuse
    same = cache.meta.get("version") == CACHE_VERSION and cache.meta.get(
        "preprocess"
    ) == cfg.model_dump(mode="json", exclude={"workers"})
    return cache if same and "md5" in cache.index else None


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
    index = cache_index(manifest, data_dir, out_dir)
    key = cache_key(index, cfg)
    meta_path = out_dir / "meta.json"
    if meta_path.is_file() and json.loads(meta_path.read_text()).get("key") == key:
        return CacheResult(out_dir, len(index), reused=True, resumed_chunks=0)

    previous = _previous(out_dir, cfg)
    old_row = {} if previous is None else {m: i for i, m in enumerate(previous.index["md5"])}
    # row of the previous cache holding the same pixels, or -1: to preprocess
    source = np.array([old_row.get(m, -1) for m in index["md5"]], dtype=np.int64)
    todo = np.flatnonzero(source < 0)
    chunks = [todo[i : i + CHUNK_SIZE] for i in range(0, len(todo), CHUNK_SIZE)]
    # a chunk's file is named by its params and images' md5s: whatever run wrote it, it holds
    # exactly those pixels, so a resumed run (even after other images changed) can trust it
    work_dir = out_dir.parent / f".{out_dir.name}.partial"
    work_dir.mkdir(parents=True, exist_ok=True)
    prefix = params_key(cfg)
    chunk_file = [
        work_dir / f"chunk-{_digest(prefix, index['md5'].iloc[rows])}.npy" for rows in chunks
    ]
    pending = [n for n, f in enumerate(chunk_file) if not f.is_file()]
    resumed = len(chunks) - len(pending)

    bar = tqdm(total=len(todo), desc="preprocess", unit="img", disable=not progress)
    bar.update(len(todo) - sum(len(chunks[n]) for n in pending))

    def save(n: int, array: np.ndarray) -> None:
        tmp = chunk_file[n].with_suffix(".tmp.npy")
        np.save(tmp, array)
        os.replace(tmp, chunk_file[n])  # a chunk file exists only when complete
        bar.update(len(array))

    paths = index["path"].tolist()
    cfg_dump = cfg.model_dump()
    args = {n: (str(data_dir), [paths[i] for i in chunks[n]], cfg_dump) for n in pending}
    workers = _workers(cfg, len(pending))
    try:
        if workers == 1:
            for n in pending:
                save(n, _preprocess_chunk(*args[n]))
        else:
            # fork is fast and needs no `__main__` guard in the caller's script, but forking a
            # process that runs TensorFlow's thread pools can deadlock: spawn then.
            method = "spawn" if "tensorflow" in sys.modules else "fork"
            context = multiprocessing.get_context(method)
            with ProcessPoolExecutor(workers, mp_context=context) as pool:
                futures = {pool.submit(_preprocess_chunk, *args[n]): n for n in pending}
                for future in as_completed(futures):
                    save(futures[future], future.result())
    finally:
        bar.close()

    _assemble(
        index, out_dir, previous, source, list(zip(chunks, chunk_file, strict=True)), cfg, key
    )
    shutil.rmtree(work_dir, ignore_errors=True)
    return CacheResult(
        out_dir, len(index), reused=False, resumed_chunks=resumed, preprocessed=len(todo)
    )


def _assemble(
    index: pd.DataFrame,
    out_dir: Path,
    previous: Cache | None,
    source: np.ndarray,
    chunks: list[tuple[np.ndarray, Path]],
    cfg: PreprocessConfig,
    key: str,
) -> None:
    """Previous pixels + new chunks into images.npy in a temp folder, then swap it in."""
    staging = out_dir.parent / f".{out_dir.name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    size = cfg.image_size
    images = np.lib.format.open_memmap(
        staging / "images.npy", mode="w+", dtype=np.uint8, shape=(len(index), size, size)
    )
    kept = np.flatnonzero(source >= 0)
    for start in range(0, len(kept), COPY_BLOCK):
        rows = kept[start : start + COPY_BLOCK]
        images[rows] = previous.images[source[rows]]
    for rows, chunk in chunks:
        images[rows] = np.load(chunk)
    images.flush()
    del images
    index.to_csv(staging / "index.csv", index=False)
    meta = {
        "version": CACHE_VERSION,
        "key": key,
        "count": len(index),
        "image_size": size,
        "preprocess": cfg.model_dump(mode="json", exclude={"workers"}),
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
    index = pd.read_csv(path / "index.csv", dtype={"patient_id": str, "study_id": str, "md5": str})
    images = np.load(path / "images.npy", mmap_mode="r")
    if len(images) != len(index):
        raise DataError(f"{path} is inconsistent (images and index differ): rebuild it")
    return Cache(images=images, index=index, meta=meta)
