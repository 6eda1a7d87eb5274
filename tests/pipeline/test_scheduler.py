"""The actor pool's queue, retries and replacement, on local Ray with stand-in actors
(no torch): a job's own failure is recorded and the actor goes on; a crashed actor is
replaced and its job retried, at most max_retries times; free actors take the next job."""

from __future__ import annotations

import time

import pytest

from pipeline.manifest import Job, SubjectSpec
from pipeline.scheduler import ActorPool


def _jobs(*ids: str) -> list[Job]:
    return [Job(i, (SubjectSpec(i, (), "thing"),)) for i in ids]


def _stand_in(ray, marker_dir, fail_init: bool = False):
    """A remote class whose behaviour is chosen by the job id's prefix."""

    class StandIn:
        def __init__(self, name: str) -> None:
            if fail_init:
                raise RuntimeError("cannot load the base")
            self.name = name

        def run(self, job_id: str, attempt: int) -> dict:
            import os
            import pathlib
            import time as clock

            began = clock.time()
            marker = pathlib.Path(marker_dir) / job_id
            if job_id.startswith("crash-once") and not marker.exists():
                marker.write_text("crashed")
                os._exit(1)
            if job_id.startswith("crash-always"):
                os._exit(1)
            if job_id.startswith("raise"):
                raise ValueError("boom")
            if job_id.startswith("bad"):
                return {"job_id": job_id, "status": "failed", "reason": "bad photo",
                        "actor": self.name}
            if job_id.startswith("slow"):
                clock.sleep(2.5)
            if job_id.startswith("hang-always") or (job_id.startswith("hang-once")
                                                     and not marker.exists()):
                marker.write_text("hung")
                clock.sleep(60)
            return {"job_id": job_id, "status": "done", "reason": "", "actor": self.name,
                    "attempt": attempt, "began": began, "ended": clock.time()}

    return ray.remote(num_cpus=1)(StandIn)


def _pool(ray, cls, size, events, unschedulable=lambda name: False,
          **kwargs) -> ActorPool:
    """A pool of `cls`; actors whose name `unschedulable` picks ask for a resource
    that no node has, so Ray can never place them."""

    def make(name: str):
        extra = {"resources": {"tuneqdm_nowhere": 1}} if unschedulable(name) else {}
        return cls.options(name=name, **extra).remote(name)

    return ActorPool(make,
                     lambda actor, job, attempt: actor.run.remote(job.job_id, attempt),
                     size, "test-pool", on_event=events.append, tick_s=0.1, **kwargs)


def test_own_failures_crashes_and_retries(ray_session, tmp_path):
    ray = ray_session
    events: list[dict] = []
    pool = _pool(ray, _stand_in(ray, str(tmp_path)), 2, events, max_retries=1)
    report = pool.run(_jobs("ok-a", "bad-b", "crash-once-c", "raise-d", "crash-always-e",
                            "ok-f"))
    results = report.results
    assert {k: v["status"] for k, v in results.items()} == {
        "ok-a": "done", "bad-b": "failed", "crash-once-c": "done", "raise-d": "failed",
        "crash-always-e": "failed", "ok-f": "done"}
    assert results["bad-b"]["reason"] == "bad photo"
    assert "ValueError: boom" in results["raise-d"]["reason"]
    assert results["crash-always-e"]["reason"].startswith("actor died 2 time(s)")
    assert report.attempts == {"ok-a": 1, "bad-b": 1, "crash-once-c": 2, "raise-d": 1,
                               "crash-always-e": 2, "ok-f": 1}
    assert len(report.replaced) == 3  # crash-once once, crash-always twice
    assert results["crash-once-c"]["actor"].startswith("test-pool-")
    # retried on another live actor: a live idle one, or the dead one's successor
    # (name.gen), whichever was free first (live idle actors take queued work first)
    crashed_on = next(e["actor"] for e in events
                      if e["event"] == "retry" and e["job"].job_id == "crash-once-c")
    assert results["crash-once-c"]["actor"] != crashed_on
    assert crashed_on in report.replaced
    kinds = [e["event"] for e in events]
    assert kinds.count("retry") == 2 and kinds.count("replaced") == 3
    assert kinds.count("finished") == 6
    assert pool.slots == []  # every actor was killed at the end


