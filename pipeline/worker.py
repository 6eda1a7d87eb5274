"""Train one job (a subject, or a group trained jointly) end to end, without Ray.

The FineTuner actor (actors.py) calls `train_job` with its loaded pipeline; tests can
call it directly. Steps: load and normalise the photos (tuneqdm.images), fine-tune the
scales (tuneqdm.train.finetune), generate a few samples with the new scale set, write
every member's folder (store.write_subject: a SubjectMeta each, completion marker last).

A job that fails for its own reasons (unreadable photo, NaN loss, bad override)
returns a "failed" result with the reason; only a crash of the process itself is left
to the scheduler.
"""

from __future__ import annotations

import contextlib
import io
import os
import platform
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from typing import Any

from tuneqdm.generate import DEFAULT_GUIDANCE

from .checkpoint import load_checkpoint, remove_checkpoint, save_checkpoint
from .manifest import Job, SubjectSpec
from .photos import read_image_bytes
from .store import THUMBNAIL_SIDE, Storage, SubjectMeta, write_subject

MAX_LOSS_POINTS = 2000
EXIT_AT_STEP_ENV = "TUNEQDM_TEST_EXIT_AT_STEP"  # test hook: see _exit_hook
CUDA_OOM_ENV = "TUNEQDM_TEST_CUDA_OOM"  # test hook: see _oom_hook
EXIT_AT_STEP_STATUS = 75


@dataclass(frozen=True)
class WorkSettings:
    """What every job of a run shares (sent once to each actor).

    train: TrainConfig keyword arguments (steps, lr_scale_out, resolution, ...), or
    lr_scale_out_relative in place of lr_scale_out (tuneqdm/recipe.py); a job's CSV
    overrides are applied on top. samples: sample images per subject (0: none).
    device: "auto", "cpu" or "cuda" (pipeline/device.py). checkpoint_every: save the
    scales and optimiser state to storage every K steps (0: never), so a retried job
    resumes there (pipeline/checkpoint.py).
    """

    run_id: str
    base: dict[str, Any]                  # address, fingerprint (+ source, revision, uri)
    quant_config: dict[str, Any]
    train: dict[str, Any] = field(default_factory=dict)
    samples: int = 2
    sample_steps: int = 20
    guidance_scale: float = DEFAULT_GUIDANCE
    scales_dtype: str = "float32"
    min_image_side: int = 32
    max_image_pixels: int = 50_000_000
    storage_options: dict[str, Any] = field(default_factory=dict)
    device: str = "auto"
    checkpoint_every: int = 50


def failed(job: Job, reason: str, attempt: int = 1, actor: str = "",
           seconds: float = 0.0) -> dict[str, Any]:
    return {"job_id": job.job_id, "subjects": job.subject_ids, "status": "failed",
            "reason": reason, "attempt": attempt, "actor": actor,
            "seconds": round(seconds, 3), "final_loss": None, "steps": 0, "outputs": {}}


def train_config_for(job: Job, settings: WorkSettings, unet=None):
    """The job's TrainConfig: run settings with the CSV's overrides on top; a recipe's
    relative rate of s_out is resolved against the loaded base's `unet`."""
    from tuneqdm.recipe import resolve_train_config

    return resolve_train_config({**settings.train, **job.overrides}, unet)


@dataclass
class _Attempt:
    """Who runs a job, which try it is, and when it started (perf_counter; and the wall
    clock when it took the model, for utilisation)."""

    job: Job
    attempt: int
    actor: str
    start: float
    started_unix: float = field(default_factory=time.time)

    def failed(self, reason: str, timed: bool = True) -> dict[str, Any]:
        seconds = time.perf_counter() - self.start if timed else 0.0
        return failed(self.job, reason, self.attempt, self.actor, seconds)


def train_job(pipe, job: Job, spec_hash: str, settings: WorkSettings, storage: Storage,
              on_step: Callable[[int, float], None] | None = None, attempt: int = 1,
              actor: str = "", photos: dict[str, bytes] | None = None,
              model_lock: Any = None) -> dict[str, Any]:
    """Train `job` on the loaded quantized `pipe`; write its artefacts; return a result
    dict (status "done" or "failed" with a reason). `photos`: {path: bytes} of local
    photos shipped by the driver (others are read here: s3://, or local paths when
    train_job is called without Ray). `model_lock`: held while `pipe` is used
    (training, samples), so that a second job's reads and the first's writes overlap
    another job's training on the same actor (pipeline/actors.py)."""
    run = _Attempt(job, attempt, actor, time.perf_counter())
    try:
        config = train_config_for(job, settings, pipe.unet)
    except ValueError as err:
        return run.failed(f"bad training settings: {err}", timed=False)
    resolution = config.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    thumbnails: dict[str, bytes] = {}
    subjects = _load_subjects(job, settings, resolution, photos or {}, thumbnails)
    if isinstance(subjects, str):
        return run.failed(subjects)
    resumption = _resumption(storage, job, spec_hash, settings)
    with model_lock or contextlib.nullcontext():
        run.started_unix = time.time()
        trained = _train(pipe, subjects, config, _exit_hook(on_step, attempt), resumption)
        if isinstance(trained, str):
            return run.failed(trained)
        result, used = trained
        files = _outputs(pipe, run, spec_hash, settings, used, result, resolution)
    photo_pngs = {spec.subject_id: [thumbnails[ref.uri] for ref in spec.images]
                  for spec in job.subjects}
    outputs = {sid: write_subject(storage, sid, *parts, photos=photo_pngs[sid])
               for sid, parts in files.items()}
    remove_checkpoint(storage, job)
    return {"job_id": job.job_id, "subjects": job.subject_ids, "status": "done",
            "reason": "", "attempt": attempt, "actor": actor,
            "seconds": round(time.perf_counter() - run.start, 3),
            "final_loss": result.final_loss, "steps": len(result.losses), "outputs": outputs,
            "resumed_from_step": result.extra.get("resumed_from_step", 0),
            "oom_retry": "" if used is config else _oom_change(config, used)}


