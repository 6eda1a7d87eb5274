"""The replica's cross-subject batcher, with a fake model (no torch, no Ray)."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

import pytest

from deploy.batcher import MixedBatcher
from deploy.errors import Overloaded


@dataclass(frozen=True)
class Req:
    subject: str
    key: int = 0
    images: int = 1


class FakeModel:
    """Records each batch; optionally blocks until released, or fails."""

    def __init__(self, seconds: float = 0.0, fail: bool = False) -> None:
        self.batches: list[list[Req]] = []
        self.seconds = seconds
        self.fail = fail
        self.threads: set[str] = set()

    def __call__(self, items: list[Req]) -> list[str]:
        self.threads.add(threading.current_thread().name)
        self.batches.append(list(items))
        time.sleep(self.seconds)
        if self.fail:
            raise RuntimeError("out of memory")
        return [f"{r.subject}:{len(items)}" for r in items]


def make(model, **kwargs) -> MixedBatcher:
    options = {"max_batch_images": 8, "max_distinct": 8, "wait_s": 0.02,
               "max_queued_images": 64, **kwargs}
    return MixedBatcher(model, key=lambda r: r.key, subject=lambda r: r.subject,
                        images=lambda r: r.images, **options)


def test_requests_for_different_subjects_share_one_batch():
    model = FakeModel()

    async def main():
        batcher = make(model)
        results = await asyncio.gather(*[batcher.submit(Req(s)) for s in "abcdabcd"])
        batcher.close()
        return results

    results = asyncio.run(main())
    assert len(model.batches) == 1 and len(model.batches[0]) == 8
    assert results == [f"{s}:8" for s in "abcdabcd"]
    assert model.threads == {"unet-batch_0"}  # off the event loop, one thread


def test_batches_respect_keys_image_and_subject_limits():
    model = FakeModel()

    async def main():
        batcher = make(model, max_batch_images=4, max_distinct=2)
        requests = [Req("a"), Req("b", key=1), Req("c"), Req("d"), Req("a", images=3),
                    Req("e", key=1)]
        await asyncio.gather(*[batcher.submit(r) for r in requests])
        batcher.close()
        return batcher.stats

    stats = asyncio.run(main())
    for batch in model.batches:
        assert len({r.key for r in batch}) == 1
        assert sum(r.images for r in batch) <= 4
        assert len({r.subject for r in batch}) <= 2
    # oldest first: the first batch is a, c (+ a's 3 images do not fit: 1 + 1 + 3 > 4)
    assert [r.subject for r in model.batches[0]] == ["a", "c"]
    assert sorted(r.subject for b in model.batches for r in b) == sorted("abcdae")
    assert stats.images == 8 and stats.largest_batch <= 4


def test_requests_arriving_during_a_batch_form_the_next_one():
    model = FakeModel(seconds=0.2)

    async def main():
        batcher = make(model, wait_s=0.0)
        first = asyncio.ensure_future(batcher.submit(Req("a")))
        await asyncio.sleep(0.05)  # a is running now
        rest = [asyncio.ensure_future(batcher.submit(Req(s))) for s in "bcd"]
        await asyncio.gather(first, *rest)
        batcher.close()

    asyncio.run(main())
    assert [[r.subject for r in b] for b in model.batches] == [["a"], ["b", "c", "d"]]


def test_full_queue_is_overloaded_and_errors_reach_every_request():
    async def overloaded():
        model = FakeModel(seconds=0.2)
        batcher = make(model, max_batch_images=2, max_queued_images=2, wait_s=0.0)
        running = asyncio.ensure_future(batcher.submit(Req("a", images=2)))
        await asyncio.sleep(0.05)
        queued = asyncio.ensure_future(batcher.submit(Req("b", images=2)))
        await asyncio.sleep(0)
        with pytest.raises(Overloaded, match="2 images already queued"):
            await batcher.submit(Req("c"))
        with pytest.raises(ValueError, match="do not fit a batch of 2"):
            await batcher.submit(Req("d", images=3))
        await asyncio.gather(running, queued)
        batcher.close()

    asyncio.run(overloaded())

    async def failing():
        batcher = make(FakeModel(fail=True))
        results = await asyncio.gather(batcher.submit(Req("a")), batcher.submit(Req("b")),
                                       return_exceptions=True)
        batcher.close()
        return results

    results = asyncio.run(failing())
    assert [str(r) for r in results] == ["out of memory", "out of memory"]


def test_cancelled_requests_are_dropped_before_batching():
    model = FakeModel(seconds=0.1)

    async def main():
        batcher = make(model, wait_s=0.0)
        running = asyncio.ensure_future(batcher.submit(Req("a")))
        await asyncio.sleep(0.03)
        gone = asyncio.ensure_future(batcher.submit(Req("gone")))
        kept = asyncio.ensure_future(batcher.submit(Req("kept")))
        await asyncio.sleep(0)
        gone.cancel()  # the client went away while waiting
        await asyncio.gather(running, kept)
        batcher.close()

    asyncio.run(main())
    assert [[r.subject for r in b] for b in model.batches] == [["a"], ["kept"]]
