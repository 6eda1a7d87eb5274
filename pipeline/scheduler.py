"""The actor pool: a queue of jobs, handed to whichever actor is free.

The driver keeps one outstanding call per actor and waits on all of them together
(`ray.wait(..., num_returns=1)`), so a fast actor takes the next job as soon as it
finishes and slow jobs do not hold up the rest (Ray's "don't ray.get in a loop"
pattern). Failures are split in two:

- the job's own failure (bad photo, NaN loss) comes back as a result with status
  "failed" from the actor, which stays alive and takes the next job;
- the actor's death (process killed, OOM, node lost: `RayActorError`,
  `WorkerCrashedError`, ...) kills and replaces that actor, and the job goes back to
  the front of the queue, at most `max_retries` times.

An actor that fails in its constructor (its base cannot load, say) is replaced too,
without counting against the job; after `max_start_failures` constructor failures
in a row with no success in between, the remaining jobs fail with that error.

The scheduler knows nothing of training: `make_actor(name)` builds an actor and
`start(actor, job, attempt)` returns an ObjectRef of the job's result dict, so the
logic is tested with tiny stand-in actors (tests/pipeline/test_scheduler.py).
"""

from __future__ import annotations

import contextlib
import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .manifest import Job

Event = dict[str, Any]


@dataclass
class _Slot:
    index: int
    generation: int
    name: str
    actor: Any
    busy: bool = False


@dataclass
class PoolReport:
    """results: job_id -> result dict; attempts: job_id -> tries used;
    replaced: names of actors that died and were replaced."""

    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    attempts: dict[str, int] = field(default_factory=dict)
    replaced: list[str] = field(default_factory=list)


def actor_crash_types() -> tuple[type[BaseException], ...]:
    """Exceptions that mean the actor (not the job) failed."""
    from ray import exceptions as rex

    return (rex.RayActorError, rex.WorkerCrashedError, rex.NodeDiedError,
            rex.OutOfMemoryError, rex.LocalRayletDiedError, rex.ObjectLostError)