def _train(pipe, subjects, config, on_step, resumption):
    """(TrainResult, the config it ran with) or the reason it failed. CUDA out of
    memory is retried once with a lighter config (tuneqdm/device.py)."""
    from tuneqdm.device import OutOfMemory, train_with_oom_retry
    from tuneqdm.train import TrainingError, finetune

    used = {"config": config}

    def train(candidate):
        used["config"] = candidate
        _oom_hook(candidate)
        return finetune(pipe, subjects, candidate, on_step=on_step, resumption=resumption)

    try:
        result = train_with_oom_retry(train, config)
    except OutOfMemory as err:
        return f"out of memory: {err}"
    except TrainingError as err:
        return f"training failed: {err}"
    if result.scale_set is None:
        return "training returned no scale set"
    return result, used["config"]


def _oom_change(before, after) -> str:
    """What the out-of-memory retry changed, in words (tuneqdm.device.oom_retry_config)."""
    if after.gradient_checkpointing and not before.gradient_checkpointing:
        return "gradient checkpointing"
    return f"batch size {after.batch_size}"


def _oom_hook(config) -> None:
    """Test hook standing in for a GPU too small (no GPU exists in CI): with
    TUNEQDM_TEST_CUDA_OOM=without-checkpointing a try without gradient checkpointing
    raises CUDA's out-of-memory error; with =always every try does."""
    import torch

    mode = os.environ.get(CUDA_OOM_ENV, "")
    if mode not in ("", "without-checkpointing", "always"):
        raise ValueError(f"{CUDA_OOM_ENV}={mode!r} is invalid: expected "
                         "'without-checkpointing' or 'always'")
    if mode == "always" or (mode and not config.gradient_checkpointing):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB "
                                     f"({CUDA_OOM_ENV} test hook)")


def _resumption(storage: Storage, job: Job, spec_hash: str, settings: WorkSettings):
    """tuneqdm Resumption: the job's checkpoint to go on from (if any), and a writer of
    new ones every settings.checkpoint_every steps (pipeline/checkpoint.py)."""
    from tuneqdm.train import Resumption

    if settings.checkpoint_every <= 0:
        return None
    fingerprint = settings.base["fingerprint"]
    state, _why = load_checkpoint(storage, job, spec_hash, fingerprint)
    if state is not None:
        print(f"{job.job_id}: resuming from its checkpoint at step {state.step}",
              file=sys.stderr, flush=True)

    def save(new_state) -> None:
        save_checkpoint(storage, job, spec_hash, fingerprint, new_state)

    return Resumption(state=state, save=save, every=settings.checkpoint_every)


def _exit_hook(on_step: Callable[[int, float], None] | None, attempt: int):
    """on_step, plus the preemption test hook: with TUNEQDM_TEST_EXIT_AT_STEP=N the
    process exits (as a preempted node's would) once step N is done, first attempt
    only."""
    exit_at = int(os.environ.get(EXIT_AT_STEP_ENV) or 0)
    if not exit_at or attempt > 1:
        return on_step

    def hooked(step: int, loss: float) -> None:
        if on_step is not None:
            on_step(step, loss)
        if step + 1 >= exit_at:
            os._exit(EXIT_AT_STEP_STATUS)

    return hooked


def _load_subjects(job: Job, settings: WorkSettings, resolution: int,
                   photos: dict[str, bytes], thumbnails: dict[str, bytes]) -> list | str:
    """The job's tuneqdm Subjects with their photos loaded, or why they cannot be;
    fills `thumbnails` (photo URI -> PNG thumbnail bytes, for the subject folder)."""
    from tuneqdm.images import ImageLoadError, load_image
    from tuneqdm.train import Subject

    def read(uri: str) -> bytes:
        shipped = photos.get(uri)
        data = shipped if shipped is not None else read_image_bytes(
            uri, settings.storage_options)
        thumbnails[uri] = _thumbnail(data)
        return data

    try:
        return [
            Subject(spec.subject_id,
                    [load_image(read(ref.uri),
                                name=ref.uri, min_side=settings.min_image_side,
                                max_pixels=settings.max_image_pixels, shorter_side=resolution)
                     for ref in spec.images],
                    spec.class_noun, spec.token, spec.prompt, captions=spec.captions)
            for spec in job.subjects
        ]
    except ImageLoadError as err:
        return f"bad image: {err}"
    except (FileNotFoundError, OSError) as err:
        return f"cannot read image: {err}"
    except ValueError as err:
        return str(err)


