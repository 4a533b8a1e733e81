"""Adaptive batching inside the serving process.

Continuous batching: while one batch runs, new requests queue; the next batch takes everything
queued (up to ``max_batch_size``). Under light load a request is scored alone and at once, with
no batching delay; under heavy load batches grow to whatever arrived during the previous one.
One batch runs at a time, in a worker thread, so the event loop keeps accepting requests.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

import anyio

Item = TypeVar("Item")
Result = TypeVar("Result")


class ContinuousBatcher(Generic[Item, Result]):
    def __init__(
        self,
        score: Callable[[list[Item]], Sequence[Result]],
        *,
        max_batch_size: int,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self.score = score
        self.max_batch_size = max_batch_size
        self.on_batch = on_batch
        self._queue: deque[tuple[Item, asyncio.Future[Result]]] = deque()
        self._wake: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None

    async def submit(self, item: Item) -> Result:
        loop = asyncio.get_running_loop()
        if self._wake is None:
            self._wake = asyncio.Event()
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._run(), name="cxr-batcher")
        future: asyncio.Future[Result] = loop.create_future()
        self._queue.append((item, future))
        self._wake.set()
        return await future

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                size = min(len(self._queue), self.max_batch_size)
                batch = [self._queue.popleft() for _ in range(size)]
                if self.on_batch is not None:
                    self.on_batch(size)
                items = [item for item, _ in batch]
                try:
                    results = await anyio.to_thread.run_sync(self.score, items)
                    if len(results) != len(items):
                        raise RuntimeError(f"scored {len(results)} results for {len(items)} items")
                except Exception as exc:  # every waiter hears about it; the loop goes on
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), result in zip(batch, results, strict=True):
                    if not future.done():  # a cancelled waiter simply drops its result
                        future.set_result(result)
