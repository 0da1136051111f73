"""The tables the suites run on: the manifest joined with image facts and derived columns
(one row per image), the split x part groups, and the summary statistics."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from bonefrac.data.mura import COLUMNS
from bonefrac.errors import DataError

MANIFEST_COLUMNS = tuple(COLUMNS)  # the reader's columns, one definition
SPLITS = ("train", "val", "test")
MURA_SPLITS = ("train", "valid")


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
