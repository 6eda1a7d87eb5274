"""A re-run verifies its finished subjects in parallel: finished subjects on moto's
S3 are all checked by the plan step (docs/pipeline.md, "Resume"), several at once, and
every one of them is reused. Runs benchmarks/resume_speed.py at 200 subjects, so the
benchmark cannot rot; its time is printed, not asserted (the 1,000-subject number is
the benchmark's, recorded in docs/pipeline.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tuneqdm.testing import load_script

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "resume_speed.py"
SUBJECTS = 200


def _bench():
    return load_script(SCRIPT)


@pytest.mark.slow
def test_finished_subjects_are_verified_in_parallel_and_all_reused(tiny_base_model, tmp_path):
    bench = _bench()
    with bench.moto_process() as endpoint:
        row = bench.measure(endpoint, tiny_base_model, tmp_path, SUBJECTS)
    print(f"plan step with {SUBJECTS} finished subjects on moto S3: {row['plan_s']} s, "
          f"{row['checks_at_once']} checks at once")
    assert row["reused"] == SUBJECTS and row["pending"] == 0
    assert row["checks_at_once"] > 1  # checked in parallel, not one after another
