"""Continuous batching for /predict_batch.

Each request decodes and preprocesses its own files first, in the service's decode thread,
while the models run the batch before it; then it joins a queue. One loop runs everything
queued (up to `max_items` images, whole requests only) as one batch the moment the models are
free, in one dedicated thread, so batches never overlap and never wait for a timer. A request
that has waited longer than `max_wait_s` is answered `Overloaded` instead of run (load
shedding: under more load than the models can take, the queue does not grow without end).

Why not BentoML's adaptive batching (`batchable=True`), measured with 8 closed-loop clients at
224 px, int8 (docs/benchmarks.md): its cork algorithm holds a ready batch back while it expects
more requests, which left the models idle ~10 ms between batches (11.5% of the time), and a
batchable API decodes its files inside the batch, while the models wait.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any


class Overloaded(Exception):
    """The request waited longer than the batcher's `max_wait_s` for the models."""


@dataclass
class _Job:
    items: list[Any]
    future: asyncio.Future
    queued: float  # time.monotonic() when it joined the queue


class Batcher:
    """`await submit(items)` -> `run(items of this and other queued requests)[this request's]`.

    `run` takes a list and returns one result per item, in order; it runs in one thread, one
    batch at a time. If it raises, every request of that batch gets the exception. A request
    whose caller stopped waiting (its future cancelled) is dropped before its batch runs, and
    its results are discarded if it was already running. `on_batch(n)` is called with each
    batch's size (for metrics).
    """

    def __init__(
        self,
        run: Callable[[list[Any]], Sequence[Any]],
        max_items: int,
        on_batch: Callable[[int], None] | None = None,
        max_wait_s: float = 30.0,
    ) -> None:
        if max_items < 1:
            raise ValueError("max_items must be at least 1")
        self._run = run
        self.max_items = max_items
        self.max_wait_s = max_wait_s
        self._on_batch = on_batch
        self._queue: collections.deque[_Job] = collections.deque()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="bonefrac-batch")
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    async def submit(self, items: Sequence[Any]) -> list[Any]:
        items = list(items)  # the caller may change its list; the queue keeps this one
        if not items:
            return []
        if len(items) > self.max_items:
            raise ValueError(f"{len(items)} items in one request, over the {self.max_items} limit")
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._task.get_loop() is not loop:
            self._wake = asyncio.Event()  # first request (on this event loop)
            self._task = loop.create_task(self._serve())
        future: asyncio.Future = loop.create_future()
        self._queue.append(_Job(items, future, time.monotonic()))
        self._wake.set()
        return await future

    def _next_batch(self) -> list[_Job]:
        jobs, count = [], 0
        late = time.monotonic() - self.max_wait_s
        while self._queue and (not jobs or count + len(self._queue[0].items) <= self.max_items):
            job = self._queue.popleft()
            if job.future.done():  # cancelled: its caller stopped waiting
                continue
            if job.queued < late:
                waited = time.monotonic() - job.queued
                limit = f"{self.max_wait_s:g} s"
                job.future.set_exception(
                    Overloaded(f"the request waited {waited:.0f} s for the models (limit {limit})")
                )
                continue
            jobs.append(job)
            count += len(job.items)
        return jobs

    async def _serve(self) -> None:
        running: list[_Job] = []
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._queue:
                    running = self._next_batch()
                    if running:
                        await self._run_batch(running)
                    running = []
        except BaseException as exc:  # cancelled, or a bug: nobody may wait forever
            for job in [*running, *self._queue]:
                if not job.future.done():
                    job.future.set_exception(RuntimeError(f"the batcher stopped: {exc!r}"))
            self._queue.clear()
            raise

    async def _run_batch(self, jobs: list[_Job]) -> None:
        flat = [item for job in jobs for item in job.items]
        try:
            if self._on_batch is not None:
                self._on_batch(len(flat))
            loop = asyncio.get_running_loop()
            results = await loop.run_in_executor(self._executor, self._run, flat)
            if len(results) != len(flat):
                raise RuntimeError(f"{len(results)} results for a batch of {len(flat)}")
        except Exception as exc:  # every request of the batch gets it
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        start = 0
        for job in jobs:
            end = start + len(job.items)
            if not job.future.done():  # a cancelled caller's results are dropped, in place
                job.future.set_result(list(results[start:end]))
            start = end
