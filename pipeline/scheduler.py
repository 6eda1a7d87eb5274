"""The actor pool: a queue of jobs, handed to whichever actor is free.

The driver keeps one outstanding call per actor and waits on all of them together
(`ray.wait(..., num_returns=1)`), so a fast actor takes the next job as soon as it
finishes and slow jobs do not hold up the rest (Ray's "don't ray.get in a loop"
pattern). A job goes only to a live actor: a new actor first answers a trivial
readiness call (`__ray_ready__`, which returns once its constructor has run), and
queued jobs go to live idle actors before any successor is started. Failures:

- the job's own failure (bad photo, NaN loss) comes back as a result with status
  "failed" from the actor, which stays alive and takes the next job;
- the actor's death (process killed, OOM, node lost: `RayActorError`,
  `WorkerCrashedError`, ...) kills and replaces that actor, and the job goes back to
  the front of the queue, at most `max_retries` times; the successor is started only
  if no live actor is idle when the job's turn comes;
- a try that outlives `subject_timeout` (a hung actor) is handled as a death: the
  actor is killed and the job retried; out of retries, it fails with the reason
  "timed out after N s (K attempt(s))";
- an actor not ready within `schedule_timeout_s` and not placed on any node (its
  node died, or another actor holds the GPU it needs) is dropped and the pool shrinks
  (one still constructing on a node gets another window); if no actor is left the
  queued jobs fail with a reason naming the resources an actor needs and those free.

Short jobs: when `prefetch(job)` says so (the caller's estimate of the job's time is
short), a live actor that is already running a job gets up to `queue_depth` more
queued behind it in its own mailbox, so the next starts the moment the first returns
instead of after the driver's round trip (collect, dispatch, send: ~0.1-0.2 s, a visible share of a
sub-second job). Only the job at the head of an actor's mailbox is running: its deadline
counts from when it reached the head; if the actor dies, the queued job goes back to the
queue without using a try.

An actor that fails in its constructor (its base cannot load, say) is replaced too,
without counting against any job; after `max_start_failures` start failures in a row
with no success in between, the remaining jobs fail with that error.

The scheduler knows nothing of training: `make_actor(name)` builds an actor and
`start(actor, job, attempt)` returns an ObjectRef of the job's result dict, so the
logic is tested with tiny stand-in actors (tests/pipeline/test_scheduler.py).
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .manifest import Job
from .ray_errors import actor_crash_types, placed, short_error

Event = dict[str, Any]


@dataclass
class _Slot:
    index: int
    generation: int
    name: str
    actor: Any
    calls: list[Any] = field(default_factory=list)  # its in-flight refs, head running
    ready_ref: Any = None    # the actor's readiness call while it is being scheduled
    since: float = 0.0       # when the actor was created (time.monotonic)
    retired: bool = False    # could not be scheduled: the pool shrank by this slot


@dataclass
class _Call:
    """One job in flight on one actor; `started` (time.monotonic) is when it reached the
    head of the actor's mailbox."""

    ref: Any
    slot: _Slot
    job: Job
    attempt: int
    started: float
    announced: bool = False  # its "started" event was sent


@dataclass
class PoolReport:
    """results: job_id -> result dict; attempts: job_id -> tries used;
    replaced: names of actors that died and were replaced; shrunk: names of actors
    dropped because they could not be scheduled; timed_out: job_id -> tries that hit
    the subject deadline."""

    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    attempts: dict[str, int] = field(default_factory=dict)
    replaced: list[str] = field(default_factory=list)
    shrunk: list[str] = field(default_factory=list)
    timed_out: dict[str, int] = field(default_factory=dict)


def _ray_ready(actor: Any) -> Any:
    return actor.__ray_ready__.remote()  # every Ray actor has it; returns once constructed


Timeout = float | Callable[[Job], float | None] | None
Prefetch = Callable[[Job], bool]


