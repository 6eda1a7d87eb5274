"""The per-subject deadline of `submit` (`--subject-timeout`): how long one try of a
job may run before its actor is taken for hung, killed and the job retried.

Given explicitly, it is that many seconds for every job. Left unset it is derived:

    deadline = max(floor_s, factor x steps x seconds per step)

where `steps` is the job's own step count (run settings and CSV overrides) and the
seconds per step are the slowest measured so far: a finished try's wall time over its
steps, so photo loading, samples and writes are included. Until a try has finished
there is nothing measured and the deadline is `first_s`. The scheduler asks for the
deadline on every tick, so a try started before the first measurement gets the
derived deadline as soon as one exists.
"""

from __future__ import annotations

from typing import Any

from .manifest import Job

DEFAULT_FACTOR = 5.0
DEFAULT_FLOOR_S = 300.0
DEFAULT_FIRST_S = 3600.0
# A job expected to take less than this is queued behind a running one on its actor
# (scheduler.ActorPool, "Short jobs"): the driver's ~0.1-0.2 s round trip between two
# subjects is then hidden. Longer jobs are not: the gap is under 1% of them, and a job
# queued behind a long one could wait while another actor sits idle at the run's end.
PREFETCH_BELOW_S = 20.0


class SubjectDeadline:
    """Callable job -> seconds; feed it finished results with `observe`."""

    def __init__(self, train: dict[str, Any], fixed_s: float | None = None,
                 factor: float = DEFAULT_FACTOR, floor_s: float = DEFAULT_FLOOR_S,
                 first_s: float = DEFAULT_FIRST_S) -> None:
        if fixed_s is not None and fixed_s <= 0:
            raise ValueError(f"subject timeout {fixed_s} is invalid: must be > 0 seconds")
        self.train = dict(train)
        self.fixed_s = fixed_s
        self.factor, self.floor_s, self.first_s = factor, floor_s, first_s
        self.step_s: float | None = None  # slowest measured seconds per step

    def observe(self, result: dict[str, Any]) -> None:
        """Take the step time of a finished try (status "done", steps > 0)."""
        steps, seconds = result.get("steps") or 0, result.get("seconds") or 0.0
        if result.get("status") == "done" and steps > 0 and seconds > 0:
            self.step_s = max(self.step_s or 0.0, seconds / steps)

    def expected_s(self, job: Job) -> float | None:
        """The job's expected wall time at the slowest measured step time (None until
        a try has finished)."""
        if self.step_s is None:
            return None
        return int({**self.train, **job.overrides}.get("steps") or 0) * self.step_s

    def is_short(self, job: Job) -> bool:
        """Whether `job` is measured to be short enough to queue behind another."""
        expected = self.expected_s(job)
        return expected is not None and expected < PREFETCH_BELOW_S

    def __call__(self, job: Job) -> float:
        if self.fixed_s is not None:
            return self.fixed_s
        expected = self.expected_s(job)
        if expected is None:
            return self.first_s
        return max(self.floor_s, self.factor * expected)
