"""Data validation stage: a Great Expectations suite over the image manifest.

The manifest (one row per image) is joined with facts read from every image file (exists,
decodes, size, mode) and with a few derived columns, then checked by two GX suites:
`images` (one row per image, failures name the offending paths) and `groups` (one row per
split x part: rows per label and class balance). Class balance is a WARNING: it is reported
but does not fail the stage. Bad data never raises; `validate` returns success=False and a
report. Only unusable inputs (no rows, missing columns) raise `DataError`.
"""

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
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import pandas as pd

from bonefrac.errors import DataError

MANIFEST_COLUMNS = (
    "path",
    "mura_split",
    "split",
    "part",
    "body_part",
    "patient_id",
    "study_id",
    "study_path",
    "view",
    "label",
    "folder_label",
)
SPLITS = ("train", "val", "test")
MURA_SPLITS = ("train", "valid")
MAX_EXAMPLES = 5
# Below this many images a process pool costs more to start than it saves.
_POOL_MIN_IMAGES = 200
# Bits per channel for the Pillow modes an X-ray can come in.
_MODE_BITS = {"1": 1, "I": 32, "F": 32, "I;16": 16, "I;16B": 16, "I;16L": 16, "I;16N": 16}


@dataclass(frozen=True)
class ImageBounds:
    """Allowed image sides in pixels (both width and height)."""

    min_side: int = 32
    max_side: int = 8192


@dataclass(frozen=True)
class ImageFacts:
    """What opening one image file found out."""

    path: str
    exists: bool
    decodes: bool
    width: int | None
    height: int | None
    mode: str | None
    bit_depth: int | None
    extension: str
    error: str | None


@dataclass(frozen=True)
class ExpectationFailure:
    """One failed expectation and up to five offending rows (image paths or group keys)."""

    expectation: str
    column: str | None
    description: str
    unexpected_count: int
    examples: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ValidationResult:
    """Outcome of `validate`: success is False when any critical expectation failed."""

    success: bool
    failures: list[ExpectationFailure]
    warnings: list[ExpectationFailure]
    report_path: Path | None
    statistics: dict

    def summary(self) -> str:
        """Human-readable result: each failed (and warned) expectation with up to 5 paths."""
        stats = self.statistics
        head = "passed" if self.success else "FAILED"
        lines = [
            f"Data validation {head}: {len(self.failures)} of {stats.get('n_expectations', '?')} "
            f"checks failed, {len(self.warnings)} warning(s) "
            f"({stats.get('n_images', 0)} images, {stats.get('n_studies', 0)} studies, "
            f"{stats.get('n_patients', 0)} patients)."
        ]
        for tag, items in (("FAIL", self.failures), ("WARN", self.warnings)):
            for item in items:
                column = f" [{item.column}]" if item.column else ""
                lines.append(f"{tag} {item.description}{column}: {item.unexpected_count} row(s)")
                lines.extend(f"    {example}" for example in item.examples[:MAX_EXAMPLES])
                if item.unexpected_count > len(item.examples):
                    lines.append(f"    ... and {item.unexpected_count - len(item.examples)} more")
        return "\n".join(lines)


# --- image facts --------------------------------------------------------------------------


def _bit_depth(mode: str) -> int:
    return _MODE_BITS.get(mode, 8)


def _read_facts(data_dir: Path, rel_path: str) -> ImageFacts:
    """Open one image; PNG/JPEG with Pillow (verify, then a full decode), DICOM with pydicom."""
    file = data_dir / rel_path
    extension = Path(rel_path).suffix.lower()
    if not file.is_file():
        return ImageFacts(rel_path, False, False, None, None, None, None, extension, "not found")
    try:
        if extension == ".dcm":
            import pydicom

            dataset = pydicom.dcmread(file)
            pixels = dataset.pixel_array  # (rows, columns[, samples]) decodes every frame
            height, width = int(pixels.shape[0]), int(pixels.shape[1])
            mode = str(dataset.get("PhotometricInterpretation", "MONOCHROME2"))
            bits = int(dataset.get("BitsStored", pixels.dtype.itemsize * 8))
            return ImageFacts(rel_path, True, True, width, height, mode, bits, extension, None)
        from PIL import Image

        with Image.open(file) as image:
            image.verify()  # checks structure and CRCs without decoding pixels
        with Image.open(file) as image:
            image.load()  # a truncated file fails here (LOAD_TRUNCATED_IMAGES is off)
            width, height = image.size
            mode = image.mode
        return ImageFacts(
            rel_path, True, True, width, height, mode, _bit_depth(mode), extension, None
        )
    except Exception as exc:  # any decoder error means "does not decode"
        message = f"{type(exc).__name__}: {exc}"[:300]
        return ImageFacts(rel_path, True, False, None, None, None, None, extension, message)


