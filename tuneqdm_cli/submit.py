"""`tuneqdm-pipeline submit` and `tuneqdm-pipeline status`: options -> SubmitConfig ->
pipeline.run.submit / pipeline.summary -> print.

Exit status: 0 success; 1 some subject failed (or a storage/Ray error); 2 invalid input
(bad CSV, bad option), nothing launched; 130 interrupted.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from pipeline.manifest import ManifestError
from pipeline.run import RunError, SubmitConfig, SubmitError, submit
from pipeline.store import Storage, StorageError
from pipeline.summary import collect_status, format_table

from .options import (
    INPUT_ERROR,
    INTERRUPTED,
    address_option,
    config_option,
    given,
    storage_option,
)

SUBMIT = "pipeline.settings:SubmitConfig"
QUANT = "tuneqdm.config:QuantConfig"
TRAIN = "tuneqdm.train:TrainConfig"
WORK = "pipeline.worker:WorkSettings"
RECIPE = "the base's recipe, else "


def _lr_in_default(_: Any) -> str:
    return "lr-scale-out / mean s0, the same relative step"


@click.command("submit")
@click.argument("manifest", metavar="SUBJECTS_CSV")
@click.option("--base-model", default=None,
              help="Hub id or local diffusers folder to quantize. Default: the bundled "
                   "toy-world base (models/toyworld-base).")
@click.option("--revision", default=None, help="Hub revision of --base-model.")
@config_option("-o", "--output", source=SUBMIT,
               help="Local folder or s3://bucket/prefix for bases, scale sets and summaries.")
@config_option("--bits", type=int, source=QUANT, help="Weight bits: 2, 3, 4, 8.")
@config_option("--method", type=click.Choice(["tuneqdm", "peqa"]), source=QUANT,
               help="tuneqdm: output+input scales with experts; peqa: output scales only.")
@config_option("--experts", type=int, source=QUANT, name="num_experts", prefix="peqa 1, else ",
               help="Timestep experts N.")
@config_option("--steps", type=int, source=TRAIN, prefix=RECIPE,
               help="Training steps per subject (a CSV 'steps' column overrides).")
@config_option("--lr-scale-out", type=float, source=TRAIN, prefix=RECIPE,
               help="Learning rate of the output-channel scales.")
@config_option("--lr-scale-in", type=float, source=TRAIN, prefix=RECIPE, show=_lr_in_default,
               help="Learning rate of the input-channel scales.")
@config_option("--batch-size", type=int, source=TRAIN, prefix=RECIPE)
@click.option("--resolution", type=int, default=None,
              help="Training size in pixels (default: the base's native size).")
@config_option("--seed", type=int, source=TRAIN, prefix=RECIPE)
@address_option
@click.option("--actors", type=int, default=None,
              help="Number of fine-tuning actors (default: one per GPU, else CPUs / "
                   "cpus-per-actor).")
@click.option("--num-gpus-per-actor", type=float, default=None,
              help="GPUs per actor, fractional allowed (default 1 if the cluster has GPUs, "
                   "else 0). Set it on autoscaling clusters whose GPU nodes are not up yet.")
@click.option("--cpus-per-actor", type=float, default=None,
              help="CPUs per actor; its torch threads (default 1 with GPUs, else all up to 8).")
@storage_option
@click.option("--shared-output", is_flag=True, default=None,
              help="Declare a local --output folder mounted on every node at the same "
                   "path (NFS, say). Without it a local --output is refused on a "
                   "multi-node cluster; use s3:// there.")
@config_option("--device", type=click.Choice(["auto", "cpu", "cuda"]), source=WORK,
               help="Where actors compute: auto (their GPU if they have one), cpu, cuda.")
@config_option("--checkpoint-every", type=int, source=WORK,
               help="Save scales and optimiser state to storage every K steps, so a "
                    "retried subject resumes there (0: never).")
@config_option("--resume/--no-resume", source=SUBMIT,
               show=lambda on: "resume" if on else "no-resume",
               help="Skip subjects whose artefacts are finished and verified.")
@config_option("--max-retries", type=int, source=SUBMIT,
               help="Retries of a subject whose actor died.")
@config_option("--schedule-timeout", type=float, source=SUBMIT,
               help="Seconds a new fine-tuning actor may take to be placed and load its "
                    "base; past it the pool shrinks, or with no actor left the "
                    "remaining subjects fail naming the resources an actor needs.")
@click.option("--subject-timeout", type=float, default=None,
              help="Seconds one try of a subject may take before its actor is taken for "
                   "hung, killed and the subject retried (default: 5 x steps x the "
                   "slowest measured seconds per step, at least 300; 3600 until a "
                   "subject has finished).")
@config_option("--samples", type=int, source=WORK, help="Sample images per subject (0: none).")
@config_option("--sample-steps", type=int, source=WORK, prefix=RECIPE)
@config_option("--guidance-scale", type=float, source=WORK, prefix=RECIPE)
@config_option("--scales-dtype", type=click.Choice(["float32", "float16"]), source=WORK)
@config_option("--min-image-side", type=int, source=WORK,
               help="Refuse photos whose shorter side is smaller (pixels).")
def submit_command(manifest: str, storage_options: dict[str, Any], **options: Any) -> None:
    """Train one scale set per subject of SUBJECTS_CSV.

    Every row is checked first (errors name file, line and column; exit status 2, nothing
    launched). The base is quantized once per content address and reused by later
    submits; finished subjects are verified and skipped. Training settings come from
    the options, else the base's recipe (tuneqdm_recipe.json in its folder), else the
    library's defaults. Exit status 1 if any subject failed.
    """
    config = SubmitConfig(manifest=manifest, storage_options=storage_options,
                          **given(**options))
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


@click.command("status")
@click.argument("output")
@storage_option
@click.option("--verify", is_flag=True,
              help="Also re-check each finished subject (checksums, scale set loads).")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
def status_command(output: str, storage_options: dict[str, Any], verify: bool,
                   as_json: bool) -> None:
    """Print the subject table of OUTPUT (a submit's --output) from storage alone."""
    try:
        storage = Storage(output, storage_options)
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
