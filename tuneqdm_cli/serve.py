"""`tuneqdm-pipeline serve` and `tuneqdm-pipeline generate`: options -> ServeSettings /
generation arguments -> deploy.serve_runner -> print.

Exit status: 0 success; 1 runtime failure (unknown subject, scale set that does not
fit, Serve failed to start); 2 invalid options.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from deploy.errors import BaseNotFound, InvalidRequest, ServeError
from deploy.params import MAX_STRENGTH, check_strength
from deploy.serve_runner import (
    GENERATE_LIMITS,
    PROXY_LOCATIONS,
    OutputNotFound,
    ResourceShortage,
    ServeRunner,
    check_resources,
    generate_to_files,
    local_capacity,
    open_store,
    wait_for_signal,
)
from deploy.store import check_subject_id
from pipeline.ray_session import RaySession, is_connected
from pipeline.store import StorageError
from tuneqdm.schedulers import SCHEDULERS

from .options import address_option, config_option, given, storage_option

SETTINGS = "deploy.settings:ServeSettings"
LIMITS = "deploy.params:Limits"
GENERATE = "deploy.serve_runner:generate_to_files"
BOUNDS = "deploy.serve_runner:GENERATE_LIMITS"
DTYPES = ("auto", "float32", "float16", "bfloat16")
SHORTAGE_HINT = ("lower --replicas / --num-cpus-per-replica / --num-gpus-per-replica (or "
                 "raise --num-cpus)")

base_option = click.option(
    "--base", "base", default=None, metavar="ADDRESS",
    help="Base address under OUTPUT/bases/ (default: the only base, or the last submit's).")
scheduler_option = click.option(
    "--scheduler", type=click.Choice(list(SCHEDULERS), case_sensitive=False), default=None,
    help="Sampler (built from the base's scheduler config). Default: the base's own.")


def _open(output: str, storage_options: dict[str, Any], base: str | None):
    try:
        return open_store(output, storage_options, base)
    except OutputNotFound as err:
        raise click.BadParameter(str(err), param_hint="OUTPUT") from None
    except (BaseNotFound, StorageError) as err:
        raise click.ClickException(str(err)) from None


@click.command("serve")
@click.argument("output")
@base_option
@storage_option
@address_option
@click.option("--host", default="127.0.0.1", show_default=True,
              help="HTTP host. The API has no authentication: expose it only behind a "
                   "gateway that has.")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--proxy-location", type=click.Choice(PROXY_LOCATIONS), default="EveryNode",
              show_default=True,
              help="HTTP proxies on every node, only on the head (e.g. nodes sharing one "
                   "network namespace, or one entry point), or none.")
@config_option("--replicas", type=click.IntRange(min=1), source=SETTINGS,
               help="Fixed number of model replicas.")
@click.option("--min-replicas", type=click.IntRange(min=0), default=None,
              help="Autoscaling lower bound (with --max-replicas).")
@click.option("--max-replicas", type=click.IntRange(min=1), default=None,
              help="Autoscaling upper bound (with --min-replicas).")
@config_option("--num-gpus-per-replica", type=click.FloatRange(min=0), source=SETTINGS,
               help="GPUs per model replica (fractions share a GPU).")
@config_option("--num-cpus-per-replica", type=click.FloatRange(min=0), source=SETTINGS,
               help="CPUs per model replica; its torch threads.")
@config_option("--max-subjects-per-replica", type=click.IntRange(1, 4096), source=SETTINGS,
               help="Scale sets resident per replica (LRU bank).")
@config_option("--max-batch-images", type=click.IntRange(1, 1024), source=SETTINGS,
               help="Images per UNet batch, across subjects.")
@config_option("--batch-wait-ms", type=click.FloatRange(0, 10_000), source=SETTINGS,
               help="How long an idle replica waits to fill a batch.")
@config_option("--max-queued-images", type=click.IntRange(min=1), source=SETTINGS,
               help="Images waiting per replica before 503.")
@config_option("--max-steps", type=click.IntRange(min=1), source=LIMITS)
@config_option("--default-steps", type=click.IntRange(min=1), source=LIMITS)
@config_option("--max-side", type=click.IntRange(min=8), source=LIMITS,
               help="Largest image side in pixels.")
@config_option("--max-images", type=click.IntRange(min=1), source=LIMITS,
               help="Images per request.")
@config_option("--max-request-cost", type=click.IntRange(min=1), source=SETTINGS,
               help="Per-request bound on height x width x steps x images (422 over it).")
@config_option("--request-timeout-s", type=click.FloatRange(min=0, min_open=True),
               source=SETTINGS, help="Per-request deadline: cancelled and 504 after it.")
@config_option("--device", source=SETTINGS, help="auto, cpu, cuda.")
@config_option("--dtype", type=click.Choice(DTYPES), source=SETTINGS,
               help="Text encoder / VAE / activations dtype (auto: bf16 on GPU).")
@click.option("--cache-weights/--no-cache-weights", default=None,
              help="Keep the base's integer weights expanded: faster generation for "
                   "more memory per replica (see docs/benchmarks.md). Default: off.")
@scheduler_option
@config_option("--name", source=SETTINGS, help="Serve application name.")
@config_option("--route-prefix", source=SETTINGS)
@click.option("--num-cpus", type=click.IntRange(min=1), default=None,
              help="CPUs of the local Ray (default: all).")
@click.option("--detach", is_flag=True,
              help="Deploy and return, leaving the app running (needs --address).")
def serve_command(output: str, base: str | None, storage_options: dict[str, Any],
                  address: str | None, host: str, port: int, proxy_location: str,
                  num_cpus: int | None, detach: bool, **options: Any) -> None:
    """Serve every subject of OUTPUT (a submit's --output) over HTTP with Ray Serve.

    Each model replica loads the quantized base once; subjects' scale sets are loaded
    on demand, kept LRU per replica, and requests for different subjects share one
    UNet batch. API: POST /v1/subjects/{id}/images; playground at /; docs at /docs.
    Stop with Ctrl-C.
    """
    settings = _serve_settings(output, base, storage_options, options)
    if detach and address is None and not is_connected():
        raise click.UsageError("--detach needs --address: a local Ray ends with this command")
    if address is None and not is_connected():  # fail before starting a Ray too small
        _check(settings, local_capacity(num_cpus), strict=True)
    with RaySession(address, num_cpus=num_cpus, dashboard=False) as session:
        runner = ServeRunner(settings, host, port, local=session.local,
                             proxy_location=proxy_location)
        try:
            # strict unless --address named a cluster (which may grow): a Ray started
            # here or already running in this process cannot, and Serve would wait forever
            _check(settings, session.ray.cluster_resources(), strict=address is None)
            runner.start(say=_say)
        except click.UsageError:
            runner.stop()
            raise
        except Exception as err:  # a replica that failed to start, a port in use, ...
            runner.stop()
            raise click.ClickException(
                f"Serve did not start: {' '.join(str(err).split())[:2000]}") from None
        click.echo(f"serving at {runner.url}/  (API docs: {runner.url}/docs)")
        sys.stdout.flush()
        if detach:
            return  # the session disconnects; the app keeps running on the cluster
        wait_for_signal()
        click.echo("stopping", err=True)
        runner.stop()


def _say(text: str) -> None:
    click.echo(text, err=True)


def _check(settings, cluster: dict[str, float], strict: bool) -> None:
    try:
        check_resources(settings, cluster, strict, _say)
    except ResourceShortage as err:
        raise click.UsageError(f"{err}: {SHORTAGE_HINT}") from None


def _serve_settings(output: str, base: str | None, storage_options: dict[str, Any],
                    options: dict[str, Any]):
    """ServeSettings from the options given (the rest: ServeSettings' and Limits'
    defaults); click.UsageError for combinations they refuse."""
    from pydantic import ValidationError

    from deploy.settings import ServeSettings

    limit_names = ("max_steps", "default_steps", "max_side", "max_images")
    limits = given(**{k: options.pop(k) for k in limit_names})
    replicas, low, high = (options.pop(k) for k in ("replicas", "min_replicas",
                                                     "max_replicas"))
    if replicas is not None and (low is not None or high is not None):
        raise click.UsageError("give --replicas or --min-replicas/--max-replicas, not both")
    if (low is None) != (high is None):
        raise click.UsageError("autoscaling needs both --min-replicas and --max-replicas")
    scaling = {"replicas": None, "min_replicas": low, "max_replicas": high} if (
        low is not None) else given(replicas=replicas)
    store = _open(output, storage_options, base)
    try:
        return ServeSettings(output=store.storage.root, storage_options=store.storage.options,
                             base=store.base.address, limits=limits, **scaling,
                             **given(**options))
    except (ValidationError, ValueError) as err:
        raise click.UsageError(_first_error(err)) from None


def _first_error(err: Exception) -> str:
    errors = getattr(err, "errors", None)
    if callable(errors):
        first = errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        return f"{where}: {first.get('msg')}" if where else str(first.get("msg"))
    return str(err)


@click.command("generate")
@click.argument("output")
@click.argument("subject_id")
@click.argument("prompt")
@click.option("-o", "--out", "out_path", default="out.png", show_default=True,
              type=click.Path(dir_okay=False, writable=True),
              help="PNG to write; with --num-images N: NAME-0.png .. NAME-(N-1).png.")
@config_option("--steps", "num_inference_steps",
               type=click.IntRange(1, GENERATE_LIMITS.max_steps), source=BOUNDS,
               name="default_steps")
@config_option("--guidance-scale", type=click.FloatRange(0, GENERATE_LIMITS.max_guidance),
               source=BOUNDS, name="default_guidance")
@config_option("--seed", type=click.IntRange(0, 2**53 - 1), source=GENERATE,
               help="Image j uses seed + j (the same images as the service's).")
@click.option("--height", type=click.IntRange(8, GENERATE_LIMITS.max_side), default=None,
              help="Pixels, a multiple of 8 (default: the base's size).")
@click.option("--width", type=click.IntRange(8, GENERATE_LIMITS.max_side), default=None)
@click.option("--negative-prompt", default=None)
@config_option("--num-images", type=click.IntRange(1, GENERATE_LIMITS.max_images),
               source=GENERATE)
@config_option("--strength", type=float, source=GENERATE, metavar="ALPHA",
               help=f"The subject's strength alpha in [0, {MAX_STRENGTH}], as the HTTP "
                    "API's: scales s0 + alpha (s - s0); 0 the untuned base, 1 the subject.")
@base_option
@storage_option
@config_option("--device", source=GENERATE)
@config_option("--dtype", type=click.Choice(DTYPES), source=GENERATE)
@scheduler_option
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch CPU threads (default: torch's).")
def generate_command(output: str, subject_id: str, prompt: str, out_path: str,
                     base: str | None, storage_options: dict[str, Any],
                     **options: Any) -> None:
    """Generate images of SUBJECT_ID for PROMPT without Serve (for scripts).

    PROMPT may use {token} and {class_noun}. The same seed gives the same images as
    POST /v1/subjects/{id}/images.
    """
    try:
        check_subject_id(subject_id)
    except InvalidRequest as err:
        raise click.BadParameter(str(err), param_hint="SUBJECT_ID") from None
    if options.get("strength") is not None:
        try:  # before storage is opened; in the HTTP API's words
            check_strength(options["strength"])
        except InvalidRequest as err:
            raise click.UsageError(str(err)) from None
    store = _open(output, storage_options, base)
    try:
        files, params = generate_to_files(store, subject_id, prompt, out_path,
                                          **given(**options))
    except InvalidRequest as err:
        raise click.UsageError(str(err)) from None
    except (ServeError, ValueError) as err:
        raise click.ClickException(str(err)) from None
    for file in files:
        click.echo(f"{file.path}  (seed {file.seed}, {params.width}x{params.height}, "
                   f"{params.num_inference_steps} steps)")
