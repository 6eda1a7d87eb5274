"""`submit` as a function: validate, quantize once, fan out, resume, summarise.

    SubmitConfig --submit()--> RunReport (rows, summary dict, exit_code)

The CLI (cli.py) only parses options into a SubmitConfig and prints. Order of work
(DESIGN section 3):

1. validate every CSV row (manifest.load_manifest); nothing starts on an error;
2. find the base's content address; with --resume, verify each subject's finished
   artefact against that base and the subject's spec hash (store.verify_subject);
3. if anything is left: connect to Ray, quantize the base in one task unless storage
   already holds it, start the FineTuner pool and run the queue (scheduler.ActorPool);
4. write summary.json and summary.parquet; exit status 1 if any subject failed.
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from .manifest import Job, group_jobs, load_manifest
from .progress import ProgressDisplay
from .quantize import quantize_task
from .store import Storage, content_address, default_cache_dir, read_done, verify_subject
from .store.layout import base_rel, subject_rel
from .summary import counts, format_table, row, write_summary
from .worker import WorkSettings

DEFAULT_OUTPUT = "outputs/tuneqdm"
TOY_BASE = Path(__file__).resolve().parents[1] / "models" / "toyworld-base"
LOCAL_OBJECT_STORE_BYTES = 512 * 2**20
# Settings a driver passes on to the workers of a remote cluster (a local Ray inherits
# the whole environment). Never credentials: the job's runtime env is shown in the
# dashboard; nodes should use instance roles (docs/pipeline.md).
FORWARDED_ENV = ("HF_HUB_OFFLINE", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")


class SubmitError(ValueError):
    """A problem with the submit's options (not with a subject); nothing was launched."""


class RunError(RuntimeError):
    """The run itself could not go on (the base did not quantize, say)."""


@dataclass(frozen=True)
class SubmitConfig:
    """Everything `tuneqdm-pipeline submit` takes. None means "decide from the cluster"
    (actors, GPUs) or "the library's default" (lr_scale_in, resolution)."""

    manifest: str
    output: str = DEFAULT_OUTPUT
    base_model: str | None = None
    revision: str | None = None
    bits: int = 4
    method: str = "tuneqdm"
    experts: int | None = None
    steps: int = 400
    lr_scale_out: float = 3e-6
    lr_scale_in: float | None = None
    batch_size: int = 1
    resolution: int | None = None
    seed: int = 0
    address: str | None = None
    actors: int | None = None
    num_gpus_per_actor: float | None = None
    cpus_per_actor: float | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)
    resume: bool = True
    max_retries: int = 2
    samples: int = 2
    sample_steps: int = 20
    guidance_scale: float = 7.5
    scales_dtype: str = "float32"
    min_image_side: int = 32

    def check(self) -> None:
        """Raise SubmitError for an option outside its range (before anything starts)."""
        checks = [
            (self.max_retries >= 0, "--max-retries", self.max_retries, ">= 0"),
            (self.actors is None or self.actors >= 1, "--actors", self.actors, ">= 1"),
            (self.num_gpus_per_actor is None or self.num_gpus_per_actor >= 0,
             "--num-gpus-per-actor", self.num_gpus_per_actor, ">= 0"),
            (self.cpus_per_actor is None or self.cpus_per_actor > 0, "--cpus-per-actor",
             self.cpus_per_actor, "> 0"),
            (self.samples >= 0, "--samples", self.samples, ">= 0"),
            (self.sample_steps >= 1, "--sample-steps", self.sample_steps, ">= 1"),
            (self.min_image_side >= 1, "--min-image-side", self.min_image_side, ">= 1"),
            (self.scales_dtype in ("float32", "float16"), "--scales-dtype",
             self.scales_dtype, "float32 or float16"),
        ]
        for ok, name, value, allowed in checks:
            if not ok:
                raise SubmitError(f"{name} {value} is invalid: must be {allowed}")

    def quant_config(self) -> dict[str, Any]:
        from tuneqdm import QuantConfig

        experts = self.experts if self.experts is not None else (
            1 if self.method == "peqa" else 4)
        try:
            return QuantConfig(bits=self.bits, method=self.method,
                               num_experts=experts).to_dict()
        except ValueError as err:
            raise SubmitError(str(err)) from None

    def train_settings(self) -> dict[str, Any]:
        from tuneqdm.train import TrainConfig

        settings = {"steps": self.steps, "lr_scale_out": self.lr_scale_out,
                    "lr_scale_in": self.lr_scale_in, "batch_size": self.batch_size,
                    "resolution": self.resolution, "seed": self.seed}
        try:
            TrainConfig(**settings)
        except ValueError as err:
            raise SubmitError(str(err)) from None
        return settings


