"""Ray orchestration and the `tuneqdm-pipeline` CLI for TuneQDM (arXiv 2401.04339).

`submit` turns a CSV of subjects into one small scale set per subject: the base model
is quantized once (a Ray task, content-addressed in storage), then a pool of
fine-tuning actors each load that base once and pull subjects from a queue
(docs/design.md §3). Modules:

- store/        the artefact store (no Ray; deploy/ reads through it too): storage,
                layout, typed records, bases, subjects and their one verifier, the
                per-node base cache
- manifest.py   subjects.csv parsing and validation (errors name file, line, column);
                columns.py reads each column, photos.py lists and reads the photos
- quantize.py   the quantize Ray task
- worker.py     training one subject (or group) end to end, without Ray
- actors.py     the FineTuner actor and the progress tracker
- scheduler.py  the actor pool: queue, ray.wait, replacement and bounded retries
- run.py        `submit` as a function: SubmitConfig -> RunReport
- summary.py    summary table, summary.json / summary.parquet, `status`
- cli.py        the click CLI
"""

__all__: list[str] = []
