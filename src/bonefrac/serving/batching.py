"""Continuous batching for /predict_batch.

Each request decodes and preprocesses its own files first, in a thread of its own, while the
models run the batch before it; then it joins a queue. One loop runs everything queued (up to
`max_items` images, whole requests only) as one batch the moment the models are free, in one
dedicated thread, so batches never overlap and never wait for a timer.

Why not BentoML's adaptive batching (`batchable=True`), measured with 8 closed-loop clients at
224 px, int8 (docs/benchmarks.md): its cork algorithm holds a ready batch back while it expects
more requests, which left the models idle ~10 ms between batches (11.5% of the time), and a
batchable API decodes its files inside the batch, while the models wait.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

Job = tuple[Sequence[Any], asyncio.Future]


class Batcher:
    """`await submit(items)` -> `run(items of this and other queued requests)[this request's]`.

    `run` takes a list and returns one result per item, in order; it runs in one thread, one
    batch at a time. If it raises, every request of that batch gets the exception. A request
    whose client went away (its future cancelled) is dropped before its batch runs.
    `on_batch(n)` is called with each batch's size (for metrics).
    """

    def __init__(
        self,
        run: Callable[[list[Any]], Sequence[Any]],
        max_items: int,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        if max_items < 1:
            raise ValueError("max_items must be at least 1")
        self._run = run
        self.max_items = max_items
        self._on_batch = on_batch
        self._queue: collections.deque[Job] = collections.deque()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="bonefrac-batch")
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    async def submit(self, items: Sequence[Any]) -> list[Any]:
        if not items:
            return []
        if len(items) > self.max_items:
            raise ValueError(f"{len(items)} items in one request, over the {self.max_items} limit")
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done():  # first request (on this event loop)
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._serve())
        future: asyncio.Future = loop.create_future()
        self._queue.append((items, future))
        self._wake.set()
        return await future

    def _next_batch(self) -> list[Job]:
        jobs, count = [], 0
        while self._queue and count + len(self._queue[0][0]) <= self.max_items:
            items, future = self._queue.popleft()
            if not future.done():  # cancelled: the client went away
                jobs.append((items, future))
                count += len(items)
        return jobs

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                jobs = self._next_batch()
                if not jobs:
                    continue
                flat = [item for items, _ in jobs for item in items]
                try:
                    if self._on_batch is not None:
                        self._on_batch(len(flat))
                    results = await loop.run_in_executor(self._executor, self._run, flat)
                    if len(results) != len(flat):
                        raise RuntimeError(f"{len(results)} results for a batch of {len(flat)}")
                except Exception as exc:  # every request of the batch gets it
                    for _, future in jobs:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                start = 0
                for items, future in jobs:
                    if not future.done():
                        future.set_result(list(results[start : start + len(items)]))
                    start += len(items)
