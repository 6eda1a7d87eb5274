"""Statistics for the toy-world comparison: confidence intervals and paired tests.

Every number is a mean over *runs*, one run = (method, subject, seed). Runs of one
subject are not independent (they share its images and evaluation prompts), so the
subject is the unit of resampling and of the tests: what the table claims must hold
across subjects, not only across seeds of the same few.

- `mean_ci`: the mean over all runs with a 95% cluster-bootstrap interval (subjects
  drawn with replacement, all seeds of a drawn subject kept; percentile interval).
- `paired_test`: runs of two methods paired by (subject, seed), which share training
  images, data order and generation noise; the per-subject mean differences are
  tested with the exact sign-flip (randomisation) test, one-sided, and their mean
  gets the same bootstrap interval. `margin` turns it into a non-inferiority test:
  "a >= (1 - margin) * b" is tested on a - (1 - margin) * b.

Pure numpy, deterministic (fixed resampling seed; runs sorted by subject and seed,
so the order they finished in does not matter), no distributional assumption.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

BOOTSTRAP_DRAWS = 10_000
LEVEL = 0.95


def _by_subject(rows: list[dict], field: str) -> dict[str, list[float]]:
    """field's values per subject, subjects in sorted order and each subject's runs by
    seed: the resampling then does not depend on the order the runs finished in."""
    out: dict[str, list[float]] = {}
    for row in sorted(rows, key=lambda r: (r["subject"], r.get("seed", 0))):
        out.setdefault(row["subject"], []).append(float(row[field]))
    return out


def cluster_bootstrap(groups: list[np.ndarray], draws: int = BOOTSTRAP_DRAWS,
                      seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the pooled mean, resampling whole groups.

    groups: one 1-D array of values per subject (any lengths). Returns (low, high).
    """
    if len(groups) < 2:
        value = float(np.mean(np.concatenate(groups)))
        return value, value
    sums = np.array([g.sum() for g in groups])
    counts = np.array([g.size for g in groups])
    picks = np.random.default_rng(seed).integers(0, len(groups), (draws, len(groups)))
    means = sums[picks].sum(1) / counts[picks].sum(1)
    tail = (1 - LEVEL) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


@dataclass(frozen=True)
class Estimate:
    """A mean over runs with its 95% interval."""

    mean: float
    low: float
    high: float
    runs: int

    def text(self, digits: int = 3) -> str:
        return f"{self.mean:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def mean_ci(rows: list[dict], field: str) -> Estimate:
    """Mean of `field` over `rows` (one per run) with its cluster-bootstrap interval."""
    groups = [np.asarray(v) for v in _by_subject(rows, field).values()]
    low, high = cluster_bootstrap(groups)
    return Estimate(float(np.mean(np.concatenate(groups))), low, high,
                    sum(g.size for g in groups))


def sign_flip_p(differences: np.ndarray) -> float:
    """One-sided exact p-value of "mean difference > 0" (differences: (n,), n <= 20).

    Under the null each difference is as likely negative as positive; p is the share
    of the 2^n sign patterns whose mean is at least the observed one.
    """
    d = np.asarray(differences, dtype=np.float64)
    if d.size > 20:
        raise ValueError(f"sign_flip_p: {d.size} differences; at most 20 (2^n patterns)")
    signs = np.array(list(itertools.product((1.0, -1.0), repeat=d.size)))
    flipped = signs @ d
    return float(np.mean(flipped >= d.sum() - 1e-12))


@dataclass(frozen=True)
class PairedResult:
    """`a` against `b` over pairs (subject, seed)."""

    difference: Estimate  # mean of a - (1 - margin) * b, with its interval
    p_value: float  # one-sided sign-flip test over subjects: difference > 0
    wins: int  # pairs where a's value is above (1 - margin) * b's
    pairs: int
    subjects: int

    @property
    def holds(self) -> bool:
        """The claim holds at the 5% level (one-sided)."""
        return self.p_value < 1 - LEVEL


def paired_test(a_rows: list[dict], b_rows: list[dict], field: str,
                margin: float = 0.0) -> PairedResult:
    """Test "a > (1 - margin) * b" on `field`, runs paired by (subject, seed)."""
    b_by = {(r["subject"], r["seed"]): float(r[field]) for r in b_rows}
    pairs = sorted((r["subject"], r["seed"],
                    float(r[field]) - (1 - margin) * b_by[(r["subject"], r["seed"])])
                   for r in a_rows if (r["subject"], r["seed"]) in b_by)
    if not pairs:
        raise ValueError("paired_test: the two methods share no (subject, seed) runs")
    diff_rows = [{"subject": s, "seed": seed, "d": d} for s, seed, d in pairs]
    groups = [np.asarray(v) for v in _by_subject(diff_rows, "d").values()]
    low, high = cluster_bootstrap(groups)
    estimate = Estimate(float(np.mean([d for _, _, d in pairs])), low, high, len(pairs))
    subject_means = np.array([g.mean() for g in groups])
    return PairedResult(estimate, sign_flip_p(subject_means),
                        int(sum(d > 0 for _, _, d in pairs)), len(pairs), len(groups))


__all__ = ["Estimate", "PairedResult", "cluster_bootstrap", "mean_ci", "paired_test",
           "sign_flip_p"]