@dataclass
class RunReport:
    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    exit_code: int


def submit(config: SubmitConfig, out: TextIO | None = None, err: TextIO | None = None,
           live_progress: bool | None = None) -> RunReport:
    """Run a submit end to end; see the module docstring. Raises ManifestError or
    SubmitError before anything is launched; returns a RunReport otherwise."""
    out = out or sys.stdout
    err = err or sys.stderr

    def say(text: str) -> None:
        err.write(text + "\n")
        err.flush()

    config.check()
    quant = config.quant_config()
    train = config.train_settings()
    specs = load_manifest(config.manifest, config.storage_options,
                          min_side=config.min_image_side)
    jobs = group_jobs(specs)
    storage = Storage(config.output, config.storage_options)
    source = resolve_base_model(config.base_model, say)
    address = content_address(source, config.revision, quant)
    run_id = time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)
    started = time.time()
    say(f"run {run_id}: {len(specs)} subject(s) in {len(jobs)} job(s) -> {storage.root}")

    spec_hashes = {job.job_id: job.spec_hash({"base": address, "quant": quant,
                                              "train": train}) for job in jobs}
    base_done = read_done(storage, address)
    reused: dict[str, dict[str, Any]] = {}
    pending: list[Job] = []
    for job in jobs:
        if config.resume and base_done is not None:
            verdicts = [verify_subject(storage, s, base_done["fingerprint"],
                                       spec_hashes[job.job_id]) for s in job.subject_ids]
            if all(v.done for v in verdicts):
                for subject_id, verdict in zip(job.subject_ids, verdicts, strict=True):
                    reused[subject_id] = verdict.meta or {}
                continue
            not_done = [f"{s}: {v.reason}" for s, v in zip(job.subject_ids, verdicts,
                                                            strict=True) if not v.done]
            if any("not started" not in reason for reason in not_done):
                say(f"redo     {job.job_id} ({'; '.join(not_done)})")
        pending.append(job)
    if reused:
        say(f"resume: {len(reused)} subject(s) already finished and verified, skipped")

    base_info: dict[str, Any] = {"address": address, "source": source,
                                 "revision": config.revision, "quant_config": quant,
                                 "uri": storage.uri(base_rel(address)),
                                 "quantized_this_run": False}
    results: dict[str, dict[str, Any]] = {}
    interrupted = False
    attempts: dict[str, int] = {}
    replaced: list[str] = []
    dashboard_url = None
    if pending:
        with _ray_session(config) as (ray, dashboard_url):
            say(f"Ray dashboard: {dashboard_url or '(not running)'}")
            resources = _plan_resources(config, ray.cluster_resources(), len(pending))
            if base_done is None:
                say(f"quantizing {source} ({quant['bits']}-bit {quant['method']}, "
                    f"N={quant['num_experts']}) -> {base_info['uri']}")
                task = quantize_task().options(name=f"tuneqdm-quantize-{address[:8]}",
                                               num_cpus=resources["num_cpus"])
                try:
                    base_done = ray.get(task.remote(storage, address, source,
                                                    config.revision, quant,
                                                    resources["threads"]))
                except ray.exceptions.RayError as error:
                    from .scheduler import short_error

                    raise RunError(f"quantizing {source} failed: {short_error(error)}"
                                   ) from None
                base_info["quantized_this_run"] = True
                say(f"quantized in {base_done['quantize_seconds']:.1f} s "
                    f"(fingerprint {base_done['fingerprint'][:12]})")
            else:
                say(f"base: reusing {base_info['uri']} (fingerprint "
                    f"{base_done['fingerprint'][:12]})")
            base_info["fingerprint"] = base_done["fingerprint"]
            settings = WorkSettings(
                run_id=run_id,
                base={k: base_info[k] for k in ("address", "fingerprint", "source",
                                                "revision", "uri")},
                quant_config=quant, train=train, samples=config.samples,
                sample_steps=config.sample_steps, guidance_scale=config.guidance_scale,
                scales_dtype=config.scales_dtype, min_image_side=config.min_image_side,
                storage_options=config.storage_options)
            report, interrupted = _run_pool(ray, config, storage, settings, pending,
                                            spec_hashes, resources, run_id, len(specs),
                                            len(reused), live_progress, err)
            results, attempts, replaced = report.results, report.attempts, report.replaced
    else:
        base_info["fingerprint"] = base_done["fingerprint"] if base_done else None
        say("nothing to do: every subject is already finished")

    rows = _rows(specs, jobs, reused, results, attempts, storage)
    summary = {
        "run_id": run_id,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "seconds": round(time.time() - started, 3),
        "manifest": str(Path(config.manifest).resolve()),
        "output": storage.root,
        "base": base_info,
        "train": train,
        "counts": counts(rows),
        "actors_replaced": replaced,
        "interrupted": interrupted,
        "dashboard_url": dashboard_url,
        "subjects": rows,
    }
    json_uri, parquet_uri = write_summary(storage, summary)
    out.write(format_table(rows) + "\n")
    out.write(f"summary: {json_uri}\n         {parquet_uri}\n")
    out.flush()
    failed = summary["counts"].get("failed", 0)
    if failed:
        say(f"{failed} subject(s) failed; rerun the same command to retry them")
    return RunReport(rows, summary, 130 if interrupted else 1 if failed else 0)


