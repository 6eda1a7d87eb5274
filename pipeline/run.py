"""`submit` as a function: plan, run, report.

    SubmitConfig --plan_submit--> SubmitPlan --run_plan--> RunOutcome --report_run--> RunReport

The CLI only parses options into a SubmitConfig (settings.py) and prints. Order of
work (docs/design.md §3):

1. plan: validate every CSV row (manifest.load_manifest; nothing starts on an
   error), decide the settings (options > the base's recipe > library defaults), find
   the base's content address and, with --resume, verify each subject's finished
   artefact against that base and the subject's spec hash (store.verify_subject);
2. run: if anything is left, connect to Ray (ray_session.RaySession), quantize the
   base in one task unless storage already holds it, start the FineTuner pool and run
   the queue (scheduler.ActorPool);
3. report: write summary.json and summary.parquet; exit status 1 if any subject failed.
"""

from __future__ import annotations

import contextlib
import secrets
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from .actors import (
    CALLS_PER_ACTOR,
    end_tracker,
    finetuner_actor,
    hook_runtime_env,
    start_tracker,
    tracker_counts,
)
from .cluster import PhotoShipper, check_output_reachable
from .deadline import SubjectDeadline
from .manifest import Job, SubjectSpec, group_jobs, load_manifest
from .progress import ProgressDisplay
from .quantize import quantize_task
from .ray_session import RaySession
from .settings import SubmitConfig, SubmitError, base_recipe, resolve_base_model
from .store import Storage, content_address, read_done, verify_subject
from .store.layout import base_rel
from .summary import counts, format_table, subject_rows, write_summary
from .worker import WorkSettings

__all__ = ["RunError", "RunReport", "SubmitConfig", "SubmitError", "submit"]

Say = Callable[[str], None]
VERIFY_THREADS = 32  # finished subjects verified at once on a re-run


class RunError(RuntimeError):
    """The run itself could not go on (the base did not quantize, say)."""


@dataclass
class SubmitPlan:
    """What a submit will do, decided before anything starts."""

    config: SubmitConfig
    run_id: str
    started: float
    storage: Storage
    specs: list[SubjectSpec]
    jobs: list[Job]
    base: dict[str, Any]            # address, source, revision, quant_config, uri, ...
    base_done: dict[str, Any] | None
    train: dict[str, Any]
    sampling: dict[str, Any]        # sample_steps, guidance_scale
    spec_hashes: dict[str, str]
    reused: dict[str, dict[str, Any]] = field(default_factory=dict)
    pending: list[Job] = field(default_factory=list)


@dataclass
class RunOutcome:
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    attempts: dict[str, int] = field(default_factory=dict)
    replaced: list[str] = field(default_factory=list)
    shrunk: list[str] = field(default_factory=list)
    timed_out: dict[str, int] = field(default_factory=dict)
    interrupted: bool = False
    dashboard_url: str | None = None


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

    plan = plan_submit(config, say)
    outcome = run_plan(plan, say, err, live_progress)
    return report_run(plan, outcome, out, say)


def plan_submit(config: SubmitConfig, say: Say) -> SubmitPlan:
    """Validate and decide everything; verify finished subjects. Starts nothing."""
    config.check()
    quant = config.quant_config()
    source = resolve_base_model(config.base_model, say)
    recipe = base_recipe(source)
    train = config.train_settings(recipe)
    sampling = config.sample_settings(recipe)
    specs = load_manifest(config.manifest, config.storage_options,
                          min_side=config.min_image_side)
    jobs = group_jobs(specs)
    storage = Storage(config.output, config.storage_options)
    address = content_address(source, config.revision, quant)
    run_id = time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)
    started = time.time()
    say(f"run {run_id}: {len(specs)} subject(s) in {len(jobs)} job(s) -> {storage.root}")
    if recipe is not None:
        say(f"recipe: {recipe.path} ({recipe.describe()}); options and CSV columns "
            "override it")
    spec_hashes = {job.job_id: job.spec_hash({"base": address, "quant": quant,
                                              "train": train}) for job in jobs}
    base = {"address": address, "source": source, "revision": config.revision,
            "quant_config": quant, "uri": storage.uri(base_rel(address)),
            "quantized_this_run": False}
    plan = SubmitPlan(config, run_id, started, storage, specs, jobs, base,
                      read_done(storage, address), train, sampling, spec_hashes)
    _sort_finished(plan, say)
    return plan


