"""Each image's content identity: the md5 of its bytes.

That is the number DVC itself records for every file of a tracked folder (the `.dir` listing
behind `data.dvc`), so a cache keyed on it agrees with the data version. Hashing all of
MURA (~40,000 images, ~3.3 GB) reads every byte once; a memo keyed on what `stat` says
(size, mtime, ctime, inode: what DVC's state database and git's index use) makes an
unchanged rerun cost one `stat` per file. A file whose timestamps are too close to the
moment it was hashed is hashed again next time ("racy" in git's sense), so an image
rewritten within the same clock tick is never missed.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bonefrac.errors import DataError

MEMO_VERSION = 1
# A memo entry is trusted only when the file last changed this long before it was hashed:
# covers coarse filesystem clocks (FAT: 2 s) and a write landing in the same tick.
RACY_NS = 2_000_000_000


def file_md5(path: Path) -> str:
    """md5 of a file's bytes (hex), as DVC 3 computes it for every tracked file."""
    digest = hashlib.md5()
    with open(path, "rb") as handle:  # 1 MiB reads: one call for a typical 80 KB image
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _stat_key(rel: str, data_dir: Path) -> list[int]:
    try:
        st = os.stat(data_dir / rel)
    except FileNotFoundError:
        raise DataError(f"{rel} not found under {data_dir}: rebuild the manifest") from None
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _read_memo(memo_path: Path | None) -> dict[str, list]:
    if memo_path is None or not Path(memo_path).is_file():
        return {}
    try:
        memo = json.loads(Path(memo_path).read_text())
    except (OSError, ValueError):
        return {}  # a damaged memo only costs a rehash
    return memo.get("files", {}) if memo.get("version") == MEMO_VERSION else {}


def _write_memo(memo_path: Path, files: dict[str, list]) -> None:
    memo_path = Path(memo_path)
    memo_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo_path.with_name(memo_path.name + ".tmp")
    tmp.write_text(json.dumps({"version": MEMO_VERSION, "files": files}))
    os.replace(tmp, memo_path)


def content_md5s(
    data_dir: Path,
    paths: Sequence[str],
    memo_path: Path | None = None,
    workers: int | None = None,
    racy_ns: int = RACY_NS,
) -> list[str]:
    """md5 of each file (paths relative to `data_dir`), in order.

    With `memo_path`, files whose stat is unchanged since a safely earlier hash reuse it;
    the memo is rewritten with the files seen this time.
    """
    data_dir = Path(data_dir)
    memo = _read_memo(memo_path)
    stats = {rel: _stat_key(rel, data_dir) for rel in dict.fromkeys(paths)}
    known: dict[str, str] = {}
    for rel, key in stats.items():
        entry = memo.get(rel)
        # entry = [size, mtime_ns, ctime_ns, inode, md5, hashed_at_ns]
        if entry and entry[:4] == key and max(key[1], key[2]) < entry[5] - racy_ns:
            known[rel] = entry[4]
    todo = [rel for rel in stats if rel not in known]
    if todo:
        hashed_at = time.time_ns()
        threads = workers or min(32, 4 * (os.cpu_count() or 1))  # reads wait on storage
        with ThreadPoolExecutor(threads) as pool:  # hashlib releases the GIL on big buffers
            digests = pool.map(lambda rel: file_md5(data_dir / rel), todo)
            for rel, digest in zip(todo, digests, strict=True):
                known[rel] = digest
                memo[rel] = [*stats[rel], digest, hashed_at]
    if memo_path is not None and (todo or set(memo) - set(stats)):
        _write_memo(memo_path, {rel: memo[rel] for rel in stats})
    return [known[rel] for rel in paths]