# -- pieces ----------------------------------------------------------------------------


def resolve_base_model(value: str | None, say: Callable[[str], None]) -> str:
    """A hub id or absolute local path. None: the bundled toy-world base, or (until it
    exists) a tiny random pipeline generated once into the cache folder."""
    if value:
        path = Path(value).expanduser()
        if path.exists():
            return str(path.resolve())
        if value.startswith((".", "/", "~")) or value.count("/") != 1:
            raise SubmitError(f"--base-model {value!r}: no such folder, and not a hub id "
                              "of the form owner/name")
        return value
    if (TOY_BASE / "model_index.json").is_file():
        return str(TOY_BASE)
    tiny = default_cache_dir() / "tiny-sd-pipeline"
    if not (tiny / "model_index.json").is_file():
        from tuneqdm.testing import save_tiny_pipeline

        staging = tiny.parent / f".tiny-{uuid.uuid4().hex[:8]}"
        save_tiny_pipeline(staging)
        try:
            os.replace(staging, tiny)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
    say(f"note: {TOY_BASE} not found; using a tiny random pipeline ({tiny}) as the base "
        "-- fine for smoke tests, useless for real images; pass --base-model")
    return str(tiny)


class _ray_session:
    """Connect to Ray (or reuse the driver's existing connection); disconnect only
    what this submit connected."""

    def __init__(self, config: SubmitConfig) -> None:
        self.config = config
        self.owned = False

    def __enter__(self):
        import ray

        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"namespace": "tuneqdm", "log_to_driver": False}
            address = self.config.address
            if address is None:
                # A fresh local instance, never someone else's `ray start` on this host;
                # the object store only carries small results (weights go via storage).
                address = "local"
                kwargs.update(include_dashboard=True, dashboard_host="127.0.0.1",
                              object_store_memory=LOCAL_OBJECT_STORE_BYTES)
            else:
                env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
                if env:
                    kwargs["runtime_env"] = {"env_vars": env}
            ray.init(address=address, **kwargs)
            self.owned = True
        from ray._private.worker import get_dashboard_url

        try:
            url = get_dashboard_url() or None
        except Exception:
            url = None
        if url and "://" not in url:
            url = "http://" + url
        return ray, url

    def __exit__(self, *exc) -> None:
        import ray

        if self.owned:
            ray.shutdown()


