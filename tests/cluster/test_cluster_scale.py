"""benchmarks/cluster_scale.py's --quick plans on the cluster fixture, so the
benchmark cannot rot: every subject finishes, and its numbers are sane."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tuneqdm.testing import load_script

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "cluster_scale.py"


def _bench():
    return load_script(SCRIPT)


def test_quick_scale_benchmark(cluster, s3_endpoint, tmp_path):
    bench = _bench()
    if not bench.DREAMBOOTH.is_dir():
        pytest.skip(f"{bench.DREAMBOOTH} is not available")
    rows = bench.run_benchmark(cluster, s3_endpoint, tmp_path, bench.QUICK_PLANS,
                               timeout_s=600)
    print("\n" + bench.table(rows))
    assert [(r["subjects"], r["steps"]) for r in rows] == bench.QUICK_PLANS
    for row in rows:
        # one actor per logical GPU at most; with sub-second subjects the first actor
        # may finish the whole plan before the second has loaded its base (the pool
        # gives work to live actors first), so one actor is a correct outcome too
        assert row["actors"] in (1, 2)
        assert 0.0 < row["busy_fraction"] <= 1.0 and not math.isnan(row["busy_fraction"])
        assert row["overhead_per_subject_ms"] >= 0.0
        assert 50 < row["driver_peak_rss_mb"] < 4096
        assert row["job_wall_s"] >= row["training_wall_s"] > 0
        assert row["subject_s"] > 0 and 0.0 <= row["idle_share"] < 1.0
