"""Data versioning with DVC: which exact data a model saw.

`data.dvc` tracks `data/` (the raw MURA-v1.1 folder); its md5 is the data version id that
every MLflow run and registered model carries. After a Prefect flow run, the stages it ran
are written into `dvc.lock` (`bonefrac.dvc_lock`), so `dvc status` agrees with the flow.
DVC is driven through its command line (`python -m dvc`), the interface DVC keeps stable.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from bonefrac.errors import DataError

if TYPE_CHECKING:
    pass


@dataclass(frozen=True)
class DataVersion:
    md5: str  # the directory hash in data.dvc, e.g. "3f2c...e1.dir"
    size: int | None
    nfiles: int | None
    pushed: bool = False

    @property
    def short(self) -> str:
        return self.md5.removesuffix(".dir")[:12]


def data_version(project_dir: Path, dvc_file: str = "data.dvc") -> DataVersion:
    """The data version recorded in `data.dvc` (run `track_data` first)."""
    path = Path(project_dir) / dvc_file
    if not path.is_file():
        raise DataError(
            f"{path} not found: run `dvc add data` (or the pipeline) to version the data"
        )
    content = yaml.safe_load(path.read_text()) or {}
    outs = content.get("outs") or []
    if not outs or "md5" not in outs[0]:
        raise DataError(f"{path} has no md5 entry: run `dvc add data` again")
    out = outs[0]
    return DataVersion(md5=str(out["md5"]), size=out.get("size"), nfiles=out.get("nfiles"))


def dvc(project_dir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run a DVC command in the project with analytics off; a failure is one-line DataError."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "dvc", *args],
        cwd=project_dir,
        capture_output=True,
        text=True,
        env=env,
    )
    if check and result.returncode != 0:
        lines = [ln for ln in (result.stderr or result.stdout).splitlines() if ln.strip()]
        reason = next((ln for ln in lines if "ERROR" in ln), lines[-1] if lines else "failed")
        raise DataError(f"dvc {' '.join(args)} failed: {reason.strip()}")
    return result


def track_data(project_dir: Path, data: str = "data", push: bool = True) -> DataVersion:
    """`dvc add` the data folder (a no-op when unchanged) and push it to the default remote."""
    project_dir = Path(project_dir)
    if not (project_dir / ".dvc").is_dir():
        raise DataError(f"{project_dir} is not a DVC repository: run `dvc init` there first")
    if not (project_dir / data).is_dir():
        raise DataError(f"{project_dir / data} not found: put MURA-v1.1 under it first")
    dvc(project_dir, "add", data)
    pushed = False
    if push:
        remotes = dvc(project_dir, "remote", "list").stdout.strip()
        if remotes:
            dvc(project_dir, "push", f"{data}.dvc")
            pushed = True
    version = data_version(project_dir, f"{data}.dvc")
    return DataVersion(version.md5, version.size, version.nfiles, pushed=pushed)
