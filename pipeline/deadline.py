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

    def __call__(self, job: Job) -> float:
        if self.fixed_s is not None:
            return self.fixed_s
        if self.step_s is None:
            return self.first_s
        steps = int({**self.train, **job.overrides}.get("steps") or 0)
        return max(self.floor_s, self.factor * steps * self.step_s)
