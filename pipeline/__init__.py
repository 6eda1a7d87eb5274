"""Ray orchestration for TuneQDM (arXiv 2401.04339): `submit` as a library.

`submit` turns a CSV of subjects into one small scale set per subject: the base model
is quantized once (a Ray task, content-addressed in storage), then a pool of
fine-tuning actors each load that base once and pull subjects from a queue
(docs/design.md §3). The click commands live above, in tuneqdm_cli/. Modules:

- store/          the artefact store (no Ray; deploy/ reads through it too): storage,
                  layout, typed records, bases, subjects and their one verifier, the
                  per-node base cache
- manifest.py     subjects.csv parsing and validation (errors name file, line, column);
                  columns.py reads each column, photos.py lists and reads the photos
- settings.py     SubmitConfig: options > the base's recipe > the typed configs' defaults
- quantize.py     the quantize Ray task
- worker.py       training one subject (or group) end to end, without Ray
- actors.py       the FineTuner actor and the progress tracker
- scheduler.py    the actor pool: queue, ray.wait, replacement and bounded retries
- ray_session.py  the one way to connect to Ray (submit and serve)
- run.py          `submit` as plan / run / report: SubmitConfig -> RunReport
- summary.py      summary table, summary.json / summary.parquet, `status`
- reference.py    the authors' released checkpoint -> a base and a subject in storage
"""

__all__: list[str] = []