def _thumbnail(data: bytes) -> bytes:
    """A training photo as a PNG of at most THUMBNAIL_SIDE px a side (for the
    playground); an unreadable photo gives b"" here and fails in load_image."""
    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(data)) as image:
            small = ImageOps.exif_transpose(image).convert("RGB")
            small.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    except Exception:
        return b""
    return _png(small)


def _outputs(pipe, run: _Attempt, spec_hash: str, settings: WorkSettings, config,
             result, resolution: int) -> dict[str, tuple[bytes, SubjectMeta, list[bytes]]]:
    """Every member's files, made while the model is held: subject id -> (the job's one
    scale set's bytes, its meta, its sample PNGs)."""
    import torch

    dtype = {"float32": torch.float32, "float16": torch.float16}[settings.scales_dtype]
    scales = result.scale_set.to_bytes(dtype)
    samples = _samples(pipe, run.job, result.scale_set, settings, config.seed, resolution)
    files = {}
    for spec in run.job.subjects:
        own = samples.get(spec.subject_id, [])
        meta = _subject_meta(spec, pipe, run, spec_hash, settings, config, result, len(own))
        files[spec.subject_id] = (scales, meta, own)
    return files


def _subject_meta(spec: SubjectSpec, pipe, run: _Attempt, spec_hash: str,
                  settings: WorkSettings, config, result, sample_count: int) -> SubjectMeta:
    losses = [float(x) for x in result.losses]
    return SubjectMeta(
        subject_id=spec.subject_id, base_fingerprint=settings.base["fingerprint"],
        base_address=settings.base.get("address", ""), spec_hash=spec_hash,
        run_id=settings.run_id, group=spec.group, members=tuple(run.job.subject_ids),
        class_noun=spec.class_noun, token=spec.token, prompt=spec.prompt,
        images=tuple(ref.uri for ref in spec.images),
        captions=None if spec.captions is None else tuple(ref.caption for ref in spec.images),
        train_config=config.to_dict(),
        quant_config=settings.quant_config, losses=tuple(_thin(losses)),
        final_loss=result.final_loss, steps=len(losses),
        train_seconds=round(result.seconds, 3),
        seconds=round(time.perf_counter() - run.start, 3),
        trainable_numbers=result.trainable_numbers, scales_dtype=settings.scales_dtype,
        sample_count=sample_count, sample_steps=settings.sample_steps,
        sample_guidance_scale=settings.guidance_scale, attempt=run.attempt, actor=run.actor,
        resumed_from_step=result.extra.get("resumed_from_step") or None,
        host=socket.gethostname(),
        device=str(pipe.unet.device) if hasattr(pipe.unet, "device") else "cpu",
        versions=library_versions(), finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        started_unix=round(run.started_unix, 4), finished_unix=round(time.time(), 4),
    )


def _samples(pipe, job: Job, scale_set, settings: WorkSettings, seed: int,
             resolution: int) -> dict[str, list[bytes]]:
    """PNG bytes of `settings.samples` images per subject, one per prompt of
    SubjectSpec.sample_prompts (its photos' captions in turn, else its instance prompt)."""
    from tuneqdm.generate import generate

    if settings.samples <= 0:
        return {}
    prompts = [p for spec in job.subjects for p in spec.sample_prompts(settings.samples)]
    images = generate(pipe, prompts, scale_sets=scale_set, seed=seed,
                      num_inference_steps=settings.sample_steps,
                      guidance_scale=settings.guidance_scale, height=resolution,
                      width=resolution, num_images_per_prompt=1)
    out: dict[str, list[bytes]] = {}
    for index, spec in enumerate(job.subjects):
        chunk = images[index * settings.samples:(index + 1) * settings.samples]
        out[spec.subject_id] = [_png(image) for image in chunk]
    return out


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _thin(values: list[float]) -> list[float]:
    """At most MAX_LOSS_POINTS evenly spaced points of a loss curve (last one kept)."""
    if len(values) <= MAX_LOSS_POINTS:
        return values
    stride = len(values) / MAX_LOSS_POINTS
    thinned = [values[int(i * stride)] for i in range(MAX_LOSS_POINTS - 1)]
    return [*thinned, values[-1]]


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("tuneqdm-pipeline", "torch", "diffusers", "transformers", "safetensors",
                    "ray", "fsspec", "s3fs", "pillow"):
        try:
            versions[package] = importlib_metadata.version(package)
        except importlib_metadata.PackageNotFoundError:
            continue
    return versions
