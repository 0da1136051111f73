"""Importing the stack in a fresh process, with and without bytecode files. These machines set
PYTHONDONTWRITEBYTECODE and uv installs without .pyc files, so each process compiled every
module it imported; the Makefile now lets Python write the .pyc files once. Each run is a new
`python -c "import ..."`; PYTHONPYCACHEPREFIX points the runs at empty folders, so the venv's
own __pycache__ folders play no part:
  plain: PYTHONDONTWRITEBYTECODE=1, no .pyc anywhere (what every process paid before);
  first: bytecode written as modules are imported (the first process after `make setup`);
  later: the .pyc files of `first` read back (every process after it).
Usage: python benchmarks/bytecode.py [--repeat 2] [--modules tensorflow,keras,...]"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from harness import cpu_info, dump  # noqa: E402

STACK = "tensorflow,keras,mlflow,prefect,nncf,openvino,bentoml"


def timed_import(modules: str, prefix: Path, write: bool) -> float:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env |= {"PYTHONPYCACHEPREFIX": str(prefix), "TF_CPP_MIN_LOG_LEVEL": "2"}
    if not write:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import {modules}"], env=env, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--modules", default=STACK)
    args = parser.parse_args()
    cpu_info()
    with tempfile.TemporaryDirectory() as empty, tempfile.TemporaryDirectory() as cache:
        plain = [timed_import(args.modules, Path(empty), False) for _ in range(args.repeat)]
        first = timed_import(args.modules, Path(cache), True)
        later = [timed_import(args.modules, Path(cache), True) for _ in range(args.repeat)]
        written = sum(1 for _ in Path(cache).rglob("*.pyc"))
    plain_s, later_s = statistics.median(plain), statistics.median(later)
    print(f"import {args.modules} in a new process:")
    print(f"  plain (no .pyc, none written): {', '.join(f'{t:.1f}' for t in plain)} s")
    print(f"  first (writes {written} .pyc files): {first:.1f} s")
    print(f"  later (reads them): {', '.join(f'{t:.1f}' for t in later)} s")
    saved = plain_s - later_s
    print(f"later vs plain: x{plain_s / later_s:.2f} faster, {saved:.1f} s saved a process")
    dump(
        [
            {"way": "plain", "seconds": plain},
            {"way": "first", "seconds": [first], "pyc_written": written},
            {"way": "later", "seconds": later},
        ]
    )


if __name__ == "__main__":
    main()