def _plan_resources(config: SubmitConfig, cluster: dict[str, float],
                    num_jobs: int) -> dict[str, Any]:
    """Actors and their resources: one per GPU when the cluster has GPUs (or when
    --num-gpus-per-actor asks for them), else CPU actors with their CPUs' threads."""
    gpus = float(cluster.get("GPU", 0))
    cpus = float(cluster.get("CPU", 1))
    gpus_per_actor = config.num_gpus_per_actor
    if gpus_per_actor is None:
        gpus_per_actor = 1.0 if gpus >= 1 else 0.0
    if gpus_per_actor > 0:
        cpus_per_actor = config.cpus_per_actor or 1.0
        actors = config.actors or max(1, int(gpus // gpus_per_actor))
    else:
        cpus_per_actor = config.cpus_per_actor or max(1.0, min(cpus, 8.0))
        actors = config.actors or max(1, int(cpus // cpus_per_actor))
    return {"actors": min(actors, num_jobs), "num_gpus": gpus_per_actor,
            "num_cpus": cpus_per_actor, "threads": max(1, int(cpus_per_actor))}


def _run_pool(ray, config: SubmitConfig, storage: Storage, settings: WorkSettings,
              jobs: list[Job], spec_hashes: dict[str, str], resources: dict[str, Any],
              run_id: str, total_subjects: int, already_done: int,
              live_progress: bool | None, err: TextIO):
    from .actors import finetuner_actor, tracker_actor
    from .scheduler import ActorPool

    tracker = tracker_actor().options(name=f"tuneqdm-progress-{run_id}").remote()
    remote_cls = finetuner_actor()
    settings_ref = ray.put(settings)

    def make_actor(name: str):
        return remote_cls.options(name=name, num_cpus=resources["num_cpus"],
                                  num_gpus=resources["num_gpus"]).remote(
            name, storage, settings_ref, resources["threads"], tracker)

    def start(actor, job: Job, attempt: int):
        return actor.train.options(name=f"train:{job.job_id}").remote(
            job.to_dict(), spec_hashes[job.job_id], attempt)

    display = ProgressDisplay(total_subjects, already_done, stream=err, live=live_progress)
    pending_snapshot: list[Any] = []

    def on_tick() -> None:
        if pending_snapshot:
            ready, _ = ray.wait(pending_snapshot, timeout=0)
            if not ready:
                return
            try:
                display.update_steps(ray.get(pending_snapshot.pop()))
            except Exception:
                pending_snapshot.clear()
        pending_snapshot.append(tracker.snapshot.remote())

    kind = (f"{resources['num_gpus']:g} GPU + {resources['num_cpus']:g} CPU"
            if resources["num_gpus"] else f"{resources['num_cpus']:g} CPU")
    err.write(f"starting {resources['actors']} FineTuner actor(s), {kind} each\n")
    pool = ActorPool(make_actor, start, resources["actors"], f"tuneqdm-finetuner-{run_id}",
                     max_retries=config.max_retries, on_event=display.event, on_tick=on_tick)
    try:
        pool.run(jobs)
    except KeyboardInterrupt:
        err.write("\ninterrupted: stopping actors; finished subjects are kept\n")
        interrupted = True
    else:
        interrupted = False
    finally:
        display.close()
        ray.kill(tracker, no_restart=True)
    return pool.report, interrupted


def _rows(specs, jobs: list[Job], reused: dict[str, dict[str, Any]],
          results: dict[str, dict[str, Any]], attempts: dict[str, int],
          storage: Storage) -> list[dict[str, Any]]:
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
