"""MURA reader: the official layout and CSV quirks, patient-disjoint splits, problems by name."""

from __future__ import annotations

import pandas as pd
import pytest

from bonefrac.config import DataConfig
from bonefrac.data import mura
from bonefrac.errors import DataError

from .mura_fixture import expected_images, make_mura


@pytest.fixture()
def mura_dir(tmp_path):
    make_mura(tmp_path)
    return tmp_path


def test_reads_official_csvs_and_keeps_configured_parts(mura_dir):
    result = mura.build_manifest(mura_dir, DataConfig())
    frame = result.frame
    assert list(frame.columns) == mura.COLUMNS
    assert len(frame) == expected_images()
    assert set(frame["part"]) == {"XR_ELBOW", "XR_HAND", "XR_SHOULDER"}
    assert set(frame["body_part"]) == {"elbow", "hand", "shoulder"}
    # hidden resource forks and text files are never rows
    assert not frame["path"].str.contains(r"/\._|\.txt$").any()
    assert result.problems == []
    # every path resolves from data_dir
    assert all((result.data_dir / p).is_file() for p in frame["path"])


def test_labels_ids_and_views(mura_dir):
    frame = mura.build_manifest(mura_dir, DataConfig()).frame
    row = frame[frame["path"].str.endswith("patient00004/study1_positive/image3.png")].iloc[0]
    assert row["label"] == 1 and row["folder_label"] == 1
    assert row["patient_id"] == "patient00004"
    assert row["study_id"] == "train/XR_HAND/patient00004/study1_positive"
    assert row["study_path"] == "MURA-v1.1/train/XR_HAND/patient00004/study1_positive/"
    assert row["view"] == 3
    assert row["mura_split"] == "train"


def test_mura_valid_is_test_and_val_is_carved_by_patient(mura_dir):
    frame = mura.build_manifest(mura_dir, DataConfig(val_fraction=0.3, seed=1)).frame
    assert set(frame.loc[frame["mura_split"] == "valid", "split"]) == {"test"}
    assert set(frame.loc[frame["mura_split"] == "train", "split"]) == {"train", "val"}
    splits_per_patient = frame.groupby("patient_id")["split"].nunique()
    assert (splits_per_patient == 1).all()


def _train_patients(n: int, start: int = 0) -> pd.DataFrame:
    rows = []
    for part in ("XR_ELBOW", "XR_HAND", "XR_SHOULDER"):
        for label in (0, 1):
            for i in range(start, start + n):
                patient = f"patient{part}{label}{i:03d}"
                rows.append(
                    {
                        "mura_split": "train",
                        "split": "train",
                        "part": part,
                        "patient_id": patient,
                        "label": label,
                    }
                )
    return pd.DataFrame(rows)


def _val_patients(frame: pd.DataFrame) -> set[str]:
    return set(frame.loc[frame["split"] == "val", "patient_id"])


def test_split_is_seeded_and_near_the_fraction():
    frame = _train_patients(200)
    a = mura.assign_val_split(frame, 0.1, seed=7)
    b = mura.assign_val_split(frame, 0.1, seed=7)
    c = mura.assign_val_split(frame, 0.1, seed=8)
    pd.testing.assert_frame_equal(a, b)
    assert _val_patients(a) != _val_patients(c)
    share = len(_val_patients(a)) / frame["patient_id"].nunique()
    assert 0.07 < share < 0.13  # 1200 patients: a 10% draw lands well inside this
    # every (part, label) stratum has val patients
    assert a[a["split"] == "val"].groupby(["part", "label"]).size().min() > 0


def test_adding_patients_never_moves_an_existing_patient_into_val():
    before = mura.assign_val_split(_train_patients(12), 0.2, seed=3)
    after = mura.assign_val_split(
        pd.concat([_train_patients(12), _train_patients(30, start=12)]), 0.2, seed=3
    )
    old = set(before["patient_id"])
    old_train = set(before.loc[before["split"] == "train", "patient_id"])
    assert not (_val_patients(after) & old_train)  # train -> val never happens
    # hash-drawn val patients stay in val; only a stratum's fallback patient may leave
    drawn = {p for p in _val_patients(before) if mura.patient_draw(p, 3) < 0.2}
    assert drawn <= _val_patients(after) & old
    assert _val_patients(after) - old  # new patients do join val


def test_small_strata_still_get_a_val_patient():
    frame = _train_patients(3)
    for seed in range(20):
        split = mura.assign_val_split(frame, 0.05, seed=seed)
        per_stratum = split[split["split"] == "val"].groupby(["part", "label"]).size()
        assert len(per_stratum) == 6, seed


def test_falls_back_to_folder_scan_without_csvs(tmp_path):
    make_mura(tmp_path, with_csvs=False)
    with_scan = mura.build_manifest(tmp_path, DataConfig()).frame
    assert len(with_scan) == expected_images()
    assert (with_scan["label"] == with_scan["folder_label"]).all()


def test_accepts_the_mura_folder_itself(mura_dir):
    frame = mura.build_manifest(mura_dir / "MURA-v1.1", DataConfig()).frame
    assert len(frame) == expected_images()


