"""Content identity of MURA-sized data: md5 of every image (what the preprocess cache key and
DVC use), first run and rerun with the stat memo, against a plain one-thread
`hashlib.md5(read_bytes())` loop, in one run.

MURA v1.1 has ~40,000 images, ~3.3 GB of PNGs (~81 KB each); the default writes that many
files of random bytes. The files were just written, so reads come from the page cache:
a cold disk adds its read time (3.3 GB / the disk's MB/s) to the first run only.
Usage: python benchmarks/content_hash.py [--files 40000] [--kb 81]"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from harness import dump  # noqa: E402

from bonefrac.data.fingerprints import content_md5s  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--files", type=int, default=40_000)
    parser.add_argument("--kb", type=float, default=81, help="mean file size")
    args = parser.parse_args()
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    print(next((ln for ln in cpu.splitlines() if "Model name" in ln), "cpu: unknown"))
    work = Path(tempfile.mkdtemp(prefix="bonefrac-hash-"))
    rng = np.random.default_rng(0)
    try:
        paths = []
        for i in range(args.files):
            rel = f"MURA-v1.1/train/XR_HAND/patient{i // 4:05d}/study1_negative/image{i % 4}.png"
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            size = int(rng.uniform(0.5, 1.5) * args.kb * 1024)
            (work / rel).write_bytes(rng.bytes(size))
            paths.append(rel)
        total_mb = sum((work / p).stat().st_size for p in paths) / 1e6
        print(f"{len(paths)} files, {total_mb:.0f} MB")
        memo = work / "memo.json"
        results = []

        def record(name: str, fn) -> list[str]:
            start = time.perf_counter()
            out = fn()
            seconds = time.perf_counter() - start
            results.append({"name": name, "seconds": seconds, "files_per_s": len(paths) / seconds})
            print(f"{name:<48} {seconds:8.2f} s  {len(paths) / seconds:10.0f} files/s")
            return out

        plain = record(
            "plain loop md5(read_bytes()), 1 thread",
            lambda: [hashlib.md5((work / p).read_bytes()).hexdigest() for p in paths],
        )
        one = record("content_md5s, 1 thread, no memo", lambda: content_md5s(work, paths, None, 1))
        record("content_md5s, default threads, first run", lambda: content_md5s(work, paths, memo))
        again = record(
            "content_md5s, unchanged rerun (stat only)", lambda: content_md5s(work, paths, memo)
        )
        os.utime(work / paths[0])  # one file touched: one rehash
        record("content_md5s, one file touched", lambda: content_md5s(work, paths, memo))
        assert plain == one == again
        print(f"memo file: {memo.stat().st_size / 1e6:.1f} MB")
        dump(results)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
