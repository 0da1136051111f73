"""`validate`: the two Great Expectations suites (`images`, one row per image; `groups`, one
row per split x part, class balance a warning only) run in an ephemeral GX context, Data Docs,
and validation.json."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from bonefrac.data.validate.facts import image_facts
from bonefrac.data.validate.results import ExpectationFailure, ValidationResult, _failure
from bonefrac.data.validate.tables import (
    MURA_SPLITS,
    SPLITS,
    _check_inputs,
    _group_table,
    _image_table,
    _statistics,
)


@dataclass(frozen=True)
class ImageBounds:
    """Allowed image sides in pixels (both width and height)."""

    min_side: int = 32
    max_side: int = 8192


def _image_expectations(gxe, parts, image_bounds: ImageBounds, extensions) -> list:
    """Suite `images`: one row per image; failures name paths."""
    side = {"min_value": image_bounds.min_side, "max_value": image_bounds.max_side}
    return [
        *(
            gxe.ExpectColumnValuesToNotBeNull(column=c, description=f"`{c}` is filled in")
            for c in ("path", "split", "part", "patient_id", "study_id", "label")
        ),
        gxe.ExpectColumnValuesToBeUnique(column="path", description="each image is listed once"),
        gxe.ExpectColumnValuesToBeInSet(
            column="exists", value_set=[True], description="image file exists"
        ),
        gxe.ExpectColumnValuesToBeInSet(
            column="decodes",
            value_set=[True],
            description="image file decodes (verify + full load)",
        ),
        gxe.ExpectColumnValuesToBeInSet(
            column="extension",
            value_set=list(extensions),
            description=f"file extension is one of {', '.join(extensions)}",
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="width", **side, description=f"image width within {side} px"
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="height", **side, description=f"image height within {side} px"
        ),
        gxe.ExpectColumnValuesToBeInSet(
            column="label", value_set=[0, 1], description="study label is 0 or 1"
        ),
        gxe.ExpectColumnValuesToBeInSet(
            column="folder_label", value_set=[0, 1], description="folder label is 0 or 1"
        ),
        gxe.ExpectColumnValuesToBeInSet(
            column="label_matches_folder",
            value_set=[True],
            description="study folder suffix (_positive/_negative) agrees with the CSV label",
        ),
        gxe.ExpectColumnValuesToBeInSet(
            column="part",
            value_set=list(parts),
            description=f"body part is one of {', '.join(parts)}",
        ),
        gxe.ExpectColumnValuesToBeInSet(
            column="body_part_matches_part",
            value_set=[True],
            description="body_part is the short name of part",
        ),
        gxe.ExpectColumnValuesToBeInSet(
            column="split", value_set=list(SPLITS), description="split is train, val or test"
        ),
        gxe.ExpectColumnValuesToBeInSet(
            column="mura_split", value_set=list(MURA_SPLITS), description="MURA split is known"
        ),
        gxe.ExpectColumnValuesToBeInSet(
            column="split_matches_mura",
            value_set=[True],
            description="test split is exactly MURA valid",
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="n_splits_for_patient",
            min_value=1,
            max_value=1,
            description="no patient appears in two splits",
        ),
        gxe.ExpectColumnValuesToBeInSet(
            column="path_in_study",
            value_set=[True],
            description="image path lies inside its study folder",
        ),
    ]


def _group_expectations(gxe, min_rows: int, balance_bounds: tuple[float, float]) -> list:
    """Suite `groups`: one row per split x part; balance is a warning only."""
    low, high = balance_bounds
    return [
        gxe.ExpectColumnValuesToBeBetween(
            column=column,
            min_value=min_rows,
            description=f"at least {min_rows} {name} images per split x part",
        )
        for column, name in (("n_negative", "normal"), ("n_positive", "abnormal"))
    ] + [
        gxe.ExpectColumnValuesToBeBetween(
            column="positive_rate",
            min_value=low,
            max_value=high,
            severity="warning",
            description=f"share of abnormal images per split x part within [{low}, {high}]",
        )
    ]


@contextlib.contextmanager
def _quiet_gx() -> Iterator[None]:
    """Keep GX's log lines and warnings out of CLI output for the duration of one run."""
    gx_logger = logging.getLogger("great_expectations")
    level = gx_logger.level
    gx_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        gx_logger.setLevel(level)