def test_other_parts_can_be_selected(mura_dir):
    frame = mura.build_manifest(mura_dir, DataConfig(parts=("XR_WRIST", "XR_FINGER"))).frame
    assert len(frame) == expected_images(("XR_WRIST", "XR_FINGER"))


def test_missing_paths_and_label_disagreements_are_reported_by_name(mura_dir):
    root = mura_dir / "MURA-v1.1"
    (root / "train/XR_ELBOW/patient00001/study1_positive/image2.png").unlink()
    labels = root / "train_labeled_studies.csv"
    labels.write_text(
        labels.read_text().replace(
            "patient00002/study1_negative/,0", "patient00002/study1_negative/,1"
        )
    )
    result = mura.build_manifest(mura_dir, DataConfig())
    text = "\n".join(result.problems)
    assert (
        "does not exist: MURA-v1.1/train/XR_ELBOW/patient00001/study1_positive/image2.png" in text
    )
    assert (
        "disagrees with its CSV label 1: MURA-v1.1/train/XR_ELBOW/patient00002/study1_negative/"
        in text
    )
    assert len(result.frame) == expected_images() - 1
    bad = result.frame[result.frame["patient_id"] == "patient00002"]
    assert (bad["label"] == 1).all() and (bad["folder_label"] == 0).all()


def test_patient_in_both_mura_splits_is_reported(mura_dir):
    root = mura_dir / "MURA-v1.1"
    src = root / "valid/XR_HAND/patient11002"
    src.rename(root / "valid/XR_HAND/patient00005")
    for name in ("valid_image_paths.csv", "valid_labeled_studies.csv"):
        p = root / name
        p.write_text(p.read_text().replace("patient11002", "patient00005"))
    result = mura.build_manifest(mura_dir, DataConfig())
    assert "patient appears in both MURA train and valid: patient00005" in result.problems


def test_wrong_folder_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="does not contain MURA-v1.1"):
        mura.build_manifest(tmp_path, DataConfig())
    with pytest.raises(DataError, match="not found"):
        mura.build_manifest(tmp_path / "nope", DataConfig())


def test_manifest_round_trip_and_counts(mura_dir, tmp_path):
    frame = mura.build_manifest(mura_dir, DataConfig()).frame
    out = mura.write_manifest(frame, tmp_path / "out" / "manifest.csv")
    again = mura.read_manifest(out)
    pd.testing.assert_frame_equal(frame, again, check_dtype=False)
    table = mura.counts_table(frame)
    assert "abnormal" in table and "normal" in table and "total" in table
    assert str(len(frame)) in table.splitlines()[-1]


def test_other_parts_join_the_manifest_for_the_body_part_model_only(mura_dir):
    frame = mura.build_manifest(mura_dir, DataConfig(other_fraction=1.0)).frame
    other = frame[frame["scope"] == "other"]
    assert set(other["part"]) == {"XR_WRIST", "XR_FINGER"}
    assert set(other["body_part"]) == {"wrist", "finger"}  # the true part, not "other"
    assert len(other) == expected_images(("XR_WRIST", "XR_FINGER"))
    assert set(frame.loc[frame["scope"] == "target", "part"]) == {
        "XR_ELBOW",
        "XR_HAND",
        "XR_SHOULDER",
    }
    none = mura.build_manifest(mura_dir, DataConfig(other_parts=())).frame
    assert len(none) == expected_images() and (none["scope"] == "target").all()


def test_other_parts_default_to_the_four_not_chosen_as_targets():
    assert DataConfig().other_parts == ("XR_FINGER", "XR_FOREARM", "XR_HUMERUS", "XR_WRIST")
    assert DataConfig(parts=("XR_WRIST",)).other_parts == (
        "XR_FINGER",
        "XR_FOREARM",
        "XR_HUMERUS",
    )
    with pytest.raises(ValueError, match="XR_WRIST in both data.parts and data.other_parts"):
        DataConfig(parts=("XR_WRIST",), other_parts=("XR_WRIST",))


def test_other_fraction_keeps_a_stable_share_of_patients_independent_of_the_val_split():
    patients = [f"patient{i:05d}" for i in range(4000)]
    frame = pd.DataFrame(
        {
            "patient_id": patients,
            "mura_split": "train",
            "split": "train",
            "part": "XR_WRIST",
            "label": [i % 2 for i in range(4000)],
            "scope": "other",
        }
    )
    quarter = mura.subsample_other_parts(frame, 0.25, seed=42)
    half = mura.subsample_other_parts(frame, 0.5, seed=42)
    assert 0.22 < len(quarter) / len(frame) < 0.28
    assert set(quarter["patient_id"]) < set(half["patient_id"])  # more kept, none dropped
    assert len(mura.subsample_other_parts(frame, 1.0, seed=42)) == len(frame)
    # a draw of its own: the kept patients go to val at val_fraction, not skewed by the cut
    val = mura.assign_val_split(quarter, 0.1, seed=42)
    assert 0.07 < (val["split"] == "val").mean() < 0.13
    targets = frame.assign(scope="target", part="XR_ELBOW")
    assert len(mura.subsample_other_parts(targets, 0.25, seed=42)) == len(targets)
