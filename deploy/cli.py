"""`tuneqdm-pipeline serve` and `tuneqdm-pipeline generate` (registered in pipeline/cli.py).

Thin: options -> ServeSettings / GenerationParams -> deploy.app / deploy.engine ->
print. Exit status: 0 success; 1 runtime failure (unknown subject, scale set that does
not fit, Serve failed to start); 2 invalid options.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import click

from .errors import BaseNotFound, InvalidRequest, ServeError

FORWARDED_ENV = ("HF_HUB_OFFLINE", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "TUNEQDM_CACHE")
LOCAL_OBJECT_STORE_BYTES = 256 * 2**20


def _storage_options(values: tuple[str, ...]) -> dict[str, Any]:
    from pipeline.store import parse_storage_options

    try:
        return parse_storage_options(values)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--storage-option") from None


storage_option = click.option(
    "--storage-option", "storage_options", multiple=True, metavar="KEY=VALUE",
    help="fsspec option for s3:// output, repeatable (as for submit).")
base_option = click.option(
    "--base", "base", default=None, metavar="ADDRESS",
    help="Base address under OUTPUT/bases/ (default: the only base, or the last submit's).")


def _open_store(output: str, storage_options: tuple[str, ...], base: str | None):
    from pipeline.store import Storage, StorageError

    from .store import SubjectStore

    options = _storage_options(storage_options)
    try:
        if not Storage(output, options).exists(""):
            raise click.BadParameter(f"{output} does not exist", param_hint="OUTPUT")
        return SubjectStore(output, options, base)
    except BaseNotFound as err:
        raise click.ClickException(str(err)) from None
    except StorageError as err:
        raise click.ClickException(str(err)) from None


@click.command("serve")
@click.argument("output")
@base_option
@storage_option
@click.option("--address", default=None,
              help="Ray cluster ('auto', ray://host:10001, host:6379). Default: start a "
                   "local Ray for this command.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="HTTP host. The API has no authentication: expose it only behind a "
                   "gateway that has.")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--replicas", type=click.IntRange(min=1), default=None,
              help="Fixed number of model replicas [default: 1].")
@click.option("--min-replicas", type=click.IntRange(min=0), default=None,
              help="Autoscaling lower bound (with --max-replicas).")
@click.option("--max-replicas", type=click.IntRange(min=1), default=None,
              help="Autoscaling upper bound (with --min-replicas).")
@click.option("--num-gpus-per-replica", type=click.FloatRange(min=0), default=0.0,
              show_default=True, help="GPUs per model replica (fractions share a GPU).")
@click.option("--num-cpus-per-replica", type=click.FloatRange(min=0), default=1.0,
              show_default=True, help="CPUs per model replica; its torch threads.")
@click.option("--max-subjects-per-replica", type=click.IntRange(1, 4096), default=16,
              show_default=True, help="Scale sets resident per replica (LRU bank).")
@click.option("--max-batch-images", type=click.IntRange(1, 1024), default=8,
              show_default=True, help="Images per UNet batch, across subjects.")
@click.option("--batch-wait-ms", type=click.FloatRange(0, 10_000), default=10.0,
              show_default=True, help="How long an idle replica waits to fill a batch.")
@click.option("--max-queued-images", type=click.IntRange(min=1), default=64,
              show_default=True, help="Images waiting per replica before 503.")
@click.option("--max-steps", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--default-steps", type=click.IntRange(min=1), default=25, show_default=True)
@click.option("--max-side", type=click.IntRange(min=8), default=1024, show_default=True,
              help="Largest image side in pixels.")
@click.option("--max-images", type=click.IntRange(min=1), default=4, show_default=True,
              help="Images per request.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]),
              default="auto", show_default=True,
              help="Text encoder / VAE / activations dtype (auto: fp16 on GPU).")
@click.option("--name", default="tuneqdm", show_default=True, help="Serve application name.")
@click.option("--route-prefix", default="/", show_default=True)
@click.option("--num-cpus", type=click.IntRange(min=1), default=None,
              help="CPUs of the local Ray (default: all).")
@click.option("--detach", is_flag=True,
              help="Deploy and return, leaving the app running (needs --address).")
def serve_command(output: str, base: str | None, storage_options: tuple[str, ...],
                  address: str | None, host: str, port: int, replicas: int | None,
                  min_replicas: int | None, max_replicas: int | None,
                  num_gpus_per_replica: float, num_cpus_per_replica: float,
                  max_subjects_per_replica: int, max_batch_images: int, batch_wait_ms: float,
                  max_queued_images: int, max_steps: int, default_steps: int, max_side: int,
                  max_images: int, device: str, dtype: str, name: str, route_prefix: str,
                  num_cpus: int | None, detach: bool) -> None:
    """Serve every subject of OUTPUT (a submit's --output) over HTTP with Ray Serve.

    Each model replica loads the quantized base once; subjects' scale sets are loaded
    on demand, kept LRU per replica, and requests for different subjects share one
    UNet batch. API: POST /v1/subjects/{id}/images; playground at /; docs at /docs.
    Stop with Ctrl-C.
    """
    from pydantic import ValidationError

    from .app import ServeSettings

    if replicas is not None and (min_replicas is not None or max_replicas is not None):
        raise click.UsageError("give --replicas or --min-replicas/--max-replicas, not both")
    if (min_replicas is None) != (max_replicas is None):
        raise click.UsageError("autoscaling needs both --min-replicas and --max-replicas")
    autoscale = min_replicas is not None
    store = _open_store(output, storage_options, base)
    try:
        settings = ServeSettings(
            output=store.storage.root, storage_options=store.storage.options,
            base=store.base.address, name=name, route_prefix=route_prefix,
            replicas=None if autoscale else (replicas or 1), min_replicas=min_replicas,
            max_replicas=max_replicas, num_cpus_per_replica=num_cpus_per_replica,
            num_gpus_per_replica=num_gpus_per_replica,
            max_subjects_per_replica=max_subjects_per_replica,
            max_batch_images=max_batch_images, batch_wait_ms=batch_wait_ms,
            max_queued_images=max_queued_images, device=device, dtype=dtype,
            limits={"max_steps": max_steps, "default_steps": default_steps,
                    "max_side": max_side, "max_images": max_images})
    except (ValidationError, ValueError) as err:
        raise click.UsageError(_first_error(err)) from None
    if detach and address is None and not _ray_connected():
        raise click.UsageError("--detach needs --address: a local Ray ends with this command")
    _run_serve(settings, address, host, port, num_cpus, detach)


def _first_error(err: Exception) -> str:
    errors = getattr(err, "errors", None)
    if callable(errors):
        first = errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        return f"{where}: {first.get('msg')}" if where else str(first.get("msg"))
    return str(err)


def _ray_connected() -> bool:
    import ray

    return ray.is_initialized()


def _run_serve(settings, address: str | None, host: str, port: int, num_cpus: int | None,
               detach: bool) -> None:
    import ray
    from ray import serve

    from .app import build_app

    owned = not ray.is_initialized()
    if owned and address is None:  # fail before starting a Ray that cannot hold the app
        _check_resources(settings, {"CPU": num_cpus or os.cpu_count() or 1, "GPU": 1e9},
                         strict=True)
    if owned:
        kwargs: dict[str, Any] = {"namespace": "tuneqdm", "log_to_driver": False}
        if address is None:
            kwargs.update(address="local", num_cpus=num_cpus, include_dashboard=False,
                          object_store_memory=LOCAL_OBJECT_STORE_BYTES)
        else:
            env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
            kwargs.update(address=address, runtime_env={"env_vars": env} if env else None)
        ray.init(**kwargs)
    local = owned and address is None
    stopping = {"now": False}

    def cleanup() -> None:
        if stopping["now"]:
            return
        stopping["now"] = True
        if local:
            serve.shutdown()
        else:
            with contextlib.suppress(Exception):
                serve.delete(settings.name)
        if owned:
            ray.shutdown()

    try:
        # strict unless --address named a cluster (which may grow): a Ray started
        # here or already running in this process cannot, and Serve would wait forever
        _check_resources(settings, ray.cluster_resources(), strict=address is None)
        serve.start(http_options={"host": host, "port": port})
        click.echo(f"deploying {settings.name!r}: base {settings.base} from {settings.output}",
                   err=True)
        serve.run(build_app(settings), name=settings.name, route_prefix=settings.route_prefix,
                  blocking=False)
    except click.UsageError:
        cleanup()
        raise
    except Exception as err:  # a replica that failed to start, a port in use, ...
        cleanup()
        raise click.ClickException(f"Serve did not start: {' '.join(str(err).split())[:2000]}"
                                   ) from None
    prefix = settings.route_prefix.rstrip("/")
    url = f"http://{host}:{port}{prefix}"
    click.echo(f"serving at {url}/  (API docs: {url}/docs)")
    sys.stdout.flush()
    if detach:
        if owned:
            ray.shutdown()  # disconnect; the app keeps running on the cluster
        return

    def on_term(*_: Any) -> None:
        raise KeyboardInterrupt

    # SIGINT too: a process started in the background of a non-interactive shell
    # inherits SIGINT ignored, and Python then never raises KeyboardInterrupt
    previous = {sig: signal.signal(sig, on_term) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        click.echo("stopping", err=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        cleanup()


def _check_resources(settings, cluster: dict[str, float], strict: bool) -> None:
    """Refuse (strict: a local Ray, which cannot grow) or warn about replicas that the
    cluster's CPUs / GPUs cannot hold; Serve would otherwise wait for them forever."""
    replicas = settings.min_replicas if settings.autoscaling else settings.replicas
    replicas = max(1, replicas or 0)
    need_cpu = (replicas * settings.num_cpus_per_replica
                + settings.ingress_replicas * settings.ingress_num_cpus)
    need_gpu = replicas * settings.num_gpus_per_replica
    have_cpu, have_gpu = float(cluster.get("CPU", 0)), float(cluster.get("GPU", 0))
    problems = []
    if need_cpu > have_cpu + 1e-9:
        problems.append(f"{replicas} replica(s) x {settings.num_cpus_per_replica:g} CPU + "
                        f"ingress {settings.ingress_replicas * settings.ingress_num_cpus:g} "
                        f"CPU = {need_cpu:g} CPUs, the cluster has {have_cpu:g}")
    if need_gpu > have_gpu + 1e-9:
        problems.append(f"{replicas} replica(s) x {settings.num_gpus_per_replica:g} GPU = "
                        f"{need_gpu:g} GPUs, the cluster has {have_gpu:g}")
    if not problems:
        return
    text = "; ".join(problems)
    if strict:
        raise click.UsageError(f"{text}: lower --replicas / --num-cpus-per-replica / "
                               "--num-gpus-per-replica (or raise --num-cpus)")
    click.echo(f"warning: {text}; Serve waits until the cluster grows", err=True)


@click.command("generate")
@click.argument("output")
@click.argument("subject_id")
@click.argument("prompt")
@click.option("-o", "--out", "out_path", default="out.png", show_default=True,
              type=click.Path(dir_okay=False, writable=True),
              help="PNG to write; with --num-images N: NAME-0.png .. NAME-(N-1).png.")
@click.option("--steps", type=click.IntRange(1, 1000), default=25, show_default=True)
@click.option("--guidance-scale", type=click.FloatRange(0, 100), default=7.5,
              show_default=True)
@click.option("--seed", type=click.IntRange(0, 2**53 - 1), default=0, show_default=True,
              help="Image j uses seed + j (the same images as the service's).")
@click.option("--height", type=click.IntRange(8, 4096), default=None,
              help="Pixels, a multiple of 8 (default: the base's size).")
@click.option("--width", type=click.IntRange(8, 4096), default=None)
@click.option("--negative-prompt", default="")
@click.option("--num-images", type=click.IntRange(1, 64), default=1, show_default=True)
@base_option
@storage_option
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]),
              default="auto", show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch CPU threads (default: torch's).")
def generate_command(output: str, subject_id: str, prompt: str, out_path: str, steps: int,
                     guidance_scale: float, seed: int, height: int | None, width: int | None,
                     negative_prompt: str, num_images: int, base: str | None,
                     storage_options: tuple[str, ...], device: str, dtype: str,
                     threads: int | None) -> None:
    """Generate images of SUBJECT_ID for PROMPT without Serve (for scripts).

    PROMPT may use {token} and {class_noun}. The same seed gives the same images as
    POST /v1/subjects/{id}/images.
    """
    from .engine import Engine, GenerationRequest, LoadedSubject
    from .params import Limits, check_params, resolve
    from .store import check_subject_id

    try:
        check_subject_id(subject_id)
    except InvalidRequest as err:
        raise click.BadParameter(str(err), param_hint="SUBJECT_ID") from None
    store = _open_store(output, storage_options, base)
    limits = Limits(max_steps=1000, default_steps=steps, max_side=4096, max_images=64,
                    max_prompt_chars=10_000, max_guidance=100.0,
                    default_guidance=guidance_scale)
    if threads:
        import torch

        torch.set_num_threads(threads)
    try:
        scale_set, info = store.read_scale_set(subject_id)
        engine = Engine(store.local_base_path(), store.base.fingerprint, capacity=1,
                        device=device, dtype=dtype)
        engine.check_fits(scale_set)
        body = {"prompt": prompt, "negative_prompt": negative_prompt or None,
                "num_inference_steps": steps, "guidance_scale": guidance_scale, "seed": seed,
                "height": height, "width": width, "num_images": num_images}
        params = check_params(resolve(body, limits, engine.native_size, info.token,
                                      info.class_noun), limits)
    except InvalidRequest as err:
        raise click.UsageError(str(err)) from None
    except (ServeError, ValueError) as err:
        raise click.ClickException(str(err)) from None
    result = engine.run([GenerationRequest(LoadedSubject(info, scale_set), params)])[0]
    paths = _output_paths(Path(out_path), num_images)
    for path, png in zip(paths, result.png_bytes(), strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png)
    for path, image_seed in zip(paths, result.seeds, strict=True):
        click.echo(f"{path}  (seed {image_seed}, {params.width}x{params.height}, "
                   f"{params.num_inference_steps} steps)")


def _output_paths(path: Path, count: int) -> list[Path]:
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{j}{path.suffix or '.png'}") for j in range(count)]
