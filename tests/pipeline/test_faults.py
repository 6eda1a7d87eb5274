"""Faults of one run on local Ray: a hung fine-tuning actor (the TUNEQDM_TEST_HANG
hook makes one subject sleep) is killed at the subject deadline, retried, and reported
as timed out; the deadline's default derivation and the hook's parsing."""

from __future__ import annotations

import io
import time

import pytest
from pipeline_testkit import copy_photos, write_csv

from pipeline.actors import TEST_HANG_ENV, hook_hang_seconds
from pipeline.deadline import SubjectDeadline
from pipeline.manifest import Job, SubjectSpec
from pipeline.run import SubmitConfig, SubmitError, submit


def _job(subject_id: str, **overrides) -> Job:
    return Job(subject_id, (SubjectSpec(subject_id, (), "thing", overrides=overrides),))


def test_the_derived_deadline_follows_steps_and_measured_step_time():
    deadline = SubjectDeadline({"steps": 400}, floor_s=300, factor=5, first_s=3600)
    assert deadline(_job("a")) == 3600  # nothing measured yet
    deadline.observe({"status": "failed", "steps": 0, "seconds": 9.0})
    assert deadline(_job("a")) == 3600
    deadline.observe({"status": "done", "steps": 400, "seconds": 200.0})  # 0.5 s/step
    assert deadline(_job("a")) == 1000.0
    assert deadline(_job("b", steps=40)) == 300  # the floor
    deadline.observe({"status": "done", "steps": 100, "seconds": 100.0})  # slower: 1 s
    assert deadline(_job("a")) == 2000.0
    assert SubjectDeadline({"steps": 400}, fixed_s=12.5)(_job("a")) == 12.5
    with pytest.raises(ValueError, match="subject timeout 0 is invalid"):
        SubjectDeadline({}, fixed_s=0)


def test_only_jobs_measured_short_are_queued_behind_another():
    deadline = SubjectDeadline({"steps": 400})
    assert not deadline.is_short(_job("a"))  # nothing measured: never
    deadline.observe({"status": "done", "steps": 400, "seconds": 20.0})  # 0.05 s/step
    assert deadline.expected_s(_job("a")) == pytest.approx(20.0)
    assert not deadline.is_short(_job("a"))  # 20 s: not below PREFETCH_BELOW_S
    assert deadline.is_short(_job("b", steps=2))


def test_the_hang_hook_reads_subject_and_seconds():
    job = _job("cat")
    assert hook_hang_seconds(job, {}) == 0
    assert hook_hang_seconds(job, {TEST_HANG_ENV: "dog:5, cat:2.5"}) == 2.5
    assert hook_hang_seconds(_job("dog"), {TEST_HANG_ENV: "dog:5,cat:2.5"}) == 5
    with pytest.raises(ValueError, match="TUNEQDM_TEST_HANG='cat' is invalid"):
        hook_hang_seconds(job, {TEST_HANG_ENV: "cat"})


def test_timeouts_are_checked_before_anything_starts(tmp_path):
    csv = write_csv(tmp_path / "s.csv", [{"subject_id": "dog", "images": str(tmp_path),
                                          "class": "dog"}])
    for field, name in (("subject_timeout", "--subject-timeout"),
                        ("schedule_timeout", "--schedule-timeout")):
        with pytest.raises(SubmitError, match=f"{name} -1.0 is invalid: must be > 0"):
            submit(SubmitConfig(manifest=str(csv), **{field: -1.0}), out=io.StringIO(),
                   err=io.StringIO())


def test_a_hung_subject_is_killed_retried_and_reported_timed_out(
        ray_session, tiny_base_model, tmp_path, monkeypatch):
    rows = [{"subject_id": s, "images": str(copy_photos(s, tmp_path / s, 2)), "class": s}
            for s in ("dog", "cat")]
    csv = write_csv(tmp_path / "subjects.csv", rows)
    monkeypatch.setenv(TEST_HANG_ENV, "cat:600")
    config = SubmitConfig(manifest=str(csv), output=str(tmp_path / "out"),
                          base_model=tiny_base_model, steps=3, lr_scale_out=1e-3, actors=2,
                          cpus_per_actor=1, samples=0, max_retries=1, subject_timeout=6)
    err = io.StringIO()
    start = time.monotonic()
    report = submit(config, out=io.StringIO(), err=err, live_progress=False)
    elapsed = time.monotonic() - start
    rows_by_id = {r["subject_id"]: r for r in report.rows}
    assert rows_by_id["dog"]["status"] == "done"
    assert rows_by_id["cat"]["status"] == "failed"
    assert rows_by_id["cat"]["reason"] == "timed out after 6 s (2 attempt(s))"
    assert rows_by_id["cat"]["attempts"] == 2
    assert report.summary["timed_out"] == {"cat": 2}
    assert report.exit_code == 1
    assert "retry    cat: actor" in err.getvalue() and "hung (attempt 1)" in err.getvalue()
    assert not (tmp_path / "out" / "subjects" / "cat" / "done.json").exists()
    assert elapsed < 150, err.getvalue()
