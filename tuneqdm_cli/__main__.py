"""`python -m tuneqdm_cli ...`: the same as the `tuneqdm-pipeline` console script."""

from .main import main

main(prog_name="tuneqdm-pipeline")
