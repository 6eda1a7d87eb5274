"""The run's summary: one row per subject, as a terminal table, summary.json and
summary.parquet; and `status`, which rebuilds the table from storage alone.

Row fields: subject_id, group, status (done | reused | failed | incomplete), final_loss,
seconds, steps, attempts, reason, output (the subject's folder URI), actor.
"""

from __future__ import annotations

import io
import math
from typing import Any

from .manifest import Job
from .store import (
    SUMMARY_JSON,
    SUMMARY_PARQUET,
    Storage,
    subject_ids,
    subject_rel,
    verify_subject,
)

COLUMNS = ("subject_id", "group", "status", "final_loss", "seconds", "steps", "attempts",
           "reason", "output", "actor")


def row(subject_id: str, *, group: str | None = None, status: str, final_loss=None,
        seconds=None, steps=None, attempts: int = 0, reason: str = "", output: str = "",
        actor: str = "") -> dict[str, Any]:
    return {"subject_id": subject_id, "group": group, "status": status,
            "final_loss": None if final_loss is None else float(final_loss),
            "seconds": None if seconds is None else float(seconds),
            "steps": None if steps is None else int(steps), "attempts": int(attempts),
            "reason": reason, "output": output, "actor": actor}


def counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    out = {"total": len(rows)}
    for r in rows:
        out[r["status"]] = out.get(r["status"], 0) + 1
    return out


def write_summary(storage: Storage, summary: dict[str, Any]) -> tuple[str, str]:
    """Write summary.json and summary.parquet (the rows); return both URIs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = summary["subjects"]
    schema = pa.schema([
        ("subject_id", pa.string()), ("group", pa.string()), ("status", pa.string()),
        ("final_loss", pa.float64()), ("seconds", pa.float64()), ("steps", pa.int64()),
        ("attempts", pa.int64()), ("reason", pa.string()), ("output", pa.string()),
        ("actor", pa.string()), ("run_id", pa.string()),
    ])
    table = pa.Table.from_pylist(
        [{**{c: r.get(c) for c in COLUMNS}, "run_id": summary.get("run_id")} for r in rows],
        schema=schema)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    json_uri = storage.write_json(SUMMARY_JSON, summary)
    parquet_uri = storage.write_bytes(SUMMARY_PARQUET, buffer.getvalue())
    return json_uri, parquet_uri


def format_table(rows: list[dict[str, Any]], max_reason: int = 60) -> str:
    """A plain-text table: subject, status, final loss, seconds, output (or reason)."""
    header = ("subject", "status", "final loss", "seconds", "output / reason")
    lines = []
    for r in rows:
        loss = r.get("final_loss")
        seconds = r.get("seconds")
        detail = r.get("output") or ""
        if r.get("status") in ("failed", "incomplete"):
            reason = " ".join(str(r.get("reason") or "").split())
            detail = reason if len(reason) <= max_reason else reason[: max_reason - 3] + "..."
        lines.append((
            r["subject_id"] + (f" ({r['group']})" if r.get("group") else ""),
            r.get("status", ""),
            "-" if loss is None or (isinstance(loss, float) and math.isnan(loss))
            else f"{loss:.4f}",
            "-" if seconds is None else f"{seconds:.1f}",
            detail,
        ))
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h)
              for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths[:-1]) + "  {}"
    out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*line) for line in lines]
    return "\n".join(out)


def collect_status(storage: Storage, verify: bool = False) -> tuple[list[dict[str, Any]],
                                                                     dict[str, Any] | None]:
    """Rows for every subject folder in storage, plus failures recorded by the last
    run's summary.json for subjects that have no finished folder. Returns (rows,
    last summary or None)."""
    try:
        last = storage.read_json(SUMMARY_JSON)
    except (FileNotFoundError, OSError):
        last = None
    previous = {r["subject_id"]: r for r in (last or {}).get("subjects", [])}
    rows: list[dict[str, Any]] = []
    seen = set()
    for subject_id in subject_ids(storage):
        seen.add(subject_id)
        # the marker and meta.json always; with --verify every checksum and the scale set
        verdict = verify_subject(storage, subject_id, load_scales=verify, check_files=verify)
        reason = verdict.reason
        if verdict.done and (meta := verdict.record) is not None:
            rows.append(row(subject_id, group=meta.group, status="done",
                            final_loss=meta.final_loss, seconds=meta.seconds,
                            steps=meta.steps, attempts=meta.attempt or 0,
                            output=storage.uri(subject_rel(subject_id)), actor=meta.actor))
            continue
        prev = previous.get(subject_id)
        if prev and prev.get("status") == "failed":
            rows.append({**prev, "status": "failed"})
        else:
            rows.append(row(subject_id, status="incomplete", reason=reason,
                            output=storage.uri(subject_rel(subject_id))))
    for subject_id, prev in previous.items():
        if subject_id not in seen and prev.get("status") == "failed":
            rows.append(dict(prev))
    rows.sort(key=lambda r: r["subject_id"])
    return rows, last


def subject_rows(specs, jobs: list[Job], reused: dict[str, dict[str, Any]],
                 results: dict[str, dict[str, Any]], attempts: dict[str, int],
                 storage: Storage) -> list[dict[str, Any]]:
    """One summary row per subject of the manifest, in its order: reused (finished
    before), done, or failed (with the reason; "not run" after an interrupt)."""
    job_of = {s: job for job in jobs for s in job.subject_ids}
    rows = []
    for spec in specs:
        sid = spec.subject_id
        output = storage.uri(subject_rel(sid))
        if sid in reused:
            meta = reused[sid]
            rows.append(row(sid, group=spec.group, status="reused",
                            final_loss=meta.get("final_loss"), seconds=meta.get("seconds"),
                            steps=meta.get("steps"), attempts=0, output=output,
                            actor=meta.get("actor") or ""))
            continue
        job = job_of[sid]
        result = results.get(job.job_id)
        if result is None:
            rows.append(row(sid, group=spec.group, status="failed",
                            attempts=attempts.get(job.job_id, 0),
                            reason="not run (the run was interrupted)"))
        elif result["status"] == "done":
            rows.append(row(sid, group=spec.group, status="done",
                            final_loss=result.get("final_loss"), seconds=result.get("seconds"),
                            steps=result.get("steps"), attempts=attempts.get(job.job_id, 1),
                            output=result["outputs"].get(sid, output),
                            actor=result.get("actor", "")))
        else:
            rows.append(row(sid, group=spec.group, status="failed",
                            seconds=result.get("seconds"),
                            attempts=attempts.get(job.job_id, 1),
                            reason=result.get("reason", ""), actor=result.get("actor", "")))
    return rows
