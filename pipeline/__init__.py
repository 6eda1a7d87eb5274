"""Ray orchestration and the `tuneqdm-pipeline` CLI for TuneQDM (arXiv 2401.04339).

`submit` turns a CSV of subjects into one small scale set per subject: the base model
is quantized once (a Ray task, content-addressed in storage), then a pool of
fine-tuning actors each load that base once and pull subjects from a queue
(DESIGN.md section 3). Modules:

- manifest.py   subjects.csv parsing and validation (errors name file, line, column)
- storage.py    fsspec URIs (local folders, s3://) with atomic writes
- base.py       content address of a quantized base; the quantize task; local copies
- artifacts.py  per-subject layout, completion markers, resume verification
- worker.py     training one subject (or group) end to end, without Ray
- actors.py     the FineTuner actor and the progress tracker
- scheduler.py  the actor pool: queue, ray.wait, replacement and bounded retries
- run.py        `submit` as a function: SubmitConfig -> RunReport
- summary.py    summary table, summary.json / summary.parquet, `status`
- cli.py        the click CLI
"""

__all__: list[str] = []