def _verify_all(plan: SubmitPlan) -> dict[str, Any]:
    """subject id -> Verdict for every subject, checked VERIFY_THREADS at a time
    (each check is a few storage round trips; on S3 they wait on the network)."""
    if not plan.config.resume or plan.base_done is None:
        return {}
    fingerprint = plan.base_done["fingerprint"]
    work = [(s, plan.spec_hashes[job.job_id]) for job in plan.jobs for s in job.subject_ids]
    with ThreadPoolExecutor(max_workers=VERIFY_THREADS) as pool:
        verdicts = pool.map(lambda item: verify_subject(plan.storage, item[0], fingerprint,
                                                        item[1]), work)
        return {subject_id: v for (subject_id, _), v in zip(work, verdicts, strict=True)}


def _sort_finished(plan: SubmitPlan, say: Say) -> None:
    """Split the jobs into verified finished subjects (reused) and pending jobs."""
    verified = _verify_all(plan)
    for job in plan.jobs:
        if verified:
            verdicts = [verified[s] for s in job.subject_ids]
            if all(v.done for v in verdicts):
                for subject_id, verdict in zip(job.subject_ids, verdicts, strict=True):
                    plan.reused[subject_id] = verdict.meta or {}
                continue
            not_done = [f"{s}: {v.reason}" for s, v in zip(job.subject_ids, verdicts,
                                                            strict=True) if not v.done]
            if any("not started" not in reason for reason in not_done):
                say(f"redo     {job.job_id} ({'; '.join(not_done)})")
        plan.pending.append(job)
    if plan.reused:
        say(f"resume: {len(plan.reused)} subject(s) already finished and verified, skipped")


def run_plan(plan: SubmitPlan, say: Say, err: TextIO,
             live_progress: bool | None = None) -> RunOutcome:
    """Quantize the base if needed and train the pending jobs on Ray."""
    if not plan.pending:
        plan.base["fingerprint"] = plan.base_done["fingerprint"] if plan.base_done else None
        say("nothing to do: every subject is already finished")
        return RunOutcome()
    config = plan.config
    with RaySession(config.address) as session:
        dashboard_url = session.dashboard_url()
        say(f"Ray dashboard: {dashboard_url or '(not running)'}")
        ray = session.ray
        check_output_reachable(ray, plan.storage, config.shared_output)
        resources = _plan_resources(config, ray.cluster_resources(), len(plan.pending))
        if config.device == "cuda" and not resources["num_gpus"]:
            raise SubmitError("--device cuda needs GPUs, but the actors get none (the "
                              "cluster has no GPU, or --num-gpus-per-actor is 0)")
        base_done = _ensure_base(ray, plan, resources, say)
        plan.base["fingerprint"] = base_done["fingerprint"]
        settings = WorkSettings(
            run_id=plan.run_id,
            base={k: plan.base[k] for k in ("address", "fingerprint", "source", "revision",
                                            "uri")},
            quant_config=plan.base["quant_config"], train=plan.train,
            samples=config.samples, sample_steps=plan.sampling["sample_steps"],
            guidance_scale=plan.sampling["guidance_scale"],
            scales_dtype=config.scales_dtype, min_image_side=config.min_image_side,
            storage_options=config.storage_options, device=config.device,
            checkpoint_every=config.checkpoint_every)
        # a Ray that outlives this driver (a cluster) keeps serving the run's metrics
        report, interrupted = _run_pool(ray, plan, settings, resources, live_progress,
                                        err, settle_metrics=not session.local)
    return RunOutcome(report.results, report.attempts, report.replaced, report.shrunk,
                      report.timed_out, interrupted, dashboard_url)


def _ensure_base(ray, plan: SubmitPlan, resources: dict[str, Any], say: Say) -> dict[str, Any]:
    """The base's done.json: reused from storage, or quantized now in one Ray task."""
    base, config = plan.base, plan.config
    if plan.base_done is not None:
        say(f"base: reusing {base['uri']} (fingerprint "
            f"{plan.base_done['fingerprint'][:12]})")
        return plan.base_done
    quant, source = base["quant_config"], base["source"]
    say(f"quantizing {source} ({quant['bits']}-bit {quant['method']}, "
        f"N={quant['num_experts']}) -> {base['uri']}")
    task = quantize_task().options(name=f"tuneqdm-quantize-{base['address'][:8]}",
                                   num_cpus=resources["num_cpus"])
    try:
        done = ray.get(task.remote(plan.storage, base["address"], source, config.revision,
                                   quant, resources["threads"]))
    except ray.exceptions.RayError as error:
        from .ray_errors import short_error

        raise RunError(f"quantizing {source} failed: {short_error(error)}") from None
    base["quantized_this_run"] = True
    say(f"quantized in {done['quantize_seconds']:.1f} s "
        f"(fingerprint {done['fingerprint'][:12]})")
    return done


