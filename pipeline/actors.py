"""Ray actors: FineTuner (loads the quantized base once, trains jobs from the
driver's queue) and ProgressTracker (a tiny shared board of per-job step progress).

Both are plain classes made remote by `finetuner_actor()` / `tracker_actor()`, so the
driver decides names and resources per run (`.options(name=..., num_gpus=...)`).
Custom metrics (ray.util.metrics): the FineTuner records its training (steps, steps
per second, latest loss); the tracker records the run's subject counts (finished,
failed, retried, running) and holds them until Ray has exported them.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from typing import Any

from .device import actor_device
from .manifest import Job
from .store import Storage, local_base_path
from .worker import WorkSettings, failed, train_job

PROGRESS_INTERVAL_S = 0.5
# Calls a FineTuner runs at once: the job holding the model, and up to two queued
# behind it (scheduler.ActorPool's short jobs: queue_depth = CALLS_PER_ACTOR - 1), so
# one reads its photos while another writes its files and the model never waits on
# either (docs/pipeline.md, "Scale").
CALLS_PER_ACTOR = 3
# Test hook: "subject_id:seconds[,subject_id:seconds]" makes the FineTuner sleep that
# long before training a job holding that subject (a hung actor, for --subject-timeout).
TEST_HANG_ENV = "TUNEQDM_TEST_HANG"


def hook_hang_seconds(job: Job, environ: dict[str, str] | None = None) -> float:
    """Seconds the TUNEQDM_TEST_HANG hook asks this job to sleep (0 without it)."""
    raw = (os.environ if environ is None else environ).get(TEST_HANG_ENV, "")
    total = 0.0
    for item in filter(None, (part.strip() for part in raw.split(","))):
        subject, _, seconds = item.rpartition(":")
        try:
            value = float(seconds)
        except ValueError:
            raise ValueError(f"{TEST_HANG_ENV}={raw!r} is invalid: expected "
                             "subject_id:seconds[,subject_id:seconds]") from None
        if subject in job.subject_ids:
            total += value
    return total


class TurnLock:
    """A lock taken in arrival order: each call draws a ticket when it arrives and holds
    the lock on its turn, so jobs use the model in the order the driver queued them
    (what the pool's deadlines assume); a call that ends without taking the lock (it
    failed reading its photos) gives up its turn with `leave`."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._next = 0  # the next ticket to draw
        self._turn = 0  # the ticket whose turn it is
        self._gone: set[int] = set()  # tickets that left before their turn came

    def draw(self) -> int:
        with self._cond:
            self._next += 1
            return self._next - 1

    @contextlib.contextmanager
    def turn(self, ticket: int, hold_s: float = 0.0):
        """Hold the lock on `ticket`'s turn (first sleeping `hold_s`: the hang hook)."""
        with self._cond:
            self._cond.wait_for(lambda: self._turn == ticket)
        try:
            time.sleep(hold_s)
            yield
        finally:
            self.leave(ticket)

    def leave(self, ticket: int) -> None:
        """`ticket` is done with the lock (or never needed it); idempotent."""
        with self._cond:
            if ticket < self._turn:
                return
            self._gone.add(ticket)
            while self._turn in self._gone:
                self._gone.discard(self._turn)
                self._turn += 1
            self._cond.notify_all()


