"""Installing the locked dependency set (what `make setup` does): pip, the plain baseline,
against uv, each into its own new venv in a temp folder, in one run. Each tool reads its own
cache (pip's, or the pip.conf indexes and find-links of the machine; uv's ~/.cache/uv): run it
once beforehand so both caches are warm, as for a newcomer's second project or a CI runner.
Usage: python benchmarks/install.py [--uv-version 0.13.9] [--repeat 1]"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from harness import cpu_info, dump  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SPEC = ["-c", str(ROOT / "requirements.lock"), "-e", f"{ROOT}[test,dask]"]


def _run(cmd: list[str], env: dict | None = None) -> None:
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def install(tool: str, uv_version: str) -> float:
    """Seconds for `tool` to install the locked set into a new venv (venv creation excluded)."""
    with tempfile.TemporaryDirectory(prefix=f"bench-install-{tool}-") as tmp:
        venv = Path(tmp) / "venv"
        _run([sys.executable, "-m", "venv", str(venv)])
        pip = [str(venv / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check"]
        start = time.perf_counter()
        if tool == "pip":
            _run([*pip, *SPEC])
        else:  # what `make setup` does: uv into the venv, then uv installs the set
            _run([*pip, f"uv=={uv_version}"])
            env = {**os.environ, "UV_SYSTEM_CERTS": "1"}
            python = str(venv / "bin" / "python")
            _run(
                [str(venv / "bin" / "uv"), "pip", "install", "--quiet", "--python", python, *SPEC],
                env,
            )
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--uv-version", default="0.13.9")
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    cpu_info()  # prints lscpu's model name and flags
    results = []
    for round_ in range(args.repeat):
        pip_s = install("pip", args.uv_version)
        uv_s = install("uv", args.uv_version)
        print(f"round {round_}: pip {pip_s:.1f} s, uv {uv_s:.1f} s, pip/uv {pip_s / uv_s:.1f}x")
        results.append({"round": round_, "pip_s": round(pip_s, 1), "uv_s": round(uv_s, 1)})
    dump(results)


if __name__ == "__main__":
    main()
