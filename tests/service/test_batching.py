"""`batching.Batcher`, /predict_batch's continuous batching, driven on a real event loop with a
`run` that blocks until the test lets it go, so which requests share a batch is deterministic."""

from __future__ import annotations

import asyncio
import threading

import pytest

from bonefrac.serving.batching import Batcher, Overloaded


class Gate:
    """A `run` that records each batch and holds it until the test lets it through:
    `release(n)` lets n more batches finish (default: all)."""

    def __init__(self, fail_on: str | None = None, short: bool = False) -> None:
        self.batches: list[list[str]] = []
        self.started = threading.Event()
        self.permits = threading.Semaphore(0)
        self.fail_on, self.short = fail_on, short

    def release(self, n: int = 1000) -> None:
        for _ in range(n):
            self.permits.release()

    def __call__(self, items: list[str]) -> list[str]:
        self.batches.append(list(items))
        self.started.set()
        assert self.permits.acquire(timeout=10)
        if self.fail_on in items:
            raise OSError("model failed")
        return [f"result of {item}" for item in items][: len(items) - self.short]


async def hold_first_batch(batcher: Batcher, gate: Gate, first: list[str]) -> asyncio.Task:
    task = asyncio.ensure_future(batcher.submit(first))
    assert await asyncio.to_thread(gate.started.wait, 10)
    return task


async def settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


def test_requests_queued_during_a_batch_run_together_and_each_gets_its_own_results():
    async def scenario():
        gate = Gate()
        batcher = Batcher(gate, max_items=16, on_batch=sizes.append)
        first = await hold_first_batch(batcher, gate, ["a"])
        later = [asyncio.ensure_future(batcher.submit(i)) for i in (["b"], ["c1", "c2"], ["d"])]
        await settle()
        gate.release()
        return await first, [await t for t in later], gate.batches

    sizes: list[int] = []
    first, later, batches = asyncio.run(scenario())
    assert batches == [["a"], ["b", "c1", "c2", "d"]]  # one forward pass for the three waiting
    assert first == ["result of a"]
    assert later == [["result of b"], ["result of c1", "result of c2"], ["result of d"]]
    assert sizes == [1, 4]


def test_a_batch_never_exceeds_max_items_and_requests_are_never_split():
    async def scenario():
        gate = Gate()
        batcher = Batcher(gate, max_items=3)
        first = await hold_first_batch(batcher, gate, ["a"])
        sizes = (["b1", "b2"], ["c1", "c2"], ["d"])
        later = [asyncio.ensure_future(batcher.submit(i)) for i in sizes]
        await settle()
        gate.release()
        await first
        return [await t for t in later], gate.batches

    later, batches = asyncio.run(scenario())
    assert batches == [["a"], ["b1", "b2"], ["c1", "c2", "d"]]  # the last one exactly full
    assert later == [
        ["result of b1", "result of b2"],
        ["result of c1", "result of c2"],
        ["result of d"],
    ]


def test_a_failing_batch_fails_only_its_own_requests_and_the_loop_goes_on():
    async def scenario():
        gate = Gate(fail_on="bad")
        batcher = Batcher(gate, max_items=16)
        first = await hold_first_batch(batcher, gate, ["bad"])
        gate.release()
        with pytest.raises(OSError, match="model failed"):
            await first
        return await batcher.submit(["good"])

    assert asyncio.run(scenario()) == ["result of good"]


def test_a_run_that_returns_the_wrong_number_of_results_is_an_error_not_a_misassignment():
    async def scenario():
        gate = Gate(short=True)
        gate.release()
        return await Batcher(gate, max_items=16).submit(["a", "b"])

    with pytest.raises(RuntimeError, match="1 results for a batch of 2"):
        asyncio.run(scenario())