class FineTuner:
    """Holds one quantized pipeline; trains the jobs the driver hands it, one at a time."""

    def __init__(self, name: str, storage: Storage, settings: WorkSettings, num_threads: int,
                 tracker: Any = None) -> None:
        import torch

        from tuneqdm.base import load_quantized_pipeline

        start = time.perf_counter()
        torch.set_num_threads(max(1, int(num_threads)))
        self.name = name
        self.storage = storage
        self.settings = settings
        self.tracker = tracker
        self.device = actor_device(settings.device)
        base = settings.base
        path = local_base_path(storage, base["address"], base["fingerprint"])
        self.pipe = load_quantized_pipeline(path, device=self.device)
        loaded = getattr(self.pipe.unet, "tuneqdm_base_fingerprint", None)
        if loaded != base["fingerprint"]:
            raise RuntimeError(f"{path}: loaded base fingerprint {loaded} is not the "
                               f"expected {base['fingerprint']}")
        self.pipe.set_progress_bar_config(disable=True)
        self.load_seconds = time.perf_counter() - start
        self.jobs_done = 0
        self.metrics = _Metrics(name)
        # the pipeline is used by one job at a time, in the order the jobs arrived; jobs
        # queued behind it (the pool's short jobs: CALLS_PER_ACTOR) read their photos
        # and the previous one writes its files meanwhile
        self.model_lock = TurnLock()

    def info(self) -> dict[str, Any]:
        import torch

        return {"name": self.name, "pid": os.getpid(), "host": socket.gethostname(),
                "device": self.device, "threads": torch.get_num_threads(),
                "load_seconds": round(self.load_seconds, 3), "jobs_done": self.jobs_done}

    def train(self, job_data: dict[str, Any], spec_hash: str, attempt: int,
              photos: dict[str, bytes] | None = None) -> dict[str, Any]:
        """Train one job; `photos`: the bytes of its local photos, read by the driver."""
        ticket = self.model_lock.draw()
        try:
            return self._train(Job.from_dict(job_data), spec_hash, attempt, photos, ticket)
        finally:
            self.model_lock.leave(ticket)

    def _train(self, job: Job, spec_hash: str, attempt: int,
               photos: dict[str, bytes] | None, ticket: int) -> dict[str, Any]:
        total = int({**self.settings.train, **job.overrides}.get("steps", 0))
        state = {"last": 0.0, "start": time.perf_counter()}
        self._report(job, 0, total, None)
        # a hung actor (test hook) sleeps holding the model: nothing else trains on it
        model_turn = self.model_lock.turn(ticket, hold_s=hook_hang_seconds(job))

        def on_step(step: int, loss: float) -> None:
            now = time.perf_counter()
            self.metrics.step(loss, (step + 1) / max(now - state["start"], 1e-9))
            if now - state["last"] >= PROGRESS_INTERVAL_S or step + 1 == total:
                state["last"] = now
                self._report(job, step + 1, total, loss)

        try:
            result = train_job(self.pipe, job, spec_hash, self.settings, self.storage,
                               on_step=on_step, attempt=attempt, actor=self.name,
                               photos=photos, model_lock=model_turn)
        except Exception as err:  # the job's own failure; the actor stays usable
            result = failed(job, f"{type(err).__name__}: {err}", attempt, self.name,
                            time.perf_counter() - state["start"])
        self.jobs_done += 1
        return result

    def _report(self, job: Job, step: int, total: int, loss: float | None) -> None:
        if self.tracker is None:
            return
        with contextlib.suppress(Exception):  # progress is best effort
            self.tracker.update.remote(job.job_id, self.name, os.getpid(), step, total, loss)


class ProgressTracker:
    """job_id -> latest {actor, pid, step, total, loss, time}; read by the driver.

    It also exports the driver's view of the run as Ray metrics (Prometheus, on the
    metrics endpoint of the tracker's node), tagged with the run id:
    tuneqdm_subjects_finished, _failed and _retried (counters) and
    tuneqdm_subjects_running (gauge). Ray exports a process's metrics every
    `metrics_report_interval_ms` (10 s by default) and drops what a dead process
    recorded since its last export, so the driver calls `settle()` before it ends the
    tracker: the run's final counts reach the endpoint. Ray also drops a gauge nobody
    set for two export intervals, so `snapshot()` (the driver reads it every tick)
    sets the running gauge again: it stays on the dashboard while subjects train."""

    def __init__(self, run_id: str = "") -> None:
        self.jobs: dict[str, dict[str, Any]] = {}
        self.run_tags = {"run": run_id}
        self.counters: dict[str, Any] = {}
        self.running = None
        self.running_now = 0
        self.changed = 0.0  # time.monotonic() of the last metric change
        with contextlib.suppress(Exception):
            from ray.util import metrics

            for key, text in (("finished", "Subjects whose scale set was written."),
                              ("failed", "Subjects that failed for their own reasons."),
                              ("retried", "Subjects retried after their actor died or "
                                          "timed out.")):
                self.counters[key] = metrics.Counter(f"tuneqdm_subjects_{key}", text,
                                                     tag_keys=("run",))
            self.running = metrics.Gauge(
                "tuneqdm_subjects_running", "Subjects being trained now.", tag_keys=("run",))

    def count(self, running: int, **added: int) -> None:
        """The driver's tally: subjects running now, and how many more were
        `finished=`, `failed=` or `retried=` (keyword counts)."""
        with contextlib.suppress(Exception):
            self.running_now = running
            if self.running is not None:
                self.running.set(running, tags=self.run_tags)
            for key, value in added.items():
                if value and key in self.counters:
                    self.counters[key].inc(value, tags=self.run_tags)
            self.changed = time.monotonic()

    def settle(self, limit_s: float = 30.0) -> float:
        """Wait (at most `limit_s`) until one export interval and a margin have passed
        since the last metric change; returns the seconds waited."""
        try:
            import ray

            interval_s = max(ray._config.metrics_report_interval_ms(), 1000) / 1000.0
        except Exception:
            interval_s = 10.0
        wait = min(limit_s, max(0.0, self.changed + 1.5 * interval_s - time.monotonic()))
        time.sleep(wait)
        return wait

    def update(self, job_id: str, actor: str, pid: int, step: int, total: int,
               loss: float | None) -> None:
        self.jobs[job_id] = {"actor": actor, "pid": pid, "step": step, "total": total,
                             "loss": loss, "time": time.time()}

    def forget(self, job_id: str) -> None:
        self.jobs.pop(job_id, None)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        if self.running is not None:
            with contextlib.suppress(Exception):
                self.running.set(self.running_now, tags=self.run_tags)
        return dict(self.jobs)


