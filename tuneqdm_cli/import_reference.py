"""`tuneqdm-pipeline import-reference`: options -> ReferenceImport ->
pipeline.reference.import_reference -> print.

Exit status: 0 imported; 1 the checkpoint or storage could not be read or written;
2 invalid options (subject id, token, prompt, an existing subject), nothing written.
"""

from __future__ import annotations

from typing import Any

import click

from pipeline.reference import ReferenceImport, ReferenceImportError, import_reference
from pipeline.store import Storage, StorageError, base_rel

from .options import INPUT_ERROR, config_option, given, storage_option

REQUEST = "pipeline.reference:ReferenceImport"


@click.command("import-reference")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.option("--base-model", required=True,
              help="The float diffusers pipeline (hub id or folder) the checkpoint was "
                   "made from, e.g. CompVis/stable-diffusion-v1-4.")
@click.option("--subject-id", required=True, help="The subject's id (its folder name).")
@click.option("--class", "class_noun", required=True, help="The class noun, e.g. dog.")
@config_option("--token", source=REQUEST, help="The identifier word of the prompts.")
@config_option("--prompt", source=REQUEST,
               help="Instance prompt template with {token} and {class_noun}.")
@click.option("-o", "--output", required=True,
              help="Local folder or s3://bucket/prefix (a submit's --output, or a new one).")
@storage_option
@click.option("--overwrite", is_flag=True, help="Replace a finished subject of that id.")
def import_reference_command(checkpoint: str, output: str, storage_options: dict[str, Any],
                             **options: Any) -> None:
    """Import CHECKPOINT, written by the TuneQDM authors' released implementation.

    Its integers, zero points and per-expert scales become a quantized base under
    OUTPUT/bases/ (shared by every checkpoint of the same quantized model) and one
    subject under OUTPUT/subjects/, which `status`, `serve` and `generate` then use
    like a trained one. The file is read with torch.load(weights_only=True): files
    holding code are refused.
    """
    request = ReferenceImport(checkpoint=checkpoint, **given(**options))
    try:
        storage = Storage(output, storage_options)
        result = import_reference(request, storage)
    except ReferenceImportError as err:
        click.echo(f"Error: {err}; nothing was written", err=True)
        raise SystemExit(INPUT_ERROR) from None
    except (ValueError, StorageError, OSError) as err:  # the checkpoint, the model, storage
        raise click.ClickException(str(err)) from None
    base = result.base
    quant = base.quant_config
    how = ", ".join(f"{n} {source}" for source, n in sorted(result.scale0_source.items()))
    click.echo(f"imported {checkpoint}: {quant['bits']}-bit {quant['method']}, "
               f"N={quant['num_experts']}, {result.layers} layers (s0: {how})")
    state = "written" if result.base_written else "already there, reused"
    click.echo(f"base     {storage.uri(base_rel(base.address))} ({state}; fingerprint "
               f"{base.fingerprint[:12]})")
    click.echo(f"subject  {result.subject_uri}")
    click.echo(f"serve it: tuneqdm-pipeline serve {storage.root} --base {base.address}")
