"""Request batching: the images of concurrent requests that share their settings (steps, guidance, width, height,
negative prompt, eta: Instance.batch_key) run as one batch; different sizes never share one.

Requests queue their instances; one worker takes the oldest waiting instance and every other waiting instance
with the same settings, up to `max_batch_size`, and generates them together on one thread (the model runs one
batch at a time). While a batch runs, new requests wait in the queue, so that under load batches fill by
themselves; `max_wait_s` > 0 also holds a batch that is not full that long for more requests (off by default: a
lone request is answered at once). The results go back to each request in its own order; an exception in a batch
fails the requests of that batch only, and the worker carries on.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
from dataclasses import dataclass
from typing import Callable, Hashable, Optional, Sequence


@dataclass
class _Pending:
    item: object
    key: Hashable
    future: asyncio.Future


class Batcher:
    def __init__(self, run: Callable[[list], list], key: Callable[[object], Hashable], max_batch_size: int,
                 max_wait_s: float = 0.0):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self._run = run  # items -> results, same order; runs on the worker thread
        self._key = key
        self.max_batch_size = int(max_batch_size)
        self.max_wait_s = float(max_wait_s)
        self._queue: collections.deque[_Pending] = collections.deque()
        self._wakeup: Optional[asyncio.Event] = None
        self._worker: Optional[asyncio.Task] = None
        self._thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ddil-generate")
        self.running = 0  # items in the batch being generated (0: idle)

    @property
    def queued(self) -> int:
        """Items waiting for a batch."""
        return sum(1 for p in self._queue if not p.future.done())

    async def submit(self, items: Sequence) -> list:
        """The results of `items`, in order, once the batches holding them have run."""
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done():  # started in the server's event loop, on first use
            self._wakeup = asyncio.Event()
            self._worker = loop.create_task(self._work())
        futures = []
        for item in items:
            future = loop.create_future()
            self._queue.append(_Pending(item, self._key(item), future))
            futures.append(future)
        self._wakeup.set()
        results = await asyncio.gather(*futures, return_exceptions=True)  # every outcome retrieved, none logged
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return list(results)

    def _count(self, key: Hashable) -> int:
        return sum(1 for p in self._queue if p.key == key and not p.future.done())

    def _take(self, key: Hashable) -> list[_Pending]:
        batch, rest = [], collections.deque()
        for pending in self._queue:
            if pending.future.done():  # its request went away (client disconnected): nothing to compute
                continue
            if pending.key == key and len(batch) < self.max_batch_size:
                batch.append(pending)
            else:
                rest.append(pending)
        self._queue = rest
        return batch

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue:
                head = self._queue[0]
                if head.future.done():
                    self._queue.popleft()
                    continue
                deadline = loop.time() + self.max_wait_s
                while self._count(head.key) < self.max_batch_size and loop.time() < deadline:
                    self._wakeup.clear()
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), deadline - loop.time())
                    except asyncio.TimeoutError:
                        break
                batch = self._take(head.key)
                if not batch:
                    continue
                self.running = len(batch)
                try:
                    results = await loop.run_in_executor(self._thread, self._run, [p.item for p in batch])
                except Exception as exc:  # noqa: BLE001 - fails this batch's requests, not the server
                    for pending in batch:
                        if not pending.future.done():
                            pending.future.set_exception(exc)
                    continue
                finally:
                    self.running = 0
                for pending, result in zip(batch, results):
                    if not pending.future.done():
                        pending.future.set_result(result)

    def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
        self._thread.shutdown(wait=False, cancel_futures=True)
