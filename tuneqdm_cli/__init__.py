"""tuneqdm_cli: the `tuneqdm-pipeline` command line (click), the top of the package
stack: it imports `pipeline` and `deploy`, and nothing imports it. The group is
`tuneqdm_cli.main:main`; `python -m tuneqdm_cli` runs it too."""
