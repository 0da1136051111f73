"""What a person reads in the terminal: the tools' harmless start-up noise turned down, the
pipeline's results in two small tables, and where to look afterwards.

Pure functions over the flow's summary and the settings; `bonefrac` calls `quiet_tools`
before any heavy library is imported.
"""

from __future__ import annotations

import io
import os
from collections.abc import MutableMapping
from pathlib import Path

from bonefrac.config import Settings

# Set (unless the user set them) before TensorFlow, Prefect, MLflow, DVC, GX or BentoML load.
QUIET_ENV = {
    # TensorFlow's C++ INFO and WARNING lines at start-up (CPU feature notes, the absl
    # "log messages before InitializeLog" banner); its ERROR lines still print.
    "TF_CPP_MIN_LOG_LEVEL": "2",
    # Prefect's ephemeral server sends telemetry at start: offline that is an ERROR line
    # ("Failed to send telemetry") and, on a fresh PREFECT_HOME, a 'database is locked'
    # traceback from the same heartbeat. Neither is about the pipeline.
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",  # Prefect's client-side analytics (and other tools honouring it)
    "DVC_NO_ANALYTICS": "1",
    "BENTOML_DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "GX_ANALYTICS_ENABLED": "false",
}


def quiet_tools(environ: MutableMapping[str, str] | None = None) -> None:
    """Turn off the tools' telemetry and start-up chatter; values already set are kept."""
    environ = os.environ if environ is None else environ
    for name, value in QUIET_ENV.items():
        environ.setdefault(name, value)


def stage_line(name: str, seconds: float, note: str = "") -> str:
    """`stage preprocess      1.2 s  cache hit (key 3f2c…), reused`"""
    return f"stage {name:<13} {seconds:7.1f} s" + (f"  {note}" if note else "")


def data_note(data: dict) -> str:
    """What version_data did: the DVC version, and whether it is the one already recorded."""
    if data["md5"] == "untracked":
        return "data outside the project: not versioned"
    version = data["md5"].removesuffix(".dir")[:12]
    if data.get("unchanged"):
        return f"data version {version} unchanged (data.dvc), reused"
    return f"data version {version} recorded in data.dvc" + (", pushed" if data["pushed"] else "")


def preprocess_note(result: dict) -> str:
    """What preprocess did: a cache hit (all reused), a partial rebuild or a full one."""
    if result["skipped"]:
        return f"cache hit (key {result['key']}), reused {result['images']} images"
    if result["preprocessed"] < result["images"]:
        reused = result["images"] - result["preprocessed"]
        return f"{result['preprocessed']} images preprocessed, {reused} unchanged and reused"
    return f"{result['images']} images preprocessed (cache key {result['key']})"


def _number(value) -> str:
    return "—" if value is None else f"{value:.3f}"


def _table(columns: list[str], rows: list[list[str]]) -> str:
    """A plain-text table (no colour, no borders) that reads well in any terminal or log."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    table = Table(*columns, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for row in rows:
        table.add_row(*row)
    console = Console(width=160, color_system=None, file=io.StringIO(), record=True)
    console.print(table)
    return "\n".join(line.rstrip() for line in console.export_text().splitlines())


def results_table(summary: dict, parts: list[str], synthetic: bool) -> str:
    """Per fracture part the test study kappa and AUROC, with the body-part model's test
    accuracy (over all its classes) and the end-to-end study kappa under them."""
    metrics = summary["metrics"]
    rows = [
        [p, _number(metrics.get(f"{p}_study_kappa")), _number(metrics.get(f"{p}_study_auroc"))]
        for p in parts
    ]
    title = "test results" + (
        " — SYNTHETIC data: these numbers say nothing about real X-rays" if synthetic else ""
    )
    lines = [
        title,
        _table(["part", "study kappa", "study AUROC"], rows),
        f"body-part accuracy {_number(metrics.get('body_part_accuracy'))} "
        "(test, over all its classes); end-to-end study kappa "
        f"{_number(metrics.get('end_to_end_study_kappa'))}",
    ]
    recognised = metrics.get("other_parts_study_recognised")
    if recognised is not None:
        lines.append(
            "other parts (wrist, finger, forearm, humerus) recognised as out of scope: "
            f"{_number(recognised)} of test studies; target-part studies abstained: "
            f"{_number(metrics.get('end_to_end_study_abstained'))} (kappa with those as "
            f"normal, as MURA scores a submission: "
            f"{_number(metrics.get('end_to_end_study_submission_kappa'))})"
        )
    return "\n".join(lines)


def decisions_table(decisions: list[dict]) -> str:
    """The champion gate's decision per model: val decides, test is only reported."""
    columns = ["model", "version", "val metric", "val", "Δ lower bound", "test", "promoted"]
    rows = [
        [
            d["model"],
            f"v{d['version']}",
            d["metric"],
            _number(d["value"]),
            _number((d.get("gate") or {}).get("lower")),
            _number(d.get("test_value")),
            ("yes: " if d["promoted"] else "no: ") + d["reason"],
        ]
        for d in decisions
    ]
    return "champion gate (val decides; test reported only)\n" + _table(columns, rows)


def pipeline_summary(summary: dict, parts: list[str], synthetic: bool) -> str:
    return results_table(summary, parts, synthetic) + "\n\n" + decisions_table(summary["decisions"])


def page_url(host: str, port: int) -> str:
    """The upload page's address (a server on all interfaces is opened on this machine's)."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return f"http://{shown}:{port}/"


def where_to_look(
    settings: Settings, validation_report: str | None = None, experiment_id: str | None = None
) -> str:
    """The closing lines of `bonefrac pipeline`: the page, the MLflow UI, the GX Data Docs and
    the evaluation report, with the paths this run wrote."""
    from bonefrac.tracking import mlflow_ui_url

    layout = settings.layout
    docs = Path(validation_report) if validation_report else layout.validation
    page = page_url(settings.serve.host, settings.serve.port)
    runs = mlflow_ui_url(experiment_id=experiment_id)  # opens on the training runs
    lines = [
        "where to look:",
        f"  page        {page}  (`bonefrac serve` starts it; `make demo` does so next)",
        f"  MLflow UI   `make ui` (or `bonefrac ui`), then {runs}",
        f"  data docs   {docs.resolve()}  (Great Expectations)",
        f"  evaluation  {(layout.evaluation / 'comparison.md').resolve()}  "
        "(reports, plots and model cards beside it)",
    ]
    return "\n".join(lines)