class _Metrics:
    """The FineTuner's training metrics (ray.util.metrics, created inside the actor
    process; no-ops if unavailable): steps (counter), steps per second and the latest
    loss (gauges), tagged with the actor's name."""

    def __init__(self, actor: str) -> None:
        self.tags = {"actor": actor}
        try:
            from ray.util import metrics

            self.steps_counter = metrics.Counter(
                "tuneqdm_train_steps", "Training steps taken.", tag_keys=("actor",))
            self.steps_per_second = metrics.Gauge(
                "tuneqdm_train_steps_per_second", "Training steps per second of the "
                "current job.", tag_keys=("actor",))
            self.loss = metrics.Gauge("tuneqdm_train_loss", "Latest training loss.",
                                      tag_keys=("actor",))
            self.enabled = True
        except Exception:
            self.enabled = False

    def step(self, loss: float, steps_per_second: float) -> None:
        if not self.enabled:
            return
        with contextlib.suppress(Exception):
            self.steps_counter.inc(1, tags=self.tags)
            self.steps_per_second.set(steps_per_second, tags=self.tags)
            self.loss.set(loss, tags=self.tags)


def finetuner_actor():
    import ray

    # the call holding the model and those queued behind it (scheduler.ActorPool's
    # short jobs), taking FineTuner.model_lock in turn
    return ray.remote(max_restarts=0, max_task_retries=0,
                      max_concurrency=CALLS_PER_ACTOR)(FineTuner)


def tracker_actor():
    import ray

    return ray.remote(num_cpus=0)(ProgressTracker)


def hook_runtime_env() -> dict[str, Any]:
    """The test hooks (TUNEQDM_TEST_HANG, TUNEQDM_TEST_EXIT_AT_STEP) the driver has,
    passed to the actors unless an enclosing Ray job already gives them to every
    worker."""
    from .ray_session import job_env_vars
    from .worker import EXIT_AT_STEP_ENV

    from_job = job_env_vars(os.environ)
    hooks = {name: os.environ[name] for name in (TEST_HANG_ENV, EXIT_AT_STEP_ENV)
             if os.environ.get(name) and name not in from_job}
    return {"runtime_env": {"env_vars": hooks}} if hooks else {}


def start_tracker(ray, run_id: str):
    """The progress tracker, on the driver's node (0 CPUs; that node lives as long as
    the run): losing a worker node must not take the progress board and the run's
    metrics with it."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return tracker_actor().options(name=f"tuneqdm-progress-{run_id}",
                                   scheduling_strategy=here).remote(run_id)


def end_tracker(ray, tracker: Any, settle: bool) -> None:
    """End the run's tracker; with `settle` (a completed run on a Ray that outlives the
    driver) first let its final counts reach Ray's metrics export: at most one export
    interval and a half, ~15 s with Ray's default (ProgressTracker.settle)."""
    if settle:
        with contextlib.suppress(Exception):
            ray.get(tracker.settle.remote(), timeout=60)
    ray.kill(tracker, no_restart=True)


def tracker_counts(event: dict[str, Any]) -> dict[str, int]:
    """The subjects a pool event adds to the tracker's counters (finished, failed,
    retried)."""
    subjects = len(event["job"].subjects)
    if event["event"] == "retry":
        return {"retried": subjects}
    if event["event"] == "finished":
        return {"finished" if event["result"]["status"] == "done" else "failed": subjects}
    return {}