def test_free_actors_take_the_next_job(ray_session, tmp_path):
    ray = ray_session
    events: list[dict] = []
    pool = _pool(ray, _stand_in(ray, str(tmp_path)), 2, events)
    start = time.monotonic()
    report = pool.run(_jobs("slow-1", "ok-1", "ok-2", "ok-3", "ok-4"))
    elapsed = time.monotonic() - start
    by_actor: dict[str, list[str]] = {}
    for job_id, result in report.results.items():
        by_actor.setdefault(result["actor"], []).append(job_id)
    slow_actor = report.results["slow-1"]["actor"]
    assert by_actor[slow_actor] == ["slow-1"]
    assert sorted(j for a, js in by_actor.items() if a != slow_actor for j in js) == [
        "ok-1", "ok-2", "ok-3", "ok-4"]
    assert elapsed < 15


def test_actors_that_cannot_start_fail_the_run_without_looping(ray_session, tmp_path):
    ray = ray_session
    events: list[dict] = []
    pool = _pool(ray, _stand_in(ray, str(tmp_path), fail_init=True), 1, events,
                 max_start_failures=2)
    report = pool.run(_jobs("ok-1", "ok-2"))
    assert {r["status"] for r in report.results.values()} == {"failed"}
    assert all("no actor could start" in r["reason"] and "cannot load the base" in r["reason"]
               for r in report.results.values())
    assert len(report.replaced) == 1


def test_pool_arguments_are_checked():
    with pytest.raises(ValueError, match="size 0"):
        ActorPool(lambda n: None, lambda a, j, t: None, 0, "x")
    with pytest.raises(ValueError, match="max_retries=-1"):
        ActorPool(lambda n: None, lambda a, j, t: None, 1, "x", max_retries=-1)
    with pytest.raises(ValueError, match="schedule_timeout_s=0 is invalid"):
        ActorPool(lambda n: None, lambda a, j, t: None, 1, "x", schedule_timeout_s=0)


def test_the_actor_metrics_record_without_errors(ray_session):
    from pipeline.actors import _Metrics

    metrics = _Metrics("test-actor")
    assert metrics.enabled
    metrics.step(0.5, 3.0)


def test_the_tracker_waits_one_export_interval_after_its_last_count(ray_session):
    """Ray exports every RAY_metrics_report_interval_ms (1 s in the tests, conftest.py);
    what a process records after its last export dies with it."""
    from pipeline.actors import ProgressTracker

    tracker = ProgressTracker("run-x")
    assert set(tracker.counters) == {"finished", "failed", "retried"}
    assert tracker.running is not None
    tracker.count(2, finished=1, retried=1, unknown=3)  # an unknown count is ignored
    waited = tracker.settle()
    assert 1.3 <= waited <= 1.5  # 1.5 intervals after the change
    assert tracker.settle() == 0.0  # nothing changed since


def _running_gauge(url: str, run: str) -> list[float]:
    import httpx

    text = httpx.get(url, timeout=10).text
    return [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith("ray_tuneqdm_subjects_running{") and f'run="{run}"' in line]


def test_the_running_gauge_stays_exported_while_the_driver_reads_snapshots(
        ray_session, ray_metrics_url):
    """Ray's metrics agent drops a gauge nobody set for two export intervals (2 s here):
    the tracker sets it again on every snapshot the driver reads, so a run whose
    subjects train for minutes without an event stays on the dashboard."""
    from pipeline.actors import start_tracker

    ray = ray_session
    tracker = start_tracker(ray, "gauge-run")
    try:
        ray.get(tracker.count.remote(2))
        start, seen = time.monotonic(), []
        while time.monotonic() - start < 6:  # the driver's ticks, past the gauge's TTL
            ray.get(tracker.snapshot.remote())
            seen = _running_gauge(ray_metrics_url, "gauge-run")
            time.sleep(0.5)
        assert seen == [2.0]
        time.sleep(5)  # no snapshots: the agent drops it (what the refresh is for)
        assert _running_gauge(ray_metrics_url, "gauge-run") == []
    finally:
        ray.kill(tracker, no_restart=True)


def test_events_count_as_finished_failed_or_retried():
    from pipeline.actors import tracker_counts

    job = Job("pair", (SubjectSpec("a", (), "thing"), SubjectSpec("b", (), "thing")))
    assert tracker_counts({"event": "retry", "job": job}) == {"retried": 2}
    assert tracker_counts({"event": "finished", "job": job, "result": {"status": "done"}}) == {
        "finished": 2}
    assert tracker_counts({"event": "finished", "job": job, "result": {"status": "failed"}}) == {
        "failed": 2}
    assert tracker_counts({"event": "started", "job": job}) == {}