def _read_chunk(data_dir: Path, rel_paths: list[str]) -> list[ImageFacts]:
    return [_read_facts(data_dir, rel_path) for rel_path in rel_paths]


def _pool_context():
    """fork where the OS has it: workers start in milliseconds and, unlike spawn, do not
    re-run the caller's __main__ script (which breaks scripts without a main guard)."""
    import multiprocessing

    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def image_facts(data_dir: Path, paths: Sequence[str], workers: int = 0) -> pd.DataFrame:
    """Open each image (verify + full load, so truncated files fail) in parallel over cores;
    one row per path: path, exists, decodes, width, height, mode, bit_depth, extension, error.

    `workers=0` uses one process per core; small inputs are read in this process.
    """
    data_dir = Path(data_dir)
    paths = list(paths)
    workers = workers or os.cpu_count() or 1
    if workers == 1 or len(paths) < _POOL_MIN_IMAGES:
        facts = _read_chunk(data_dir, paths)
    else:
        # ~4 chunks per worker balances load without pickling one task per image.
        size = max(1, -(-len(paths) // (workers * 4)))
        chunks = [paths[i : i + size] for i in range(0, len(paths), size)]
        try:
            with ProcessPoolExecutor(workers, mp_context=_pool_context()) as pool:
                facts = [
                    item
                    for chunk in pool.map(_read_chunk, [data_dir] * len(chunks), chunks)
                    for item in chunk
                ]
        except BrokenProcessPool:  # e.g. a worker killed for memory: finish here instead
            facts = _read_chunk(data_dir, paths)
    columns = [f.name for f in fields(ImageFacts)]
    frame = pd.DataFrame([asdict(item) for item in facts], columns=columns)
    for column in ("width", "height", "bit_depth"):
        frame[column] = frame[column].astype("Int64")
    return frame


# --- tables the suites run on ---------------------------------------------------------------


def _check_inputs(manifest: pd.DataFrame, data_dir: Path, parts: Sequence[str]) -> None:
    if manifest is None or len(manifest) == 0:
        raise DataError("the manifest has no rows: run `bonefrac manifest` on the MURA folder")
    missing = [c for c in MANIFEST_COLUMNS if c not in manifest.columns]
    if missing:
        raise DataError(
            f"the manifest lacks column(s) {', '.join(missing)}: "
            "rebuild it with `bonefrac manifest`"
        )
    if not Path(data_dir).is_dir():
        raise DataError(f"{data_dir} not found: pass --data pointing at the folder with MURA-v1.1")
    if not parts:
        raise DataError("no body parts configured: set data.parts in params.yaml")


def _image_table(manifest: pd.DataFrame, facts: pd.DataFrame) -> pd.DataFrame:
    """Manifest + image facts + derived columns, one row per manifest row."""
    table = manifest.loc[:, list(MANIFEST_COLUMNS)].reset_index(drop=True)
    table["path"] = table["path"].astype(str)
    table = table.merge(facts, on="path", how="left", validate="many_to_one")
    # A missing file is reported once, by `exists`; its decode and size are unknown (null).
    table["decodes"] = table["decodes"].astype(object).where(table["exists"], None)
    table["label_matches_folder"] = table["label"] == table["folder_label"]
    table["n_splits_for_patient"] = table.groupby("patient_id")["split"].transform("nunique")
    # MURA valid is the test set, and nothing else is (invariant 2).
    table["split_matches_mura"] = (table["split"] == "test") == (table["mura_split"] == "valid")
    short_part = table["part"].astype(str).str.removeprefix("XR_").str.lower()
    table["body_part_matches_part"] = table["body_part"].astype(str) == short_part
    study_path = table["study_path"].astype(str)
    table["path_in_study"] = [
        p.startswith(s) for p, s in zip(table["path"], study_path, strict=True)
    ]
    return table


def _group_table(table: pd.DataFrame, parts: Sequence[str]) -> pd.DataFrame:
    """One row per split x configured part (empty ones included): images per label, balance."""
    known = table[
        table["split"].isin(SPLITS) & table["part"].isin(parts) & table["label"].isin([0, 1])
    ]
    counts = (
        known.groupby(["split", "part", "label"]).size().unstack("label").reindex(columns=[0, 1])
    )
    full = pd.MultiIndex.from_product([SPLITS, list(parts)], names=["split", "part"])
    counts = counts.reindex(full).fillna(0).astype(int)
    groups = pd.DataFrame(
        {
            "group": [f"{split}/{part}" for split, part in full],
            "split": full.get_level_values("split"),
            "part": full.get_level_values("part"),
            "n_negative": counts[0].to_numpy(),
            "n_positive": counts[1].to_numpy(),
        }
    )
    total = groups["n_negative"] + groups["n_positive"]
    groups["positive_rate"] = (groups["n_positive"] / total.where(total > 0)).round(4)
    return groups


def _statistics(table: pd.DataFrame, groups: pd.DataFrame) -> dict[str, Any]:
    def counts(rows: pd.DataFrame) -> dict[str, Any]:
        labels = pd.to_numeric(rows["label"], errors="coerce")
        return {
            "n_images": int(len(rows)),
            "n_studies": int(rows["study_id"].nunique()),
            "n_patients": int(rows["patient_id"].nunique()),
            "positive_rate": round(float(labels.mean()), 4) if len(rows) else None,
        }

    stats = counts(table)
    stats["n_missing_files"] = int((~table["exists"]).sum())
    stats["n_undecodable"] = int(table["decodes"].eq(False).sum())
    stats["splits"] = {
        str(split): counts(rows) for split, rows in table.groupby("split", sort=True)
    }
    stats["groups"] = {
        row.group: {
            "n_negative": int(row.n_negative),
            "n_positive": int(row.n_positive),
            "positive_rate": None if pd.isna(row.positive_rate) else float(row.positive_rate),
        }
        for row in groups.itertuples()
    }
    return stats


# --- Great Expectations -------------------------------------------------------------------


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


def _failure(result, key: str) -> ExpectationFailure:
    config = result.expectation_config
    details = result.result or {}
    examples: list[str] = []
    rows = details.get("unexpected_index_list") or details.get("partial_unexpected_index_list")
    for row in rows or []:
        value = str(row.get(key)) if isinstance(row, dict) else str(row)
        if value not in examples:
            examples.append(value)
        if len(examples) == MAX_EXAMPLES:
            break
    count = details.get("unexpected_count")
    description = config.description or config.type
    exception = (result.exception_info or {}).get("exception_message")
    if exception:  # the expectation itself could not run
        description = f"{description} (could not run: {exception})"
    return ExpectationFailure(
        expectation=config.type,
        column=config.kwargs.get("column"),
        description=description,
        unexpected_count=int(count) if count is not None else 0,
        examples=examples,
    )


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
    min_rows_per_group: int = 2,
    balance_bounds: tuple[float, float] = (0.1, 0.9),
    image_bounds: ImageBounds = ImageBounds(min_side=32, max_side=8192),
    allowed_extensions: Sequence[str] = (".png", ".jpg", ".jpeg", ".dcm"),
    workers: int = 0,
) -> ValidationResult:
    """Check the manifest and every image it lists; write `out_dir/data_docs/` (GX Data Docs)
    and `out_dir/validation.json` (the DVC metrics). Bad data gives success=False, not an
    exception; unusable inputs raise DataError before anything is written."""
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
            image_checks = _image_expectations(gx.expectations, parts, image_bounds, extensions)
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
