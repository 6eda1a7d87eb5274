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
            return {"job_id": job_id, "status": "done", "reason": "", "actor": self.name,
                    "attempt": attempt}

    return ray.remote(num_cpus=1)(StandIn)


def _pool(ray, cls, size, events, **kwargs) -> ActorPool:
    return ActorPool(lambda name: cls.options(name=name).remote(name),
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
    assert "." in results["crash-once-c"]["actor"]  # ran on a replacement (name.gen)
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


def test_custom_metrics_record_without_errors(ray_session):
    from pipeline.actors import _Metrics

    metrics = _Metrics("test-actor")
    assert metrics.enabled
    metrics.step(0.5, 3.0)
    metrics.finished(True, 2)
    metrics.finished(False, 1)
