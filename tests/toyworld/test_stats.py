"""Intervals and paired tests of the toy-world comparison (toyworld/stats.py)."""

from __future__ import annotations

import numpy as np
import pytest

from toyworld.stats import cluster_bootstrap, mean_ci, paired_test, sign_flip_p


def test_sign_flip_p_is_exact():
    assert sign_flip_p(np.ones(8)) == pytest.approx(1 / 256)  # only the observed signs
    assert sign_flip_p(-np.ones(8)) == 1.0
    assert sign_flip_p(np.zeros(5)) == 1.0
    # +3, -1: sign patterns with sum >= 2 are (+3, +1) and (+3, -1): 2 of 4
    assert sign_flip_p(np.array([3.0, -1.0])) == 0.5
    with pytest.raises(ValueError, match="at most 20"):
        sign_flip_p(np.ones(21))


def test_cluster_bootstrap_resamples_whole_subjects():
    same = [np.full(3, 0.7), np.full(3, 0.7), np.full(2, 0.7)]
    assert cluster_bootstrap(same) == pytest.approx((0.7, 0.7))
    groups = [np.array([0.1, 0.2, 0.3]), np.array([0.5, 0.6]), np.array([0.9])]
    low, high = cluster_bootstrap(groups)
    assert 0.1 <= low < np.mean(np.concatenate(groups)) < high <= 0.9
    assert cluster_bootstrap(groups) == (low, high)  # fixed seed: reproducible
    # seeds of one subject do not narrow the interval: 10 copies of each run agree
    tenfold = [np.repeat(g, 10) for g in groups]
    assert cluster_bootstrap(tenfold) == pytest.approx((low, high))


def test_mean_ci_and_paired_test_on_rows():
    rows = [{"subject": s, "seed": seed, "x": v}
            for s, v in (("a", 0.2), ("b", 0.4), ("c", 0.9)) for seed in range(2)]
    estimate = mean_ci(rows, "x")
    assert estimate.mean == pytest.approx(0.5) and estimate.runs == 6
    assert estimate.low < 0.5 < estimate.high
    better = [{**r, "x": r["x"] + 0.05} for r in rows]
    result = paired_test(better, rows, "x")
    assert result.difference.mean == pytest.approx(0.05)
    assert (result.wins, result.pairs, result.subjects) == (6, 6, 3)
    assert result.p_value == pytest.approx(1 / 8) and not result.holds  # 3 subjects only
    # non-inferiority: 0.97 b against a 5% margin holds in every pair, a 1% one in none
    near = [{**r, "x": 0.97 * r["x"]} for r in rows]
    assert paired_test(near, rows, "x", margin=0.05).wins == 6
    assert paired_test(near, rows, "x", margin=0.01).wins == 0
    with pytest.raises(ValueError, match="share no"):
        paired_test(rows, [{**r, "seed": 9} for r in rows], "x")


def test_intervals_do_not_depend_on_the_order_runs_finished_in():
    """The table's runs come back in completion order, which varies between runs of
    the script: the same runs in any order give the same intervals and p-values."""
    rng = np.random.default_rng(5)
    rows = [{"subject": f"s{i}", "seed": seed, "x": float(rng.uniform())}
            for i in range(8) for seed in range(3)]
    other = [{**r, "x": r["x"] - 0.1 * float(rng.uniform())} for r in rows]
    shuffled = [rows[i] for i in rng.permutation(len(rows))]
    assert mean_ci(shuffled, "x") == mean_ci(rows, "x")
    assert paired_test(shuffled, other[::-1], "x", margin=0.05) == paired_test(
        rows, other, "x", margin=0.05)
