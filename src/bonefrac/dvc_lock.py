"""Record a Prefect flow run in dvc.lock, so `dvc status` and `dvc repro` agree with the flow.

Lives beside the stage list (not in data/versioning.py) because it needs to know which
params sections each stage reads, and data/ must not import the stages.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from bonefrac.config import Settings
from bonefrac.data.versioning import dvc


@dataclass(frozen=True)
class DvcRecord:
    recorded: bool
    stages: tuple[str, ...]
    reason: str  # why not, when not recorded
    seconds: float = 0.0


def why_not_reproducible(settings: Settings, stages: tuple[str, ...]) -> str | None:
    """Why `dvc repro` would not reproduce this run's outputs, or None when it would.

    dvc.lock records params.yaml's values of the sections each stage reads, and the project's
    own data and artifacts folders; a run with a --profile, --data or environment override
    computed something else, and recording it would make `dvc status` lie.
    """
    from bonefrac.config import load_settings
    from bonefrac.stages import get_stage

    project = Path(settings.paths.project)
    if not (project / ".dvc").is_dir() or not (project / "dvc.yaml").is_file():
        return f"{project} has no DVC pipeline (.dvc/ and dvc.yaml)"
    as_dvc_runs_it = load_settings(project / "params.yaml", env={})
    for field in ("data", "artifacts"):
        if getattr(settings.paths, field) != getattr(as_dvc_runs_it.paths, field):
            return f"this run's paths.{field} is not params.yaml's (an override)"
    if settings.profile != as_dvc_runs_it.profile:
        return (
            f"this run used profile {settings.profile!r} but params.yaml says "
            f"{as_dvc_runs_it.profile!r}: set `profile:` in params.yaml instead of --profile "
            "or BONEFRAC_PROFILE to keep DVC in step"
        )
    for name in stages:
        sections = get_stage(name).sections
        if settings.section_hash(*sections) != as_dvc_runs_it.section_hash(*sections):
            return f"stage {name} ran with {'/'.join(sections)} settings unlike params.yaml's"
    return None


def record_flow_run(settings: Settings, stages: tuple[str, ...]) -> DvcRecord:
    """Write `stages` into dvc.lock as they ran in this flow (`dvc commit --force`), so
    `dvc status` and `dvc repro` agree with the flow without running anything again.

    DVC hashes the current deps, params and outs and caches the outs, as `dvc repro` would.
    Only a run that `dvc repro` would reproduce is recorded (see `why_not_reproducible`).
    """
    reason = why_not_reproducible(settings, stages)
    if reason is not None:
        return DvcRecord(False, stages, reason)
    start = time.perf_counter()
    dvc(Path(settings.paths.project), "commit", "--force", "--quiet", *stages)
    return DvcRecord(True, stages, "", time.perf_counter() - start)