def test_a_dead_actors_job_goes_to_the_live_idle_actor_not_an_unschedulable_one(
        ray_session, tmp_path):
    """The node-loss hang of issue 10: the successor of a dead actor cannot be placed;
    the job must go to the surviving actor and the run end without waiting for it."""
    ray = ray_session
    events: list[dict] = []
    pool = _pool(ray, _stand_in(ray, str(tmp_path)), 2, events,
                 unschedulable=lambda name: "." in name, schedule_timeout_s=120)
    start = time.monotonic()
    report = pool.run(_jobs("crash-once-a", "slow-b", "ok-c", "ok-d"))
    elapsed = time.monotonic() - start
    assert {k: v["status"] for k, v in report.results.items()} == dict.fromkeys(
        ("crash-once-a", "slow-b", "ok-c", "ok-d"), "done")
    survivor = report.results["slow-b"]["actor"]
    assert report.results["crash-once-a"]["actor"] == survivor
    assert report.attempts["crash-once-a"] == 2
    assert report.shrunk == []  # never waited out the 120 s schedule timeout
    assert elapsed < 60


def test_an_actor_that_cannot_be_scheduled_shrinks_the_pool(ray_session, tmp_path):
    ray = ray_session
    events: list[dict] = []
    pool = _pool(ray, _stand_in(ray, str(tmp_path)), 2, events,
                 unschedulable=lambda name: name.startswith("test-pool-1"),
                 schedule_timeout_s=6)
    start = time.monotonic()
    report = pool.run(_jobs("slow-1", "slow-2", "slow-3", "slow-4", "ok-5"))
    assert time.monotonic() - start < 60
    assert {r["status"] for r in report.results.values()} == {"done"}
    assert {r["actor"] for r in report.results.values()} == {"test-pool-0"}
    assert report.shrunk == ["test-pool-1"]
    shrunk = [e for e in events if e["event"] == "shrunk"]
    assert len(shrunk) == 1 and shrunk[0]["actors_left"] == 1


def test_no_schedulable_actor_fails_the_jobs_naming_the_resources(ray_session, tmp_path):
    ray = ray_session
    events: list[dict] = []
    pool = _pool(ray, _stand_in(ray, str(tmp_path)), 1, events,
                 unschedulable=lambda name: True, schedule_timeout_s=1.5,
                 demand="1 CPU + 1 tuneqdm_nowhere")
    start = time.monotonic()
    report = pool.run(_jobs("ok-1", "ok-2"))
    assert time.monotonic() - start < 30
    assert {r["status"] for r in report.results.values()} == {"failed"}
    for result in report.results.values():
        assert result["reason"].startswith("no actor could be scheduled within 1.5 s "
                                           "(each needs 1 CPU + 1 tuneqdm_nowhere); "
                                           "free in the cluster: CPU ")
    assert report.attempts == {}


def test_a_hung_try_is_killed_retried_and_reported_as_timed_out(ray_session, tmp_path):
    ray = ray_session
    events: list[dict] = []
    pool = _pool(ray, _stand_in(ray, str(tmp_path)), 2, events, max_retries=1,
                 subject_timeout=lambda job: 3.0 if job.job_id.startswith("hang") else None)
    start = time.monotonic()
    report = pool.run(_jobs("hang-once-a", "hang-always-b", "ok-c"))
    elapsed = time.monotonic() - start
    status = {k: (v["status"], v["reason"]) for k, v in report.results.items()}
    assert status == {"hang-once-a": ("done", ""), "ok-c": ("done", ""),
                      "hang-always-b": ("failed", "timed out after 3 s (2 attempt(s))")}
    assert report.timed_out == {"hang-once-a": 1, "hang-always-b": 2}
    assert report.attempts == {"hang-once-a": 2, "hang-always-b": 2, "ok-c": 1}
    assert len(report.replaced) == 3
    retries = [e["reason"] for e in events if e["event"] == "retry"]
    assert retries == ["timed out after 3 s"] * 2
    assert 6 <= elapsed < 40  # two 3 s deadlines in a row for hang-always-b


