"""Ray orchestration for TuneQDM (arXiv 2401.04339): `submit` as a library.

`submit` turns a CSV of subjects into one small scale set per subject: the base model
is quantized once (a Ray task, content-addressed in storage), then a pool of
fine-tuning actors each load that base once and pull subjects from a queue
(docs/design.md §3). The click commands live above, in tuneqdm_cli/. Modules:

- manifest.py     subjects.csv parsing and validation (errors name file, line, column)
- storage.py      fsspec URIs (local folders, s3://) with atomic writes
- base.py         content address of a quantized base; the quantize task; local copies
- artifacts.py    per-subject layout, completion markers, resume verification
- settings.py     SubmitConfig: options > the base's recipe > the typed configs' defaults
- worker.py       training one subject (or group) end to end, without Ray
- actors.py       the FineTuner actor and the progress tracker
- scheduler.py    the actor pool: queue, ray.wait, replacement and bounded retries
- ray_session.py  the one way to connect to Ray (submit and serve)
- run.py          `submit` as plan / run / report: SubmitConfig -> RunReport
- summary.py      summary table, summary.json / summary.parquet, `status`
- reference.py    the authors' released checkpoint -> a base and a subject in storage
"""

__all__: list[str] = []