def report_run(plan: SubmitPlan, outcome: RunOutcome, out: TextIO, say: Say) -> RunReport:
    """The rows and summary: written to storage, printed, and returned."""
    rows = subject_rows(plan.specs, plan.jobs, plan.reused, outcome.results,
                        outcome.attempts, plan.storage)
    summary = {
        "run_id": plan.run_id,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(plan.started)),
        "seconds": round(time.time() - plan.started, 3),
        "manifest": str(Path(plan.config.manifest).resolve()),
        "output": plan.storage.root,
        "base": plan.base,
        "train": plan.train,
        "counts": counts(rows),
        "actors_replaced": outcome.replaced,
        "actors_dropped": outcome.shrunk,
        "timed_out": outcome.timed_out,
        "interrupted": outcome.interrupted,
        "dashboard_url": outcome.dashboard_url,
        "subjects": rows,
    }
    json_uri, parquet_uri = write_summary(plan.storage, summary)
    out.write(format_table(rows) + "\n")
    out.write(f"summary: {json_uri}\n         {parquet_uri}\n")
    out.flush()
    failed = summary["counts"].get("failed", 0)
    if failed:
        say(f"{failed} subject(s) failed; rerun the same command to retry them")
    exit_code = 130 if outcome.interrupted else 1 if failed else 0
    return RunReport(rows, summary, exit_code)


# -- pieces ----------------------------------------------------------------------------


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


def _run_pool(ray, plan: SubmitPlan, settings: WorkSettings, resources: dict[str, Any],
              live_progress: bool | None, err: TextIO, settle_metrics: bool = True):
    """The pending jobs on a pool of FineTuner actors, with a live progress line;
    settle_metrics: see actors.end_tracker. Returns (PoolReport, interrupted)."""
    from .scheduler import ActorPool

    run_id, storage, spec_hashes = plan.run_id, plan.storage, plan.spec_hashes
    tracker = start_tracker(ray, run_id)
    remote_cls = finetuner_actor()
    settings_ref = ray.put(settings)
    photos = PhotoShipper(ray)
    extra = hook_runtime_env()

    def make_actor(name: str):
        return remote_cls.options(name=name, num_cpus=resources["num_cpus"],
                                  num_gpus=resources["num_gpus"], **extra).remote(
            name, storage, settings_ref, resources["threads"], tracker)

    def start(actor, job: Job, attempt: int):
        return actor.train.options(name=f"train:{job.job_id}").remote(
            job.to_dict(), spec_hashes[job.job_id], attempt, photos.ref(job))

    display = ProgressDisplay(len(plan.specs), len(plan.reused), stream=err,
                              live=live_progress)
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
    deadline = SubjectDeadline(plan.train, plan.config.subject_timeout)
    pool = ActorPool(make_actor, start, resources["actors"], f"tuneqdm-finetuner-{run_id}",
                     max_retries=plan.config.max_retries,
                     on_event=_event_sink(photos, display, deadline, tracker, err),
                     on_tick=on_tick, schedule_timeout_s=plan.config.schedule_timeout,
                     subject_timeout=deadline, demand=kind,
                     prefetch=deadline.is_short, queue_depth=CALLS_PER_ACTOR - 1)
    interrupted = completed = False
    try:
        pool.run(plan.pending)
        completed = True
    except KeyboardInterrupt:
        err.write("\ninterrupted: stopping actors; finished subjects are kept\n")
        interrupted = True
    finally:
        display.close()
        end_tracker(ray, tracker, settle=completed and settle_metrics)
    return pool.report, interrupted


def _event_sink(photos: PhotoShipper, display: ProgressDisplay, deadline: SubjectDeadline,
                tracker: Any, err: TextIO):
    """The pool's events: release a finished job's photos, say where a job resumed, feed
    the derived deadline (step times of finished tries) and the tracker's metrics
    (running, retried), and show them on the progress display."""

    def on_event(event: dict[str, Any]) -> None:
        display.event(event)
        if event["event"] == "finished":
            photos.drop(event["job"])
            deadline.observe(event["result"])
            if event["result"].get("resumed_from_step"):
                err.write(f"resumed  {event['job'].job_id} from its checkpoint at step "
                          f"{event['result']['resumed_from_step']}\n")
            if event["result"].get("oom_retry"):
                err.write(f"memory   {event['job'].job_id} ran out of GPU memory; trained "
                          f"with {event['result']['oom_retry']} instead\n")
        if event["event"] in ("started", "finished", "retry"):
            running = sum(display.members.get(j, 1) for j in display.running)
            with contextlib.suppress(Exception):
                tracker.count.remote(running, **tracker_counts(event))

    return on_event
