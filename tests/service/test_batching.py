"""`batching.Batcher`, /predict_batch's continuous batching, driven on a real event loop with a
`run` that blocks until the test lets it go, so which requests share a batch is deterministic."""

from __future__ import annotations

import asyncio
import threading

import pytest

from bonefrac.serving.batching import Batcher


class Gate:
    """A `run` that records each batch and holds the first until `release()`."""

    def __init__(self, fail_on: str | None = None, short: bool = False) -> None:
        self.batches: list[list[str]] = []
        self.started = threading.Event()
        self.go = threading.Event()
        self.fail_on, self.short = fail_on, short

    def __call__(self, items: list[str]) -> list[str]:
        self.batches.append(list(items))
        self.started.set()
        self.go.wait(10)
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
        gate.go.set()
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
        later = [asyncio.ensure_future(batcher.submit(i)) for i in (["b1", "b2"], ["c1", "c2"])]
        await settle()
        gate.go.set()
        await first
        return [await t for t in later], gate.batches

    later, batches = asyncio.run(scenario())
    assert batches == [["a"], ["b1", "b2"], ["c1", "c2"]]
    assert later == [["result of b1", "result of b2"], ["result of c1", "result of c2"]]


def test_a_failing_batch_fails_only_its_own_requests_and_the_loop_goes_on():
    async def scenario():
        gate = Gate(fail_on="bad")
        batcher = Batcher(gate, max_items=16)
        first = await hold_first_batch(batcher, gate, ["bad"])
        gate.go.set()
        with pytest.raises(OSError, match="model failed"):
            await first
        return await batcher.submit(["good"])

    assert asyncio.run(scenario()) == ["result of good"]


def test_a_run_that_returns_the_wrong_number_of_results_is_an_error_not_a_misassignment():
    async def scenario():
        gate = Gate(short=True)
        gate.go.set()
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
        gate.go.set()
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
