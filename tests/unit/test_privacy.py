"""Patient ids in logged artifacts are replaced by keyed pseudonyms."""

from __future__ import annotations

import stat

from bonefrac.privacy import project_key, pseudonymise_path, pseudonymise_paths

STUDY = "MURA-v1.1/valid/XR_ELBOW/patient11185/study1_positive/"


def test_patient_folders_become_stable_keyed_pseudonyms(tmp_path):
    key = project_key(tmp_path)
    assert project_key(tmp_path) == key  # created once, then reused
    assert stat.S_IMODE((tmp_path / ".pseudonym-key").stat().st_mode) == 0o600
    out = pseudonymise_path(STUDY, key)
    assert "11185" not in out and out.startswith("MURA-v1.1/valid/XR_ELBOW/pt-")
    assert out.endswith("/study1_positive/")
    assert pseudonymise_path(STUDY, key) == out  # same patient, same pseudonym
    other_key = pseudonymise_path(STUDY, b"another project's key")
    assert other_key != out  # not a plain hash anyone could recompute


def test_hospital_folder_names_after_the_body_part_are_pseudonymised():
    paths = ["site/XR_HAND/Doe_Jane_19500101/study2_negative/", "XR_HAND/patient2/s1/"]
    out = pseudonymise_paths(paths, b"k" * 32)
    assert "Doe_Jane" not in out[0] and "19500101" not in out[0]
    assert out[0].startswith("site/XR_HAND/pt-") and out[1].startswith("XR_HAND/pt-")
    assert len({o.split("/")[-3] for o in out}) == 2


def test_study_tables_lose_patient_ids_but_keep_their_rows():
    import pandas as pd

    from bonefrac.privacy import pseudonymise_frame

    frame = pd.DataFrame(
        {
            "study_id": [STUDY, STUDY.replace("11185", "11186")],
            "patient_id": ["11185", "11186"],
            "prob": [0.2, 0.9],
        }
    )
    out = pseudonymise_frame(frame, b"k" * 32)
    text = out.to_csv(index=False)
    assert "11185" not in text and "11186" not in text
    assert out["prob"].tolist() == [0.2, 0.9] and out["patient_id"].nunique() == 2
    assert frame["patient_id"].tolist() == ["11185", "11186"]  # the input is untouched