class ActorPool:
    """Runs `jobs` on `size` actors with bounded retries; see the module docstring.

    schedule_timeout_s: how long a new actor may take to be scheduled and constructed;
    subject_timeout: seconds one try of a job may take (a number, a function of the
    job, or None for no deadline); demand: the actor's resources, for messages;
    prefetch: whether a job may be queued behind a running one (short jobs);
    queue_depth: how many may wait behind it on one actor."""

    def __init__(self, make_actor: Callable[[str], Any],
                 start: Callable[[Any, Job, int], Any], size: int, name_prefix: str,
                 max_retries: int = 2, max_start_failures: int | None = None,
                 on_event: Callable[[Event], None] | None = None,
                 on_tick: Callable[[], None] | None = None, tick_s: float = 0.5,
                 schedule_timeout_s: float = 600.0, subject_timeout: Timeout = None,
                 ready: Callable[[Any], Any] = _ray_ready, demand: str = "",
                 prefetch: Prefetch | None = None, queue_depth: int = 1) -> None:
        if size < 1:
            raise ValueError(f"actor pool size {size} is invalid: must be >= 1")
        if max_retries < 0:
            raise ValueError(f"max_retries={max_retries} is invalid: must be >= 0")
        if schedule_timeout_s <= 0:
            raise ValueError(f"schedule_timeout_s={schedule_timeout_s} is invalid: "
                             "must be > 0")
        self.make_actor, self.start, self.ready = make_actor, start, ready
        self.size = size
        self.name_prefix = name_prefix
        self.max_retries = max_retries
        self.max_start_failures = max_start_failures or 2 * size + 1
        self.on_event = on_event or (lambda event: None)
        self.on_tick = on_tick or (lambda: None)
        self.tick_s = tick_s
        self.schedule_timeout_s = schedule_timeout_s
        self.subject_timeout = subject_timeout
        self.demand = demand
        self.prefetch = prefetch or (lambda job: False)
        self.queue_depth = queue_depth
        self.slots: list[_Slot] = []
        self.report = PoolReport()
        self._queue: deque[Job] = deque()
        self._in_flight: dict[Any, _Call] = {}  # ObjectRef of a job's result -> its call
        self._starting: dict[Any, _Slot] = {}   # ObjectRef of a readiness call -> slot
        self._start_failures = 0  # constructor failures in a row
        self._broken = ""  # set when actors keep failing to start: no more replacements

    def run(self, jobs: list[Job]) -> PoolReport:
        import ray

        self.report = PoolReport()  # kept on self: partial results on Ctrl-C
        self._queue, self._in_flight, self._starting = deque(jobs), {}, {}
        self._start_failures, self._broken = 0, ""
        self.slots = [_Slot(i, 0, self._name(i, 0), None)
                      for i in range(min(self.size, len(jobs)))]
        try:
            while self._queue or self._in_flight:
                if self._broken:
                    self._fail_queue()
                self._dispatch()
                self._check_deadlines()
                waiting = [*self._in_flight, *self._starting]
                if not waiting:
                    continue
                ready, _ = ray.wait(waiting, num_returns=1, timeout=self.tick_s)
                self.on_tick()
                for ref in ready:
                    if ref in self._starting:
                        self._started(ref)
                    elif ref in self._in_flight:
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

    # -- handing out work ------------------------------------------------------------

    def _dispatch(self) -> None:
        """Queued jobs go to live idle actors first; a successor actor is started only
        for the jobs that no live or starting actor can take."""
        for slot in self.slots:
            if self._queue and self._live(slot) and not slot.calls:
                self._give(slot, self._queue.popleft())
        for _ in range(self.queue_depth):  # short jobs: queued behind a running one,
            for slot in self.slots:        # one more per actor in each round
                if (self._queue and self._live(slot) and
                        1 <= len(slot.calls) <= self.queue_depth and
                        self.prefetch(self._queue[0])):
                    self._give(slot, self._queue.popleft())
        starting = sum(1 for slot in self.slots if slot.ready_ref is not None)
        wanted = len(self._queue) - starting
        for slot in self.slots:
            if wanted <= 0 or self._broken:
                break
            if slot.actor is None and not slot.retired:
                slot.actor = self.make_actor(slot.name)
                slot.ready_ref, slot.since = self.ready(slot.actor), time.monotonic()
                self._starting[slot.ready_ref] = slot
                wanted -= 1
        self._check_unschedulable()

    @staticmethod
    def _live(slot: _Slot) -> bool:
        return slot.actor is not None and slot.ready_ref is None and not slot.retired

    def _give(self, slot: _Slot, job: Job) -> None:
        attempt = self.report.attempts.get(job.job_id, 0) + 1
        self.report.attempts[job.job_id] = attempt
        ref = self.start(slot.actor, job, attempt)
        slot.calls.append(ref)
        self._in_flight[ref] = _Call(ref, slot, job, attempt, time.monotonic())
        if len(slot.calls) == 1:
            self._announce(self._in_flight[ref])

    def _announce(self, call: _Call) -> None:
        """The call reached the head of its actor's mailbox: it runs from now (once)."""
        if call.announced:
            return
        call.started, call.announced = time.monotonic(), True
        self.on_event({"event": "started", "job": call.job, "actor": call.slot.name,
                       "attempt": call.attempt})

    def _timeout_for(self, job: Job) -> float | None:
        timeout = self.subject_timeout
        return timeout(job) if callable(timeout) else timeout

    def _started(self, ref: Any) -> None:
        """An actor's readiness call returned: it is live, or it failed to start."""
        import ray

        slot = self._starting.pop(ref)
        slot.ready_ref = None
        try:
            ray.get(ref)
        except ray.exceptions.RayError as err:
            self._start_failed(slot, short_error(err))
        else:
            self._start_failures = 0

    def _start_failed(self, slot: _Slot, reason: str) -> None:
        self._start_failures += 1
        if self._start_failures >= self.max_start_failures:
            self._broken = f"no actor could start: {reason}"
            self._retire(slot)
        else:
            self._replace(slot, reason)

    def _check_unschedulable(self) -> None:
        """Drop actors still not ready after schedule_timeout_s (their resources are
        gone: a node died, or another actor holds them). The pool shrinks while a live
        actor remains; with none left the queued jobs fail, naming the resources."""
        now = time.monotonic()
        for slot in self.slots:
            if slot.ready_ref is None or now - slot.since < self.schedule_timeout_s:
                continue
            if placed(slot.actor):  # on a node, still constructing: another window
                slot.since = now
                continue
            self._starting.pop(slot.ready_ref, None)
            slot.ready_ref = None
            self._retire(slot)
            slot.retired = True
            self.report.shrunk.append(slot.name)
            left = sum(1 for s in self.slots if not s.retired)
            self.on_event({"event": "shrunk", "actor": slot.name, "actors_left": left,
                           "reason": f"not scheduled within {self.schedule_timeout_s:g} s"})
            if not any(self._live(s) or s.ready_ref is not None for s in self.slots):
                self._broken = self._unschedulable_reason()

    def _unschedulable_reason(self) -> str:
        import ray

        try:
            free = {k: v for k, v in ray.available_resources().items()
                    if k in ("CPU", "GPU", "memory")}
        except Exception:
            free = {}
        free_text = ", ".join(f"{k} {v:g}" for k, v in sorted(free.items())) or "none"
        need = f" (each needs {self.demand})" if self.demand else ""
        return (f"no actor could be scheduled within {self.schedule_timeout_s:g} s"
                f"{need}; free in the cluster: {free_text}")

    # -- results, deaths, deadlines ----------------------------------------------------

    def _collect(self, ref: Any) -> None:
        """Take one finished call: its result, the job's own failure, or the actor's."""
        import ray

        call = self._in_flight[ref]
        slot = call.slot
        try:
            result = ray.get(ref)
        except actor_crash_types() as err:
            self._actor_died(slot, short_error(err))
            return
        except ray.exceptions.RayTaskError as err:
            result = _failed(call.job, call.attempt, slot.name, short_error(err))
        del self._in_flight[ref]
        slot.calls.remove(ref)
        self._announce(call)  # a queued call may be collected before the one ahead of it
        self._finish(call.job, call.attempt, slot.name, result)
        if slot.calls:
            self._announce(self._in_flight[slot.calls[0]])

    def _check_deadlines(self) -> None:
        """A try past its deadline: kill its actor (hung, not crashed) and retry. The
        deadline is asked anew on every tick, so a derived one can follow measurements."""
        import ray

        now = time.monotonic()
        for slot in self.slots:
            if not slot.calls:
                continue
            call = self._in_flight[slot.calls[0]]  # the running one
            timeout_s = self._timeout_for(call.job)
            if not timeout_s or now - call.started < timeout_s:
                continue
            if ray.wait([call.ref], timeout=0)[0]:
                continue  # it has just finished (a busy driver saw it late): collect it
            jid = call.job.job_id
            self.report.timed_out[jid] = self.report.timed_out.get(jid, 0) + 1
            self._actor_died(slot, f"timed out after {timeout_s:g} s", timed_out=True)

    def _actor_died(self, slot: _Slot, reason: str, timed_out: bool = False) -> None:
        """Replace the actor; requeue its running job, or fail it after max_retries
        deaths. A job queued behind it never ran: back to the queue, no try used."""
        calls = [self._in_flight.pop(ref) for ref in slot.calls]
        slot.calls = []
        for queued in reversed(calls[1:]):
            self.report.attempts[queued.job.job_id] -= 1
            self._queue.appendleft(queued.job)
        call = calls[0]
        job, attempt = call.job, call.attempt
        died_on = slot.name
        self._replace(slot, reason)
        if attempt <= self.max_retries:
            self.on_event({"event": "retry", "job": job, "actor": died_on,
                           "attempt": attempt, "reason": reason})
            self._queue.appendleft(job)
        elif timed_out:
            self._finish(job, attempt, died_on, _failed(
                job, attempt, died_on, f"{reason} ({attempt} attempt(s))"))
        else:
            self._finish(job, attempt, died_on, _failed(
                job, attempt, died_on,
                f"actor died {attempt} time(s) while training it (last: {reason})"))

    def shutdown(self) -> None:
        """Kill every actor of the pool (they hold CPUs/GPUs and a loaded model)."""
        for slot in self.slots:
            self._retire(slot)
        self.slots, self._starting = [], {}

    def _name(self, index: int, generation: int) -> str:
        return f"{self.name_prefix}-{index}" + (f".{generation}" if generation else "")

    def _replace(self, slot: _Slot, reason: str) -> None:
        """Kill a dead actor; its successor starts when a job needs it (_dispatch)."""
        self._retire(slot)
        old = slot.name
        slot.generation += 1
        slot.name = self._name(slot.index, slot.generation)
        self.report.replaced.append(old)
        self.on_event({"event": "replaced", "actor": old, "new_actor": slot.name,
                       "reason": reason})

    def _retire(self, slot: _Slot) -> None:
        import ray

        if slot.actor is not None:
            with contextlib.suppress(Exception):
                ray.kill(slot.actor, no_restart=True)
        slot.actor, slot.ready_ref = None, None


def _failed(job: Job, attempt: int, actor: str, reason: str) -> dict[str, Any]:
    from .worker import failed

    return failed(job, reason, attempt, actor)