def _import_gx():
    """Import GX (~5 s) only when validating, with its usage analytics off."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx

    return gx


def _run_suites(gx, tables: dict[str, tuple[pd.DataFrame, str, list]], docs_dir: Path):
    """Validate each (frame, key column, expectations) in one ephemeral GX context and build
    Data Docs into docs_dir. Returns (key column, suite result) pairs in order."""
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    for site in list(context.list_data_docs_sites()):
        context.delete_data_docs_site(site)
    context.add_data_docs_site(
        "bonefrac",
        {
            "class_name": "SiteBuilder",
            "show_how_to_buttons": False,
            "store_backend": {
                "class_name": "TupleFilesystemStoreBackend",
                "base_directory": str(docs_dir),
            },
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        },
    )
    source = context.data_sources.add_pandas("manifest")
    results = []
    # SUMMARY, not COMPLETE: GX still counts every bad row, but lists (and stores, and
    # renders) only the first 20 keys; COMPLETE doubled the time on 40k failing rows.
    result_format = {"result_format": "SUMMARY", "partial_unexpected_count": 20}
    for name, (frame, key, expectations) in tables.items():
        batch = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe(name)
        suite = context.suites.add(gx.ExpectationSuite(name=name))
        for expectation in expectations:
            suite.add_expectation(expectation)
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(name=name, data=batch, suite=suite)
        )
        result = definition.run(
            batch_parameters={"dataframe": frame},
            result_format={**result_format, "unexpected_index_column_names": [key]},
        )
        results.append((key, result))
    context.build_data_docs(site_names=["bonefrac"])
    return results


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as tmp:
        tmp.write(text)
    os.replace(tmp.name, path)


def validate(
    manifest: pd.DataFrame,
    data_dir: Path,
    parts: Sequence[str],
    out_dir: Path,
    *,
    other_parts: Sequence[str] = (),
    min_rows_per_group: int = 2,
    balance_bounds: tuple[float, float] = (0.1, 0.9),
    image_bounds: ImageBounds = ImageBounds(min_side=32, max_side=8192),
    allowed_extensions: Sequence[str] = (".png", ".jpg", ".jpeg", ".dcm"),
    workers: int = 0,
) -> ValidationResult:
    """Check the manifest and every image it lists; write `out_dir/data_docs/` (GX Data Docs)
    and `out_dir/validation.json` (the DVC metrics). Bad data gives success=False, not an
    exception; unusable inputs raise DataError before anything is written. `other_parts`
    (MURA's parts for the body-part model's "other" class) are checked image by image; the
    per-group counts and balance cover the target `parts`, which have fracture models."""
    started = time.perf_counter()
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    parts = list(parts)
    _check_inputs(manifest, data_dir, parts)
    extensions = [e.lower() for e in allowed_extensions]

    # 1. Facts from the files, before GX is imported, so the workers fork from a lean process.
    unique_paths = manifest["path"].astype(str).drop_duplicates().tolist()
    facts = image_facts(data_dir, unique_paths, workers=workers)
    table = _image_table(manifest, facts)
    groups = _group_table(table, parts)

    # 2. GX suites, Data Docs built next to the final folder and swapped in afterwards.
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".data_docs-", dir=out_dir))
    try:
        with _quiet_gx():
            gx = _import_gx()
            image_checks = _image_expectations(
                gx.expectations, [*parts, *other_parts], image_bounds, extensions
            )
            group_checks = _group_expectations(gx.expectations, min_rows_per_group, balance_bounds)
            tables = {
                "images": (table, "path", image_checks),
                "groups": (groups, "group", group_checks),
            }
            runs = _run_suites(gx, tables, staging)
        docs_dir = out_dir / "data_docs"
        shutil.rmtree(docs_dir, ignore_errors=True)
        staging.rename(docs_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    # 3. Failures (critical) and warnings (severity=warning) with example paths.
    failures: list[ExpectationFailure] = []
    warned: list[ExpectationFailure] = []
    n_expectations = 0
    for key, run in runs:
        for result in run.results:
            n_expectations += 1
            if result.success:
                continue
            severity = str(getattr(result.expectation_config.severity, "value", "critical"))
            (warned if severity == "warning" else failures).append(_failure(result, key))

    statistics = _statistics(table, groups)
    statistics["n_expectations"] = n_expectations
    statistics["seconds"] = round(time.perf_counter() - started, 2)
    report_path = out_dir / "data_docs" / "index.html"
    result = ValidationResult(
        success=not failures,
        failures=failures,
        warnings=warned,
        report_path=report_path if report_path.exists() else None,
        statistics=statistics,
    )
    payload = {
        "success": result.success,
        "n_failures": len(failures),
        "n_warnings": len(warned),
        "failures": [asdict(f) for f in failures],
        "warnings": [asdict(w) for w in warned],
        "statistics": statistics,
        "report": "data_docs/index.html" if result.report_path else None,  # relative to out_dir
    }
    _write_atomic(out_dir / "validation.json", json.dumps(payload, indent=2, default=str) + "\n")
    return result