def _slow_driver(events: list[dict], ends: dict[str, float], pause_s: float):
    """An event sink that takes `pause_s` over every finished job, as a busy driver
    does, and notes when it was done with each."""

    def on_event(event: dict) -> None:
        events.append(event)
        if event["event"] == "finished":
            time.sleep(pause_s)
            ends[event["job"].job_id] = time.time()

    return on_event


def _slow_driver_pool(ray, tmp_path, events: list[dict], ends: dict[str, float],
                      **kwargs) -> ActorPool:
    """One stand-in actor, driven by a driver that takes 1 s over every result."""
    return ActorPool(lambda name: _stand_in(ray, str(tmp_path)).options(name=name).remote(name),
                     lambda actor, job, attempt: actor.run.remote(job.job_id, attempt),
                     1, "test-pool", on_event=_slow_driver(events, ends, 1.0), tick_s=0.1,
                     **kwargs)


@pytest.mark.parametrize("prefetch", [False, True])
def test_short_jobs_are_queued_behind_a_running_one(ray_session, tmp_path, prefetch):
    """With prefetch the actor starts its next job without waiting for the driver: the
    second job begins before the driver has finished with the first; without it, after."""
    ray = ray_session
    events: list[dict] = []
    ends: dict[str, float] = {}
    pool = _slow_driver_pool(ray, tmp_path, events, ends, prefetch=lambda job: prefetch)
    report = pool.run(_jobs("ok-1", "ok-2", "ok-3"))
    assert {k: v["status"] for k, v in report.results.items()} == dict.fromkeys(
        ("ok-1", "ok-2", "ok-3"), "done")
    assert report.attempts == {"ok-1": 1, "ok-2": 1, "ok-3": 1}
    began_before_driver_was_done = [report.results[b]["began"] < ends[a]
                                    for a, b in (("ok-1", "ok-2"), ("ok-2", "ok-3"))]
    assert began_before_driver_was_done == [prefetch, prefetch]
    started = [e["job"].job_id for e in events if e["event"] == "started"]
    assert started == ["ok-1", "ok-2", "ok-3"]  # each announced once, when it runs


def test_a_job_queued_behind_a_crash_or_a_hang_uses_no_try(ray_session, tmp_path):
    ray = ray_session
    events: list[dict] = []
    pool = _pool(ray, _stand_in(ray, str(tmp_path)), 1, events, max_retries=1,
                 subject_timeout=lambda job: 3.0 if job.job_id.startswith("hang") else None,
                 prefetch=lambda job: True)
    # the crash comes first: an actor that dies may take the reply of a call it had
    # just finished with it (Ray then fails that call too), so nothing runs before it
    report = pool.run(_jobs("crash-once-a", "ok-b", "hang-once-c", "ok-d"))
    assert {k: v["status"] for k, v in report.results.items()} == dict.fromkeys(
        ("crash-once-a", "ok-b", "hang-once-c", "ok-d"), "done")
    assert report.attempts == {"crash-once-a": 2, "ok-b": 1, "hang-once-c": 2, "ok-d": 1}
    assert report.timed_out == {"hang-once-c": 1}
    retries = [e["job"].job_id for e in events if e["event"] == "retry"]
    assert retries == ["crash-once-a", "hang-once-c"]


@pytest.mark.parametrize("depth", [1, 2])
def test_queue_depth_is_how_many_short_jobs_wait_behind_a_running_one(ray_session, tmp_path,
                                                                      depth):
    """With depth 2 the third job is already in the actor's mailbox before the driver
    is done with the first; with depth 1 it is handed out only after that."""
    ray = ray_session
    events: list[dict] = []
    ends: dict[str, float] = {}
    pool = _slow_driver_pool(ray, tmp_path, events, ends, prefetch=lambda job: True,
                             queue_depth=depth)
    report = pool.run(_jobs("ok-1", "ok-2", "ok-3", "ok-4"))
    assert report.attempts == dict.fromkeys(("ok-1", "ok-2", "ok-3", "ok-4"), 1)
    assert (report.results["ok-3"]["began"] < ends["ok-1"]) == (depth == 2)
    started = [e["job"].job_id for e in events if e["event"] == "started"]
    # each announced once (a queued call may be collected before the one ahead of it)
    assert started[0] == "ok-1" and sorted(started) == ["ok-1", "ok-2", "ok-3", "ok-4"]
