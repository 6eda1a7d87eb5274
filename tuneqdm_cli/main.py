"""The `tuneqdm-pipeline` command: one click group over the pipeline and the service.

    submit            train one scale set per subject of a CSV, on Ray   (submit.py)
    status            the subject table of an output, from storage alone  (submit.py)
    serve             every subject over HTTP with Ray Serve               (serve.py)
    generate          images of one subject, without Serve                 (serve.py)
    import-reference  the authors' released checkpoint -> a base and a subject in
                      storage                                              (import_reference.py)

This package sits above `pipeline/` and `deploy/` and nothing imports it. Commands
are thin: parse options -> a config -> call the library -> print.
"""

from __future__ import annotations

import click

from .import_reference import import_reference_command
from .serve import generate_command, serve_command
from .submit import status_command, submit_command


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="tuneqdm-pipeline")
def main() -> None:
    """Personalise a quantized Stable-Diffusion UNet per subject with TuneQDM
    (arXiv 2401.04339): one small scale set per subject, trained on Ray."""


for command in (submit_command, status_command, serve_command, generate_command,
                import_reference_command):
    main.add_command(command)


if __name__ == "__main__":
    main()
