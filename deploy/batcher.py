"""Cross-subject request batching inside one replica (asyncio).

Serve's `@serve.batch` splits a batch by multiplexed model id, i.e. by subject, which
is exactly what TuneQDM does not need: requests for different subjects can share one
UNet batch (docs/design.md §2). So each model replica runs its own batcher:

- `submit(item)` queues a request and awaits its result; a full queue (more than
  `max_queued_images` images waiting) raises Overloaded at once (HTTP 503);
- one loop takes the OLDEST waiting request, waits until `wait_s` has passed since
  it arrived (or its batch is full), and packs in arrival order every waiting
  request with the same `batch_key` (steps, guidance, size) while the batch stays
  within `max_batch_images` images and `max_distinct` subjects (the bank's slots);
- the batch runs on one worker thread (the UNet is one model; torch releases the
  GIL, so the event loop keeps accepting requests meanwhile); requests arriving
  during a run are packed into the next batch without further waiting, since their
  window has already passed;
- requests whose caller went away (cancelled) are dropped before a batch is packed.

Why not a fixed-size collector or Serve's batch: the wait applies only when the
replica is idle (an idle replica trades at most `wait_s` of latency for batching),
and under load batches form from the backlog with no wait at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from .errors import Overloaded

Item = TypeVar("Item")


@dataclass(eq=False)
class _Waiting(Generic[Item]):
    item: Item
    key: Hashable
    subject: Hashable
    images: int
    arrived: float
    future: asyncio.Future = field(repr=False)


@dataclass
class BatchStats:
    """What the batcher did so far (for tests, benchmarks and /v1/stats)."""

    batches: int = 0
    images: int = 0
    largest_batch: int = 0
    sizes: list[int] = field(default_factory=list)  # images per batch, last 1000

    def record(self, images: int) -> None:
        self.batches += 1
        self.images += images
        self.largest_batch = max(self.largest_batch, images)
        self.sizes.append(images)
        del self.sizes[:-1000]


class MixedBatcher(Generic[Item]):
    """Gathers requests (any subjects) into batches and runs `run_batch` on each.

    run_batch(items) -> one result per item, called on a single worker thread.
    key(item): requests batch only with equal keys. subject(item): at most
    `max_distinct` distinct subjects per batch. images(item): its image count.
    """

    def __init__(self, run_batch: Callable[[list[Item]], list[Any]], *,
                 key: Callable[[Item], Hashable], subject: Callable[[Item], Hashable],
                 images: Callable[[Item], int], max_batch_images: int = 8,
                 max_distinct: int = 8, wait_s: float = 0.01,
                 max_queued_images: int = 64) -> None:
        if max_batch_images < 1 or max_distinct < 1 or max_queued_images < 1 or wait_s < 0:
            raise ValueError("max_batch_images, max_distinct, max_queued_images must be >= 1 "
                             "and wait_s >= 0")
        self._run_batch = run_batch
        self._key, self._subject, self._images = key, subject, images
        self.max_batch_images = max_batch_images
        self.max_distinct = max_distinct
        self.wait_s = wait_s
        self.max_queued_images = max_queued_images
        self.stats = BatchStats()
        self._waiting: list[_Waiting[Item]] = []
        self._wakeup: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="unet-batch")

    @property
    def queued_images(self) -> int:
        return sum(w.images for w in self._waiting if not w.future.done())

    async def submit(self, item: Item) -> Any:
        """Queue `item` and return its result (or raise its batch's error)."""
        images = self._images(item)
        if images > self.max_batch_images:
            raise ValueError(f"{images} images do not fit a batch of {self.max_batch_images}")
        if self.queued_images + images > self.max_queued_images:
            raise Overloaded(f"replica is busy: {self.queued_images} images already queued "
                             f"(limit {self.max_queued_images}); retry shortly")
        self._ensure_loop()
        future = asyncio.get_running_loop().create_future()
        self._waiting.append(_Waiting(item, self._key(item), self._subject(item), images,
                                      time.monotonic(), future))
        self._wakeup.set()
        return await future

    def healthy(self) -> bool:
        """False if the batch loop died (a bug: batch errors are caught per batch)."""
        task = self._loop_task
        return task is None or not task.done() or task.cancelled()

    def close(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- the loop ------------------------------------------------------------------------

    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._wakeup = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._waiting = [w for w in self._waiting if not w.future.done()]
            if not self._waiting:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            oldest = self._waiting[0]
            delay = oldest.arrived + self.wait_s - time.monotonic()
            if delay > 0 and self._pack_images(oldest) < self.max_batch_images:
                self._wakeup.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), delay)
                continue  # re-check: more arrived, or the window passed
            batch = self._pack(oldest)
            if not batch:
                continue
            for waiting in batch:
                self._waiting.remove(waiting)
            items = [w.item for w in batch]
            try:
                results = await loop.run_in_executor(self._executor, self._run_batch, items)
                if len(results) != len(items):
                    raise RuntimeError(f"run_batch returned {len(results)} results for "
                                       f"{len(items)} requests")
            except Exception as err:  # every request of the batch gets the error
                for waiting in batch:
                    if not waiting.future.done():
                        waiting.future.set_exception(err)
                continue
            self.stats.record(sum(w.images for w in batch))
            for waiting, result in zip(batch, results, strict=True):
                if not waiting.future.done():
                    waiting.future.set_result(result)

    def _pack(self, oldest: _Waiting[Item]) -> list[_Waiting[Item]]:
        """`oldest` and, in arrival order, the compatible waiting requests that fit."""
        batch, images, subjects = [], 0, set()
        for waiting in self._waiting:
            if waiting.future.done() or waiting.key != oldest.key:
                continue
            new_subjects = subjects | {waiting.subject}
            if images + waiting.images > self.max_batch_images or (
                    len(new_subjects) > self.max_distinct):
                continue
            batch.append(waiting)
            images += waiting.images
            subjects = new_subjects
        return batch

    def _pack_images(self, oldest: _Waiting[Item]) -> int:
        return sum(w.images for w in self._pack(oldest))
