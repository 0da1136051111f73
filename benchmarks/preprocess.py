"""Preprocessing throughput: the cache stage (1 and 2 worker processes) against a plain loop
of the same decode + CLAHE + Gaussian + resize calls, in one run; and the cost of reading a
cached epoch. Usage: python benchmarks/preprocess.py [--patients 24] [--size 224]"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from harness import dump  # noqa: E402

from bonefrac.cache import build_cache, load_cache  # noqa: E402
from bonefrac.config import (
    DataConfig,  # noqa: E402
    PreprocessConfig,  # noqa: E402
)
from bonefrac.data import mura, synthetic  # noqa: E402
from bonefrac.imaging import preprocess_file  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--patients", type=int, default=24)
    parser.add_argument("--size", type=int, default=224, help="model input side")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bonefrac-bench-"))
    try:
        synthetic.generate(work / "data", patients=args.patients, size=512, seed=0)
        frame = mura.build_manifest(work / "data", DataConfig()).frame
        cfg = PreprocessConfig(image_size=args.size)
        n = len(frame)
        print(f"{n} SYNTHETIC images (~512 px) -> {args.size} px, CLAHE + Gaussian K=5")

        start = time.perf_counter()
        for rel in frame["path"]:
            preprocess_file(work / "data" / rel, cfg)
        plain = time.perf_counter() - start

        results = [{"name": "plain loop", "seconds": plain, "images_per_s": n / plain}]
        for workers in (1, 2):
            out = work / f"cache-{workers}"
            start = time.perf_counter()
            build_cache(
                frame,
                work / "data",
                out,
                cfg.model_copy(update={"workers": workers}),
                progress=False,
            )
            seconds = time.perf_counter() - start
            results.append(
                {
                    "name": f"cache stage, {workers} worker(s)",
                    "seconds": seconds,
                    "images_per_s": n / seconds,
                    "ratio_vs_plain": plain / seconds,
                }
            )

        cache = load_cache(work / "cache-2")
        start = time.perf_counter()
        for begin in range(0, n, 32):  # one epoch of batches as training reads them
            np.asarray(cache.images[begin : begin + 32], dtype=np.float32)
        epoch = time.perf_counter() - start
        results.append(
            {
                "name": "reading one cached epoch",
                "seconds": epoch,
                "images_per_s": n / epoch,
                "ratio_vs_plain": plain / epoch,
            }
        )
        for r in results:
            extra = f"  x{r['ratio_vs_plain']:.2f} vs plain" if "ratio_vs_plain" in r else ""
            print(f"{r['name']:<28} {r['seconds']:7.2f} s  {r['images_per_s']:9.1f} img/s{extra}")
        dump(results)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