class ActorPool:
    """Runs `jobs` on `size` actors with bounded retries; see the module docstring."""

    def __init__(self, make_actor: Callable[[str], Any],
                 start: Callable[[Any, Job, int], Any], size: int, name_prefix: str,
                 max_retries: int = 2, max_start_failures: int | None = None,
                 on_event: Callable[[Event], None] | None = None,
                 on_tick: Callable[[], None] | None = None, tick_s: float = 0.5) -> None:
        if size < 1:
            raise ValueError(f"actor pool size {size} is invalid: must be >= 1")
        if max_retries < 0:
            raise ValueError(f"max_retries={max_retries} is invalid: must be >= 0")
        self.make_actor = make_actor
        self.start = start
        self.size = size
        self.name_prefix = name_prefix
        self.max_retries = max_retries
        self.max_start_failures = max_start_failures or 2 * size + 1
        self.on_event = on_event or (lambda event: None)
        self.on_tick = on_tick or (lambda: None)
        self.tick_s = tick_s
        self.slots: list[_Slot] = []
        self.report = PoolReport()
        self._queue: deque[Job] = deque()
        self._in_flight: dict[Any, tuple[_Slot, Job, int]] = {}  # ObjectRef -> its call
        self._start_failures = 0  # constructor failures in a row
        self._broken = ""  # set when actors keep failing to start: no more replacements

    def run(self, jobs: list[Job]) -> PoolReport:
        import ray

        self.report = PoolReport()  # kept on self: partial results on Ctrl-C
        self._queue, self._in_flight = deque(jobs), {}
        self._start_failures, self._broken = 0, ""
        self.slots = [self._new_slot(i, 0) for i in range(min(self.size, len(jobs)))]
        try:
            while self._queue or self._in_flight:
                if self._broken:
                    self._fail_queue()
                self._start_free_slots()
                if not self._in_flight:
                    continue
                ready, _ = ray.wait(list(self._in_flight), num_returns=1, timeout=self.tick_s)
                self.on_tick()
                for ref in ready:
                    self._collect(ref)
            return self.report
        finally:
            self.shutdown()

    def _finish(self, job: Job, attempt: int, actor: str, result: dict[str, Any]) -> None:
        self.report.results[job.job_id] = result
        self.on_event({"event": "finished", "job": job, "actor": actor, "attempt": attempt,
                       "result": result})

    def _fail_queue(self) -> None:
        """No actor can start: every queued job fails with that reason."""
        while self._queue:
            job = self._queue.popleft()
            tries = self.report.attempts.get(job.job_id, 0)
            self._finish(job, tries, "", _failed(job, tries, "", self._broken))

    def _start_free_slots(self) -> None:
        """Hand the next queued job to every idle slot (starting replaced actors)."""
        for slot in self.slots:
            if slot.busy or not self._queue:
                continue
            if slot.actor is None:  # replaced: start the successor now
                slot.actor = self.make_actor(slot.name)
            job = self._queue.popleft()
            attempt = self.report.attempts.get(job.job_id, 0) + 1
            self.report.attempts[job.job_id] = attempt
            ref = self.start(slot.actor, job, attempt)
            slot.busy = True
            self._in_flight[ref] = (slot, job, attempt)
            self.on_event({"event": "started", "job": job, "actor": slot.name,
                           "attempt": attempt})

    def _collect(self, ref: Any) -> None:
        """Take one finished call: its result, the job's own failure, or the actor's."""
        import ray

        slot, job, attempt = self._in_flight.pop(ref)
        slot.busy = False
        try:
            result = ray.get(ref)
        except actor_crash_types() as err:
            self._actor_died(slot, job, attempt, err)
            return
        except ray.exceptions.RayTaskError as err:
            result = _failed(job, attempt, slot.name, short_error(err))
        else:
            self._start_failures = 0
        self._finish(job, attempt, slot.name, result)

    def _actor_died(self, slot: _Slot, job: Job, attempt: int, err: BaseException) -> None:
        """Replace the actor; requeue the job, or fail it after max_retries deaths."""
        reason = short_error(err)
        init_failed = getattr(err, "actor_init_failed", False)
        if init_failed:  # not the job's fault: give the try back
            self.report.attempts[job.job_id] = attempt - 1
            self._start_failures += 1
            if self._start_failures >= self.max_start_failures:
                self._broken = f"no actor could start: {reason}"
        if self._broken:
            self._retire(slot)
            tries = self.report.attempts[job.job_id]
            self._finish(job, tries, slot.name, _failed(job, tries, slot.name, self._broken))
            return
        self._replace(slot, reason, self.report)
        if init_failed:
            self._queue.appendleft(job)
        elif attempt > self.max_retries:
            self._finish(job, attempt, slot.name, _failed(
                job, attempt, slot.name,
                f"actor died {attempt} time(s) while training it (last: {reason})"))
        else:
            self.on_event({"event": "retry", "job": job, "actor": slot.name,
                           "attempt": attempt, "reason": reason})
            self._queue.appendleft(job)

    def shutdown(self) -> None:
        """Kill every actor of the pool (they hold CPUs/GPUs and a loaded model)."""
        for slot in self.slots:
            self._retire(slot)
        self.slots = []

    def _new_slot(self, index: int, generation: int) -> _Slot:
        return _Slot(index, generation, self._name(index, generation),
                     self.make_actor(self._name(index, generation)))

    def _name(self, index: int, generation: int) -> str:
        return f"{self.name_prefix}-{index}" + (f".{generation}" if generation else "")

    def _replace(self, slot: _Slot, reason: str, report: PoolReport) -> None:
        """Kill a dead actor; its successor starts when the slot gets its next job."""
        self._retire(slot)
        old = slot.name
        slot.generation += 1
        slot.name = self._name(slot.index, slot.generation)
        report.replaced.append(old)
        self.on_event({"event": "replaced", "actor": old, "new_actor": slot.name,
                       "reason": reason})

    def _retire(self, slot: _Slot) -> None:
        import ray

        if slot.actor is not None:
            with contextlib.suppress(Exception):
                ray.kill(slot.actor, no_restart=True)
        slot.actor = None


def _failed(job: Job, attempt: int, actor: str, reason: str) -> dict[str, Any]:
    from .worker import failed

    return failed(job, reason, attempt, actor)


def short_error(err: BaseException, limit: int = 400) -> str:
    """One readable line for an error: ANSI colours removed; for an error raised in a
    remote constructor or task, the exception line at the end of its traceback."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if "Traceback" in text or 'File "' in text:
        for line in reversed(lines):
            if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b", line):
                return f"{type(err).__name__}: {line[:limit]}"
    return f"{type(err).__name__}: {' '.join(lines)[:limit]}"
