"""The toy-world table's summaries (benchmarks/toyworld_table.py): one row per method
with intervals, the paper's claims as paired tests, and per-subject means."""

from __future__ import annotations

import statistics

from toyworld.compare import Method
from toyworld.stats import mean_ci, paired_test


def summarise(rows: list[dict], methods: list[Method], memory: dict[str, dict]) -> list[dict]:
    """One row per method: means over its runs (subjects x seeds); the two fidelities
    with their 95% cluster-bootstrap intervals over subjects (toyworld/stats.py)."""
    table = []
    for method in methods:
        mine = [r for r in rows if r["method"] == method.key]
        peak = memory.get(method.key, {}).get("peak_train_bytes")
        table.append({
            "method": method.label,
            "subject": mean_ci(mine, "subject_fidelity").text(),
            **{key: f"{mean_ci(mine, field).mean:.2f}" for key, field in PARTS},
            "prompt": mean_ci(mine, "prompt_fidelity").text(),
            "runs": str(len(mine)),
            "trainable": f"{mine[0]['trainable']:,}",
            "bytes": f"{mine[0]['personal_bytes']:,}",
            "peak": "-" if peak is None else f"{peak / 2**20:.1f}",
            "train_s": f"{statistics.mean(r['train_s'] for r in mine):.1f}",
        })
    return table


PARTS = [("colour", "subject_colour"), ("shape", "subject_shape"),
         ("pattern", "subject_pattern"), ("background", "background"),
         ("position", "position")]


def paper_claims(methods: list[Method]) -> list[tuple[str, Method, Method, float]]:
    """The paper's claims that `methods` can test: (claim, a, b, margin) for "a beats
    (1 - margin) x b" on subject fidelity."""
    have = set(methods)
    bits = sorted({m.bits for m in methods if m.name == "tuneqdm"}, reverse=True)
    experts = max((m.num_experts for m in methods if m.name == "tuneqdm"), default=1)
    claims = []
    for b in bits:
        claims.append((f"TuneQDM N={experts} > PEQA at W{b}", Method("tuneqdm", b, experts),
                       Method("peqa", b), 0.0))
    for b in bits:
        claims.append((f"N={experts} > N=1 at W{b}", Method("tuneqdm", b, experts),
                       Method("tuneqdm", b, 1), 0.0))
    for recipe in ("fast", "paper"):
        for b in bits:
            claims.append((f"TuneQDM N={experts} W{b} >= 95% of full fine-tuning ({recipe})",
                           Method("tuneqdm", b, experts, recipe), Method("full", recipe=recipe),
                           0.05))
    return [c for c in claims if c[1] in have and c[2] in have and c[1] != c[2]]


def check_claims(rows: list[dict], methods: list[Method]) -> list[dict]:
    """Each claim's paired test on subject fidelity (pairs: subject x seed)."""
    out = []
    for claim, a, b, margin in paper_claims(methods):
        result = paired_test([r for r in rows if r["method"] == a.key],
                             [r for r in rows if r["method"] == b.key],
                             "subject_fidelity", margin)
        verdict = "holds" if result.holds else "not shown"
        if result.subjects < 6:
            verdict += f" (only {result.subjects} subjects: p >= {2.0 ** -result.subjects:.3f})"
        out.append({"claim": claim, "difference": result.difference.text(),
                    "wins": f"{result.wins}/{result.pairs}", "p": f"{result.p_value:.4f}",
                    "verdict": verdict})
    return out


CLAIM_COLUMNS = [("claim", "claim"), ("difference", "a - (1 - margin) b [95% CI]"),
                 ("wins", "pairs won"), ("p", "p (one-sided, sign-flip over subjects)"),
                 ("verdict", "at 5%")]


COLUMNS = [("method", "method"), ("subject", "subject fidelity [95% CI]"),
           ("colour", "colour"), ("shape", "shape"), ("pattern", "pattern"),
           ("prompt", "prompt fidelity [95% CI]"), ("background", "background"),
           ("position", "position"), ("runs", "runs"),
           ("trainable", "trainable numbers"), ("bytes", "per-subject bytes"),
           ("peak", "peak training MiB"), ("train_s", "train s")]


def per_subject(rows: list[dict], methods: list[Method], subjects: list[str],
                field: str = "subject_fidelity") -> list[dict]:
    """One row per method: `field`'s mean over seeds for each subject, and the weakest
    subject (issue 13 asks for full fine-tuning >= 0.85 on every one). Methods whose
    rows lack `field` (a run from before it existed) are left out."""
    table = []
    for method in methods:
        mine = [r for r in rows if r["method"] == method.key and field in r]
        means = {s: statistics.mean(r[field] for r in mine if r["subject"] == s)
                 for s in subjects if any(r["subject"] == s for r in mine)}
        if not means:
            continue
        weakest = min(means, key=means.get)
        table.append({"method": method.label,
                      **{s: f"{value:.3f}" for s, value in means.items()},
                      "weakest": f"{means[weakest]:.3f} ({weakest})"})
    return table