def test_a_request_whose_client_left_is_dropped_before_its_batch_runs():
    async def scenario():
        gate = Gate()
        batcher = Batcher(gate, max_items=16)
        first = await hold_first_batch(batcher, gate, ["a"])
        gone = asyncio.ensure_future(batcher.submit(["gone"]))
        kept = asyncio.ensure_future(batcher.submit(["kept"]))
        await settle()
        gone.cancel()
        gate.release()
        await first
        return await kept, gate.batches

    kept, batches = asyncio.run(scenario())
    assert kept == ["result of kept"]
    assert batches == [["a"], ["kept"]]


def test_submit_refuses_an_oversized_request_and_answers_an_empty_one_at_once():
    gate = Gate()
    batcher = Batcher(gate, max_items=2)
    assert asyncio.run(batcher.submit([])) == []
    with pytest.raises(ValueError, match="3 items in one request, over the 2 limit"):
        asyncio.run(batcher.submit(["a", "b", "c"]))
    assert gate.batches == []
    with pytest.raises(ValueError):
        Batcher(gate, max_items=0)


def test_a_request_cancelled_while_its_batch_runs_does_not_shift_the_others_results():
    async def scenario():
        gate = Gate()
        batcher = Batcher(gate, max_items=16)
        first = await hold_first_batch(batcher, gate, ["a"])
        gate.started.clear()
        gone = asyncio.ensure_future(batcher.submit(["x1", "x2"]))
        kept = asyncio.ensure_future(batcher.submit(["y"]))
        await settle()
        gate.release(1)
        await first
        # the second batch holds both requests; cancel one while it runs
        assert await asyncio.to_thread(gate.started.wait, 10)
        gone.cancel()
        gate.release(1)
        return await asyncio.wait_for(kept, 10), gate.batches

    kept, batches = asyncio.run(scenario())
    assert batches == [["a"], ["x1", "x2", "y"]]
    assert kept == ["result of y"]


def test_a_request_of_exactly_max_items_runs():
    async def scenario():
        gate = Gate()
        gate.release()
        batcher = Batcher(gate, max_items=3)
        return await asyncio.wait_for(batcher.submit(["a", "b", "c"]), 10), gate.batches

    results, batches = asyncio.run(scenario())
    assert results == ["result of a", "result of b", "result of c"]
    assert batches == [["a", "b", "c"]]


def test_the_queue_keeps_its_own_copy_of_a_request():
    async def scenario():
        gate = Gate()
        batcher = Batcher(gate, max_items=2)
        first = await hold_first_batch(batcher, gate, ["a"])
        items = ["b"]
        later = asyncio.ensure_future(batcher.submit(items))
        await settle()
        items.extend(["c", "d", "e"])  # over max_items after submit: must not matter
        gate.release()
        await first
        return await asyncio.wait_for(later, 10)

    assert asyncio.run(scenario()) == ["result of b"]


def test_a_failing_metric_fails_its_batch_not_the_batcher():
    def observe(n: int) -> None:
        if n == 2:
            raise ValueError("metrics down")

    async def scenario():
        gate = Gate()
        gate.release()
        batcher = Batcher(gate, max_items=16, on_batch=observe)
        with pytest.raises(ValueError, match="metrics down"):
            await asyncio.wait_for(batcher.submit(["a", "b"]), 10)
        return await asyncio.wait_for(batcher.submit(["c"]), 10)

    assert asyncio.run(scenario()) == ["result of c"]


def test_if_the_batcher_stops_every_waiting_request_gets_an_error_not_a_hang():
    async def scenario():
        gate = Gate()
        batcher = Batcher(gate, max_items=1)
        first = await hold_first_batch(batcher, gate, ["a"])
        queued = [asyncio.ensure_future(batcher.submit([i])) for i in "bc"]
        await settle()
        batcher._task.cancel()  # the serving task dies mid-batch (shutdown, or a bug)
        done, pending = await asyncio.wait([first, *queued], timeout=10)
        gate.release()
        return [w.exception() for w in done], pending

    errors, pending = asyncio.run(scenario())
    assert not pending and len(errors) == 3  # the running request and the two queued ones
    assert all(isinstance(e, RuntimeError) and "batcher stopped" in str(e) for e in errors)


