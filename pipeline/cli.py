"""`tuneqdm-pipeline`: personalise a quantized diffusion model for many subjects on Ray.

Thin by design: each command parses options into a config, calls pipeline.run /
pipeline.summary, and prints. Exit status: 0 success; 1 some subject failed (or a
storage/Ray error); 2 invalid input (bad CSV, bad option), nothing launched;
130 interrupted.
"""

from __future__ import annotations

import json
import sys

import click

from .manifest import ManifestError
from .run import DEFAULT_OUTPUT, RunError, SubmitConfig, SubmitError, submit
from .store import Storage, StorageError, parse_storage_options
from .summary import collect_status, format_table

INPUT_ERROR = 2
INTERRUPTED = 130


def _storage_options(values: tuple[str, ...]) -> dict:
    try:
        return parse_storage_options(values)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--storage-option") from None


storage_option = click.option(
    "--storage-option", "storage_options", multiple=True, metavar="KEY=VALUE",
    help="fsspec option for s3:// output and images, repeatable; e.g. "
         "endpoint_url=http://127.0.0.1:9000, profile=NAME, "
         "client_kwargs.region_name=... Credentials are refused here: they come from "
         "the usual AWS environment variables and files.")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="tuneqdm-pipeline")
def main() -> None:
    """Personalise a quantized Stable-Diffusion UNet per subject with TuneQDM
    (arXiv 2401.04339): one small scale set per subject, trained on Ray."""


@main.command("submit")
@click.argument("manifest", metavar="SUBJECTS_CSV")
@click.option("--base-model", default=None,
              help="Hub id or local diffusers folder to quantize. Default: the bundled "
                   "toy-world base (models/toyworld-base).")
@click.option("--revision", default=None, help="Hub revision of --base-model.")
@click.option("-o", "--output", default=DEFAULT_OUTPUT, show_default=True,
              help="Local folder or s3://bucket/prefix for bases, scale sets and summaries.")
@click.option("--bits", type=int, default=4, show_default=True, help="Weight bits: 2, 3, 4, 8.")
@click.option("--method", type=click.Choice(["tuneqdm", "peqa"]), default="tuneqdm",
              show_default=True, help="tuneqdm: output+input scales with experts; "
                                      "peqa: output scales only.")
@click.option("--experts", type=int, default=None,
              help="Timestep experts N (default 4 for tuneqdm, 1 for peqa).")
@click.option("--steps", type=int, default=400, show_default=True,
              help="Training steps per subject (a CSV 'steps' column overrides).")
@click.option("--lr-scale-out", type=float, default=3e-6, show_default=True,
              help="Learning rate of the output-channel scales.")
@click.option("--lr-scale-in", type=float, default=None,
              help="Learning rate of the input-channel scales (default: lr-scale-out / "
                   "mean s0, the same relative step).")
@click.option("--batch-size", type=int, default=1, show_default=True)
@click.option("--resolution", type=int, default=None,
              help="Training size in pixels (default: the base's native size).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--address", default=None,
              help="Ray cluster: 'auto', ray://host:10001 or host:6379. Default: start a "
                   "local Ray.")
@click.option("--actors", type=int, default=None,
              help="Number of fine-tuning actors (default: one per GPU, else CPUs / "
                   "cpus-per-actor).")
@click.option("--num-gpus-per-actor", type=float, default=None,
              help="GPUs per actor, fractional allowed (default 1 if the cluster has GPUs, "
                   "else 0). Set it on autoscaling clusters whose GPU nodes are not up yet.")
@click.option("--cpus-per-actor", type=float, default=None,
              help="CPUs per actor; its torch threads (default 1 with GPUs, else all up to 8).")
@storage_option
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="Skip subjects whose artefacts are finished and verified.")
@click.option("--max-retries", type=int, default=2, show_default=True,
              help="Retries of a subject whose actor died.")
@click.option("--samples", type=int, default=2, show_default=True,
              help="Sample images per subject (0: none).")
@click.option("--sample-steps", type=int, default=20, show_default=True)
@click.option("--guidance-scale", type=float, default=7.5, show_default=True)
@click.option("--scales-dtype", type=click.Choice(["float32", "float16"]), default="float32",
              show_default=True)
@click.option("--min-image-side", type=int, default=32, show_default=True,
              help="Refuse photos whose shorter side is smaller (pixels).")
def submit_command(manifest: str, storage_options: tuple[str, ...], **options) -> None:
    """Train one scale set per subject of SUBJECTS_CSV.

    Every row is checked first (errors name file, line and column; exit status 2, nothing
    launched). The base is quantized once per content address and reused by later
    submits; finished subjects are verified and skipped. Exit status 1 if any subject
    failed.
    """
    config = SubmitConfig(manifest=manifest, storage_options=_storage_options(storage_options),
                          **options)
    try:
        report = submit(config, out=sys.stdout, err=sys.stderr)
    except ManifestError as err:
        click.echo(f"Error: {len(err.problems)} problem(s) in {manifest}; nothing was "
                   "launched:", err=True)
        for problem in err.problems:
            click.echo(f"  {problem}", err=True)
        raise SystemExit(INPUT_ERROR) from None
    except SubmitError as err:
        click.echo(f"Error: {err}; nothing was launched", err=True)
        raise SystemExit(INPUT_ERROR) from None
    except (StorageError, RunError) as err:
        raise click.ClickException(str(err)) from None
    except KeyboardInterrupt:
        click.echo("\ninterrupted", err=True)
        raise SystemExit(INTERRUPTED) from None
    raise SystemExit(report.exit_code)


@main.command("status")
@click.argument("output")
@storage_option
@click.option("--verify", is_flag=True,
              help="Also re-check each finished subject (checksums, scale set loads).")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
def status_command(output: str, storage_options: tuple[str, ...], verify: bool,
                   as_json: bool) -> None:
    """Print the subject table of OUTPUT (a submit's --output) from storage alone."""
    try:
        storage = Storage(output, _storage_options(storage_options))
        if not storage.exists(""):
            click.echo(f"Error: {storage.root} does not exist", err=True)
            raise SystemExit(INPUT_ERROR)
        rows, last = collect_status(storage, verify=verify)
    except StorageError as err:
        raise click.ClickException(str(err)) from None
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo(f"no subjects under {storage.root}")
        return
    click.echo(format_table(rows))
    tally: dict[str, int] = {}
    for r in rows:
        tally[r["status"]] = tally.get(r["status"], 0) + 1
    parts = ", ".join(f"{n} {status}" for status, n in sorted(tally.items()))
    when = f"; last run {last['run_id']}" if last else ""
    click.echo(f"{len(rows)} subject(s): {parts}{when}")


# `serve` and `generate` live in deploy/ (the Ray Serve app and its HTTP API).
from deploy.cli import generate_command, serve_command  # noqa: E402

main.add_command(serve_command)
main.add_command(generate_command)


if __name__ == "__main__":
    main()
