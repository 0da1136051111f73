"""Trainings that log the same new dataset at the same moment (Dask workers tracking to one
`mlflow server`) all record it. MLflow's SQL store looks a dataset up and inserts it when
absent, in two steps, so two writers can both miss it and the second insert breaks the
datasets' unique key (a 400 from the server): seen in the Dask test, where it failed a
training and with it the pipeline. `tracking.retry_lost_insert_race` retries exactly that."""

from __future__ import annotations

import threading

import pytest
from mlflow.entities import Dataset as DatasetEntity
from mlflow.entities import DatasetInput, InputTag
from mlflow.exceptions import MlflowException

from bonefrac.tracking import lost_insert_race, retry_lost_insert_race
from tests import processes

pytestmark = pytest.mark.slow  # starts a server

WRITERS = 8
ROUNDS = 6

# What the server answers the writer that lost (mlflow 3.17, sqlite backend), as the Dask test
# logged it.
LOST_RACE = (
    "BAD_REQUEST: (sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id, "
    "datasets.name, datasets.digest\n[SQL: INSERT INTO datasets (dataset_uuid, experiment_id, "
    "name, digest, dataset_source_type, dataset_source, dataset_schema, dataset_profile) ...]"
)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("race")
    with processes.mlflow_server(folder, folder / "server.log") as uri:
        yield uri


def dataset(digest: str) -> DatasetEntity:
    return DatasetEntity("MURA-v1.1 (SYNTHETIC)", digest, "local", '{"uri": "/data"}')


def test_writers_logging_one_new_dataset_at_once_all_record_it(mlflow_server):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    experiment = client.create_experiment("race")
    runs = [client.create_run(experiment).info.run_id for _ in range(WRITERS)]
    errors: list[BaseException] = []
    attempts: list[int] = []

    def writer(run_id: str, digest: str, start: threading.Barrier) -> None:
        def log() -> None:
            attempts.append(1)  # list.append is atomic
            client.log_inputs(run_id, [DatasetInput(dataset(digest), [InputTag("r", run_id)])])

        start.wait()
        try:
            retry_lost_insert_race(log)
        except BaseException as exc:  # noqa: BLE001  (the test reports every failure)
            errors.append(exc)

    for round_ in range(ROUNDS):
        start = threading.Barrier(WRITERS)
        threads = [
            threading.Thread(target=writer, args=(run, f"digest-{round_}", start)) for run in runs
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    assert errors == []
    print(f"{len(attempts) - WRITERS * ROUNDS} retries for {WRITERS * ROUNDS} writes")
    for run in runs:  # every run records every round's dataset, once
        digests = sorted(i.dataset.digest for i in client.get_run(run).inputs.dataset_inputs)
        assert digests == [f"digest-{r}" for r in range(ROUNDS)]


def test_only_a_lost_insert_race_is_retried():
    calls = []

    def loses_once() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise MlflowException(LOST_RACE)
        return "logged"

    assert retry_lost_insert_race(loses_once, pause_s=0) == "logged"
    assert len(calls) == 2

    other = MlflowException("RESOURCE_DOES_NOT_EXIST: Run 'abc' not found")
    calls.clear()

    def fails() -> None:
        calls.append(1)
        raise other

    with pytest.raises(MlflowException, match="not found"):
        retry_lost_insert_race(fails, pause_s=0)
    assert len(calls) == 1  # not retried

    calls.clear()

    def always_loses() -> None:
        calls.append(1)
        raise MlflowException(LOST_RACE)

    with pytest.raises(MlflowException, match="UNIQUE constraint"):
        retry_lost_insert_race(always_loses, attempts=3, pause_s=0)
    assert len(calls) == 3  # bounded
    # a unique key broken elsewhere (a run's tag written twice) is not this race
    assert not lost_insert_race(
        MlflowException("UNIQUE constraint failed: tags.key, tags.run_uuid")
    )
    assert lost_insert_race(MlflowException('duplicate key value violates "datasets_pk"'))