def test_requests_that_waited_past_max_wait_are_shed_with_overloaded():
    async def scenario():
        gate = Gate()
        batcher = Batcher(gate, max_items=16, max_wait_s=0.2)
        first = await hold_first_batch(batcher, gate, ["a"])
        late = asyncio.ensure_future(batcher.submit(["late"]))
        await asyncio.sleep(0.4)  # the models are still busy with "a"
        gate.release()
        await first
        with pytest.raises(Overloaded, match=r"waited 0 s for the models \(limit 0.2 s\)"):
            await asyncio.wait_for(late, 10)
        return await asyncio.wait_for(batcher.submit(["fresh"]), 10), gate.batches

    fresh, batches = asyncio.run(scenario())
    assert fresh == ["result of fresh"]
    assert batches == [["a"], ["fresh"]]  # the late request never reached the models


def test_a_new_event_loop_gets_its_own_serving_task():
    gate = Gate()
    gate.release()
    batcher = Batcher(gate, max_items=16)
    old = asyncio.new_event_loop()
    try:
        assert old.run_until_complete(batcher.submit(["a"])) == ["result of a"]
        # the old loop stays open with its task pending; a request on a new loop still runs
        assert asyncio.run(asyncio.wait_for(batcher.submit(["b"]), 10)) == ["result of b"]
    finally:
        old.close()


def _logger_states() -> dict:
    import logging

    loggers = logging.Logger.manager.loggerDict.values()
    return {lg: (lg.disabled, lg.propagate) for lg in loggers if isinstance(lg, logging.Logger)}


def _restore_loggers(states: dict) -> None:
    """Loggers as they were; one created during the import (bonefrac.serving, first made by
    the modules BentoML's configuration then disabled) as a new logger is: on, propagating,
    so later tests' caplog still sees it."""
    import logging

    for lg in logging.Logger.manager.loggerDict.values():
        if isinstance(lg, logging.Logger):
            lg.disabled, lg.propagate = states.get(lg, (False, True))


class _FailingBatcher:
    def __init__(self, error: Exception) -> None:
        self.error = error

    async def submit(self, items):
        raise self.error


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (RuntimeError("model exploded"), 500, "internal"),
        (Overloaded("waited 31 s"), 503, "overloaded"),
    ],
)
def test_predict_batch_answers_a_fault_with_a_5xx_and_the_request_id(error, status, code):
    """The /predict_batch method itself (BentoML's wrapper bypassed): our own fault is one 5xx
    with the request id, not a 200 of per-item errors; shedding is a 503 'overloaded'."""
    import json
    from concurrent.futures import ThreadPoolExecutor
    from types import SimpleNamespace

    import numpy as np

    before = _logger_states()  # importing BentoML's service machinery reconfigures logging

    from bonefrac.inference import Views
    from bonefrac.serving import service, uploads
    from bonefrac.serving.predictor import Predictor

    _restore_loggers(before)
    view = Views({"k": np.zeros((1, 4, 4, 3), np.uint8)})
    fake = SimpleNamespace(
        refusal=None,
        decoder=ThreadPoolExecutor(1),
        _decode_batch=lambda images: [view for _ in images],
        predictor=SimpleNamespace(merge_batch=Predictor.merge_batch),
        batcher=_FailingBatcher(error),
    )
    method = service.BonefracService.apis["predict_batch"].func

    async def call():
        uploads.request_id.set("rid-42")
        return await method(fake, ["a", "b"])

    try:
        response = asyncio.run(call())
    finally:
        fake.decoder.shutdown()
    assert response.status_code == status
    body = json.loads(response.body)
    assert body["error"]["code"] == code
    if code == "internal":
        assert "request id rid-42" in body["error"]["message"]
        assert "exploded" not in body["error"]["message"]  # logged, never sent
